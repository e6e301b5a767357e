"""Triton kernels for `angel::ternary_kmajor_linear` (3:4 ternary in the K-major layout of `ops/ternary_kmajor.py`).

lo int32 [K/32, N] (8 low code nibbles a word), hi int32 [K/128, N] (32 high code bits a word),
scales [K/g, N]; y [M, N] in x's dtype, fp32 accumulation, any N (masked), K % 128 == 0.

- M == 1 (decode), `_gemv_kernel`, one launch. A program owns BLOCK_N output channels and the
  spans (128 k) of one K split; per chunk row (32 k: 8 blocks of 4 weights) it reads one lo word a
  channel (the span's hi word once) and builds in registers the chunk's table T [32, 8], T[c, b] =
  Σ_p t_p(c) x[32·row + 4b + p] (the 32 sums a block's code can select; lane c holds code c, four
  FFMAs an entry, shared by the program's channels). Each block's code c = nibble | high bit << 4
  (shifts, masks, an OR) selects T[c, b] with `tl.gather`, which Triton lowers to one warp shuffle
  (from lane c): no memory access and no multiplication per weight, one add. (To reach the
  gather's layout, Triton 3.6 passes each word row through shared memory once; forcing one word a
  lane instead was 8–10% slower on an H100, benchmarks/RESULTS.md.) Scales multiply a chunk's
  (32 k) or a span's sum once. Split K as in `kernels/kmajor_gemm.py` (`split_k.finish_gemv`).
- 1 < M <= SMALL_M_GEMV_MAX_M, `_small_m_gemv_kernel`: the same with BLOCK_M rows; each block's
  code is decoded once and selects from every row's table (T [BLOCK_M, 32, 8]); the split-K
  workspace holds [M, N] sums.
- larger M: `_dequantize_kernel` writes Wᵀ [K, N] in x's dtype and cuBLAS multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.kmajor_gemm import pop_gemv_split
from angel_compile.kernels.split_k import finish_gemv, finish_small_m_gemv, gemv_workspace, split_k_tiles
from angel_compile.kernels.tiling import rows_and_contiguous

SPAN = 128  # k per hi word
GEMV_CONFIG = {"BLOCK_N": 128, "K_PER_SPLIT": 128, "num_warps": 1}  # one span (128 k) per program
# 1 < M <= SMALL_M_GEMV_MAX_M: `_small_m_gemv_kernel`, one warp, tiles per BLOCK_M (M rounded up to
# a power of two): the best of an H100 sweep at both Llama shapes (benchmarks/RESULTS.md); at
# BLOCK_M = 8, 128 channels spill registers. Larger M: dequantize + cuBLAS.
SMALL_M_GEMV_MAX_M = 8
SMALL_M_GEMV_CONFIGS = {
    2: {"BLOCK_N": 128, "K_PER_SPLIT": 256},
    4: {"BLOCK_N": 128, "K_PER_SPLIT": 128},
    8: {"BLOCK_N": 64, "K_PER_SPLIT": 128},
}


@triton.jit
def _code_weight(codes, p: tl.constexpr):
    """t_p ∈ {−1, 0, 1} (fp32) of 5-bit codes c = z << 3 | s (`ops/ternary.py`)."""
    z = codes >> 3
    j = p - (z < p).to(tl.int32)  # the rank of p among the non-zero positions
    negative = (codes >> j) & 1
    return tl.where(z == p, 0.0, 1.0 - 2.0 * negative.to(tl.float32))


@triton.jit
def _chunk_codes(lo, hi, R: tl.constexpr, blocks):
    """[BLOCK_N, 8] 5-bit codes of chunk row R of a span: nibble b of lo | bit 8R + b of hi << 4."""
    nibble = (lo[:, None] >> (4 * blocks[None, :])) & 15
    return nibble | (((hi[:, None] >> (8 * R + blocks[None, :])) & 1) << 4)


@triton.jit
def _gemv_kernel(
    x_ptr, lo_ptr, hi_ptr, s_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr,
    N, K, stride_lo, stride_hi, stride_s,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    span_begin, span_end = split_k_tiles(K // 128, tl.program_id(1), SPLIT_K)  # spans of 128 k
    codes = tl.arange(0, 32)[:, None]  # [32, 1]
    t0, t1, t2, t3 = _code_weight(codes, 0), _code_weight(codes, 1), _code_weight(codes, 2), _code_weight(codes, 3)
    blocks = tl.arange(0, 8)  # the 8 blocks of a chunk row
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for q in range(span_begin, span_end):
        hi = tl.load(hi_ptr + q * stride_hi + offs_n, mask=n_mask, other=0)
        span_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r in tl.static_range(4):
            row = 4 * q + r  # chunk row: k 32·row .. 32·row + 31
            lo = tl.load(lo_ptr + row * stride_lo + offs_n, mask=n_mask, other=0, eviction_policy="evict_first")
            x_block = x_ptr + 32 * row + 4 * blocks  # [8]: the first x of each block
            table = t0 * tl.load(x_block).to(tl.float32)[None, :]  # [32, 8]
            table += t1 * tl.load(x_block + 1).to(tl.float32)[None, :]
            table += t2 * tl.load(x_block + 2).to(tl.float32)[None, :]
            table += t3 * tl.load(x_block + 3).to(tl.float32)[None, :]
            code = _chunk_codes(lo, hi, r, blocks)  # [BLOCK_N, 8]
            chunk_sum = tl.sum(tl.gather(table, code, axis=0), axis=1)  # [BLOCK_N]
            if GROUP % 128 == 0:
                span_sum += chunk_sum
            else:  # a group of 32 or 64 k: scale each chunk
                scale = tl.load(s_ptr + (32 * row // GROUP) * stride_s + offs_n, mask=n_mask, other=0.0)
                acc = tl.fma(chunk_sum, scale.to(tl.float32), acc)
        if GROUP % 128 == 0:
            scale = tl.load(s_ptr + (128 * q // GROUP) * stride_s + offs_n, mask=n_mask, other=0.0)
            acc = tl.fma(span_sum, scale.to(tl.float32), acc)
    finish_gemv(acc, offs_n, n_mask, partial_ptr, arrived_ptr, pid_n, bias_ptr, out_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _small_m_gemv_kernel(
    x_ptr, lo_ptr, hi_ptr, s_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr,
    M, N, K, stride_xm, stride_lo, stride_hi, stride_s, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    span_begin, span_end = split_k_tiles(K // 128, tl.program_id(1), SPLIT_K)  # spans of 128 k
    codes = tl.arange(0, 32)[None, :, None]  # [1, 32, 1]
    t0, t1, t2, t3 = _code_weight(codes, 0), _code_weight(codes, 1), _code_weight(codes, 2), _code_weight(codes, 3)
    blocks = tl.arange(0, 8)
    x_blocks = x_ptr + offs_m[:, None] * stride_xm + 4 * blocks[None, :]  # [BLOCK_M, 8]: a chunk row's blocks
    x_mask = m_mask[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q in range(span_begin, span_end):
        hi = tl.load(hi_ptr + q * stride_hi + offs_n, mask=n_mask, other=0)
        span_sum = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in tl.static_range(4):
            row = 4 * q + r  # chunk row: k 32·row .. 32·row + 31
            lo = tl.load(lo_ptr + row * stride_lo + offs_n, mask=n_mask, other=0, eviction_policy="evict_first")
            x_row = x_blocks + 32 * row
            table = t0 * tl.load(x_row, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]  # [BLOCK_M, 32, 8]
            table += t1 * tl.load(x_row + 1, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
            table += t2 * tl.load(x_row + 2, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
            table += t3 * tl.load(x_row + 3, mask=x_mask, other=0.0).to(tl.float32)[:, None, :]
            code = _chunk_codes(lo, hi, r, blocks)  # [BLOCK_N, 8]
            rows_code = tl.broadcast_to(code[None, :, :], (BLOCK_M, BLOCK_N, 8))
            chunk_sum = tl.sum(tl.gather(table, rows_code, axis=1), axis=2)  # [BLOCK_M, BLOCK_N]
            if GROUP % 128 == 0:
                span_sum += chunk_sum
            else:  # a group of 32 or 64 k: scale each chunk
                scale = tl.load(s_ptr + (32 * row // GROUP) * stride_s + offs_n, mask=n_mask, other=0.0)
                acc = tl.fma(chunk_sum, scale.to(tl.float32)[None, :], acc)
        if GROUP % 128 == 0:
            scale = tl.load(s_ptr + (128 * q // GROUP) * stride_s + offs_n, mask=n_mask, other=0.0)
            acc = tl.fma(span_sum, scale.to(tl.float32)[None, :], acc)
    finish_small_m_gemv(
        acc, offs_m, offs_n, m_mask, n_mask, N, partial_ptr, arrived_ptr, pid_n, bias_ptr, out_ptr, stride_om,
        HAS_BIAS, SPLIT_K,
    )  # fmt: skip


@triton.jit
def _dequantize_kernel(
    lo_ptr, hi_ptr, s_ptr, out_ptr, N, stride_lo, stride_hi, stride_s, stride_ok,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One chunk row (32 k) × BLOCK_N channels of Wᵀ [K, N] per program.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1)
    n_mask = offs_n < N
    lo = tl.load(lo_ptr + row * stride_lo + offs_n, mask=n_mask, other=0)
    hi = tl.load(hi_ptr + (row // 4) * stride_hi + offs_n, mask=n_mask, other=0)
    scale = tl.load(s_ptr + (32 * row // GROUP) * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    for i in tl.static_range(8):
        code = ((lo >> (4 * i)) & 15) | (((hi >> (8 * (row % 4) + i)) & 1) << 4)
        for p in tl.static_range(4):
            w = _code_weight(code, p) * scale
            out_ptrs = out_ptr + (32 * row + 4 * i + p) * stride_ok + offs_n
            tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask)


def _gemv(x2, lo, hi, scales, group_size, bias, config):
    k, n = x2.shape[1], lo.shape[1]
    meta = {**GEMV_CONFIG, **(config or {})}
    split = pop_gemv_split(meta, k // SPAN, SPAN)  # spans (128 k) play the role of groups
    row_blocks = triton.cdiv(n, meta["BLOCK_N"])
    partial, arrived = gemv_workspace(x2.device, n, row_blocks)
    out = x2.new_empty((1, n))
    _gemv_kernel[(row_blocks, split)](
        x2, lo, hi, scales, scales if bias is None else bias, out, partial, arrived,
        n, k, lo.stride(0), hi.stride(0), scales.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, SPLIT_K=split, **meta,
    )  # fmt: skip
    return out


def _small_m_gemv(x2, lo, hi, scales, group_size, bias, config):
    (m, k), n = x2.shape, lo.shape[1]
    block_m = triton.next_power_of_2(m)
    meta = {**SMALL_M_GEMV_CONFIGS[block_m], "num_warps": 1, **(config or {})}
    if meta["num_warps"] != 1:
        raise ValueError(f"the small-M ternary GEMV runs one warp (warp-local gathers), got {meta['num_warps']}")
    split = pop_gemv_split(meta, k // SPAN, SPAN)
    row_blocks = triton.cdiv(n, meta["BLOCK_N"])
    partial, arrived = gemv_workspace(x2.device, m * n, row_blocks)
    out = x2.new_empty((m, n))
    _small_m_gemv_kernel[(row_blocks, split)](
        x2, lo, hi, scales, scales if bias is None else bias, out, partial, arrived,
        m, n, k, x2.stride(0), lo.stride(0), hi.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, SPLIT_K=split, **meta,
    )  # fmt: skip
    return out


def dequantize_ternary_kmajor_triton(
    lo: torch.Tensor, hi: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Wᵀ [K, N] in `dtype` from the K-major layout (CUDA)."""
    k, n = 32 * lo.shape[0], lo.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=lo.device)
    block_n = 128
    _dequantize_kernel[(triton.cdiv(n, block_n), k // 32)](
        lo, hi, scales, out, n, lo.stride(0), hi.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def ternary_kmajor_linear_triton(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype.

    M <= SMALL_M_GEMV_MAX_M: a GEMV (`config`: BLOCK_N, num_warps, SPLIT_K or K_PER_SPLIT replaces
    its tile); larger M dequantizes Wᵀ for cuBLAS.
    """
    *lead, k = x.shape
    n = lo.shape[1]
    x2, lo, hi, scales, bias = rows_and_contiguous(x, lo, hi, scales, bias)  # x2 [M, K]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    if m == 1:
        out = _gemv(x2, lo, hi, scales, group_size, bias, config)
    elif m <= SMALL_M_GEMV_MAX_M:
        out = _small_m_gemv(x2, lo, hi, scales, group_size, bias, config)
    else:
        w_t = dequantize_ternary_kmajor_triton(lo, hi, scales, group_size, x.dtype)  # [K, N]
        out = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
    return out.reshape(*lead, n)
