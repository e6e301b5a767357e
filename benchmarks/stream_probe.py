"""A read-only streaming probe: how fast this GPU reads a packed weight's bytes once, with no decoding.

The floor for a decode GEMV that must read those bytes (bench_lowbit.py --ceiling). `stream_sum_triton`
reads an int32 buffer [R, N] (N contiguous, like the K-major words) in one launch: each program
sums ROWS rows × BLOCK_N columns (int32, wrapping) and stores one number, so almost nothing but
the reads reaches memory. `stream_sum_reference` is the same sum in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS, BLOCK_N = 8, 512  # 16 KB a program, four warps: the fastest of 8 tilings on an H200 (RESULTS)


@triton.jit
def _stream_sum_kernel(words_ptr, out_ptr, N, stride_r, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_r = tl.program_id(0), tl.program_id(1)
    offs_r = pid_r * ROWS + tl.arange(0, ROWS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tl.load(words_ptr + offs_r[:, None] * stride_r + offs_n[None, :], eviction_policy="evict_first")
    tl.store(out_ptr + pid_r * tl.num_programs(0) + pid_n, tl.sum(tl.sum(tile, axis=1), axis=0))


def probe_buffer(nbytes: int, n: int, device: torch.device | str) -> torch.Tensor:
    """Random int32 [R, n] holding at least `nbytes` (R a multiple of ROWS); n % BLOCK_N == 0."""
    if n % BLOCK_N:
        raise ValueError(f"the probe needs N divisible by {BLOCK_N}, got {n}")
    rows = triton.cdiv(triton.cdiv(nbytes, 4 * n), ROWS) * ROWS
    return torch.randint(-(2**31), 2**31 - 1, (rows, n), dtype=torch.int32, device=device)


def stream_sum_triton(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N] -> int32 [R / ROWS, N / BLOCK_N]: each tile's wrapped sum."""
    rows, n = words.shape
    if rows % ROWS or n % BLOCK_N or words.stride(1) != 1:
        raise ValueError(f"the probe needs a row-contiguous [R, N] with R % {ROWS} == 0 and N % {BLOCK_N} == 0")
    out = torch.empty((rows // ROWS, n // BLOCK_N), dtype=torch.int32, device=words.device)
    grid = (n // BLOCK_N, rows // ROWS)
    _stream_sum_kernel[grid](words, out, n, words.stride(0), ROWS=ROWS, BLOCK_N=BLOCK_N, num_warps=4)
    return out


def stream_sum_reference(words: torch.Tensor) -> torch.Tensor:
    """The same tile sums in PyTorch (int64, wrapped to int32)."""
    rows, n = words.shape
    sums = words.long().view(rows // ROWS, ROWS, n // BLOCK_N, BLOCK_N).sum(dim=(1, 3))
    return (((sums + 2**31) % 2**32) - 2**31).to(torch.int32)
