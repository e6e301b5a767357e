"""Split K shared by the weight-only kernels: how many splits, which K tiles a split owns, the epilogue.

A split-K launch has grid axis `split` of size SPLIT_K; split s owns the contiguous run of K tiles
`split_k_tiles(num_tiles, s, SPLIT_K)` and adds its fp32 partial sums into a zeroed buffer with
atomics (`split_k_output`); `finish_split_k` then adds the bias and casts (the kernels skip both when SPLIT_K > 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 264  # two per SM of an H100: with fewer, split K


def split_k_for(
    n: int, k: int, block_n: int, block_k: int, target_programs: int = TARGET_PROGRAMS, min_tiles: int = 4
) -> int:
    """Splits (a power of two): enough programs for `target_programs`, at least `min_tiles` K tiles per split."""
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split * 2 <= target_programs and k // block_k >= split * 2 * min_tiles:
        split *= 2
    return split


@triton.jit
def split_k_tiles(num_tiles, split, SPLIT_K: tl.constexpr):
    """[begin, end) of the K tiles that split `split` of SPLIT_K owns (empty for a split past the end)."""
    per_split = tl.cdiv(num_tiles, SPLIT_K)
    begin = split * per_split
    return begin, tl.minimum(begin + per_split, num_tiles)


def split_k_output(m: int, n: int, split: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [m, n] output buffer of a launch: zeroed fp32 for the splits' atomics, else `dtype`."""
    if split > 1:
        return torch.zeros((m, n), dtype=torch.float32, device=device)
    return torch.empty((m, n), dtype=dtype, device=device)


@triton.jit
def store_or_add(ptrs, tile, mask, SPLIT_K: tl.constexpr):
    """Without split K: store the fp32 tile in the output's dtype; with: add it into the zeroed fp32 buffer."""
    if SPLIT_K == 1:
        tl.store(ptrs, tile.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, tile, mask=mask, sem="relaxed")


def finish_split_k(out: torch.Tensor, bias: torch.Tensor | None, split: int, dtype: torch.dtype) -> torch.Tensor:
    """The result of a launch: as is without split K, else fp32 partial sums + bias, cast to `dtype`."""
    if split == 1:
        return out
    return (out if bias is None else out + bias.float()).to(dtype)
