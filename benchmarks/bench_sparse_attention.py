"""angel::sparse_attention (selection + Triton block-sparse kernel) vs dense causal SDPA, on a GPU.

Llama-8B attention shape: batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, at 8K, 32K
and 128K tokens. Same-run medians of `triton.testing.do_bench` (few repetitions at 128K).
The dense baseline is the fastest SDPA backend torch offers here, tried in turn: cuDNN and
FlashAttention-2 (K/V repeated to 32 heads beforehand, outside the timing, for backends that
do not take GQA). Each sparse row times the whole op (block selection included) with the
built-in recipes' parameters, and reports its density (fraction of causal blocks computed)
and the relative error of its output against the dense output. The last rows time the
kernel alone at 100% density against the dense baseline.

Q/K/V are random here: timings do not depend on the values, but the dynamic methods'
density does (random keys have flat attention, so s2o stays dense); see
`benchmarks/sparse_attention_quality.py` for density and error on recorded attention inputs.

    python -m benchmarks.bench_sparse_attention [--seqs 8192 32768 131072]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import angel_compile  # noqa: F401  (registers the op and its CUDA kernel)
from angel_compile.kernels.block_sparse_attention import block_sparse_attention_triton
from angel_compile.recipe import load_recipe
from angel_compile.sparse.selection import (
    SparseAttentionConfig,
    block_density,
    block_mask_to_index,
    causal_block_mask,
    select_blocks,
)

HEADS, KV_HEADS, DIM = 32, 8, 128
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
RECIPES = ("sparse-attention-static", "sparse-attention-stem", "sparse-attention-s2o")


def _bench(fn, seq: int) -> float:
    # 128K dense takes ~0.25 s a call: a few repetitions are enough for a stable median.
    warmup, rep = (25, 200) if seq <= 32768 else (2, 1500)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _config(recipe: str) -> SparseAttentionConfig:
    (spec,) = load_recipe(recipe).passes
    return SparseAttentionConfig(**{**spec.options, "min_seq_len": 0})


def bench_seq(seq: int) -> None:
    """Print the table rows of one sequence length (its tensors are freed on return)."""
    scale = DIM**-0.5
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_rep, v_rep = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)

    dense_ms, dense_out, dense_name = float("inf"), None, ""
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                out = dense()
                ms = _bench(dense, seq)
        except RuntimeError as exc:
            print(f"| {seq} | dense SDPA {name} | unavailable: {str(exc).splitlines()[0][:60]} | | | |")
            continue
        print(f"| {seq} | dense SDPA {name} | {ms:.2f} | | 1.000 | |")
        if ms < dense_ms:
            dense_ms, dense_out, dense_name = ms, out, name
    versus = f"x vs {dense_name}"
    for recipe in RECIPES:
        c = _config(recipe)
        params = (c.method, c.block_size, 0, c.sink_blocks, c.local_blocks, c.top_k, c.budget_decay, c.threshold)

        def sparse(params=params) -> torch.Tensor:
            return torch.ops.angel.sparse_attention(q, k, v, scale, *params)

        def selection(c=c) -> tuple[torch.Tensor, torch.Tensor]:
            return block_mask_to_index(select_blocks(q, k, v, c, scale))

        error = _relative_error(sparse(), dense_out)
        density = block_density(select_blocks(q, k, v, c, scale))
        ms, select_ms = _bench(sparse, seq), _bench(selection, seq)
        what = f"{c.method} (op; selection alone {select_ms:.2f} ms)"
        print(f"| {seq} | {what} | {ms:.2f} | {dense_ms / ms:.2f}{versus} | {density:.3f} | {error:.2e} |")
    n = -(-seq // 128)
    index, count = block_mask_to_index(causal_block_mask(n, "cuda").expand(1, HEADS, n, n))

    def full_kernel() -> torch.Tensor:
        return block_sparse_attention_triton(q, k, v, index, count, scale, 128)

    error = _relative_error(full_kernel(), dense_out)
    ms = _bench(full_kernel, seq)
    print(f"| {seq} | kernel at 100% density | {ms:.2f} | {dense_ms / ms:.2f}{versus} | 1.000 | {error:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"# B=1, {HEADS} q heads / {KV_HEADS} kv heads, d={DIM}, bf16, causal; times in ms (median)")
    print("# goals (issue 5): sparse >= 8x dense at 128K, >= 3x at 32K; kernel at 100% density >= 0.8x dense")
    print("| seq | what | ms | speedup vs dense | density | rel. error |")
    print("|---|---|---|---|---|---|")
    for seq in args.seqs:
        bench_seq(seq)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
