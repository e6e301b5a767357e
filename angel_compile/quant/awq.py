"""AWQ (Lin et al., 2023): activation-aware input-channel scales for group-wise INT4.

Weights that meet large activations matter most. Scaling input channel k of W up by s_k
(W' = W · diag(s)) and the activation down (x' = x / s) leaves W x unchanged in float, while
RTN of W' rounds the salient columns on a finer relative grid. The scale follows the mean
activation magnitude, s = mean|x|^α (normalised so that √(max s · min s) = 1), and α is chosen
on a grid over [0, 1] to minimise the layer's output error on calibration rows:
    err(α) = mean((Q(W · s) (x / s)ᵀ − W xᵀ)²),   Q = RTN in the `ops/int4.py` format
α = 0 is plain RTN, so the chosen α is never worse than RTN on the calibration rows.

The returned s must be applied on both sides: W ← W · s (quantize that), x ← x / s (the pass
folds 1/s into the norm that produces x, or inserts a multiply; passes/quantize/smoothing.py).
Layers that read one activation (q, k, v) share one s: search with their weights concatenated
along N.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from angel_compile.ops.int4 import Int4Weight, dequantize_int4, int4_supported, quantize_int4_rtn


class AWQSearch(NamedTuple):
    scales: torch.Tensor  # float32 [K]: W ← W · s, x ← x / s
    alpha: float
    errors: torch.Tensor  # float32 [grid + 1]: output MSE for α = i / grid


def awq_search(
    w: torch.Tensor,
    x_sample: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    grid: int = 20,
    scale_dtype: torch.dtype | None = None,
) -> AWQSearch:
    """Grid-search α for weight w [N, K] on calibration rows x_sample [R, K]; returns AWQSearch.

    `scale_dtype` is the dtype the group scales will be stored in (default w's dtype), so the
    search measures the rounding that will be deployed.
    """
    reason = int4_supported(w.shape[1], group_size)
    if reason:
        raise ValueError(reason)
    if x_sample.dim() != 2 or x_sample.shape[1] != w.shape[1]:
        raise ValueError(f"x_sample must be [R, {w.shape[1]}], got {tuple(x_sample.shape)}")
    weight, x = w.detach().float(), x_sample.detach().float()
    scale_dtype = scale_dtype or w.dtype
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-4)  # [K]; dead channels keep a finite scale
    reference = x @ weight.T  # [R, N]
    errors, candidates = [], []
    for i in range(grid + 1):
        s = mean_abs.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        q = quantize_int4_rtn(weight * s, group_size, symmetric, scale_dtype)
        w_q = dequantize_int4(q.packed, q.scales, q.zeros, group_size)  # [N, K]
        errors.append(((x / s) @ w_q.T - reference).pow(2).mean())
        candidates.append(s)
    errors = torch.stack(errors)
    best = int(torch.argmin(errors))
    return AWQSearch(candidates[best], best / grid, errors)


def awq_quantize(
    w: torch.Tensor,
    x_sample: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    grid: int = 20,
    scale_dtype: torch.dtype | None = None,
) -> tuple[Int4Weight, AWQSearch]:
    """AWQ search, then RTN of W · s: the weight to use with x / s (`search.scales` = s)."""
    search = awq_search(w, x_sample, group_size, symmetric, grid, scale_dtype)
    weight = (w.detach().float() * search.scales).to(scale_dtype or w.dtype)
    return quantize_int4_rtn(weight, group_size, symmetric, scale_dtype or w.dtype), search
