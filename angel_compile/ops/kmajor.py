"""INT4 and INT2 group-wise weights in the K-major word layout, and the ops that read them.

Ops:
    `angel::int4_kmajor_linear(x, words, scales, zeros, group_size, bias) -> x.dtype`
    `angel::int2_kmajor_linear(x, words, scales, zeros, group_size, bias) -> x.dtype`
        y = x @ Wᵀ + bias, the same W and semantics as `angel::int4_weight_only_linear`
        (`ops/int4.py`) and `angel::int2_weight_only_linear` (`ops/int2.py`), with the weights
        in the layout below.

Layout (weight W [N, K], codes q of `bits` = 4 or 2, F = 32 / bits fields per word, group size g):
    words   int32 [K/F, N]:  words[r, n] = Σ_{f<F} q[n, F·r + f] << (bits · f)  (two's complement)
            (field f of a word is k = F·r + f; N is the contiguous dimension)
    scales  [K/g, N], the dtype of the row-major scales
    zeros   uint8 [K/g, N], or None: zero point 2^(bits − 1) (8 for INT4, 2 for INT2)
    W[n, k] = (q[n, k] − zero[k // g, n]) · scale[k // g, n]

Why a second layout: a decode GEMV (batch 1) reads each weight once and does a few instructions
per weight. With N contiguous, one thread's int32 word holds F consecutive k of one output
channel, the F x values it needs are shared by every channel the thread holds, so x costs a load
per F·(channels per thread) weights, and the decoded tile never changes thread layout
(`kernels/kmajor_gemm.py`). The row-major bytes of `ops/int4.py` / `ops/int2.py` stay the
quantize pass's output and ONNX's (MatMulNBits) layout; the `kmajor_layout` pass converts a
graph's INT4 and INT2 layers for the Triton kernels.
"""

from __future__ import annotations

import torch

from angel_compile.ops.int2 import unpack_int2
from angel_compile.ops.int4 import int4_supported, unpack_int4

UNPACK_ROW_MAJOR = {4: unpack_int4, 2: unpack_int2}


def fields_per_word(bits: int) -> int:
    if bits not in UNPACK_ROW_MAJOR:
        raise ValueError(f"the K-major layout holds {list(UNPACK_ROW_MAJOR)}-bit codes, not {bits}-bit")
    return 32 // bits


def pack_kmajor(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] of `bits` bits (K % (32 / bits) == 0) -> int32 words [K / (32 / bits), N]."""
    fields = fields_per_word(bits)
    n, k = codes.shape
    if k % fields:
        raise ValueError(f"pack_kmajor needs K divisible by {fields} for {bits}-bit codes, got {(n, k)}")
    values = codes.to(torch.int64).view(n, k // fields, fields)  # [N, K/F, F]
    shifts = bits * torch.arange(fields, device=codes.device)
    words = (values << shifts).sum(-1)  # [N, K/F], 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
    return words.to(torch.int32).t().contiguous()


def unpack_kmajor(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [K/F, N] -> uint8 codes [N, K]; the inverse of `pack_kmajor`."""
    fields = fields_per_word(bits)
    shifts = bits * torch.arange(fields, device=words.device, dtype=torch.int32)
    values = (words.t()[..., None] >> shifts) & ((1 << bits) - 1)  # >> sign-extends, the mask drops it
    return values.flatten(-2).to(torch.uint8)


def to_kmajor(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-major (packed uint8 [N, K·bits/8], scales / zeros [N, K/g]) -> (words, scales, zeros) K-major."""
    words = pack_kmajor(UNPACK_ROW_MAJOR[bits](packed), bits)
    return words, scales.t().contiguous(), None if zeros is None else zeros.t().contiguous()


def dequantize_kmajor(
    words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """float32 W [N, K] from the K-major layout."""
    codes = unpack_kmajor(words, bits).float().unflatten(-1, (-1, group_size))  # [N, G, g]
    zero = float(1 << (bits - 1)) if zeros is None else zeros.t().float()[..., None]
    return ((codes - zero) * scales.t().float()[..., None]).flatten(-2)


def kmajor_linear_reference(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (weights dequantized in fp32)."""
    w = dequantize_kmajor(words, scales, zeros, bits, group_size).to(x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_kmajor_format(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> None:
    """torch._check the layout: int32 words [K/F, N], scales and uint8 zeros [K/g, N]."""
    fields = fields_per_word(bits)
    torch._check(words.dtype == torch.int32, lambda: f"words must be int32, got {words.dtype}")
    torch._check(words.dim() == 2, lambda: f"words must be 2-D [K/{fields}, N], got {tuple(words.shape)}")
    k, rows = x.shape[-1], words.shape[0]
    torch._check(k == fields * rows, lambda: f"x's last dim {k} must be {fields} × words' {rows}")
    torch._check(int4_supported(k, group_size) is None, lambda: str(int4_supported(k, group_size)))
    groups = (k // group_size, words.shape[1])
    torch._check(tuple(scales.shape) == groups, lambda: f"scales must be {groups}, got {tuple(scales.shape)}")
    if zeros is not None:
        torch._check(zeros.dtype == torch.uint8, lambda: f"zeros must be uint8, got {zeros.dtype}")
        torch._check(tuple(zeros.shape) == groups, lambda: f"zeros must be {groups}, got {tuple(zeros.shape)}")


def _define_op(bits: int) -> torch.library.CustomOpDef:
    """`angel::int{bits}_kmajor_linear`: its schema, reference and fake implementation."""

    @torch.library.custom_op(f"angel::int{bits}_kmajor_linear", mutates_args=())
    def kmajor_linear(
        x: torch.Tensor,
        words: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kmajor_linear_reference(x, words, scales, zeros, bits, group_size, bias)

    @kmajor_linear.register_fake
    def _(
        x: torch.Tensor,
        words: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_kmajor_format(x, words, scales, zeros, bits, group_size)
        return x.new_empty((*x.shape[:-1], words.shape[1]))

    return kmajor_linear


int4_kmajor_linear = _define_op(4)
int2_kmajor_linear = _define_op(2)
