"""INT4 group-wise weights: the packing format, RTN quantization, and two linear ops.

Ops:
    `angel::int4_weight_only_linear(x, packed, scales, zeros, group_size, bias) -> x.dtype`
        y = x @ Wᵀ + bias with W dequantized from the format below.
    `angel::w4a8_linear(x, packed, scales, zeros, group_size, input_scale, bias) -> x.dtype`
        the same weights, with x quantized to FP8 E4M3 first: per token (row) dynamically,
        s_x = max_k |x[m, k]| / 448, or with one static per-tensor `input_scale` s_x from
        calibration; xq = fp8(clamp(x / s_x, ±448)); y = (xq @ Wᵀ) · s_x + bias.

Format (bits = 4; weight W float [N, K], out × in features, group size g):
    codes   q[n, k] ∈ {0, ..., 15}
    packed  uint8 [N, K/2]:  packed[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)
            (low nibble = even k, high nibble = odd k)
    scales  [N, K/g], float32, float16 or bfloat16 (`scale_dtype`, default W's dtype)
    zeros   uint8 [N, K/g], one zero point per group, 0..15 (asymmetric); None = symmetric,
            whose zero point is 8: the signed code q − 8 ∈ [−8, 7] stored in offset binary
    W[n, k] ≈ (q[n, k] − zero[n, k // g]) · scale[n, k // g]

This is onnxruntime's `com.microsoft.MatMulNBits` layout (bits=4, block_size=g):
`packed.view(N, K/g, g/2)` is its B, `scales.view(-1)` its scales, and its default zero point
is 8, our symmetric one; its zero points are two 4-bit values per byte, `pack_int4(zeros)`.

Rounding to nearest (RTN), per group of g weights along K, with `bits` generic (2^bits levels,
maxq = 2^bits − 1; INT2 uses the same machinery):
    symmetric   s = max|w| / (maxq / 2), q = clamp(round(w / s) + 2^(bits−1), 0, maxq)
    asymmetric  lo = min(min w, 0), hi = max(max w, 0), s = (hi − lo) / maxq,
                z = clamp(round(−lo / s), 0, maxq), q = clamp(round(w / s) + z, 0, maxq)
The scale is rounded up to `scale_dtype` before the codes are computed, so that the stored
scale is the one the codes were made for: |w − (q − z) · s| ≤ s / 2 for every weight. A group of
zeros gets scale 1 (any positive scale represents it). With a clipping search
(`clipped_groupwise_params`, `clip_search`), each group takes the parameters of α·w for the α of
a grid (INT4_CLIP_GRID; INT2's in `ops/int2.py`) with the lowest squared error of w itself, so
that |w − (q − z) · s| ≤ s / 2 holds only inside the clipped range.

Supported: K % g == 0 with g a power of two in 16..256 (`int4_supported` says why not; the
quantize pass then leaves the layer in float). K is never padded: a ragged last group would
need a padded x on every call, for layers (K = 4096, 14336 in Llama) that never have one.

The plain-PyTorch references below are the CPU implementations and the ground truth for the
Triton kernels (`kernels/int4_gemm.py`), which `lowering/triton.py` registers for CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SUPPORTED_GROUP_SIZES = (16, 32, 64, 128, 256)
# Range shrink factors of the INT4 clipping search (1.0 = min/max first): 16 levels leave less to
# clip than INT2's 4, and on SmolLM2 GPTQ a 1.0-0.8 grid beat 1.0-0.5 (benchmarks/RESULTS.md).
INT4_CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(11))  # 1.0, 0.98, ..., 0.8
FP8_E4M3_MAX = 448.0


def int4_supported(k: int, group_size: int) -> str | None:
    """Why a layer with K input features cannot use the INT4 format with `group_size`, or None."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        return f"group size {group_size} is not one of {list(SUPPORTED_GROUP_SIZES)}"
    if k % group_size != 0:
        return f"K = {k} is not divisible by the group size {group_size}"
    return None


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., K] (K even) -> uint8 [..., K/2]: low nibble even k, high nibble odd k."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {tuple(codes.shape)}")
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))  # [..., K/2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes 0..15 [..., K]; the inverse of `pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


