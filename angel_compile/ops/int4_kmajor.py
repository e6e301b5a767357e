"""INT4 group-wise weights in the K-major word layout, and the op that reads them.

Op:
    `angel::int4_kmajor_linear(x, words, scales, zeros, group_size, bias) -> x.dtype`
        y = x @ Wᵀ + bias, the same W and semantics as `angel::int4_weight_only_linear`
        (`ops/int4.py`), with the weights in the layout below.

Layout (weight W [N, K], codes q, group size g, as in `ops/int4.py`):
    words   int32 [K/8, N]:  words[r, n] = Σ_{i<8} q[n, 8r + i] << 4i  (two's complement)
            (nibble i of a word is k = 8r + i; N is the contiguous dimension)
    scales  [K/g, N], the dtype of the row-major scales
    zeros   uint8 [K/g, N], or None: zero point 8
    W[n, k] = (q[n, k] − zero[k // g, n]) · scale[k // g, n]

Why a second layout: a decode GEMV (batch 1) reads each weight once and does a few instructions
per weight. With N contiguous, one thread's int32 word holds 8 consecutive k of one output
channel and the 8 x values it needs are shared by every channel the thread holds, so x costs
a load per 8·(channels per thread) weights, and the decoded tile never changes thread layout
(`kernels/int4_kmajor.py`). The row-major [N, K/2] bytes of `ops/int4.py` stay the quantize
passes' output and ONNX's (MatMulNBits) layout; the `int4_kmajor_layout` pass converts a
graph's INT4 layers for the Triton kernels.
"""

from __future__ import annotations

import torch

from angel_compile.ops.int4 import int4_supported, unpack_int4

NIBBLES_PER_WORD = 8


def pack_int4_kmajor(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] (K % 8 == 0) -> int32 words [K/8, N]."""
    n, k = codes.shape
    if k % NIBBLES_PER_WORD:
        raise ValueError(f"pack_int4_kmajor needs K divisible by 8, got codes of shape {(n, k)}")
    nibbles = codes.to(torch.int64).view(n, k // NIBBLES_PER_WORD, NIBBLES_PER_WORD)  # [N, K/8, 8]
    shifts = 4 * torch.arange(NIBBLES_PER_WORD, device=codes.device)
    words = (nibbles << shifts).sum(-1)  # [N, K/8], 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32
    return words.to(torch.int32).t().contiguous()


def unpack_int4_kmajor(words: torch.Tensor) -> torch.Tensor:
    """int32 words [K/8, N] -> uint8 codes [N, K]; the inverse of `pack_int4_kmajor`."""
    shifts = 4 * torch.arange(NIBBLES_PER_WORD, device=words.device, dtype=torch.int32)
    nibbles = (words.t()[..., None] >> shifts) & 0xF  # [N, K/8, 8]; >> sign-extends, & 0xF drops it
    return nibbles.flatten(-2).to(torch.uint8)


def to_kmajor(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-major INT4 (`ops/int4.py`: packed [N, K/2], scales / zeros [N, K/g]) -> (words, scales, zeros) K-major."""
    words = pack_int4_kmajor(unpack_int4(packed))
    return words, scales.t().contiguous(), None if zeros is None else zeros.t().contiguous()


def dequantize_int4_kmajor(
    words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """float32 W [N, K] from the K-major layout."""
    codes = unpack_int4_kmajor(words).float().unflatten(-1, (-1, group_size))  # [N, G, g]
    zero = 8.0 if zeros is None else zeros.t().float()[..., None]
    return ((codes - zero) * scales.t().float()[..., None]).flatten(-2)


def int4_kmajor_linear_reference(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (weights dequantized in fp32)."""
    w = dequantize_int4_kmajor(words, scales, zeros, group_size).to(x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def check_kmajor_format(
    x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> None:
    """torch._check the layout: int32 words [K/8, N], scales and uint8 zeros [K/g, N]."""
    torch._check(words.dtype == torch.int32, lambda: f"words must be int32, got {words.dtype}")
    torch._check(words.dim() == 2, lambda: f"words must be 2-D [K/8, N], got {tuple(words.shape)}")
    k = x.shape[-1]
    rows = words.shape[0]
    torch._check(k == NIBBLES_PER_WORD * rows, lambda: f"x's last dim {k} must be 8 × words' {rows}")
    torch._check(int4_supported(k, group_size) is None, lambda: str(int4_supported(k, group_size)))
    groups = (k // group_size, words.shape[1])
    torch._check(tuple(scales.shape) == groups, lambda: f"scales must be {groups}, got {tuple(scales.shape)}")
    if zeros is not None:
        torch._check(zeros.dtype == torch.uint8, lambda: f"zeros must be uint8, got {zeros.dtype}")
        torch._check(tuple(zeros.shape) == groups, lambda: f"zeros must be {groups}, got {tuple(zeros.shape)}")


@torch.library.custom_op("angel::int4_kmajor_linear", mutates_args=())
def int4_kmajor_linear(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return int4_kmajor_linear_reference(x, words, scales, zeros, group_size, bias)


@int4_kmajor_linear.register_fake
def _(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    check_kmajor_format(x, words, scales, zeros, group_size)
    return x.new_empty((*x.shape[:-1], words.shape[1]))
