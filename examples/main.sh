#!/usr/bin/env bash
# The main job of the README: set up a fresh machine and run the kernel benchmark.
# (Replaced by quantizing a real model once the calibration engine lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[data]"
python3 -m sliderquant.bench kernels "$@"
