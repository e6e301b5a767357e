"""Greedy Maximal Marginal Relevance selection in Triton (reference: `ops/prune_tokens.py`).

One program per batch row runs the whole greedy loop over N ≤ 16K tokens. It keeps a running
max-similarity vector max_sim [N] (fp32, in a scratch buffer) instead of an N×N similarity
matrix: each step scans N in tiles for argmax λ·imp − (1 − λ)·max_sim (the first step: argmax
imp; picked tokens are marked with max_sim = +inf and never picked again; ties go to the lower
index), then raises max_sim with the similarities of every token to the new pick, computed
tile by tile over N and D (fp32 accumulation). Work per step is N·D, memory N·D + N.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16384


@triton.jit
def _mmr_select_kernel(
    x_ptr,  # [B, N, D] unit-norm features
    imp_ptr,  # [B, N] fp32 importance
    max_sim_ptr,  # [B, N] fp32 scratch, zeros on entry
    out_ptr,  # [B, keep] int64 picks, in pick order
    N,
    D,
    keep,
    lambda_,
    stride_xb,
    stride_xn,
    stride_ib,
    stride_mb,
    stride_ob,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    x_row = x_ptr + b * stride_xb
    imp_row = imp_ptr + b * stride_ib
    sim_row = max_sim_ptr + b * stride_mb
    for step in range(keep):
        best_score = -float("inf")
        best_index = 0
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            valid = offs < N
            imp = tl.load(imp_row + offs, mask=valid, other=0.0)
            max_sim = tl.load(sim_row + offs, mask=valid, other=0.0)
            open_ = valid & (max_sim != float("inf"))
            score = lambda_ * imp - (1.0 - lambda_) * tl.where(open_, max_sim, 0.0)
            if step == 0:
                score = imp
            score = tl.where(open_, score, -float("inf"))
            tile_best = tl.max(score, axis=0)
            tile_index = tl.argmax(score, axis=0) + n0
            better = tile_best > best_score  # strict: an earlier tile wins a tie
            best_index = tl.where(better, tile_index, best_index)
            best_score = tl.where(better, tile_best, best_score)
        tl.store(out_ptr + b * stride_ob + step, best_index.to(tl.int64))
        picked = x_row + best_index * stride_xn
        for n0 in range(0, N, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            valid = offs < N
            sim = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                in_d = dims < D
                xs = tl.load(picked + dims, mask=in_d, other=0.0).to(tl.float32)  # [BLOCK_D]
                tile = tl.load(
                    x_row + offs[:, None] * stride_xn + dims[None, :], mask=valid[:, None] & in_d[None, :], other=0.0
                ).to(tl.float32)  # [BLOCK_N, BLOCK_D]
                sim += tl.sum(tile * xs[None, :], axis=1)
            max_sim = tl.load(sim_row + offs, mask=valid, other=0.0)
            max_sim = tl.maximum(max_sim, sim)
            max_sim = tl.where(offs == best_index, float("inf"), max_sim)
            tl.store(sim_row + offs, max_sim, mask=valid)
        # The next step reads max_sim written by other threads of this program.
        tl.debug_barrier()


def mmr_select_triton(
    features: torch.Tensor, importance: torch.Tensor, keep: int, lambda_: float, config: dict | None = None
) -> torch.Tensor:
    """Greedy MMR over unit-norm features [B, N, D] (fp32/fp16/bf16) -> picks [B, keep] int64, in pick order."""
    batch, count, dim = features.shape
    if count > MAX_TOKENS:
        raise ValueError(f"mmr_select_triton: {count} tokens exceed the kernel's limit of {MAX_TOKENS}")
    if not 0 < keep <= count:
        raise ValueError(f"mmr_select_triton: keep={keep} must be in [1, {count}]")
    x = features.contiguous()
    imp = importance.float().contiguous()
    max_sim = torch.zeros(batch, count, dtype=torch.float32, device=x.device)
    out = torch.empty(batch, keep, dtype=torch.int64, device=x.device)
    config = config or {"BLOCK_N": 128, "BLOCK_D": 64, "num_warps": 8}
    _mmr_select_kernel[(batch,)](
        x,
        imp,
        max_sim,
        out,
        count,
        dim,
        keep,
        float(lambda_),
        x.stride(0),
        x.stride(1),
        imp.stride(0),
        max_sim.stride(0),
        out.stride(0),
        **config,
    )
    return out
