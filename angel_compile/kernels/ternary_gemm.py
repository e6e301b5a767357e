"""Triton kernels for `angel::ternary_3of4_linear` (1.25-bit 3:4 ternary, format of `ops/ternary.py`).

packed uint8 [N, 5·K/32] (8 five-bit block codes per 5 bytes), scales [N, K/g] (g = K: per
channel). y [M, N] in x's dtype, fp32 accumulation; these kernels need K % 32 == 0 (the launcher
falls back to the reference for a padded per-channel K).

- M == 1 (decode), `_gemv_kernel`, for K % 128 == 0: a lookup of x-sums (LUT-GEMV, as in T-MAC).
  A block of 4 weights has 32 possible values of Σ_p t_p x_p, one per code, so per K tile each
  program builds the table T[block, c] = Σ_p t_p(c) x_p (4 FMAs per entry, `_code_values` gives
  t_p(c)); each block of a row then costs one table read and one add, no per-weight work.
  Layout (`tl.gather` along the last axis of [S, NGS, PG, R, 32]): lane c holds T[block, c] of
  every block of the tile, and lane j decodes rows 32r + j (r < R = BLOCK_N / 32), so a lookup is
  one warp shuffle (`shfl.idx` from lane = code) and all lanes read the same block's table at once.
  The table costs 4 FMAs a lane per block against R lookups, so R (rows per lane) amortizes it.
  One warp per program: with more, Triton's gather layout puts the extra warps along the code
  positions, which makes the code extraction depend on the warp.
  The packed row is read as 32-bit words, 5 per 128 weights (a "super-chunk" of 4 chunks, aligned
  when K % 128 == 0): code i of the super-chunk sits at bit 5i of its 160 bits, in word 5i // 32
  (codes 6, 12, 19, 25 straddle two words). Word and shift are constants per register, so a code
  costs a shift and a mask, all 32-bit. Scales apply once per scale group (NGS groups of g < 128
  per super-chunk, else one). Split K for more programs (`gemv_split_k`): fp32 atomics into a
  workspace; the last program of a row block adds the bias and writes y (`split_k.last_split_total`),
  so a split GEMV is still one kernel launch.
- M > 1 (and M == 1 with K % 128 != 0), `_gemm_kernel`: a chunk's 5 bytes form the 40-bit integer
  V, code i = (V >> 5i) & 31, and `TERNARY_CODE_TO_2BIT` (a 32-entry table in L1) gives the
  block's four weights as 2-bit fields t + 1; the tile is unpacked to t · s in x's dtype and
  multiplied on tensor cores (`tl.dot`), BLOCK_K dividing g or g dividing BLOCK_K. M >= 256
  dequantizes W once (`_dequantize_kernel`) for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.split_k import (
    finish_gemv,
    finish_split_k,
    gemv_workspace,
    split_k_for,
    split_k_output,
    split_k_tiles,
    store_or_add,
)
from angel_compile.kernels.tiling import rows_and_contiguous
from angel_compile.ops.ternary import (
    CHUNK_BYTES,
    CHUNK_WEIGHTS,
    TERNARY_CODE_TABLE,
    TERNARY_CODE_TO_2BIT,
    ternary_3of4_linear_reference,
)

GEMV_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 1, "num_stages": 3}
# Candidates for timing on the GPU (benchmarks/bench_lowbit.py --variants). One warp per program:
# with more, Triton puts the extra warps along the code positions, not along the rows (see docstring).
# BLOCK_N = 32 · rows per lane: more rows amortize the table, fewer leave more programs; no SPLIT_K
# means `gemv_split_k`. GEMV_CONFIG ("n64_k256_st3") was the fastest of a 14-tile sweep on an H100
# for both Llama-8B shapes (benchmarks/RESULTS.md, issue 6); the others here are its neighbours.
GEMV_VARIANTS: dict[str, dict] = {
    "n64_k256_st3": GEMV_CONFIG,
    "n64_k256_st2": {**GEMV_CONFIG, "num_stages": 2},
    "n64_k256_st4": {**GEMV_CONFIG, "num_stages": 4},
    "n64_k512_st3": {**GEMV_CONFIG, "BLOCK_K": 512},
    "n64_k512_st2": {**GEMV_CONFIG, "BLOCK_K": 512, "num_stages": 2},
    "n32_k256_st3": {**GEMV_CONFIG, "BLOCK_N": 32},
    "n32_k512_st3": {**GEMV_CONFIG, "BLOCK_N": 32, "BLOCK_K": 512},
    "n64_k128_st4": {**GEMV_CONFIG, "BLOCK_K": 128, "num_stages": 4},
    "n128_k128_st3": {**GEMV_CONFIG, "BLOCK_N": 128, "BLOCK_K": 128},
    "n64_k256_st3_split8": {**GEMV_CONFIG, "SPLIT_K": 8},
}
SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
DEQUANTIZE_MIN_M = 256
GEMV_TARGET_PROGRAMS = 1056  # eight one-warp programs per SM of an H100
SUPER_CHUNK_WEIGHTS = 128  # the GEMV reads 4 chunks (5 aligned 32-bit words) at a time
_LUTS: dict[torch.device, torch.Tensor] = {}
_CODE_VALUES: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    if device not in _LUTS:
        _LUTS[device] = TERNARY_CODE_TO_2BIT.to(device)
    return _LUTS[device]


def gemv_split_k(n: int, k: int, block_n: int, block_k: int) -> int:
    """K splits of the GEMV: up to GEMV_TARGET_PROGRAMS one-warp programs, at least 2 K tiles each."""
    return split_k_for(n, k, block_n, block_k, GEMV_TARGET_PROGRAMS, min_tiles=2)


def _code_values(device: torch.device) -> torch.Tensor:
    # float32 [32, 4]: the weights t ∈ {−1, 0, 1} of each block code (the GEMV's table builder reads it).
    if device not in _CODE_VALUES:
        _CODE_VALUES[device] = TERNARY_CODE_TABLE.float().to(device)
    return _CODE_VALUES[device]


@triton.jit
def _block_codes(w_ptr, offs_n, n_mask, stride_wn, chunk0, CHUNKS: tl.constexpr, K):
    # [BLOCK_N, CHUNKS, 8] five-bit block codes of the chunks chunk0 .. chunk0 + CHUNKS − 1.
    offs_c = chunk0 + tl.arange(0, CHUNKS)
    mask = n_mask[:, None] & (offs_c * 32 < K)[None, :]
    base = w_ptr + offs_n[:, None] * stride_wn + offs_c[None, :] * 5  # [BLOCK_N, CHUNKS]
    v = tl.zeros(base.shape, dtype=tl.uint64)
    for j in tl.static_range(5):
        byte = tl.load(base + j, mask=mask, other=0, eviction_policy="evict_first")
        v |= byte.to(tl.uint64) << (8 * j)
    return (v[:, :, None] >> (5 * tl.arange(0, 8)).to(tl.uint64)[None, None, :]) & 31


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, t_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr,
    N, K, stride_wn, stride_sn,
    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # Shapes [S, NGS, PG, R, 32]: super-chunk, scale group inside it, code position in the group,
    # row register, lane (= table entry on the gather axis, = row inside 32 rows of the program).
    S: tl.constexpr = BLOCK_K // 128  # super-chunks of 128 weights (5 words, 32 codes) per K tile
    NGS: tl.constexpr = 128 // GROUP if GROUP < 128 else 1  # scale groups per super-chunk
    PG: tl.constexpr = 32 // NGS  # codes per scale group inside a super-chunk
    R: tl.constexpr = BLOCK_N // 32  # rows per lane (over all warps)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, R)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [R, 32]
    n_mask = offs_n < N
    offs_s = tl.arange(0, S)[:, None, None, None, None]
    offs_g = tl.arange(0, NGS)[None, :, None, None, None]
    pos = offs_g * PG + tl.arange(0, PG)[None, None, :, None, None]  # code i of the super-chunk, bits 5i
    word = (5 * pos) >> 5  # constants per register: LLVM folds the selects below
    shift = ((5 * pos) & 31).to(tl.uint32)
    entry = tl.arange(0, 32)[None, None, None, None, :]
    t0 = tl.load(t_ptr + entry * 4)  # [1, 1, 1, 1, 32] weight p of block code `entry`, in {-1, 0, 1}
    t1 = tl.load(t_ptr + entry * 4 + 1)
    t2 = tl.load(t_ptr + entry * 4 + 2)
    t3 = tl.load(t_ptr + entry * 4 + 3)
    t_begin, t_end = split_k_tiles(tl.cdiv(K, BLOCK_K), tl.program_id(1), SPLIT_K)
    w_ptrs = w_ptr + offs_n[None, :, :] * stride_wn + tl.arange(0, S)[:, None, None] * 5  # [S, R, 32] words
    acc = tl.zeros((R, 32), dtype=tl.float32)
    for k0 in tl.range(t_begin * BLOCK_K, t_end * BLOCK_K, BLOCK_K, num_stages=STAGES):
        s_valid = k0 + offs_s * 128 < K  # [S, 1, 1, 1, 1]
        w_mask = n_mask[None, :, :] & (k0 + tl.arange(0, S)[:, None, None] * 128 < K)
        p = w_ptrs + k0 // 128 * 5
        w0 = tl.load(p, mask=w_mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w1 = tl.load(p + 1, mask=w_mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w2 = tl.load(p + 2, mask=w_mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w3 = tl.load(p + 3, mask=w_mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w4 = tl.load(p + 4, mask=w_mask, other=0, eviction_policy="evict_first").to(tl.uint32, bitcast=True)
        w0, w1, w2 = w0[:, None, None, :, :], w1[:, None, None, :, :], w2[:, None, None, :, :]
        w3, w4 = w3[:, None, None, :, :], w4[:, None, None, :, :]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, tl.where(word == 3, w3, w4))))
        hi = tl.where(word == 0, w1, tl.where(word == 1, w2, tl.where(word == 2, w3, w4)))
        straddle = tl.where(shift > 27, hi << ((32 - shift) & 31), 0)  # codes 6, 12, 19, 25 span two words
        codes = (((lo >> shift) | straddle) & 31).to(tl.int32)  # [S, NGS, PG, R, 32]
        # Table of the 32 signed sums of each block's four x values: T[block, c] = Σ_p t_p(c) x_p.
        x_ptrs = x_ptr + k0 + offs_s * 128 + pos * 4  # [S, NGS, PG, 1, 1]
        table = tl.load(x_ptrs, mask=s_valid, other=0.0).to(tl.float32) * t0
        table += tl.load(x_ptrs + 1, mask=s_valid, other=0.0).to(tl.float32) * t1
        table += tl.load(x_ptrs + 2, mask=s_valid, other=0.0).to(tl.float32) * t2
        table += tl.load(x_ptrs + 3, mask=s_valid, other=0.0).to(tl.float32) * t3  # [S, NGS, PG, 1, 32]
        table = tl.broadcast_to(table, (S, NGS, PG, R, 32))
        sums = tl.sum(tl.gather(table, codes, axis=4), axis=2, keep_dims=True)  # [S, NGS, 1, R, 32]
        g = (k0 + offs_s * 128 + offs_g * (128 // NGS)) // GROUP  # [S, NGS, 1, 1, 1] scale group
        scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask & s_valid, other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(tl.sum(sums * scale, axis=2), axis=1), axis=0)
    finish_gemv(acc, offs_n, n_mask, partial_ptr, arrived_ptr, tl.program_id(0), bias_ptr, out_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequantized_tile(w_ptr, s_ptr, lut_ptr, offs_n, n_mask, stride_wn, stride_sn, k0, K, GROUP, BLOCK_K: tl.constexpr):
    # fp32 [BLOCK_N, BLOCK_K] t · s of one K tile (inside one scale group), k order.
    codes = _block_codes(w_ptr, offs_n, n_mask, stride_wn, k0 // 32, BLOCK_K // 32, K)
    u = tl.load(lut_ptr + codes)  # [BLOCK_N, CHUNKS, 8] uint8
    fields = (u[:, :, :, None] >> (2 * tl.arange(0, 4)).to(tl.uint8)[None, None, None, :]) & 3
    t = tl.reshape(fields, (offs_n.shape[0], BLOCK_K)).to(tl.float32) - 1.0
    scale = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
    return t * scale[:, None]


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, lut_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    t_begin, t_end = split_k_tiles(K // BLOCK_K, tl.program_id(2), SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(t_begin * BLOCK_K, t_end * BLOCK_K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        w = _dequantized_tile(w_ptr, s_ptr, lut_ptr, offs_n, n_mask, stride_wn, stride_sn, k0, K, GROUP, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if HAS_BIAS and SPLIT_K == 1:  # with split K, finish_split_k adds it
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_or_add(out_ptrs, acc, m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, lut_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    w = _dequantized_tile(w_ptr, s_ptr, lut_ptr, offs_n, n_mask, stride_wn, stride_sn, k0, K, GROUP, BLOCK_K)
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + k0 + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def tile_k(group_size: int, k: int, preferred: int) -> int:
    """A K tile (power of two, 32 .. preferred) that lies inside one scale group or holds whole groups."""
    if group_size >= preferred or group_size == k:
        tile = preferred
        while group_size % tile:  # per-channel K like 576 = 64 · 9
            tile //= 2
        return tile
    return preferred  # groups are powers of two below the tile: it holds whole groups


def dequantize_ternary_3of4_triton(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """W [N, K] in `dtype` from the 3:4 format (K % 32 == 0)."""
    n = packed.shape[0]
    block_k = tile_k(group_size, k, 128)
    block_k = min(block_k, group_size)
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, 32), k // block_k)
    _dequantize_kernel[grid](
        packed, scales, _lut(packed.device), out, n, k, packed.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_N=32, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def ternary_3of4_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype; weights as in ops/ternary.py.

    `config` (BLOCK_* sizes, SPLIT_K, num_warps, num_stages) replaces the default tile of the
    path M selects (GEMV_VARIANTS for M == 1: BLOCK_K a power-of-two multiple of 128, BLOCK_N of
    32; the tl.dot GEMM: BLOCK_K inside a scale group or holding whole groups).
    """
    *lead, k = x.shape
    n = packed.shape[0]
    if k % CHUNK_WEIGHTS or packed.shape[1] != k // CHUNK_WEIGHTS * CHUNK_BYTES:
        return ternary_3of4_linear_reference(x, packed, scales, group_size, bias)  # padded last chunk
    x2, packed, scales, bias = rows_and_contiguous(x, packed, scales, bias)  # x2 [M, K]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    any_ptr = scales
    if m >= DEQUANTIZE_MIN_M and config is None:
        w = dequantize_ternary_3of4_triton(packed, scales, group_size, k, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, n)
    if m == 1 and k % SUPER_CHUNK_WEIGHTS == 0:
        meta = {**GEMV_CONFIG, **(config or {})}
        split = meta.pop("SPLIT_K", None) or gemv_split_k(n, k, meta["BLOCK_N"], meta["BLOCK_K"])
        stages = meta.pop("num_stages")
        partial, arrived = gemv_workspace(x.device, n, triton.cdiv(n, meta["BLOCK_N"]))
        out = x.new_empty((1, n))
        _gemv_kernel[(triton.cdiv(n, meta["BLOCK_N"]), split)](
            x2, packed.view(torch.int32), scales, _code_values(x.device), any_ptr if bias is None else bias, out,
            partial, arrived, n, k, packed.shape[1] // 4, scales.stride(0),
            HAS_BIAS=bias is not None, GROUP=group_size, SPLIT_K=split, STAGES=stages, **meta,
        )  # fmt: skip
        return out.reshape(*lead, n)
    if config is not None and "BLOCK_M" not in config:
        config = None  # a GEMV config, here for M == 1 with K % 128 != 0
    meta = {**(SMALL_M_CONFIG if m <= 16 else LARGE_M_CONFIG), **(config or {})}
    meta["BLOCK_K"] = min(tile_k(group_size, k, meta["BLOCK_K"]), group_size)  # inside one group
    split = meta.pop("SPLIT_K", None) or (split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"]) if m <= 16 else 1)
    out = split_k_output(m, n, split, x.dtype, x.device)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), split)
    _gemm_kernel[grid](
        x2, packed, scales, _lut(x.device), any_ptr if bias is None else bias, out,
        m, n, k, x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, GROUP=group_size,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", SPLIT_K=split, **meta,
    )  # fmt: skip
    return finish_split_k(out, bias, split, x.dtype).reshape(*lead, n)
