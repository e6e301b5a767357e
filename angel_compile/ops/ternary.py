"""Ternary weights: 1.25-bit 3:4-sparse ternary ("Sherry"), plain 2-bit ternary, and the linear op.

A ternary weight is t · scale with t ∈ {−1, 0, +1}. Op:
    `angel::ternary_3of4_linear(x, packed, scales, group_size, bias) -> x.dtype`
        y = x @ Wᵀ + bias, W [N, K] from the 3:4 format below.
Plain ternary (every weight free in {−1, 0, +1}, 2 bits each) needs no op of its own: it is the
INT2 format of `ops/int2.py` with symmetric zero point 2 and codes t + 2 ∈ {1, 2, 3}
(`quantize_ternary_2bit` returns an `Int2Weight`), run by `angel::int2_weight_only_linear`.

3:4 format, bit for bit (weight W [N, K], K % 4 == 0):
    block     4 consecutive weights along K, b = k // 4, positions p = k % 4 ∈ {0, 1, 2, 3}.
              Exactly one weight of the block is zero, at position z; the other three are ±1.
    code      5 bits: c = z << 3 | s, with s = s0 | s1 << 1 | s2 << 2 where sj = 1 when the j-th
              non-zero position (the positions other than z, in increasing order) holds −1, and
              0 when it holds +1. 4 zero positions × 2³ sign patterns = 32 codes.
              Example: weights (+1, 0, −1, −1): z = 1, non-zeros at 0, 2, 3 with signs +, −, −:
              s = 0b110, c = 1 << 3 | 6 = 14.
    chunk     8 blocks = 32 weights: the 40-bit little-endian integer V = Σ_i c_i << 5i
              (block i of the chunk in bits 5i .. 5i+4) stored as 5 bytes, byte j = (V >> 8j) & 0xFF.
    packed    uint8 [N, 5 · ⌈K/32⌉]: the chunks of each row in K order (1.25 bits per weight).
              When K % 32 != 0 the last chunk is padded with code 0 blocks, which the op never
              reads against real inputs (the padded x is zero).
    scales    [N, ⌈K/g⌉] float (float32 / float16 / bfloat16): one per group of g weights along K,
              g ∈ {32, 64, 128, 256} dividing K, or g = K (one per output channel).
    W[n, k] = t[n, k] · scales[n, k // g]

`TERNARY_CODE_TO_2BIT` is the 32-entry lookup the kernels use: code -> one byte holding the block's
four weights as 2-bit fields t_p + 1 (bits 2p, 2p+1), the plain 2-bit ternary encoding.

Quantizer (`quantize_ternary_3of4`), per group with optional input-channel importance h
(diag of the calibration Hessian or mean x², default 1), minimising Σ h_k (w_k − s t_k)²:
alternate (a) for the group's scale s, per block the signs t = sign(w) (the optimum for s > 0)
and the zero position z minimising h_z w_z² + Σ_{p≠z} h_p (|w_p| − s)²; (b) for those blocks,
the weighted least-squares scale s = Σ_{t≠0} h |w| / Σ_{t≠0} h. Start: z = argmin_p h_p w_p².
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from angel_compile.ops.int2 import Int2Weight, make_int2_weight

CHUNK_WEIGHTS = 32  # weights per 5-byte chunk
CHUNK_BYTES = 5
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)
ALTERNATING_STEPS = 6


def _code_table() -> torch.Tensor:
    """int8 [32, 4]: the block of weights t ∈ {−1, 0, 1} each code stands for."""
    table = torch.zeros(32, 4, dtype=torch.int8)
    for code in range(32):
        z, signs = code >> 3, code & 7
        nonzero = [p for p in range(4) if p != z]
        for j, p in enumerate(nonzero):
            table[code, p] = -1 if (signs >> j) & 1 else 1
    return table


TERNARY_CODE_TABLE = _code_table()  # [32, 4] int8
TERNARY_CODE_TO_2BIT = ((TERNARY_CODE_TABLE.to(torch.int32) + 1) << torch.arange(0, 8, 2)).sum(-1).to(torch.uint8)


def ternary_supported(k: int, group_size: int | None) -> str | None:
    """Why a layer with K input features cannot use the 3:4 format (group None = per channel), or None."""
    if k % 4:
        return f"K = {k} is not divisible by 4 (the 3:4 block)"
    if group_size is not None and group_size != k:
        if group_size not in SUPPORTED_GROUP_SIZES:
            return f"group size {group_size} is not one of {list(SUPPORTED_GROUP_SIZES)} (or per channel)"
        if k % group_size:
            return f"K = {k} is not divisible by the group size {group_size}"
    return None


def packed_width(k: int) -> int:
    """Bytes per row of the 3:4 format for K input features."""
    return CHUNK_BYTES * -(-k // CHUNK_WEIGHTS)


def encode_blocks(t: torch.Tensor) -> torch.Tensor:
    """int8 t [..., K] (3:4 ternary, K % 4 == 0) -> uint8 codes [..., K/4]; raises if a block is not 3:4."""
    blocks = t.to(torch.int8).unflatten(-1, (-1, 4))  # [..., B, 4]
    zero = blocks == 0
    if not bool((zero.sum(-1) == 1).all()):
        raise ValueError("every block of 4 weights must hold exactly one zero")
    z = zero.to(torch.uint8).argmax(-1)  # [..., B]
    negative = blocks < 0  # [..., B, 4]
    # Sign bit j belongs to the j-th non-zero position: positions after z move down by one.
    position = torch.arange(4, device=blocks.device)
    j = position - (position > z[..., None]).to(torch.long)  # [..., B, 4]
    bits = torch.where(negative, torch.ones_like(j) << j, torch.zeros_like(j)).sum(-1)
    return (z.to(torch.long) << 3 | bits).to(torch.uint8)


def pack_ternary_3of4(t: torch.Tensor) -> torch.Tensor:
    """int8 t [N, K] in {−1, 0, 1}, one zero per block of 4 -> uint8 packed [N, 5·⌈K/32⌉] (module docstring)."""
    n, k = t.shape
    if k % 4:
        raise ValueError(f"pack_ternary_3of4 needs K divisible by 4, got K = {k}")
    codes = encode_blocks(t).to(torch.int64)  # [N, K/4]
    pad = -codes.shape[1] % 8
    codes = torch.nn.functional.pad(codes, (0, pad))  # code 0 blocks fill the last chunk
    chunks = codes.unflatten(-1, (-1, 8))  # [N, C, 8]
    value = (chunks << (5 * torch.arange(8, device=chunks.device))).sum(-1)  # [N, C] 40-bit integers (disjoint bits)
    packed = torch.stack([(value >> (8 * j)) & 0xFF for j in range(CHUNK_BYTES)], dim=-1)  # [N, C, 5]
    return packed.flatten(-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 packed [N, 5·C] -> uint8 codes [N, 8·C] (block order along K)."""
    chunk_bytes = packed.to(torch.int64).unflatten(-1, (-1, CHUNK_BYTES))  # [N, C, 5]
    value = (chunk_bytes << (8 * torch.arange(CHUNK_BYTES, device=packed.device))).sum(-1)  # [N, C]
    codes = (value[..., None] >> (5 * torch.arange(8, device=packed.device))) & 31  # [N, C, 8]
    return codes.flatten(-2).to(torch.uint8)


