"""Triton kernels for `angel::int4_weight_only_linear` and `angel::w4a8_linear` (INT4 group-wise).

Weights in the format of `ops/int4.py`: packed uint8 [N, K/2] (low nibble = even k), scales
[N, K/g] (fp32 / fp16 / bf16), zeros uint8 [N, K/g] or None (zero point 8). Nibbles become
floats through integer bit operations (`_nibble_to_fp32`), never I2F. y [M, N] in x's dtype,
fp32 accumulation; any M and N (masked edges), K % g == 0.

int4 weight-only, chosen by M:
- M == 1 (decode), `_gemv_kernel`, CUDA cores: each program owns BLOCK_N output channels and
  streams their packed rows once, as [BLOCK_N, groups, g/2] byte tiles. x is loaded as
  (even, odd) element pairs, so the two nibbles of a byte meet their x without reordering
  the weight tile. The zero point leaves the inner loop: per group,
  Σ_k (q_k − z) s x_k = s (Σ_k q_k x_k − z Σ_k x_k).
  An int32-word variant (one LOP3 + FADD + FFMA per nibble, split K) was slower in every H100
  sweep and was removed; its numbers are in benchmarks/RESULTS.md (INT4 GEMV).
- 1 < M < 256, `_gemm_kernel`: the byte tile is unpacked in registers, interleaved back into
  k order (tl.join + reshape), dequantized ((q − z) · s, one group per K tile) to x's dtype
  and multiplied on tensor cores (`tl.dot`). For M <= 16 a 16-row tile covers every row, so W
  is read once; SPLIT_K > 1 splits K across programs (fp32 atomics into a zeroed buffer) where
  N / BLOCK_N programs alone would leave SMs idle (M = 16, N = 4096: 75 -> 35 µs on an H100).
- M >= 256 (prefill, compute bound), `_dequantize_kernel` writes W once in x's dtype and
  cuBLAS multiplies: the fused kernel dequantizes every W tile again for each row tile and
  ran at half of bf16 cuBLAS's rate (benchmarks/RESULTS.md).

W4A8 (`_gemm_kernel` with W4A8=True, every M): x is quantized to FP8 E4M3 per row beforehand
(`ops.int4.quantize_fp8_rows`, PyTorch ops). The int4 tile is dequantized to **fp8**: q − z is
an integer in [−15, 15], exact in E4M3, so `tl.dot` runs on the FP8 tensor cores, one K tile
per group, and the group scale multiplies the fp32 partial product before it is accumulated:
    acc += (xq_tile @ (q − z)_tileᵀ) · s[group];   y = acc · s_x[row] + bias
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.split_k import finish_split_k, split_k_for, split_k_output, split_k_tiles, store_or_add
from angel_compile.kernels.tiling import grouped_tile, rows_and_contiguous
from angel_compile.ops.int4 import quantize_fp8_rows

# M == 1: one fixed tile, the best of a 6-tile sweep on an H100 (benchmarks/RESULTS.md, INT4).
GEMV_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}
# M <= 16: one 16-row tile; SPLIT_K is chosen per shape by `split_k_for`.
SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
DEQUANTIZE_MIN_M = 256  # from here on: dequantize W, then cuBLAS


def _gemm_configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w, num_stages=s
        )
        for bm, bn, bk, w, s in shapes
    ]


# M > 16: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_K is capped at the group size.
GEMM_CONFIGS = _gemm_configs(
    [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]
)


def _cap_block_k(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs with BLOCK_K <= GROUP (one group per K tile), duplicates dropped."""
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    capped = {}
    for c in configs:
        kwargs_c = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], group)}
        key = (tuple(sorted(kwargs_c.items())), c.num_warps, c.num_stages)
        capped.setdefault(key, triton.Config(kwargs_c, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(capped.values())


@triton.jit
def _nibble_to_fp32(q):
    # 0x4B000000 | v is the fp32 bit pattern of 2**23 + v (v < 16): one OR and one FADD
    # replace I2F, which runs at a quarter of the FMA rate or less.
    return (q.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    N, K, stride_wn, stride_sn,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per K tile
    HALF: tl.constexpr = GROUP // 2  # bytes per group row
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_g = tl.arange(0, NG)  # [NG]
    offs_h = tl.arange(0, HALF)  # [HALF]
    n_mask = offs_n < N
    # [BLOCK_N, NG, HALF] bytes of a K tile; [NG, HALF, 2] x elements (even, odd) per byte.
    w_ptrs = w_ptr + offs_n[:, None, None] * stride_wn + (offs_g[:, None] * HALF + offs_h[None, :])[None, :, :]
    x_offs = (offs_g[:, None, None] * GROUP + offs_h[None, :, None] * 2) + tl.arange(0, 2)[None, None, :]
    sz_offs = offs_n[:, None] * stride_sn + offs_g[None, :]  # [BLOCK_N, NG], scales and zeros alike
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        g0 = k0 // GROUP
        if EVEN_K:
            g_mask = offs_g < NG
        else:
            g_mask = g0 + offs_g < K // GROUP
        ng_mask = n_mask[:, None] & g_mask[None, :]  # [BLOCK_N, NG]
        b = tl.load(w_ptrs + k0 // 2, mask=ng_mask[:, :, None], other=0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + x_offs, mask=g_mask[:, None, None], other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(x)  # [NG, HALF] each
        dot = _nibble_to_fp32(b & 0xF) * x_even[None, :, :] + _nibble_to_fp32(b >> 4) * x_odd[None, :, :]
        dot = tl.sum(dot, axis=2)  # [BLOCK_N, NG]: Σ q x per group
        # Reduced in the weight tile's layout (as `dot`), which keeps it inside each warp.
        x_sum = tl.sum((x_even + x_odd)[None, :, :], axis=2)  # [1, NG]
        if HAS_ZEROS:
            zero = tl.load(z_ptr + sz_offs + g0, mask=ng_mask, other=0).to(tl.float32)
        else:
            zero = 8.0
        scale = tl.load(s_ptr + sz_offs + g0, mask=ng_mask, other=0.0).to(tl.float32)
        acc += (dot - zero * x_sum) * scale
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,
    N, stride_wn, stride_sn, stride_on,
    HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One [BLOCK_N, GROUP] block of W per program, written in out's dtype.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    g = tl.program_id(1)
    n_mask = offs_n < N
    b = tl.load(
        w_ptr + offs_n[:, None] * stride_wn + g * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :],
        mask=n_mask[:, None],
        other=0,
    )
    q = _nibble_to_fp32(tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, GROUP)))  # [BLOCK_N, GROUP], k order
    scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
    else:
        zero = tl.full((BLOCK_N,), 8.0, tl.float32)
    w = (q - zero[:, None]) * scale[:, None]
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + g * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None])


