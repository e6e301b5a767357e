"""Triton kernels for `angel::int2_weight_only_linear` (INT2 group-wise, format of `ops/int2.py`).

packed uint8 [N, K/4] (lowest bits = first weight), scales [N, K/g], zeros uint8 [N, K/g] or None
(zero point 2). y [M, N] in x's dtype, fp32 accumulation, any M and N (masked edges), K % g == 0.

- M == 1 (decode), `_gemv_kernel`, CUDA cores. The packed rows are read as little-endian int32
  words, packed.view(int32) [N, K/16] (no repacking): field f (bits 2f, 2f+1) of word j is
  q[16j + f]. A tile is [BLOCK_N, NG, g/16] words with each thread's words inside one group, so
  the weight tile is never reshaped or interleaved (a reshape of the unpacked tile into k order
  costs a shared-memory layout conversion per tile: the previous kernel ran at 0.5× bf16) and the
  per-group sum stays inside the thread. x is loaded per field, x[16j + f] in the layout of the
  word tile: a thread loads each x value once and reuses it for every row it holds (BLOCK_N
  beyond the rows its warps cover), so the per-x work (load, convert, scale) is spread over rows.
  Decoding costs one AND and one FFMA per weight: field f, masked in place (or in word >> 16 for
  f >= 8) at bits p, p+1, is the fp32 bit pattern of the subnormal q · 2^(p − 149), exactly; x is
  scaled by 2^(85 − p) (a power of two, exact), so each product is q x · 2^-64, rounded once as
  a plain FFMA. No shift per weight, no integer-to-float conversion, no offset to subtract. Per
  group, Σ_k (q_k − z) s x_k = s (2^64 Σ products − z Σ x): scale and zero point once per group.
  This needs FFMA without flush-to-zero (Triton's default; the sm_90 test checks the PTX) and
  |x| < 2^43 (x · 2^85 stays finite). SPLIT_K > 1 splits the K tiles over programs when
  N / BLOCK_N programs alone leave SMs idle; the split that finishes a row block last writes y
  (`split_k.last_split_total`), so the GEMV stays one kernel launch (no memset, no cast kernel).
  GEMV_VARIANTS are the tiles that `benchmarks/bench_lowbit.py --variants` times; GEMV_CONFIG is
  the default.
- 1 < M < 256, `_gemm_kernel`: a [BLOCK_N, BLOCK_K] tile is unpacked and dequantized in registers
  ((q − z) · s, one group per K tile) to x's dtype and multiplied on tensor cores (`tl.dot`); one
  16-row tile covers M <= 16, so W is read once; split K as in the GEMV.
- M >= 256 (prefill, compute bound): `_dequantize_kernel` writes W in x's dtype, cuBLAS multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.int4_gemm import dequantize_groupwise
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


def _gemv_variant(block_n: int, block_k: int, warps: int, stages: int, split_k: int | None = None) -> tuple[str, dict]:
    name = f"n{block_n}_k{block_k}_w{warps}_s{stages}" + (f"_split{split_k}" if split_k else "")
    config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}
    return name, config if split_k is None else {**config, "SPLIT_K": split_k}


# M == 1 tiles that `benchmarks/bench_lowbit.py --variants` compares. A thread holds
# BLOCK_N / (rows its CTA's threads cover) rows; static sm_90 SASS counts of the loop (g = 64) are
# ~3.2 instructions per weight at 8 rows a thread, ~4.1 at 4 and ~8.3 at 1 (x work). Without
# SPLIT_K, `split_k_for` picks it. The first three were the best of a first 13-tile sweep on an
# H100 (benchmarks/RESULTS.md, issue 6); the one-warp tiles with many split-K programs follow the
# ternary GEMV, whose best tiles are one-warp programs, and won the second sweep.
GEMV_VARIANTS: dict[str, dict] = dict(
    _gemv_variant(*v)
    for v in [
        (64, 256, 2, 4, 4),
        (64, 512, 4, 3),
        (128, 512, 8, 3),
        (32, 256, 1, 4, 4),
        (32, 256, 1, 4, 8),
        (64, 256, 1, 4, 4),
        (64, 256, 1, 4, 8),
        (16, 256, 1, 4, 4),
        (32, 512, 1, 3, 4),
        (64, 256, 2, 4, 8),
        (32, 256, 2, 4, 4),
        (128, 256, 4, 4, 4),
    ]
)
# The fastest tile over both Llama-8B shapes in the second sweep (1.43x / 1.81x bf16 on an H100).
GEMV_CONFIG = GEMV_VARIANTS["n32_k512_w1_s3_split4"]
SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
DEQUANTIZE_MIN_M = 256


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr,
    N, K, stride_wn, stride_sn,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    # w: the packed rows as little-endian int32 words [N, K/16]; field f (bits 2f, 2f+1) of word j
    # of a row is q[16j + f]. A tile is [BLOCK_N, NG, WPG] words: a thread's words lie in one group,
    # so the per-group sum stays in the thread, and each x value is loaded once per thread and
    # reused by every row the thread holds (BLOCK_N beyond the rows its warps cover).
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per K tile
    WPG: tl.constexpr = GROUP // 16  # words per group row
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_g = tl.arange(0, NG)  # [NG]
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None, None] * stride_wn + (offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :])[None]
    x_offs = (offs_g[:, None] * GROUP + tl.arange(0, WPG)[None, :] * 16)[None]  # [1, NG, WPG]: k of field 0
    sz_offs = offs_n[:, None] * stride_sn + offs_g[None, :]  # [BLOCK_N, NG], scales and zeros alike
    groups = K // GROUP
    t_begin, t_end = split_k_tiles(tl.cdiv(groups, NG), tl.program_id(1), SPLIT_K)
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for t in tl.range(t_begin, t_end, num_stages=STAGES):
        g0 = t * NG
        g_mask = g0 + offs_g < groups  # [NG]
        ng_mask = n_mask[:, None] & g_mask[None, :]  # [BLOCK_N, NG]
        words = tl.load(w_ptrs + g0 * WPG, mask=ng_mask[:, :, None], other=0, eviction_policy="evict_first")
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_N, NG, WPG]
        high = words >> 16  # fields 8..15 moved to bits 0..15
        dot = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)  # Σ q x · 2^-64 per word
        x_sum = tl.zeros((1, NG, WPG), dtype=tl.float32)  # Σ x per word
        for f in tl.static_range(16):
            # Masked in place, field f at bits p, p+1 (p = 2 (f % 8) in src) is the subnormal float q · 2^(p−149)
            # (exponent bits 0), exact; x · 2^(85−p) (a power of two, exact) makes the product q x 2^-64.
            # One AND and one FFMA per weight: no shift, no conversion, no offset to remove.
            if f < 8:
                src = words
            else:
                src = high
            w = (src & (3 << 2 * (f % 8))).to(tl.float32, bitcast=True)
            x = tl.load(x_ptr + g0 * GROUP + x_offs + f, mask=g_mask[None, :, None], other=0.0).to(tl.float32)
            dot += w * (x * (2.0 ** (85 - 2 * (f % 8))))
            x_sum += x
        # Σ_k (q_k − z) s x_k = s (Σ q x − z Σ x) per group.
        scale = tl.load(s_ptr + sz_offs + g0, mask=ng_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + sz_offs + g0, mask=ng_mask, other=0).to(tl.float32)
        else:
            zero = 2.0
        acc += (tl.sum(dot, axis=2) * (2.0**64) - zero * tl.sum(x_sum, axis=2)) * scale
    total = tl.sum(acc, axis=1)
    finish_gemv(total, offs_n, n_mask, partial_ptr, arrived_ptr, tl.program_id(0), bias_ptr, out_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequantized_tile(b, offs_n, n_mask, g, s_ptr, z_ptr, stride_sn, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr):
    # b: uint8 [BLOCK_N, BLOCK_K/4] of one group -> fp32 [BLOCK_N, BLOCK_K] (q − z) · s, k order.
    shifts = (2 * tl.arange(0, 4)).to(tl.uint8)
    q = (b[:, :, None] >> shifts[None, None, :]) & 3
    q = tl.reshape(q, (b.shape[0], BLOCK_K)).to(tl.float32)
    scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, 2.0, tl.float32)
    return (q - zero[:, None]) * scale[:, None]


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    t_begin, t_end = split_k_tiles(K // BLOCK_K, tl.program_id(2), SPLIT_K)  # BLOCK_K divides GROUP divides K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + tl.arange(0, BLOCK_K // 4)[None, :]  # [BLOCK_N, BLOCK_K/4]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(t_begin * BLOCK_K, t_end * BLOCK_K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs + k0 // 4, mask=n_mask[:, None], other=0)
        w = _dequantized_tile(b, offs_n, n_mask, k0 // GROUP, s_ptr, z_ptr, stride_sn, HAS_ZEROS, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if HAS_BIAS and SPLIT_K == 1:  # with split K, finish_split_k adds it
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    store_or_add(out_ptrs, acc, m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wn, stride_sn, stride_on,
    HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_mask = offs_n < N
    b = tl.load(
        w_ptr + offs_n[:, None] * stride_wn + g * (GROUP // 4) + tl.arange(0, GROUP // 4)[None, :],
        mask=n_mask[:, None],
        other=0,
    )
    w = _dequantized_tile(b, offs_n, n_mask, g, s_ptr, z_ptr, stride_sn, HAS_ZEROS, GROUP)
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + g * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def dequantize_int2_triton(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """W [N, K] in `dtype` from the INT2 format (CUDA, or the interpreter)."""
    return dequantize_groupwise(_dequantize_kernel, 4, packed, scales, zeros, group_size, dtype)


def int2_weight_only_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype; weights as in ops/int2.py.

    `config` (BLOCK_* sizes, SPLIT_K, num_warps, num_stages) replaces the default tile of the
    path M selects (M == 1: GEMV; else the tl.dot GEMM); tests and sweeps use it.
    """
    *lead, k = x.shape
    n = packed.shape[0]
    x2, packed, scales, zeros, bias = rows_and_contiguous(x, packed, scales, zeros, bias)  # x2 [M, K]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    any_ptr = scales  # stands for absent tensors; never read when the flag is off
    if m >= DEQUANTIZE_MIN_M and config is None:
        w = dequantize_int2_triton(packed, scales, zeros, group_size, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, n)
    if m == 1:
        meta = {**GEMV_CONFIG, **(config or {})}
        meta["BLOCK_K"] = max(meta["BLOCK_K"], group_size)
        split = meta.pop("SPLIT_K", None) or split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"])
        stages = meta.pop("num_stages")
        if packed.data_ptr() % 4:  # a view at an odd byte offset: words need 4-byte alignment
            packed = packed.clone()
        words = packed.view(torch.int32)  # [N, K/16]: K % 16 == 0, so every row is whole words
        row_blocks = triton.cdiv(n, meta["BLOCK_N"])
        partial, arrived = gemv_workspace(x.device, n, row_blocks)
        out = x.new_empty((1, n))
        _gemv_kernel[(row_blocks, split)](
            x2, words, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None else bias, out,
            partial, arrived, n, k, words.stride(0), scales.stride(0),
            HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GROUP=group_size, SPLIT_K=split, STAGES=stages,
            **meta,
        )  # fmt: skip
        return out.reshape(*lead, n)
    meta = {**(SMALL_M_CONFIG if m <= 16 else LARGE_M_CONFIG), **(config or {})}
    meta["BLOCK_K"] = min(meta["BLOCK_K"], group_size)  # one group per K tile
    split = meta.pop("SPLIT_K", None) or (split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"]) if m <= 16 else 1)
    out = split_k_output(m, n, split, x.dtype, x.device)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), split)
    _gemm_kernel[grid](
        x2, packed, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None else bias, out,
        m, n, k, x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GROUP=group_size,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", SPLIT_K=split, **meta,
    )  # fmt: skip
    return finish_split_k(out, bias, split, x.dtype).reshape(*lead, n)