@dataclass(frozen=True)
class Int4Weight:
    """A weight [N, K] in the INT4 group-wise format (module docstring)."""

    packed: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # [N, K/g]
    zeros: torch.Tensor | None  # uint8 [N, K/g], or None: symmetric, zero point 8
    group_size: int
    shape: tuple[int, int]  # (N, K)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def codes(self) -> torch.Tensor:
        """uint8 [N, K], 0..15."""
        return unpack_int4(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] the format represents."""
        return dequantize_int4(self.packed, self.scales, self.zeros, self.group_size).to(dtype)

    def nbytes(self) -> int:
        tensors = (self.packed, self.scales) + (() if self.zeros is None else (self.zeros,))
        return sum(t.numel() * t.element_size() for t in tensors)


def groupwise_params(
    w: torch.Tensor, group_size: int, bits: int = 4, symmetric: bool = False, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN scales and zero points of w [N, K] per group of `group_size` along K.

    Returns (scale, zero), both float32 [N, K/g]: the scale already rounded to `scale_dtype`
    (default w's dtype) and the zero point integer-valued (2^(bits−1) when symmetric).
    """
    maxq = 2**bits - 1
    groups = w.detach().float().unflatten(-1, (-1, group_size))  # [N, G, g]
    if symmetric:
        scale = groups.abs().amax(dim=-1) / (maxq / 2)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = groups.amin(dim=-1).clamp(max=0)
        hi = groups.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = scale.to(scale_dtype or w.dtype)
    # Rounded up, never down: a smaller scale would no longer cover the group's range.
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)
    scale = stored.float()
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _group_errors(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    """Squared RTN error per group [N, G] of w [N, K] with params [N, G]."""
    groups = w.float().unflatten(-1, (-1, group_size))  # [N, G, g]
    codes = quantize_to_codes(groups, scale[..., None], zero[..., None], bits)
    return ((codes - zero[..., None]) * scale[..., None] - groups).pow(2).sum(-1)


def clipped_groupwise_params(
    w: torch.Tensor,
    group_size: int,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype | None,
    alphas: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`groupwise_params` of the best shrunk range: for each α in `alphas`, the params of α·w, and
    per group those of the lowest squared RTN error of w itself (outliers clipped to the end levels
    instead of stretching every step). `alphas` starts with 1.0 (the plain min/max range)."""
    best_scale, best_zero = groupwise_params(w * alphas[0], group_size, bits, symmetric, scale_dtype)
    if len(alphas) == 1:  # nothing to compare: skip the error pass
        return best_scale, best_zero
    best_error = _group_errors(w, best_scale, best_zero, group_size, bits)
    for alpha in alphas[1:]:
        scale, zero = groupwise_params(w * alpha, group_size, bits, symmetric, scale_dtype)
        error = _group_errors(w, scale, zero, group_size, bits)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
    return best_scale, best_zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """q = clamp(round(w / scale) + zero, 0, maxq) elementwise (broadcasting), as float32."""
    return (torch.round(w.float() / scale) + zero).clamp(0, 2**bits - 1)


def quantize_int4_rtn(
    w: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
    clip_search: bool = False,
) -> Int4Weight:
    """Round-to-nearest INT4 of a float weight [N, K] (module docstring; K % group_size == 0);
    with `clip_search`, each group's range is the best of INT4_CLIP_GRID (`clipped_groupwise_params`)."""
    reason = int4_supported(w.shape[-1], group_size)
    if reason:
        raise ValueError(reason)
    alphas = INT4_CLIP_GRID if clip_search else INT4_CLIP_GRID[:1]
    scale, zero = clipped_groupwise_params(w, group_size, 4, symmetric, scale_dtype, alphas)  # [N, G]
    codes = quantize_to_codes(w.unflatten(-1, (-1, group_size)), scale[..., None], zero[..., None])
    return make_int4_weight(codes.flatten(-2), scale, zero, group_size, symmetric, scale_dtype or w.dtype)


def make_int4_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
) -> Int4Weight:
    """Int4Weight from codes [N, K] (0..15) and float scale / zero [N, K/g] (as `groupwise_params`)."""
    n, k = codes.shape
    zeros = None if symmetric else zero.to(torch.uint8)
    return Int4Weight(pack_int4(codes.to(torch.uint8)), scale.to(scale_dtype), zeros, group_size, (n, k))


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """float32 [N, K] weight from packed [N, K/2], scales and zeros [N, K/g] (None: zero point 8)."""
    codes = unpack_int4(packed).float().unflatten(-1, (-1, group_size))  # [N, G, g]
    zero = 8.0 if zeros is None else zeros.float()[..., None]
    return ((codes - zero) * scales.float()[..., None]).flatten(-2)


def quantize_fp8_rows(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scale [M, 1]); per row, or the static per-tensor scale.

    W4A8's activation quantizer (the same rule as per-token FP8 elsewhere in the project).
    """
    xf = x.float()
    if input_scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # An all-zero row gets any positive scale; its codes are zero either way.
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    else:
        scale = input_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    xq = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def int4_weight_only_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (weights dequantized in fp32)."""
    w = dequantize_int4(packed, scales, zeros, group_size).to(x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def w4a8_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: FP8 x (per row, or static), INT4 weights, float32 arithmetic -> x's dtype."""
    *lead, k = x.shape
    xq, x_scale = quantize_fp8_rows(x.reshape(-1, k), input_scale)  # [M, K], [M, 1]
    w = dequantize_int4(packed, scales, zeros, group_size)  # [N, K] fp32
    y = (xq.float() @ w.T) * x_scale  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


def check_groupwise_format(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    per_byte: int = 2,
    supported: Callable[[int, int], str | None] = int4_supported,
) -> None:
    """torch._check the group-wise packed format: uint8 packed [N, K/per_byte], scales and uint8 zeros [N, K/g]."""
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.dim() == 2, lambda: f"packed must be 2-D [N, K/{per_byte}], got {tuple(packed.shape)}")
    k = x.shape[-1]
    torch._check(
        k == per_byte * packed.shape[1], lambda: f"x's last dim {k} must be {per_byte} × packed's {packed.shape[1]}"
    )
    torch._check(supported(k, group_size) is None, lambda: str(supported(k, group_size)))
    groups = (packed.shape[0], k // group_size)
    torch._check(tuple(scales.shape) == groups, lambda: f"scales must be {groups}, got {tuple(scales.shape)}")
    if zeros is not None:
        torch._check(zeros.dtype == torch.uint8, lambda: f"zeros must be uint8, got {zeros.dtype}")
        torch._check(tuple(zeros.shape) == groups, lambda: f"zeros must be {groups}, got {tuple(zeros.shape)}")


@torch.library.custom_op("angel::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return int4_weight_only_linear_reference(x, packed, scales, zeros, group_size, bias)


@int4_weight_only_linear.register_fake
def _(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    check_groupwise_format(x, packed, scales, zeros, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("angel::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return w4a8_linear_reference(x, packed, scales, zeros, group_size, input_scale, bias)


@w4a8_linear.register_fake
def _(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    check_groupwise_format(x, packed, scales, zeros, group_size)
    if input_scale is not None:
        torch._check(input_scale.numel() == 1, lambda: "input_scale must hold one per-tensor scale")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
