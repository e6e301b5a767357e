"""Triton kernels for `angel::fp8_linear` and `angel::w8a8_int8_linear`: quantized x × quantized W.

Two kernels, shared by both ops:
- `_quantize_rows_kernel`: x [M, K] float -> codes [M, K] (float8e4nv or int8) and scales
  [M] fp32, one program per row, fused: the row's max |x|, its scale max / QMAX, then x / scale
  clamped to ±QMAX and cast. A row of K <= ROW_IN_REGISTERS_MAX_K is loaded once and kept in
  registers; a longer one is read twice (max, then codes; the second read mostly from L2).
  With a static per-tensor scale (fp8-static) the max is skipped. An optional
  per-channel multiplier [K] (SmoothQuant's 1/s where no norm could absorb it) scales x as
  it is loaded, in both passes, instead of a separate elementwise kernel.
- `_scaled_gemm_kernel`: out [M, N] = (A [M, K] @ B [N, K]ᵀ) · a_scale[m] · b_scale[n] + bias[n],
  A and B both FP8 E4M3 (fp32 accumulation) or both INT8 (int32 accumulation, exact), on the
  tensor cores (`tl.dot`); the scales are applied once per output in the epilogue. A scale
  tensor of one element (per-tensor) is read with stride 0. Tiles in grouped order (GROUP_M
  row tiles share each column tile of B while it is in L2); rows and columns past M and N are
  wrapped (`% M`) rather than masked in the K loop and masked only on the store.

B is the weight as stored by the ops, [N, K] row-major: its tile transposed is the K-major
operand FP8 wgmma wants on Hopper (the layout `torch._scaled_mm` asks for too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.tiling import grouped_tile
from angel_compile.ops.int4 import FP8_E4M3_MAX
from angel_compile.ops.w8a8_int8 import INT8_MAX


def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): H100 tiles for 1-byte operands (128-byte K rows).
# The two large tiles take 4 stages (192 KiB of shared memory): 1-4% faster than 3 on both INT8
# W8A8 shapes and FP8 8192³ in an H100 sweep (benchmarks/RESULTS.md).
GEMM_CONFIGS = _configs(
    [
        (128, 256, 128, 8, 4),
        (256, 128, 128, 8, 4),
        (128, 128, 128, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
    ]
)
# Row quantization: rows up to ROW_IN_REGISTERS_MAX_K (32 fp32 values a thread at 16 warps) in one
# tile, longer ones in QUANTIZE_BLOCK_K tiles by 16 warps: 2.2-2.8 TB/s on an H100, against
# 1.7-1.9 TB/s for 1024-wide tiles by 4 warps read twice (benchmarks/RESULTS.md).
QUANTIZE_BLOCK_K = 2048
ROW_IN_REGISTERS_MAX_K = 16384


@triton.jit
def _load_row_tile(x_row, multiplier_ptr, k0, offs, K, HAS_MULTIPLIER: tl.constexpr):
    """x[k0 + offs] as fp32, times the per-channel multiplier if there is one; 0 past K."""
    mask = k0 + offs < K
    x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULTIPLIER:
        x *= tl.load(multiplier_ptr + k0 + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store_codes(q_row, x, scale, k0, offs, K, QMAX: tl.constexpr, TO_INT: tl.constexpr):
    v = tl.clamp(x / scale, -QMAX, QMAX)  # division, as the reference: same codes at ties
    if TO_INT:
        # 1.5·2^23 + v rounds v to an integer, half to even, for |v| < 2^22.
        v = (v + 12582912.0) - 12582912.0
    tl.store(q_row + k0 + offs, v.to(q_row.dtype.element_ty), mask=k0 + offs < K)


@triton.jit
def _row_scale(amax, scale_ptr, row, QMAX: tl.constexpr):
    """max |x| / QMAX of the row from per-lane maxima, stored; an all-zero row gets 1 (any
    positive scale gives zero codes)."""
    row_max = tl.max(amax, axis=0)
    scale = tl.where(row_max > 0, row_max / QMAX, 1.0)
    tl.store(scale_ptr + row, scale)
    return scale


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr, multiplier_ptr,
    K, stride_xm, stride_qm,
    QMAX: tl.constexpr, TO_INT: tl.constexpr, STATIC: tl.constexpr, HAS_MULTIPLIER: tl.constexpr,
    BLOCK_K: tl.constexpr, ONE_TILE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        # The whole row in registers: x is read from memory once.
        x = _load_row_tile(x_row, multiplier_ptr, 0, offs, K, HAS_MULTIPLIER)
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            scale = _row_scale(tl.abs(x), scale_ptr, row, QMAX)
        _store_codes(q_row, x, scale, 0, offs, K, QMAX, TO_INT)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                amax = tl.maximum(amax, tl.abs(_load_row_tile(x_row, multiplier_ptr, k0, offs, K, HAS_MULTIPLIER)))
            scale = _row_scale(amax, scale_ptr, row, QMAX)
        for k0 in range(0, K, BLOCK_K):  # the row is read again, mostly from L2
            x = _load_row_tile(x_row, multiplier_ptr, k0, offs, K, HAS_MULTIPLIER)
            _store_codes(q_row, x, scale, k0, offs, K, QMAX, TO_INT)


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_am, stride_bn, stride_om, stride_as, stride_bs,
    M_BUCKET,  # autotuning key only: next power of two of M
    ACC_INT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped rows / columns: valid addresses, results discarded by the store mask.
    rows = offs_m % M
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + cols[:, None].to(tl.int64) * stride_bn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    if ACC_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            # Loaded as bytes: the bit pattern 0 is +0 in both formats (and the interpreter
            # cannot cast an `other` value to fp8).
            k_mask = offs_k[None, :] < K - k0
            a = tl.load(a_ptrs.to(tl.pointer_type(tl.uint8)), mask=k_mask, other=0)
            b = tl.load(b_ptrs.to(tl.pointer_type(tl.uint8)), mask=k_mask, other=0)
            a = a.to(a_ptr.dtype.element_ty, bitcast=True)
            b = b.to(b_ptr.dtype.element_ty, bitcast=True)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=acc.dtype)  # [BLOCK_M, BLOCK_N]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + rows * stride_as)  # [BLOCK_M]
    b_scale = tl.load(b_scale_ptr + cols * stride_bs)  # [BLOCK_N]
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_scaled_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "ACC_INT"])(_scaled_gemm_kernel)


def quantize_rows_triton(
    x: torch.Tensor,
    dtype: torch.dtype,
    static_scale: torch.Tensor | None = None,
    multiplier: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float (times `multiplier` [K] if given) -> (codes [M, K] in `dtype` (float8_e4m3fn
    or int8), fp32 scale [M] or the static [1])."""
    if dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"quantize_rows_triton: dtype must be float8_e4m3fn or int8, got {dtype}")
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    static = static_scale is not None
    scale = static_scale.float().reshape(1) if static else torch.empty(m, dtype=torch.float32, device=x.device)
    one_tile = k <= ROW_IN_REGISTERS_MAX_K  # quantized from registers: x is read once
    block_k = triton.next_power_of_2(k) if one_tile else QUANTIZE_BLOCK_K
    if m:
        _quantize_rows_kernel[(m,)](
            x, q, scale, scale, scale if multiplier is None else multiplier.contiguous(), k, x.stride(0), q.stride(0),
            QMAX=INT8_MAX if dtype == torch.int8 else FP8_E4M3_MAX, TO_INT=dtype == torch.int8, STATIC=static,
            HAS_MULTIPLIER=multiplier is not None,
            BLOCK_K=block_k, ONE_TILE=one_tile, num_warps=max(4, block_k // 1024) if one_tile else 16,
        )  # fmt: skip
    return q, scale


def scaled_gemm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> torch.Tensor:
    """(a [M, K] @ b [N, K]ᵀ) · a_scale [M] or [1] · b_scale [N] or [1] + bias [N] -> [M, N] in out_dtype.

    a and b both float8_e4m3fn or both int8. `config` (BLOCK_M/N/K, GROUP_M, num_warps,
    num_stages) replaces autotuning: tests and sweeps use it.
    """
    if a.dtype != b.dtype or a.dtype not in (torch.float8_e4m3fn, torch.int8):
        raise ValueError(f"scaled_gemm_triton: operands must both be float8_e4m3fn or int8, got {a.dtype}, {b.dtype}")
    m, k = a.shape
    n = b.shape[0]
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    args = (a, b, a_scale, b_scale, b_scale if bias is None else bias.contiguous(), out, m, n, k)
    args += (a.stride(0), b.stride(0), out.stride(0), int(a_scale.numel() > 1), int(b_scale.numel() > 1))
    args += (triton.next_power_of_2(m),)
    meta = {"ACC_INT": a.dtype == torch.int8, "HAS_BIAS": bias is not None}

    def grid(p: dict) -> tuple[int]:
        return (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(n, p["BLOCK_N"]),)

    if config is None:
        # EVEN_K must hold for every config the autotuner tries: their largest BLOCK_K.
        meta["EVEN_K"] = k % max(c.kwargs["BLOCK_K"] for c in GEMM_CONFIGS) == 0
        _scaled_gemm_tuned[grid](*args, **meta)
    else:
        full = {"GROUP_M": 8, **config, **meta}
        full["EVEN_K"] = k % full["BLOCK_K"] == 0
        _scaled_gemm_kernel[grid(full)](*args, **full)
    return out


def fp8_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """`angel::fp8_linear` on CUDA: x [..., K] float -> [..., N] in x's dtype (ops/fp8_linear.py)."""
    *lead, k = x.shape
    xq, x_scale = quantize_rows_triton(x.reshape(-1, k), torch.float8_e4m3fn, input_scale)
    out = scaled_gemm_triton(xq, weight, x_scale, weight_scale, bias, x.dtype, config)
    return out.reshape(*lead, weight.shape[0])


def w8a8_int8_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_multiplier: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """`angel::w8a8_int8_linear` on CUDA: x [..., K] float -> [..., N] in x's dtype (ops/w8a8_int8.py)."""
    *lead, k = x.shape
    xq, x_scale = quantize_rows_triton(x.reshape(-1, k), torch.int8, multiplier=input_multiplier)
    out = scaled_gemm_triton(xq, weight, x_scale, weight_scale, bias, x.dtype, config)
    return out.reshape(*lead, weight.shape[0])
