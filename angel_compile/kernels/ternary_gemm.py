"""Triton kernels for `angel::ternary_3of4_linear` (1.25-bit 3:4 ternary, format of `ops/ternary.py`).

packed uint8 [N, 5·K/32] (8 five-bit block codes per 5 bytes), scales [N, K/g] (g = K: per
channel). y [M, N] in x's dtype, fp32 accumulation; these kernels need K % 32 == 0 (the launcher
falls back to the reference for a padded per-channel K) and BLOCK_K dividing g or g dividing BLOCK_K.

Decoding a chunk: its 5 bytes form the 40-bit integer V; code i = (V >> 5i) & 31. Each code goes
through `TERNARY_CODE_TO_2BIT`, a 32-entry table (128 bytes, resident in L1), to one byte with the
block's four weights as 2-bit fields u = t + 1 ∈ {0, 1, 2}: one lookup per 4 weights replaces the
zero-position / sign-bit arithmetic.

- M == 1 (decode), `_gemv_kernel`: each u becomes the float 1 + u/4 with a shift and an AND/OR
  (no conversion instruction), multiplied with x; per scale group
      Σ_k t_k x_k = Σ_k (u_k − 1) x_k = 4 Σ_k f_k x_k − 5 Σ_k x_k
  so the weights cost no multiplications of their own and the scale is applied once per group
  (once per K tile when the tile lies inside one group). SPLIT_K as in `kernels/int2_gemm.py`.
- M > 1, `_gemm_kernel`: the tile is unpacked to t · s in x's dtype and multiplied on tensor
  cores (`tl.dot`); M >= 256 dequantizes W once (`_dequantize_kernel`) for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.int2_gemm import _finish, split_k_for
from angel_compile.ops.ternary import CHUNK_BYTES, CHUNK_WEIGHTS, TERNARY_CODE_TO_2BIT, ternary_3of4_linear_reference

GEMV_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}
SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
DEQUANTIZE_MIN_M = 256
_LUTS: dict[torch.device, torch.Tensor] = {}


def _lut(device: torch.device) -> torch.Tensor:
    if device not in _LUTS:
        _LUTS[device] = TERNARY_CODE_TO_2BIT.to(device)
    return _LUTS[device]


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
    x_ptr, w_ptr, s_ptr, lut_ptr, bias_ptr, out_ptr,
    N, K, stride_wn, stride_sn,
    HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    CHUNKS: tl.constexpr = BLOCK_K // 32
    NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # scale groups per K tile
    GW: tl.constexpr = BLOCK_K // NG  # weights per scale group inside the tile
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, NG)
    shifts = (21 - 2 * tl.arange(0, 4)).to(tl.uint32)  # field p of the byte -> mantissa bit 21
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_end = min(k_begin + tiles_per_split * BLOCK_K, K)
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        codes = _block_codes(w_ptr, offs_n, n_mask, stride_wn, k0 // 32, CHUNKS, K)  # [BLOCK_N, CHUNKS, 8]
        u = tl.load(lut_ptr + codes).to(tl.uint32)  # 32-entry lookup
        f = (((u[:, :, :, None] << shifts[None, None, None, :]) & 0x600000) | 0x3F800000).to(tl.float32, bitcast=True)
        f = tl.reshape(f, (BLOCK_N, BLOCK_K))  # 1 + u/4, k order
        x = tl.load(x_ptr + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
        fx = tl.sum(tl.reshape(f * x[None, :], (BLOCK_N, NG, GW)), axis=2)  # [BLOCK_N, NG]
        x_sum = tl.sum(tl.reshape(x, (NG, GW)), axis=1)  # [NG]
        g = (k0 + offs_g * GW) // GROUP
        scale = tl.load(
            s_ptr + offs_n[:, None] * stride_sn + g[None, :],
            mask=n_mask[:, None] & (g < K // GROUP)[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += (4.0 * fx - 5.0 * x_sum[None, :]) * scale
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(out_ptr + offs_n, y, mask=n_mask, sem="relaxed")


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
    tiles_per_split = tl.cdiv(K // BLOCK_K, SPLIT_K)
    k_begin = tl.program_id(2) * tiles_per_split * BLOCK_K
    k_end = min(k_begin + tiles_per_split * BLOCK_K, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        w = _dequantized_tile(w_ptr, s_ptr, lut_ptr, offs_n, n_mask, stride_wn, stride_sn, k0, K, GROUP, BLOCK_K)
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
    path M selects; BLOCK_K must lie inside a scale group or hold whole groups.
    """
    *lead, k = x.shape
    n = packed.shape[0]
    if k % CHUNK_WEIGHTS or packed.shape[1] != k // CHUNK_WEIGHTS * CHUNK_BYTES:
        return ternary_3of4_linear_reference(x, packed, scales, group_size, bias)  # padded last chunk
    x2 = x.reshape(-1, k).contiguous()
    packed, scales = packed.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    lut = _lut(x.device)
    any_ptr = scales
    if m >= DEQUANTIZE_MIN_M and config is None:
        w = dequantize_ternary_3of4_triton(packed, scales, group_size, k, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, n)
    if m == 1:
        meta = {**GEMV_CONFIG, **(config or {})}
        if config is None or "BLOCK_K" not in config:
            meta["BLOCK_K"] = tile_k(group_size, k, meta["BLOCK_K"])
        split = meta.pop("SPLIT_K", None) or split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"])
        stages = meta.pop("num_stages")
        out = torch.zeros((1, n), dtype=torch.float32, device=x.device) if split > 1 else x.new_empty((1, n))
        _gemv_kernel[(triton.cdiv(n, meta["BLOCK_N"]), split)](
            x2, packed, scales, lut, any_ptr if bias is None else bias, out, n, k, packed.stride(0), scales.stride(0),
            HAS_BIAS=bias is not None, GROUP=group_size, SPLIT_K=split, STAGES=stages, **meta,
        )  # fmt: skip
        return _finish(out, bias, split, x.dtype).reshape(*lead, n)
    meta = {**(SMALL_M_CONFIG if m <= 16 else LARGE_M_CONFIG), **(config or {})}
    meta["BLOCK_K"] = min(tile_k(group_size, k, meta["BLOCK_K"]), group_size)  # inside one group
    split = meta.pop("SPLIT_K", None) or (split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"]) if m <= 16 else 1)
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else x.new_empty((m, n))
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), split)
    _gemm_kernel[grid](
        x2, packed, scales, lut, any_ptr if bias is None else bias, out,
        m, n, k, x2.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, GROUP=group_size,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", SPLIT_K=split, **meta,
    )  # fmt: skip
    return _finish(out, bias, split, x.dtype).reshape(*lead, n)
