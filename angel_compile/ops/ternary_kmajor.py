"""3:4 ternary weights ("Sherry", `ops/ternary.py`) in a K-major layout for the decode GEMV, and its op.

Op:
    `angel::ternary_kmajor_linear(x, lo, hi, scales, group_size, bias) -> x.dtype`
        y = x @ Wᵀ + bias, the same W and semantics as `angel::ternary_3of4_linear`, with the
        weights in the layout below.

Layout (weight W [N, K], K % 128 == 0; c[n, b] the 5-bit code of block b = k // 4 of row n, as
defined in `ops/ternary.py`: c = z << 3 | s):
    lo      int32 [K/32, N]:  lo[r, n] = Σ_{i<8} (c[n, 8r + i] & 15) << 4i   (8 blocks = 32 weights)
    hi      int32 [K/128, N]: hi[q, n] = Σ_{j<32} (c[n, 32q + j] >> 4) << j  (32 blocks = 128 weights)
            (both two's complement; N is the contiguous dimension)
    scales  [K/g, N], the dtype of the row-major scales
    W[n, k] = t(c[n, k // 4])[k % 4] · scales[k // g, n]
5 bits per block of 4 weights, 1.25 bits per weight, as in the row-major bytes.

Why: the decode GEMV (`kernels/ternary_kmajor.py`) looks every code up in a table of the 32
partial dot products Σ_p t_p(c) x[4b + p] of each block b of x (built in registers, one entry a
lane), so a block of 4 weights costs shifts, masks, an OR, one warp shuffle and one add; a
thread's words hold whole blocks of a few output channels, and N contiguous keeps the loads
coalesced. The row-major bytes stay the quantize pass's output and ONNX's layout; the
`kmajor_layout` pass converts.
"""

from __future__ import annotations

import torch

from angel_compile.ops.ternary import TERNARY_CODE_TABLE, packed_width, ternary_supported, unpack_codes

SPAN = 128  # weights along K per hi word


def ternary_kmajor_supported(k: int, group_size: int) -> str | None:
    """Why a 3:4 ternary layer with K input features cannot take the K-major layout, or None."""
    reason = ternary_supported(k, group_size)
    if reason:
        return reason
    if k % SPAN:
        return f"K = {k} is not divisible by {SPAN} (a hi word spans {SPAN} weights)"
    return None


def _int32(values: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> the same 32 bits as int32."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def to_ternary_kmajor(
    packed: torch.Tensor, scales: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-major 3:4 bytes [N, 5·K/32] and scales [N, K/g] -> (lo [K/32, N], hi [K/128, N], scales [K/g, N])."""
    if k % SPAN or packed.shape[1] != packed_width(k):
        raise ValueError(f"to_ternary_kmajor needs K divisible by {SPAN} and packed [N, {packed_width(k)}]")
    codes = unpack_codes(packed).to(torch.int64)[:, : k // 4]  # [N, K/4]
    n = codes.shape[0]
    lo = ((codes & 15).view(n, k // 32, 8) << (4 * torch.arange(8, device=codes.device))).sum(-1)
    hi = ((codes >> 4).view(n, k // SPAN, 32) << torch.arange(32, device=codes.device)).sum(-1)
    return _int32(lo).t().contiguous(), _int32(hi).t().contiguous(), scales.t().contiguous()


def ternary_kmajor_codes(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """lo [K/32, N], hi [K/128, N] -> uint8 codes [N, K/4]; the inverse of the packing above."""
    low = (lo.t()[..., None] >> (4 * torch.arange(8, device=lo.device, dtype=torch.int32))) & 15  # [N, K/32, 8]
    high = (hi.t()[..., None] >> torch.arange(32, device=hi.device, dtype=torch.int32)) & 1  # [N, K/128, 32]
    return (low.flatten(-2) | (high.flatten(-2) << 4)).to(torch.uint8)


def dequantize_ternary_kmajor(
    lo: torch.Tensor, hi: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """float32 W [N, K] from the K-major layout."""
    codes = ternary_kmajor_codes(lo, hi).long()  # [N, K/4]
    t = TERNARY_CODE_TABLE.to(lo.device)[codes].flatten(-2).float()  # [N, K]
    return (t.unflatten(-1, (-1, group_size)) * scales.t().float()[..., None]).flatten(-2)


def ternary_kmajor_linear_reference(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (weights dequantized in fp32)."""
    w = dequantize_ternary_kmajor(lo, hi, scales, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_ternary_kmajor_format(lo: torch.Tensor, hi: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    """Raise ValueError naming what is wrong with a K-major ternary weight."""
    k, n = 32 * lo.shape[0], lo.shape[1]
    if lo.dtype != torch.int32 or hi.dtype != torch.int32:
        raise ValueError(f"lo and hi must be int32, got {lo.dtype} and {hi.dtype}")
    reason = ternary_kmajor_supported(k, group_size)
    if reason:
        raise ValueError(reason)
    if tuple(hi.shape) != (k // SPAN, n) or tuple(scales.shape) != (k // group_size, n):
        raise ValueError(
            f"for lo {tuple(lo.shape)} (K = {k}, N = {n}) hi must be {(k // SPAN, n)} and scales "
            f"{(k // group_size, n)}, got {tuple(hi.shape)} and {tuple(scales.shape)}"
        )


@torch.library.custom_op("angel::ternary_kmajor_linear", mutates_args=())
def ternary_kmajor_linear(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return ternary_kmajor_linear_reference(x, lo, hi, scales, group_size, bias)


@ternary_kmajor_linear.register_fake
def _(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    k = x.shape[-1]
    torch._check(lo.dim() == 2 and 32 * lo.shape[0] == k, lambda: f"lo must be [K/32, N] for K = {k}, got {lo.shape}")
    return x.new_empty((*x.shape[:-1], lo.shape[1]))
