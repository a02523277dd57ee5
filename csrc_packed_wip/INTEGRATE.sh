#!/bin/bash
# Moves the packed kernels into csrc/ and adds their bindings (run once from the repo root, after
# helper B's csrc/setup.py work is committed).  Then: python setup.py build_ext --inplace && pytest tests/test_packed.py
set -euo pipefail
git mv csrc_packed_wip/sq_packed.h csrc_packed_wip/packed_ref.c csrc_packed_wip/packed_avx2.c csrc_packed_wip/packed_avx512.c csrc/
python3 csrc_packed_wip/apply_bindings.py .
python3 - <<'PY'
from pathlib import Path
p = Path("csrc/sq_kernels.h"); s = p.read_text()
old = "/* dispatch.c */"
assert s.count(old) == 1
s = s.replace(old, "/* The packed low-bit matmul (y = x W^T from 2/3/4/8-bit codes) has its layout and API in\n"
                   " * sq_packed.h; dispatch.c picks its kernels with sq_pk_kernel(). */\n\n/* dispatch.c */")
p.write_text(s)
PY
git rm -q csrc_packed_wip/apply_bindings.py csrc_packed_wip/module_packed_snippet.c csrc_packed_wip/dispatch_packed_snippet.c csrc_packed_wip/INTEGRATE.sh
