"""Triton kernels for `angel::int8_weight_only_linear`: y = (x @ W_int8ᵀ) · scale + bias.

x [M, K] (fp16 / bf16 / fp32, rows contiguous), W int8 [N, K] row-major, scale fp32 [N],
bias [N] or None; y [M, N] in x's dtype, fp32 accumulation. Any M, N, K (masked edges). The
int8 tile is converted in registers (exactly: |v| <= 127 is representable in every float
dtype) and never written back as floats.

Three paths, chosen by M:
- M == 1 (decode), `_gemv_kernel`: each program owns BLOCK_N output channels and streams
  their weight rows once, multiply-accumulating on CUDA cores into a [BLOCK_N, BLOCK_K] fp32
  accumulator reduced at the end. Memory bound (int8 is half the bytes of bf16): the loop is
  software-pipelined (cp.async, two tiles in flight), int8 becomes fp32 through integer bit
  operations (`_int8_to_fp32`), and weight loads are evict-first (each byte is read once).
- 2 <= M <= 16, `_gemm_kernel` with a 16-row tile: one tensor-core `tl.dot` per K slice
  covers every row, so W is still read once.
- M > 16, `_gemm_kernel` with [BLOCK_M, BLOCK_N] tiles, grouped tile order for L2 reuse;
  W_AS_A computes the transposed product (W as the left operand, which Hopper's wgmma can
  take from registers after conversion), picked by autotuning where it is faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.tiling import grouped_tile

# M == 1: one fixed tile, so the first decode step compiles one kernel and tunes nothing. In a
# sweep on an H100 with HBM-resident weights (Llama-8B q/o, gate/up and down shapes;
# benchmarks/RESULTS.md) it was within 3% of the best of 47 variants on each shape.
GEMV_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4}


def _gemm_configs(shapes: list[tuple[int, int, int, int, int, bool]]) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "W_AS_A": w_as_a},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, w, s, w_as_a in shapes
    ]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, W_AS_A), best of the same sweep: for M <= 16
# 32 channels per program suit N = 4096 and 64 suit N = 14336; for larger M W_AS_A wins at
# N = 4096 and the plain order at N = 14336.
GEMM_SMALL_M_CONFIGS = _gemm_configs(
    [(16, 32, 256, 4, 5, False), (16, 64, 256, 4, 3, False), (16, 32, 128, 4, 6, False)]
)
GEMM_CONFIGS = _gemm_configs(
    [
        (128, 64, 128, 4, 4, True),
        (128, 128, 64, 4, 3, False),
        (128, 128, 64, 8, 4, False),
        (128, 64, 64, 4, 5, True),
        (64, 64, 128, 4, 4, True),
    ]
)


@triton.jit
def _int8_to_fp32(w):
    # 0x4B000000 | (v + 128) is the fp32 bit pattern of 2**23 + v + 128, so two integer ops
    # and one add replace I2F, which runs at an eighth of the FMA rate on Hopper.
    biased = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint32) | 0x4B000000
    return biased.to(tl.float32, bitcast=True) - 8388736.0


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
    # A loop without tl.dot is pipelined only when the loop itself asks. In the sweep 2 stages
    # lost 3-70% to 3; 4 were within 2% for GEMV_CONFIG's tile.
    for k0 in tl.range(0, K, BLOCK_K, num_stages=3):
        if EVEN_K:
            x = tl.load(x_ptr + k0 + offs_k)  # [BLOCK_K]
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        else:
            k_mask = k0 + offs_k < K
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0)
            w_mask = n_mask[:, None] & k_mask[None, :]
            w = tl.load(w_ptrs + k0, mask=w_mask, other=0, eviction_policy="evict_first")
        acc += _int8_to_fp32(w) * x.to(tl.float32)[None, :]  # w: [BLOCK_N, BLOCK_K] int8
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
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
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
        wf = w.to(x.dtype)  # w: [BLOCK_N, BLOCK_K] int8; Triton converts without I2F
        if W_AS_A:
            acc = tl.dot(wf, tl.trans(x), acc, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        else:
            acc = tl.dot(x, tl.trans(wf), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
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


_gemm_small_m_tuned = triton.autotune(configs=GEMM_SMALL_M_CONFIGS, key=["M_BUCKET", "N", "K"])(_gemm_kernel)
_gemm_tuned = triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])(_gemm_kernel)


def int8_weight_only_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K], weight int8 [N, K], scale fp32 [N], bias [N] or None -> [..., N] in x's dtype.

    `config` (block sizes, num_warps, num_stages; W_AS_A for M > 1) replaces GEMV_CONFIG or
    autotuning: tests and sweeps use it.
    """
    *lead, k = x.shape
    n = weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    weight, scale = weight.contiguous(), scale.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    has_bias = bias is not None
    bias_arg = bias.contiguous() if has_bias else scale  # any pointer; never read without HAS_BIAS
    if m == 1:
        meta = {**(config or GEMV_CONFIG), "HAS_BIAS": has_bias}
        meta["EVEN_K"] = k % meta["BLOCK_K"] == 0
        grid = (triton.cdiv(n, meta["BLOCK_N"]),)
        _gemv_kernel[grid](x2, weight, scale, bias_arg, out, n, k, weight.stride(0), **meta)
        return out.reshape(*lead, n)

    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    meta = {"HAS_BIAS": has_bias, "DOT_PRECISION": precision}
    args = (x2, weight, scale, bias_arg, out, m, n, k, x2.stride(0), weight.stride(0), out.stride(0))
    # Tuned once per power-of-two bucket of M (M_BUCKET), not for every sequence length.
    args += (triton.next_power_of_2(m),)

    def grid(p: dict) -> tuple[int]:
        return (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(n, p["BLOCK_N"]),)

    if config:
        meta.update({"GROUP_M": 8, "W_AS_A": False, **config})
        meta["EVEN_K"] = k % meta["BLOCK_K"] == 0
        _gemm_kernel[grid(meta)](*args, **meta)
    else:
        kernel = _gemm_small_m_tuned if m <= 16 else _gemm_tuned
        # EVEN_K must hold for whichever config autotuning picks; block sizes are powers of
        # two, so K divisible by the largest BLOCK_K is divisible by all.
        meta["EVEN_K"] = k % max(c.kwargs["BLOCK_K"] for c in kernel.configs) == 0
        kernel[grid](*args, **meta)
    return out.reshape(*lead, n)
