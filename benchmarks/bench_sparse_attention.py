"""angel::sparse_attention (selection + Triton block-sparse kernel) vs dense causal SDPA, on a GPU.

Llama-8B attention shape: batch 1, 32 query heads, 8 KV heads, head dim 128, bf16, at 8K, 32K
and 128K tokens. Same-run medians of `triton.testing.do_bench` (few repetitions at 128K).
The dense baseline is the fastest SDPA backend torch offers here, tried in turn: cuDNN and
FlashAttention-2 (K/V repeated to 32 heads beforehand, outside the timing, for backends that
do not take GQA). Each sparse row times the whole op (block selection included) with the
built-in recipes' parameters, and reports its density (fraction of causal blocks computed)
and the relative error of its output against the dense output. The last rows time the
kernel alone at 100% density against the dense baseline.

With --variants it times instead every launch config of the kernel's `VARIANTS` at 100%
density against the dense baseline, each checked against the dense output first; a variant
that fails to compile or to match is reported as such.

Q/K/V are random here: timings do not depend on the values, but the dynamic methods'
density does (random keys have flat attention, so s2o stays dense); see
`benchmarks/sparse_attention_quality.py` for density and error on recorded attention inputs.

    python -m benchmarks.bench_sparse_attention [--seqs 8192 32768 131072] [--variants]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import angel_compile  # noqa: F401  (registers the op and its CUDA kernel)
from angel_compile.kernels.block_sparse_attention import VARIANTS, block_sparse_attention_triton
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


def _inputs(seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, KV_HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def _dense_baselines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> dict:
    """{backend: (ms, output) or the reason it is unavailable} of dense causal SDPA."""
    seq = q.shape[2]
    k_rep, v_rep = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=scale)

    results = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                results[name] = (_bench(dense, seq), dense())
        except RuntimeError as exc:
            results[name] = str(exc).splitlines()[0][:60]
    return results


def _fastest(baselines: dict) -> tuple[str, float, torch.Tensor]:
    name, (ms, out) = min(((n, r) for n, r in baselines.items() if isinstance(r, tuple)), key=lambda x: x[1][0])
    return name, ms, out


def _full_index(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = -(-seq // 128)
    return block_mask_to_index(causal_block_mask(n, "cuda").expand(1, HEADS, n, n))


def bench_seq(seq: int) -> None:
    """Print the table rows of one sequence length (its tensors are freed on return)."""
    scale = DIM**-0.5
    q, k, v = _inputs(seq)
    baselines = _dense_baselines(q, k, v, scale)
    for name, result in baselines.items():
        if isinstance(result, str):
            print(f"| {seq} | dense SDPA {name} | unavailable: {result} | | | |")
        else:
            print(f"| {seq} | dense SDPA {name} | {result[0]:.2f} | | 1.000 | |")
    dense_name, dense_ms, dense_out = _fastest(baselines)
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
    index, count = _full_index(seq)

    def full_kernel() -> torch.Tensor:
        return block_sparse_attention_triton(q, k, v, index, count, scale, 128)

    error = _relative_error(full_kernel(), dense_out)
    ms = _bench(full_kernel, seq)
    print(f"| {seq} | kernel at 100% density | {ms:.2f} | {dense_ms / ms:.2f}{versus} | 1.000 | {error:.2e} |")


def bench_variants(seq: int) -> None:
    """Print one row per kernel variant at 100% density, and the dense baseline's row."""
    scale = DIM**-0.5
    q, k, v = _inputs(seq)
    dense_name, dense_ms, dense_out = _fastest(_dense_baselines(q, k, v, scale))
    causal_flop = 4 * HEADS * seq * seq * DIM / 2  # q·kᵀ and p·v over the causal half

    def row(what: str, ms: float) -> str:
        return f"| {seq} | {what} | {ms:.2f} | {dense_ms / ms:.3f} | {causal_flop / ms / 1e9:.0f} |"

    print(row(f"dense SDPA {dense_name}", dense_ms))
    index, count = _full_index(seq)
    for name, config in VARIANTS.items():

        def kernel(config=config) -> torch.Tensor:
            return block_sparse_attention_triton(q, k, v, index, count, scale, 128, config=config)

        try:
            error = _relative_error(kernel(), dense_out)
        except Exception as exc:  # a compile or launch failure of one variant, not of the run
            print(f"| {seq} | {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]} | | |")
            continue
        if error >= 1e-2:
            print(f"| {seq} | {name} | wrong: rel. error {error:.2e} vs SDPA | | |")
            continue
        print(row(name, _bench(kernel, seq)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--variants", action="store_true", help="time the kernel's VARIANTS at 100%% density")
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"# B=1, {HEADS} q heads / {KV_HEADS} kv heads, d={DIM}, bf16, causal; times in ms (median)")
    print("# goals (issue 5): sparse >= 8x dense at 128K, >= 3x at 32K; kernel at 100% density >= 0.8x dense")
    if args.variants:
        print("| seq | variant | ms | x vs dense | TFLOP/s |")
        print("|---|---|---|---|---|")
    else:
        print("| seq | what | ms | speedup vs dense | density | rel. error |")
        print("|---|---|---|---|---|---|")
    for seq in args.seqs:
        (bench_variants if args.variants else bench_seq)(seq)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
