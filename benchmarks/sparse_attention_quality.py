"""Density and output error of the block-selection methods against dense causal attention (CPU).

For each sequence length, the attention inputs (Q, K, V after RoPE) of every layer of a model
are recorded by wrapping `F.scaled_dot_product_attention` during one forward pass; each method
then selects blocks and the attention restricted to them is compared with dense causal
attention: density = fraction of causal blocks computed, error = ‖out − dense‖ / ‖dense‖,
averaged over layers. Stem is also run with a uniform top-k (budget_decay = 0) and with
score-only ranking (no value norm), for the paper's two comparisons.

The model is the toy LLaMA of `angel_compile.models` (random weights, random token ids):
`angel_compile.eval` has no recorder for a real model's attention inputs yet, and random
weights give attention with little structure, so these numbers say how the methods behave,
not how they do on a trained model.

    python -m benchmarks.sparse_attention_quality [--seqs 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import torch
import torch.nn.functional as F

from angel_compile.models import build_toy_model
from angel_compile.ops.sparse_attention import block_masked_attention, dense_causal_attention
from angel_compile.sparse.selection import SparseAttentionConfig, block_density, select_blocks

BLOCK = 64

# name -> (config, output_aware); budgets in 64-token blocks
VARIANTS: dict[str, tuple[SparseAttentionConfig, bool]] = {
    "static (sink 1, local 7)": (SparseAttentionConfig("static", BLOCK, 0, 1, 7), True),
    "stem (top_k 8, decay 0.5)": (SparseAttentionConfig("stem", BLOCK, 0, 1, 2, top_k=8, budget_decay=0.5), True),
    "stem uniform (top_k 6)": (SparseAttentionConfig("stem", BLOCK, 0, 1, 2, top_k=6, budget_decay=0.0), True),
    "stem score-only (top_k 8, decay 0.5)": (
        SparseAttentionConfig("stem", BLOCK, 0, 1, 2, top_k=8, budget_decay=0.5),
        False,
    ),
    "s2o (threshold 0.02)": (SparseAttentionConfig("s2o", BLOCK, 0, 1, 2, threshold=0.02), True),
    "s2o (threshold 0.1)": (SparseAttentionConfig("s2o", BLOCK, 0, 1, 2, threshold=0.1), True),
}


def record_attention_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, scale) of every SDPA call of one forward pass."""
    recorded = []
    sdpa: Callable = F.scaled_dot_product_attention

    def recording(q, k, v, *args, scale=None, **kwargs):
        recorded.append((q, k, v, scale if scale is not None else q.shape[-1] ** -0.5))
        return sdpa(q, k, v, *args, scale=scale, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        F.scaled_dot_product_attention = sdpa
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args()
    model = build_toy_model("llama", max_positions=max(args.seqs))
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} CPU, torch {torch.__version__}")
    print("# Q/K/V recorded from the toy LLaMA (random weights, random ids; no real-model recorder yet)")
    print(f"# block {BLOCK} tokens; density and relative error averaged over the model's layers")
    print("| seq | method | density | rel. error vs dense |")
    print("|---|---|---|---|")
    for seq in args.seqs:
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
        layers = record_attention_inputs(model, ids)
        for name, (config, output_aware) in VARIANTS.items():
            densities, errors = [], []
            for q, k, v, scale in layers:
                with torch.no_grad():
                    dense = dense_causal_attention(q, k, v, scale)
                    mask = select_blocks(q, k, v, config, scale, output_aware=output_aware)
                    out = block_masked_attention(q, k, v, mask, scale, BLOCK)
                densities.append(block_density(mask))
                errors.append(((out - dense).norm() / dense.norm()).item())
            print(f"| {seq} | {name} | {sum(densities) / len(densities):.3f} | {sum(errors) / len(errors):.4f} |")


if __name__ == "__main__":
    main()
