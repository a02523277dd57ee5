"""Adds the packed-matmul bindings to csrc/module.c and csrc/dispatch.c (run once, from the repo root)."""
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
wip = Path(__file__).parent
mod = (root / "csrc/module.c").read_text()

def sub(text, old, new, count=1):
    assert text.count(old) == count, (old, text.count(old))
    return text.replace(old, new)

mod = sub(mod, '#include "sq_kernels.h"\n', '#include "sq_kernels.h"\n#include "sq_packed.h"\n')
mod = sub(mod, "    const sq_kernel_table *kernels;\n} module_state;",
          "    const sq_kernel_table *kernels;\n    sq_pk_matmul_fn pk_matmul; /* packed low-bit matmul (sq_packed.h) */\n"
          "    const char *pk_name;\n} module_state;")
snippet = (wip / "module_packed_snippet.c").read_text()
mod = sub(mod, "/* ------------------------------------------------------------------ backend selection */",
          snippet + "\n/* ------------------------------------------------------------------ backend selection */")
old_sel = """    const sq_kernel_table *t = NULL;
    if (strcmp(name, "ref") == 0) {"""
new_sel = """    const sq_kernel_table *t = NULL;
    /* the packed kernels follow: ref -> ref, avx2 -> avx2, auto -> the best (AVX-512 where present);
     * 'avx512' selects the avx2 table for everything else */
    const char *pk_isa = strcmp(name, "avx512") == 0 ? "avx512" : name;
    if (strcmp(name, "avx512") == 0) {
        t = sq_kernels_avx2();
        if (!t || !sq_pk_kernel("avx512", NULL)) {
            PyErr_SetString(PyExc_RuntimeError, "this CPU does not support AVX-512F, AVX2 and FMA");
            return NULL;
        }
    } else if (strcmp(name, "ref") == 0) {"""
mod = sub(mod, old_sel, new_sel)
mod = sub(mod, """    get_state(module)->kernels = t;
    Py_RETURN_NONE;""", """    module_state *st = get_state(module);
    st->kernels = t;
    st->pk_matmul = sq_pk_kernel(pk_isa, &st->pk_name);
    Py_RETURN_NONE;""")
mod = sub(mod, "(expected 'ref', 'avx2' or 'auto';", "(expected 'ref', 'avx2', 'avx512' or 'auto';")
mod = sub(mod, "    st->kernels = sq_kernels_best();\n",
          "    st->kernels = sq_kernels_best();\n    st->pk_matmul = sq_pk_kernel(\"auto\", &st->pk_name);\n")
mod = sub(mod, "    {NULL, NULL, 0, NULL},\n};",
          """    {"pk_matmul", (PyCFunction)(void (*)(void))pk_matmul, METH_FASTCALL, pk_matmul_doc},
    {"packed_backend", packed_backend, METH_NOARGS,
     "packed_backend()\\n--\\n\\nName of the active packed matmul kernels: 'avx512', 'avx2' or 'ref'."},
    {NULL, NULL, 0, NULL},
};""")
(root / "csrc/module.c").write_text(mod)

disp = (root / "csrc/dispatch.c").read_text()
disp = sub(disp, '#include "sq_kernels.h"\n', '#include <string.h>\n\n#include "sq_kernels.h"\n#include "sq_packed.h"\n')
disp = disp.rstrip("\n") + "\n\n" + (wip / "dispatch_packed_snippet.c").read_text()
disp = sub(disp, " * The binding layer picks one table at import (SLIDERQUANT_ISA=ref|avx2 overrides the choice).",
           " * The binding layer picks one table at import (SLIDERQUANT_ISA=ref|avx2|avx512 overrides the choice;\n"
           " * the packed matmul kernels of sq_packed.h follow it, AVX-512 where the CPU has it).")
(root / "csrc/dispatch.c").write_text(disp)
print("patched")
