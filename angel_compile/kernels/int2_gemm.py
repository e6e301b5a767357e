"""Triton kernels for `angel::int2_weight_only_linear` (INT2 group-wise, format of `ops/int2.py`).

packed uint8 [N, K/4] (lowest bits = first weight), scales [N, K/g], zeros uint8 [N, K/g] or None
(zero point 2). y [M, N] in x's dtype, fp32 accumulation, any M and N (masked edges), K % g == 0.

- M == 1 (decode), `_gemv_kernel`, CUDA cores: each program streams BLOCK_N packed rows as
  contiguous [BLOCK_N, BLOCK_K/4] byte tiles (evict-first: read once). A 2-bit code q becomes the
  float 1 + q/4 with one shift and one AND/OR on its byte (bits placed in the fp32 mantissa under
  the exponent of 1.0), so there is no integer-to-float conversion and no per-weight subtraction:
      Σ_k f_k x_k = Σ_k x_k + Σ_k q_k x_k / 4   =>   Σ_k (q_k − z) s x_k = s (4 Σ f x − (4 + z) Σ x)
  per group, so the scale and zero point are applied once per group. SPLIT_K > 1 splits K over
  programs (fp32 atomics) when N / BLOCK_N programs alone leave SMs idle.
- 1 < M < 256, `_gemm_kernel`: a [BLOCK_N, BLOCK_K] tile is unpacked and dequantized in registers
  ((q − z) · s, one group per K tile) to x's dtype and multiplied on tensor cores (`tl.dot`); one
  16-row tile covers M <= 16, so W is read once; split K as in the GEMV.
- M >= 256 (prefill, compute bound): `_dequantize_kernel` writes W in x's dtype, cuBLAS multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}
SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
DEQUANTIZE_MIN_M = 256
TARGET_PROGRAMS = 264  # two per SM of an H100: with fewer, split K


@triton.jit
def _unit_float(b, shift):
    # Bits 2i, 2i+1 of byte b moved to mantissa bits 21, 22 under 1.0's exponent: 1 + q/4.
    return (((b << shift) & 0x600000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    N, K, stride_wn, stride_sn,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per K tile (BLOCK_K is a multiple of GROUP)
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    n_mask = offs_n < N
    offs_b = tl.arange(0, BLOCK_K // 4)  # bytes of a K tile
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, NG)
    shifts = (21 - 2 * tl.arange(0, 4)).to(tl.uint32)  # [4]: weight i of a byte -> bit 21
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_end = min(k_begin + tiles_per_split * BLOCK_K, K)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :]  # [BLOCK_N, BLOCK_K/4]
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        b_mask = n_mask[:, None] & (k0 + offs_b * 4 < K)[None, :]
        b = tl.load(w_ptrs + k0 // 4, mask=b_mask, other=0, eviction_policy="evict_first").to(tl.uint32)
        f = tl.reshape(_unit_float(b[:, :, None], shifts[None, None, :]), (BLOCK_N, BLOCK_K))  # k order
        x = tl.load(x_ptr + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        fx = tl.sum(tl.reshape(f * x[None, :], (BLOCK_N, NG, GROUP)), axis=2)  # [BLOCK_N, NG]
        x_sum = tl.sum(tl.reshape(x, (NG, GROUP)), axis=1)  # [NG]
        g_mask = n_mask[:, None] & (k0 // GROUP + offs_g < K // GROUP)[None, :]
        sz_ptrs = offs_n[:, None] * stride_sn + k0 // GROUP + offs_g[None, :]
        scale = tl.load(s_ptr + sz_ptrs, mask=g_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + sz_ptrs, mask=g_mask, other=0).to(tl.float32)
        else:
            zero = 2.0
        acc += (4.0 * fx - (4.0 + zero) * x_sum[None, :]) * scale
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(out_ptr + offs_n, y, mask=n_mask, sem="relaxed")


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
    tiles_per_split = tl.cdiv(K // BLOCK_K, SPLIT_K)  # BLOCK_K divides GROUP, GROUP divides K
    k_begin = tl.program_id(2) * tiles_per_split * BLOCK_K
    k_end = min(k_begin + tiles_per_split * BLOCK_K, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + tl.arange(0, BLOCK_K // 4)[None, :]  # [BLOCK_N, BLOCK_K/4]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs + k0 // 4, mask=n_mask[:, None], other=0)
        w = _dequantized_tile(b, offs_n, n_mask, k0 // GROUP, s_ptr, z_ptr, stride_sn, HAS_ZEROS, BLOCK_K)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


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
    n, k = packed.shape[0], packed.shape[1] * 4
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, 32), k // group_size)
    _dequantize_kernel[grid](
        packed, scales, scales if zeros is None else zeros, out, n, packed.stride(0), scales.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, GROUP=group_size, BLOCK_N=32,
    )  # fmt: skip
    return out


def split_k_for(n: int, k: int, block_n: int, block_k: int) -> int:
    """K splits: enough programs for the SMs, at least 4 K tiles per split."""
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split * 2 <= TARGET_PROGRAMS and k // block_k >= split * 2 * 4:
        split *= 2
    return split


def _finish(out: torch.Tensor, bias: torch.Tensor | None, split: int, dtype: torch.dtype) -> torch.Tensor:
    # Split-K programs added fp32 partial sums; bias and the cast come after.
    if split == 1:
        return out
    return (out if bias is None else out + bias.float()).to(dtype)


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
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    packed, scales = packed.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
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
        out = torch.zeros((1, n), dtype=torch.float32, device=x.device) if split > 1 else x.new_empty((1, n))
        _gemv_kernel[(triton.cdiv(n, meta["BLOCK_N"]), split)](
            x2, packed, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None else bias, out,
            n, k, packed.stride(0), scales.stride(0),
            HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GROUP=group_size, SPLIT_K=split, STAGES=stages,
            **meta,
        )  # fmt: skip
        return _finish(out, bias, split, x.dtype).reshape(*lead, n)
    meta = {**(SMALL_M_CONFIG if m <= 16 else LARGE_M_CONFIG), **(config or {})}
    meta["BLOCK_K"] = min(meta["BLOCK_K"], group_size)  # one group per K tile
    split = meta.pop("SPLIT_K", None) or (split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"]) if m <= 16 else 1)
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else x.new_empty((m, n))
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), split)
    _gemm_kernel[grid](
        x2, packed, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None else bias, out,
        m, n, k, x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GROUP=group_size,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", SPLIT_K=split, **meta,
    )  # fmt: skip
    return _finish(out, bias, split, x.dtype).reshape(*lead, n)
