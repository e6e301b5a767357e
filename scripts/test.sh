#!/usr/bin/env bash
# Set up, then lint and run the CPU test suite (Triton kernels run under its interpreter;
# tests marked `gpu` are skipped without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check angel_compile tests benchmarks examples
.venv/bin/ruff format --check angel_compile tests benchmarks examples
.venv/bin/python -m pytest -m "not gpu" "$@"
