"""Helpers shared by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def dynamic_batch_seq() -> dict:
    return {"input_ids": {0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=256)}}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def outlier_layer(k: int = 256, n: int = 96, rows: int = 1024, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A synthetic linear layer for quantization tests: (weight [N, K], x_calibration, x_held_out).

    Activations are correlated (a shared low-rank part) with 8 outlier channels 20× larger, as
    in LLM hidden states; the weight has heavy-tailed rows. Held-out rows come from the same
    distribution with fresh samples.
    """
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(16, k, generator=g)

    def activations(count: int) -> torch.Tensor:
        x = torch.randn(count, 16, generator=g) @ mixing + torch.randn(count, k, generator=g)
        x[:, :8] *= 20
        return x

    weight = torch.randn(n, k, generator=g) * 0.02 * torch.rand(n, 1, generator=g).add(0.5)
    return weight, activations(rows), activations(rows // 2)


def ptx_from_fresh_process(module: str) -> dict[str, str]:
    """`module.ptx_for_sm90()` (kernel name -> PTX for an H100) run in a fresh Python process.

    The interpreter replaced triton.language's own jit functions at import, so the kernels are
    compiled where TRITON_INTERPRET is unset; no GPU is needed to compile.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json; from {module} import ptx_for_sm90 as f; print(json.dumps(f()))"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
