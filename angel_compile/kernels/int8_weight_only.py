"""Triton kernels for `angel::int8_weight_only_linear`: y = (x @ W_int8ᵀ) · scale + bias.

x [M, K] (fp16 / bf16 / fp32), W int8 [N, K] row-major, scale fp32 [N], bias [N] or None,
y [M, N] in x's dtype; fp32 accumulation. The int8 tile is converted in registers (exact in
every float dtype) and never written back as floats.

Two kernels, chosen by M:
- `_gemv_kernel` (M == 1, decode): each program owns BLOCK_N output channels and streams
  their weight rows once, multiply-accumulating on CUDA cores into a [BLOCK_N, BLOCK_K]
  fp32 accumulator reduced at the end. Memory bound: int8 halves the bytes of bf16. int8 is
  turned into fp16 with integer bit operations (`_int8_to_fp16`) rather than I2F, whose
  throughput is a quarter of the FMA pipe's.
- `_gemm_kernel` (M > 1): tiles of [BLOCK_M, BLOCK_N] with tensor-core `tl.dot` over
  BLOCK_K slices, grouped tile order for L2 reuse of W; W_AS_A computes the transposed
  product (W as the left operand), which autotuning picks where it is faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Winners of a sweep on an H100 (benchmarks/RESULTS.md), weights streamed from HBM.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2)
    for bn, bk, w in [(8, 512, 8), (16, 256, 4), (4, 2048, 8), (8, 1024, 4), (4, 512, 8)]
]


def _gemm_configs(shapes: list[tuple[int, int, int, int, int, bool]]) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "W_AS_A": w_as_a}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, w, s, w_as_a in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, W_AS_A) for M <= 16 and for larger M.
GEMM_SMALL_M_CONFIGS = _gemm_configs(
    [(16, 32, 256, 4, 5, False), (16, 64, 256, 4, 3, False), (16, 32, 256, 4, 3, False), (16, 32, 128, 4, 5, False)]
)
GEMM_CONFIGS = _gemm_configs(
    [
        (128, 64, 128, 4, 4, True),
        (128, 128, 64, 4, 3, False),
        (128, 128, 64, 4, 4, False),
        (64, 64, 128, 4, 4, True),
        (128, 256, 64, 8, 3, False),
        (128, 128, 128, 8, 3, True),
    ]
)


@triton.jit
def _int8_to_fp16(w):
    # 0x6400 | (v + 128) is the fp16 bit pattern of 1024 + v + 128: integer ops instead of I2F.
    biased = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400
    return biased.to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    N, K, stride_wn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + offs_k)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        else:
            k_mask = k0 + offs_k < K
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += _int8_to_fp16(w).to(tl.float32) * x.to(tl.float32)[None, :]  # w: [BLOCK_N, BLOCK_K] int8
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    M_BUCKET,  # autotuning key only: next power of two of M
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W_AS_A: tl.constexpr,
):  # fmt: skip
    # Grouped ordering: GROUP_M row-tiles share each column-tile of W while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    if W_AS_A:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        else:
            k_mask = k0 + offs_k < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        wf = w.to(x.dtype)
        # W as the left operand lets Hopper's wgmma take it from registers after conversion.
        if W_AS_A:
            acc = tl.dot(wf, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(wf), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if W_AS_A:
        acc = acc * scale[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])
    else:
        acc = acc * scale[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_gemv_tuned = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K"])(_gemv_kernel)
_gemm_small_m_tuned = triton.autotune(configs=GEMM_SMALL_M_CONFIGS, key=["M_BUCKET", "N", "K"])(_gemm_kernel)
_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])(_gemm_kernel)


def int8_weight_only_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch on x [..., K]; `config` (block sizes, num_warps) skips autotuning (tests, sweeps)."""
    *lead, k = x.shape
    n = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else scale  # any pointer; never read without HAS_BIAS
    if m == 1:
        meta = dict(HAS_BIAS=has_bias)
        grid = lambda p: (triton.cdiv(n, p["BLOCK_N"]),)  # noqa: E731
        kernel = _gemv_kernel if config else _gemv_tuned
        args = (x2, weight, scale, bias_arg, out, n, k, weight.stride(0))
        if config:
            meta.update(config)
            meta["EVEN_K"] = k % config["BLOCK_K"] == 0
            kernel[grid(config)](*args, **meta)
        else:
            _launch_tuned(kernel, grid, args, meta, k)
    else:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        meta = dict(HAS_BIAS=has_bias, DOT_PRECISION=precision)
        grid = lambda p: (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(n, p["BLOCK_N"]),)  # noqa: E731
        m_bucket = triton.next_power_of_2(m)
        args = (x2, weight, scale, bias_arg, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0), m_bucket)
        if config:
            meta.update({"GROUP_M": 8, "W_AS_A": False, **config})
            meta["EVEN_K"] = k % meta["BLOCK_K"] == 0
            _gemm_kernel[grid(meta)](*args, **meta)
        else:
            # Tuned once per power-of-two bucket of M (M_BUCKET), not for every sequence length.
            _launch_tuned(_gemm_small_m_tuned if m <= 16 else _gemm_tuned, grid, args, meta, k)
    return out.reshape(*lead, n)


def _launch_tuned(kernel, grid, args, meta: dict, k: int) -> None:
    # EVEN_K must hold for whichever config autotuning picks; block sizes are powers of two,
    # so K divisible by the largest BLOCK_K is divisible by all.
    meta["EVEN_K"] = k % max(c.kwargs["BLOCK_K"] for c in kernel.configs) == 0
    kernel[grid](*args, **meta)