def unpack_ternary_3of4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 packed [N, 5·⌈K/32⌉] -> int8 t [N, K]; the inverse of `pack_ternary_3of4`."""
    codes = unpack_codes(packed).long()  # [N, 8·C]
    t = TERNARY_CODE_TABLE.to(packed.device)[codes]  # [N, 8·C, 4]
    return t.flatten(-2)[:, :k]


@dataclass(frozen=True)
class Ternary3of4Weight:
    """A weight [N, K] in the 3:4 ternary format (module docstring)."""

    packed: torch.Tensor  # uint8 [N, 5·⌈K/32⌉]
    scales: torch.Tensor  # [N, K/g]
    group_size: int  # g (K for per channel)
    shape: tuple[int, int]  # (N, K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ternary_3of4(self.packed, self.scales, self.group_size, self.shape[1]).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales))


def _importance(h: torch.Tensor | None, k: int) -> torch.Tensor:
    if h is None:
        return torch.ones(k)
    if h.shape != (k,):
        raise ValueError(f"the importance must be [K] = [{k}], got {tuple(h.shape)}")
    # A channel never seen in calibration still gets a little weight, so its block is not arbitrary.
    h = h.detach().float().clamp_min(0)
    return h + 1e-6 * h.mean().clamp_min(1e-12)


def ternary_3of4_fit(
    w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None, steps: int = ALTERNATING_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t int8 [N, K] 3:4 ternary, scale float32 [N, K/g]) minimising Σ h (w − s t)² (module docstring)."""
    n, k = w.shape
    weights = w.detach().float().reshape(n, k // group_size, group_size // 4, 4)  # [N, G, B, 4]
    h = _importance(importance, k).to(w.device).reshape(1, k // group_size, group_size // 4, 4).expand_as(weights)
    magnitude = weights.abs()
    zero_at = (h * magnitude.square()).argmin(-1)  # [N, G, B] start: drop the least important weight

    def scale_for(zero_at: torch.Tensor) -> torch.Tensor:
        kept = torch.ones_like(magnitude).scatter_(-1, zero_at[..., None], 0.0)
        num = (h * magnitude * kept).sum((-1, -2))
        den = (h * kept).sum((-1, -2))
        scale = num / den.clamp_min(1e-30)
        return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale

    scale = scale_for(zero_at)  # [N, G]
    for _ in range(steps):
        s = scale[..., None, None]
        kept_cost = h * (magnitude - s).square()  # cost of each position as ±s
        dropped_cost = h * magnitude.square()  # cost of each position as 0
        zero_at = (dropped_cost - kept_cost).argmin(-1)  # total = Σ kept + (dropped − kept) at z
        scale = scale_for(zero_at)
    sign = torch.where(weights < 0, -1, 1).to(torch.int8)
    t = sign.scatter(-1, zero_at[..., None], 0)
    return t.reshape(n, k), scale


def quantize_ternary_3of4(
    w: torch.Tensor,
    group_size: int | None = 128,
    importance: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> Ternary3of4Weight:
    """3:4 ternary of a float weight [N, K]; group_size None = per output channel; importance h [K]."""
    n, k = w.shape
    reason = ternary_supported(k, group_size)
    if reason:
        raise ValueError(reason)
    group = k if group_size is None else group_size
    t, scale = ternary_3of4_fit(w, group, importance)
    stored = scale.to(scale_dtype or w.dtype)
    return Ternary3of4Weight(pack_ternary_3of4(t), stored, group, (n, k))


def dequantize_ternary_3of4(packed: torch.Tensor, scales: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """float32 W [N, K] from the 3:4 format."""
    t = unpack_ternary_3of4(packed, k).float().unflatten(-1, (-1, group_size))  # [N, G, g]
    return (t * scales.float()[..., None]).flatten(-2)


def quantize_ternary_2bit(
    w: torch.Tensor,
    group_size: int = 128,
    importance: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    steps: int = ALTERNATING_STEPS,
) -> Int2Weight:
    """Plain ternary t ∈ {−1, 0, 1} per weight, stored as symmetric INT2 (codes t + 2).

    Alternates t = clamp(round(w / s), −1, 1) and the weighted least-squares s per group,
    starting from s = 1.5 · mean |w| (the threshold 0.75 · mean |w| of ternary weight networks).
    """
    n, k = w.shape
    if group_size not in SUPPORTED_GROUP_SIZES or k % group_size:
        raise ValueError(f"group size {group_size} must be one of {list(SUPPORTED_GROUP_SIZES)} and divide K = {k}")
    weights = w.detach().float().reshape(n, k // group_size, group_size)
    h = _importance(importance, k).to(w.device).reshape(1, k // group_size, group_size)
    scale = 1.5 * weights.abs().mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    for _ in range(steps):
        t = torch.round(weights / scale[..., None]).clamp(-1, 1)
        den = (h * t.square()).sum(-1)
        fitted = (h * weights * t).sum(-1) / den.clamp_min(1e-30)
        scale = torch.where(den > 0, fitted, scale)
    stored = scale.to(scale_dtype or w.dtype)
    t = torch.round(weights / stored.float()[..., None]).clamp(-1, 1)
    return make_int2_weight((t + 2).reshape(n, k), stored.float(), None, group_size, stored.dtype)


def ternary_3of4_linear_reference(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (weights dequantized in fp32)."""
    w = dequantize_ternary_3of4(packed, scales, group_size, x.shape[-1]).to(x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("angel::ternary_3of4_linear", mutates_args=())
def ternary_3of4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return ternary_3of4_linear_reference(x, packed, scales, group_size, bias)


@ternary_3of4_linear.register_fake
def _(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    k = x.shape[-1]
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(
        packed.dim() == 2 and packed.shape[1] == packed_width(k),
        lambda: f"packed must be [N, {packed_width(k)}] for K = {k}, got {tuple(packed.shape)}",
    )
    torch._check(ternary_supported(k, group_size) is None, lambda: str(ternary_supported(k, group_size)))
    groups = (packed.shape[0], k // group_size)
    torch._check(tuple(scales.shape) == groups, lambda: f"scales must be {groups}, got {tuple(scales.shape)}")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