def dequantize_groupwise(
    kernel: triton.JITFunction,
    values_per_byte: int,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W [N, K] in `dtype` by a group-wise dequantize `kernel` (INT4 here, INT2 in `int2_gemm`).

    One program per 32 rows × one group; the kernels share their argument list.
    """
    n, k = packed.shape[0], packed.shape[1] * values_per_byte
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    grid = (triton.cdiv(n, 32), k // group_size)
    kernel[grid](
        packed, scales, scales if zeros is None else zeros, out, n, packed.stride(0), scales.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, GROUP=group_size, BLOCK_N=32,
    )  # fmt: skip
    return out


def dequantize_int4_triton(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """W [N, K] in `dtype` from the INT4 format (CUDA)."""
    return dequantize_groupwise(_dequantize_kernel, 2, packed, scales, zeros, group_size, dtype)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, xs_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    M_BUCKET,  # autotuning key only: next power of two of M
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, W4A8: tl.constexpr, GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    t_begin, t_end = split_k_tiles(K // BLOCK_K, tl.program_id(1), SPLIT_K)  # BLOCK_K divides K: K % GROUP == 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + tl.arange(0, BLOCK_K // 2)[None, :]  # [BLOCK_N, BLOCK_K/2]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(t_begin * BLOCK_K, t_end * BLOCK_K, BLOCK_K):
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs + k0 // 2, mask=n_mask[:, None], other=0)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K))  # [BLOCK_N, BLOCK_K], k order
        g = k0 // GROUP  # BLOCK_K <= GROUP: one group per tile
        scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_ZEROS:
            zero = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)
            w = _nibble_to_fp32(q) - zero[:, None]
        else:
            w = _nibble_to_fp32(q) - 8.0
        if W4A8:
            part = tl.dot(x, tl.trans(w.to(x.dtype)))  # fp8 × fp8 -> fp32, exact per group
            acc += part * scale[None, :]
        else:
            w = (w * scale[:, None]).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    if W4A8:
        acc *= tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    store_or_add(out_ptrs, acc, m_mask[:, None] & n_mask[None, :], SPLIT_K)


_gemm_tuned = triton.autotune(
    configs=GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "GROUP", "W4A8"],
    prune_configs_by={"early_config_prune": _cap_block_k},
)(_gemm_kernel)


def _launch(
    x2: torch.Tensor,
    x_scale: torch.Tensor | None,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: dict | None,
) -> torch.Tensor:
    m, k = x2.shape
    n = packed.shape[0]
    w4a8 = x_scale is not None
    any_ptr = scales  # for absent tensors; never read when the flag is off
    meta = {"HAS_ZEROS": zeros is not None, "W4A8": w4a8, "GROUP": group_size}
    meta["DOT_PRECISION"] = "ieee" if x2.dtype == torch.float32 else "tf32"
    if config is None and m <= 16:
        config = {**SMALL_M_CONFIG, "BLOCK_K": min(SMALL_M_CONFIG["BLOCK_K"], group_size)}
        config["SPLIT_K"] = split_k_for(n, k, config["BLOCK_N"], config["BLOCK_K"])
    split = config.get("SPLIT_K", 1) if config else 1
    # With split K the programs add fp32 partial sums; bias and the cast come after.
    out = split_k_output(m, n, split, out_dtype, x2.device)
    meta["HAS_BIAS"] = bias is not None and split == 1
    args = (x2, packed, scales, any_ptr if zeros is None else zeros, any_ptr if x_scale is None else x_scale)
    args += (bias if meta["HAS_BIAS"] else any_ptr, out, m, n, k, x2.stride(0), packed.stride(0), scales.stride(0))
    args += (out.stride(0), triton.next_power_of_2(m))

    def grid(p: dict) -> tuple[int, int]:
        return (triton.cdiv(m, p["BLOCK_M"]) * triton.cdiv(n, p["BLOCK_N"]), p.get("SPLIT_K", 1))

    if config:
        full = {"GROUP_M": 8, "SPLIT_K": 1, **config, **meta}
        _gemm_kernel[grid(full)](*args, **full)
    else:
        _gemm_tuned[grid](*args, **meta)
    return finish_split_k(out, bias, split, out_dtype)


def int4_weight_only_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype; weights as in ops/int4.py.

    `config` (block sizes, num_warps, num_stages; SPLIT_K for M > 1) replaces GEMV_CONFIG,
    the small-M choice or autotuning: tests and sweeps use it.
    """
    *lead, k = x.shape
    n = packed.shape[0]
    x2, packed, scales, zeros, bias = rows_and_contiguous(x, packed, scales, zeros, bias)  # x2 [M, K]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    if m == 1:
        meta = {**GEMV_CONFIG, **(config or {})}
        meta["BLOCK_K"] = max(meta["BLOCK_K"], group_size)
        stages = meta.pop("num_stages")
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(n, meta["BLOCK_N"]),)
        _gemv_kernel[grid](
            x2, packed, scales, scales if zeros is None else zeros, scales if bias is None else bias, out,
            n, k, packed.stride(0), scales.stride(0),
            HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, EVEN_K=k % meta["BLOCK_K"] == 0,
            GROUP=group_size, STAGES=stages, **meta,
        )  # fmt: skip
        return out.reshape(*lead, n)
    if m >= DEQUANTIZE_MIN_M and config is None:
        # Compute bound: dequantizing W once (N·K·2 bytes written) and a cuBLAS GEMM beats
        # dequantizing every W tile again for each row tile inside the GEMM.
        w = dequantize_int4_triton(packed, scales, zeros, group_size, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*lead, n)
    out = _launch(x2, None, packed, scales, zeros, group_size, bias, x.dtype, config)
    return out.reshape(*lead, n)


def w4a8_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype: FP8 x (per row, or static `input_scale`) × INT4 W."""
    *lead, k = x.shape
    n = packed.shape[0]
    if x.numel() == 0:
        return x.new_empty((*lead, n))
    xq, x_scale = quantize_fp8_rows(x.reshape(-1, k), input_scale)  # [M, K] fp8, [M, 1] fp32
    zeros = None if zeros is None else zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = _launch(
        xq, x_scale.contiguous(), packed.contiguous(), scales.contiguous(), zeros, group_size, bias, x.dtype, config
    )
    return out.reshape(*lead, n)
