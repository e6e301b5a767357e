"""GPTQ (Frantar et al., 2022): group-wise INT4 rounding with second-order error feedback.

Quantizes the columns of W [N, K] one at a time; the error of each column, weighted by the
inverse Hessian of the layer's reconstruction loss ‖W x − Q(W) x‖² (H = 2/n Σ x xᵀ over
calibration rows), is pushed onto the columns not yet quantized:
    U = chol(H⁻¹)ᵀ (upper)               H⁻¹ = Uᵀ U, H damped by damp · mean(diag H)
    for column j:  q_j = Q(w_j),  e_j = (w_j − q_j) / U_jj,  w_{j+1:} −= e_j U_{j, j+1:}
Columns are processed in blocks of `block_size`: inside a block the update is applied at once
to the block, and to the columns after it once per block (one matmul, "lazy batch updates").

Group scales and zero points (RTN rules of `ops/int4.py`) are computed when a group's first
column is about to be quantized, from the group's current (error-updated) weights: the min/max
range, or with several `alphas` the shrunk range α·[min, max] of the lowest squared RTN error of
those weights (`clipped_groupwise_params`; the clipping search of GPTQ's reference `mse` option,
which matters at 2 bits, where a min/max range wastes most of the four levels on outliers). With
`act_order`, columns go in order of decreasing H_jj (most activated first), but groups stay the
contiguous runs of `group_size` original columns that the format stores (no g_idx): a group's
parameters are fixed when the first of its columns comes up in that order.

Dead inputs (H_jj = 0: the channel was always zero in calibration) get H_jj = 1 and a zero
weight column, as in the reference implementation: their weight never reaches the output.
"""

from __future__ import annotations

import torch

from angel_compile.ops.int4 import (
    INT4_CLIP_GRID,
    Int4Weight,
    clipped_groupwise_params,
    int4_supported,
    make_int4_weight,
    quantize_to_codes,
)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (float64, [K, K]); λ grows 10× until H is positive definite."""
    mean_diag = torch.diag(h).mean().item()
    for attempt in range(4):
        damped = h.clone()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
    raise ValueError(f"the Hessian is not positive definite even with damping {damp * 1000} · mean(diag H)")


def gptq_groupwise(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    bits: int = 4,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
    alphas: tuple[float, ...] = (1.0,),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of a float weight [N, K] to `bits`-bit group-wise codes, with H [K, K] (fp32).

    `alphas`: the range shrink factors searched for each group's params, 1.0 (min/max) first.

    Returns float32 (codes [N, K] in 0..2^bits − 1, scale [N, K/g] rounded to `scale_dtype`
    (default w's dtype), zero [N, K/g]): W ≈ (codes − zero) · scale per group.
    """
    n, k = w.shape
    reason = int4_supported(k, group_size)
    if reason:
        raise ValueError(reason)
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}] for a weight [{n}, {k}], got {tuple(hessian.shape)}")
    scale_dtype = scale_dtype or w.dtype
    device = w.device  # everything on the weight's device (the Hessian may come from a CPU state)
    weight = w.detach().double().clone()  # [N, K]; float64: the updates sum K rank-1 terms
    h = hessian.detach().to(device=device, dtype=torch.float64, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0

    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k, device=device)
    weight, h = weight[:, order], h[order][:, order]  # columns in processing order
    group_of = order // group_size  # [K] original group of each processed column
    position = torch.argsort(order)  # [K] processed position of each original column
    u = _inverse_hessian_cholesky(h, damp)  # [K, K] upper

    groups = k // group_size
    scale = torch.zeros(n, groups, dtype=torch.float64, device=device)
    zero = torch.zeros(n, groups, dtype=torch.float64, device=device)
    started = [False] * groups
    codes = torch.zeros(n, k, dtype=torch.float64, device=device)

    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        block = weight[:, b0:b1].clone()  # [N, B], updated in place column by column
        errors = torch.zeros_like(block)
        u_block = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            g = group_of[b0 + i].item()
            if not started[g]:
                # The group's current weights: those in this block carry the updates so far,
                # later blocks' columns still lack this block's (applied after it, as in GPTQ).
                cols = position[g * group_size : (g + 1) * group_size]
                current = weight[:, cols].clone()
                inside = (cols >= b0) & (cols < b1)
                current[:, inside] = block[:, cols[inside] - b0]
                s, z = clipped_groupwise_params(current.float(), group_size, bits, symmetric, scale_dtype, alphas)
                scale[:, g], zero[:, g] = s[:, 0].double(), z[:, 0].double()
                started[g] = True
            column = block[:, i]
            q = quantize_to_codes(column, scale[:, g], zero[:, g], bits).double()
            codes[:, b0 + i] = q
            error = (column - (q - zero[:, g]) * scale[:, g]) / u_block[i, i]
            block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            errors[:, i] = error
        weight[:, b1:] -= errors @ u[b0:b1, b1:]

    return codes[:, position].float(), scale.float(), zero.float()  # original column order


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype | None = None,
    clip_search: bool = False,
) -> Int4Weight:
    """GPTQ of a float weight [N, K] to INT4 (`ops/int4.py` format), H = 2/n Σ x xᵀ [K, K] (fp32).

    `damp` is the fraction of mean(diag H) added to the diagonal; `block_size` the lazy-update
    block; `clip_search`: each group's range searched over INT4_CLIP_GRID. Raises ValueError for
    shapes `int4_supported` refuses.
    """
    alphas = INT4_CLIP_GRID if clip_search else INT4_CLIP_GRID[:1]
    codes, scale, zero = gptq_groupwise(
        w, hessian, group_size, 4, symmetric, damp, act_order, block_size, scale_dtype, alphas
    )
    return make_int4_weight(codes, scale, zero, group_size, symmetric, scale_dtype or w.dtype)
