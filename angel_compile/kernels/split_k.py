"""Split K shared by the weight-only kernels: how many splits, which K tiles a split owns, the epilogue.

A split-K launch has grid axis `split` of size SPLIT_K; split s owns the contiguous run of K tiles
`split_k_tiles(num_tiles, s, SPLIT_K)`. Two epilogues:
- GEMM tiles add their fp32 partial sums into a zeroed buffer with atomics (`split_k_output`);
  `finish_split_k` then adds the bias and casts (the kernels skip both when SPLIT_K > 1).
- The decode GEMVs stay one kernel launch (a memset and a cast kernel would cost as much as the
  GEMV's own tail): `last_split_total` adds the partial sums into a per-(device, stream)
  workspace (`gemv_workspace`), and the split that arrives last at its row block, found with an
  arrival counter, takes the total, writes y and leaves the workspace and counter at zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 264  # two per SM of an H100: with fewer, split K
_WORKSPACES: dict[tuple[torch.device, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


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


def gemv_workspace(device: torch.device, n: int, row_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial sums [>= n] and int32 arrival counters [>= row_blocks] for `last_split_total`.

    Zero between GEMV calls (the last split of each row block resets its part). One per (device,
    stream): GEMVs on one stream run in order, GEMVs on two streams must not share partial sums.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, stream)
    partial, arrived = _WORKSPACES.get(key, (None, None))
    if partial is None or partial.numel() < n or arrived.numel() < row_blocks:
        size = max(n, 0 if partial is None else partial.numel())
        blocks = max(row_blocks, 0 if arrived is None else arrived.numel())
        partial = torch.zeros(size, dtype=torch.float32, device=device)
        arrived = torch.zeros(blocks, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (partial, arrived)
    return partial, arrived


@triton.jit
def last_split_total(acc, offs_n, n_mask, partial_ptr, arrived_ptr, row_block, SPLIT_K: tl.constexpr):
    """(total, is_last): with SPLIT_K > 1, adds this split's fp32 row sums `acc` to the workspace;
    the split that arrives last at `row_block` gets the total and zeroes the workspace and counter."""
    last = True
    if SPLIT_K > 1:
        tl.atomic_add(partial_ptr + offs_n, acc, mask=n_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are issued before the arrival is counted
        last = tl.atomic_add(arrived_ptr + row_block, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            acc = tl.load(partial_ptr + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")  # from L2
            tl.store(partial_ptr + offs_n, tl.zeros_like(acc), mask=n_mask)
            tl.store(arrived_ptr + row_block, 0)
    return acc, last


@triton.jit
def finish_gemv(
    acc, offs_n, n_mask, partial_ptr, arrived_ptr, row_block, bias_ptr, out_ptr,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """The decode GEMVs' epilogue: the total of the splits (`last_split_total`), to which the last
    split adds the bias before writing y [N] in out's dtype."""
    y, last = last_split_total(acc, offs_n, n_mask, partial_ptr, arrived_ptr, row_block, SPLIT_K)
    if last:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def finish_small_m_gemv(
    acc, offs_m, offs_n, m_mask, n_mask, N, partial_ptr, arrived_ptr, row_block, bias_ptr, out_ptr, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """`finish_gemv` for M rows: acc [BLOCK_M, BLOCK_N] goes through the [M, N] workspace, and the
    last split writes y [M, N] (row stride stride_om) in out's dtype, bias added."""
    offs = offs_m[:, None] * N + offs_n[None, :]  # into the [M, N] workspace
    mask = m_mask[:, None] & n_mask[None, :]
    y, last = last_split_total(acc, offs, mask, partial_ptr, arrived_ptr, row_block, SPLIT_K)
    if last:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
