"""INT2 group-wise weights: the packing format, RTN (with clipping search) and GPTQ, and the linear op.

Op:
    `angel::int2_weight_only_linear(x, packed, scales, zeros, group_size, bias) -> x.dtype`
        y = x @ Wᵀ + bias with W dequantized from the format below.

Format (weight W float [N, K], out × in features, group size g):
    codes   q[n, k] ∈ {0, 1, 2, 3}
    packed  uint8 [N, K/4]:  packed[n, j] = q[n, 4j] | q[n, 4j+1] << 2 | q[n, 4j+2] << 4 | q[n, 4j+3] << 6
            (the lowest two bits hold the first weight along K)
    scales  [N, K/g], float32, float16 or bfloat16
    zeros   uint8 [N, K/g], zero point per group in 0..3 (asymmetric); None = symmetric, zero point 2
    W[n, k] ≈ (q[n, k] − zero[n, k // g]) · scale[n, k // g]

This is onnxruntime's `com.microsoft.MatMulNBits` layout with bits = 2 (block_size = g): `packed`
viewed as [N, K/g, g/4] is its B, `scales.view(-1)` its scales, and its zero points are four 2-bit
values per byte (lowest bits = first group); its default zero point, 2, is our symmetric one.

Rounding (per group of g weights along K):
    RTN          `ops/int4.py`'s rules with bits = 2. Four levels make the min/max range a poor
                 choice: with `clip_search`, the range [lo, hi] is shrunk to α·[lo, hi] for α on
                 a grid in [0.5, 1] and each group keeps the α of the lowest squared error
                 (outliers are clipped to the end levels instead of stretching every step).
    GPTQ         `quant/gptq.py` with bits = 2 (`quantize_int2_gptq`), given the layer's Hessian;
                 with `clip_search` each group's range is chosen the same way, from the group's
                 error-updated weights when GPTQ reaches it.

Supported: K % g == 0 with g in 16..256 (`int2_supported`); the quantize pass leaves other layers
in float with the reason. The plain-PyTorch reference below is the CPU implementation and the
ground truth of the Triton kernels (`kernels/int2_gemm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from angel_compile.ops.int4 import (
    check_groupwise_format,
    clipped_groupwise_params,
    int4_supported,
    quantize_to_codes,
)

BITS = 2
SYMMETRIC_ZERO = 2
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # α = 1.0, 0.95, ..., 0.5


def int2_supported(k: int, group_size: int) -> str | None:
    """Why a layer with K input features cannot use the INT2 format with `group_size`, or None."""
    return int4_supported(k, group_size)  # same group sizes and divisibility; g is a multiple of 4


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..3 [..., K] (K % 4 == 0) -> uint8 [..., K/4], first weight in the lowest bits."""
    if codes.shape[-1] % 4:
        raise ValueError(f"pack_int2 needs a last dimension divisible by 4, got {tuple(codes.shape)}")
    quads = codes.to(torch.uint8).unflatten(-1, (-1, 4))  # [..., K/4, 4]
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/4] -> uint8 codes 0..3 [..., K]; the inverse of `pack_int2`."""
    return torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).flatten(-2)


@dataclass(frozen=True)
class Int2Weight:
    """A weight [N, K] in the INT2 group-wise format (module docstring)."""

    packed: torch.Tensor  # uint8 [N, K/4]
    scales: torch.Tensor  # [N, K/g]
    zeros: torch.Tensor | None  # uint8 [N, K/g], or None: symmetric, zero point 2
    group_size: int
    shape: tuple[int, int]  # (N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] the format represents."""
        return dequantize_int2(self.packed, self.scales, self.zeros, self.group_size).to(dtype)

    def nbytes(self) -> int:
        tensors = (self.packed, self.scales) + (() if self.zeros is None else (self.zeros,))
        return sum(t.numel() * t.element_size() for t in tensors)


def make_int2_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int, scale_dtype: torch.dtype
) -> Int2Weight:
    """Int2Weight from codes [N, K] (0..3), scale [N, K/g] and zero [N, K/g] (None: symmetric)."""
    zeros = None if zero is None else zero.to(torch.uint8)
    return Int2Weight(pack_int2(codes), scale.to(scale_dtype), zeros, group_size, tuple(codes.shape))


def int2_rtn_params(
    w: torch.Tensor,
    group_size: int,
    symmetric: bool = False,
    clip_search: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 [N, K/g] for INT2 RTN of w [N, K]; with `clip_search`, the best α per group."""
    alphas = CLIP_GRID if clip_search else CLIP_GRID[:1]
    return clipped_groupwise_params(w, group_size, BITS, symmetric, scale_dtype, alphas)


def quantize_int2_rtn(
    w: torch.Tensor,
    group_size: int = 64,
    symmetric: bool = False,
    clip_search: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> Int2Weight:
    """Round-to-nearest INT2 of a float weight [N, K] (module docstring; K % group_size == 0)."""
    reason = int2_supported(w.shape[-1], group_size)
    if reason:
        raise ValueError(reason)
    scale, zero = int2_rtn_params(w, group_size, symmetric, clip_search, scale_dtype)  # [N, G]
    codes = quantize_to_codes(w.unflatten(-1, (-1, group_size)), scale[..., None], zero[..., None], BITS)
    return make_int2_weight(codes.flatten(-2), scale, None if symmetric else zero, group_size, scale_dtype or w.dtype)


def quantize_int2_gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 64,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
    clip_search: bool = True,
) -> Int2Weight:
    """GPTQ INT2 of a float weight [N, K] with the layer's Hessian H = 2/n Σ x xᵀ [K, K]; with
    `clip_search`, each group's range is searched over CLIP_GRID as for RTN (on the group's
    error-updated weights)."""
    from angel_compile.quant.gptq import gptq_groupwise

    alphas = CLIP_GRID if clip_search else CLIP_GRID[:1]
    codes, scale, zero = gptq_groupwise(
        w, hessian, group_size, BITS, symmetric, damp, act_order, scale_dtype=scale_dtype, alphas=alphas
    )
    return make_int2_weight(codes, scale, None if symmetric else zero, group_size, scale_dtype or w.dtype)


def dequantize_int2(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """float32 [N, K] weight from packed [N, K/4], scales and zeros [N, K/g] (None: zero point 2)."""
    codes = unpack_int2(packed).float().unflatten(-1, (-1, group_size))  # [N, G, g]
    zero = float(SYMMETRIC_ZERO) if zeros is None else zeros.float()[..., None]
    return ((codes - zero) * scales.float()[..., None]).flatten(-2)


def int2_weight_only_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (weights dequantized in fp32)."""
    w = dequantize_int2(packed, scales, zeros, group_size).to(x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("angel::int2_weight_only_linear", mutates_args=())
def int2_weight_only_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return int2_weight_only_linear_reference(x, packed, scales, zeros, group_size, bias)


@int2_weight_only_linear.register_fake
def _(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    check_groupwise_format(x, packed, scales, zeros, group_size, per_byte=4, supported=int2_supported)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
