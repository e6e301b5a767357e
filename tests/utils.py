"""Helpers shared by tests."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def compile_sm90_ptx(
    fn: Any,
    types: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int,
    aligned: Callable[[str, str], bool] = lambda name, type_: True,
    **options: Any,
) -> str:
    """PTX of the Triton kernel `fn` for an H100 (sm_90), compiled ahead of time without a GPU.

    Arguments in `constexprs` are constexpr; the others have their Triton type from `types`, else
    i32. `aligned(name, type)` picks the arguments marked divisible by 16, as the launchers'
    specialization marks Llama-shaped pointers, sizes and strides (default: every one). Call it
    in a process without TRITON_INTERPRET (`ptx_from_fresh_process`).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(fn.arg_names)
        if signature[a] != "constexpr" and aligned(a, signature[a])
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **options}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


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
