#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: compile an example transformers
# model with the int8-weight-only recipe, check its accuracy, export ONNX and run it in
# onnxruntime. Outputs (ONNX model, per-stage debug dumps) go to angel_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/angel-compile run "${1:-int8-weight-only}" --onnx angel_out/model.onnx --debug-dir angel_out/debug
