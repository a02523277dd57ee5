#!/usr/bin/env bash
# The sanitizer step of CI (tests/run.sh calls it): builds sliderquant._C with AddressSanitizer and
# UndefinedBehaviorSanitizer in its own build directory (the normal in-place build is untouched),
# then runs the randomized bad-input test of the C entry points and the kernel tests against that
# build.  Any sanitizer report fails the step (every check is fatal: -fno-sanitize-recover=all,
# halt_on_error=1).  Prints the number of bad-input calls and of sanitizer reports at the end.
#
# Python itself is not instrumented, so the ASan runtime is preloaded (LD_PRELOAD); leak detection is
# off because CPython and torch keep memory until exit by design.  The leak/RSS test of the kernel
# tests is left out here: ASan's quarantine holds freed memory back on purpose, so RSS grows.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/build/sanitize
rm -rf "$out"
mkdir -p "$out/pkg" "$out/logs"

cc=$(python3 -c "import sysconfig; print((sysconfig.get_config_var('CC') or 'cc').split()[0])")
libasan=$("$cc" -print-file-name=libasan.so)
if [ ! -f "$libasan" ]; then
    echo "sanitize: $cc has no AddressSanitizer runtime (libasan.so); install it with the compiler" >&2
    exit 1
fi

echo "sanitize: building sliderquant._C with -fsanitize=address,undefined ($cc)"
if ! SLIDERQUANT_SANITIZE=1 python3 setup.py -q build_ext --build-temp "$out/tmp" --build-lib "$out/lib" --force \
        >"$out/build.log" 2>&1; then
    cat "$out/build.log" >&2
    exit 1
fi
# a copy of the package with the instrumented extension; imported from its own directory below
tar --exclude='_C*.so' --exclude=__pycache__ -cf - sliderquant | tar -xf - -C "$out/pkg"
cp "$out"/lib/sliderquant/_C*.so "$out/pkg/sliderquant/"

# libstdc++ right after the ASan runtime: ASan finds the real __cxa_throw when it starts, and torch
# throws C++ exceptions (e.g. exporting a meta tensor through DLPack), which would otherwise abort.
libstdcxx=$("$cc" -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$out/logs/asan
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$out/logs/ubsan
export PYTHONPATH=$out/pkg
cd "$out/pkg"

status=0
python3 -c "import sliderquant._C as c; assert c.__file__.startswith('$out/pkg'), c.__file__" || status=1
calls=0
if [ $status -eq 0 ]; then
    if python3 "$root/tests/test_c_badinput.py" >"$out/badinput.txt" 2>&1; then
        calls=$(sed -n 's/^bad-input calls: \([0-9]*\).*/\1/p' "$out/badinput.txt")
    else
        status=1
    fi
    cat "$out/badinput.txt"
    python3 -m pytest -q -p no:cacheprovider "$root/tests/test_kernels.py" "$root/tests/test_c_badinput.py" \
        "$root/tests/test_packed.py" -k "not memory_leaks and not smollm2 and not load_packed" || status=1
fi

reports=0
for f in "$out"/logs/*; do
    [ -e "$f" ] || continue
    cat "$f" >&2
    n=$(grep -cE "ERROR: AddressSanitizer|runtime error:" "$f" || true)
    reports=$((reports + (n > 0 ? n : 1)))
done
echo "sanitize: bad-input calls: ${calls:-0}, sanitizer reports: $reports"
if [ $reports -gt 0 ] || [ $status -ne 0 ]; then
    echo "sanitize: FAILED" >&2
    exit 1
fi
echo "sanitize: passed"
