"""Build of sliderquant._C: plain C11 against the CPython C API (no libtorch, no pybind11).

OpenMP is used when the compiler supports it (serial kernels otherwise).  The AVX2/FMA kernels carry
their own `#pragma GCC target`, so one build runs on any x86-64 and picks its kernels at import.
No fast-math flags: they would turn on flush-to-zero for the whole Python process.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.c"))
BASE_FLAGS = ["-std=c11", "-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]


def _compiler_accepts(compiler_cmd, flags):
    """True when the C compiler builds and links a tiny OpenMP program with `flags`."""
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file = os.path.join(tmp, "probe.c")
        with open(c_file, "w") as f:
            f.write(src)
        try:
            res = subprocess.run(compiler_cmd + [c_file, "-o", os.path.join(tmp, "probe")] + flags,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


# SLIDERQUANT_SANITIZE=1 (tests/sanitize.sh, in its own build directory): AddressSanitizer and
# UndefinedBehaviorSanitizer, every report fatal.  -fno-wrapv undoes CPython's -fwrapv, which would
# otherwise define signed overflow and hide it from UBSan.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                  "-fno-wrapv", "-O1", "-g"]


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else [shutil.which("cc") or "cc"]
        use_omp = os.environ.get("SLIDERQUANT_NO_OPENMP", "") == "" and _compiler_accepts(cc, ["-fopenmp"])
        sanitize = SANITIZE_FLAGS if os.environ.get("SLIDERQUANT_SANITIZE", "") == "1" else []
        for ext in self.extensions:
            ext.extra_compile_args = BASE_FLAGS + (["-fopenmp"] if use_omp else []) + sanitize
            ext.extra_link_args = (["-fopenmp"] if use_omp else []) + sanitize[:1]
        if not use_omp:
            print("sliderquant: OpenMP not available, building serial kernels", file=sys.stderr)
        super().build_extensions()


setup(
    ext_modules=[Extension("sliderquant._C", sources=SOURCES, include_dirs=["csrc"],
                           depends=[str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.h")])],
    cmdclass={"build_ext": BuildExt},
)
