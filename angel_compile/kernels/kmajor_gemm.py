"""Triton kernels for `angel::int4_kmajor_linear` and `angel::int2_kmajor_linear` (`ops/kmajor.py`).

words int32 [K/F, N] (F = 32 / BITS fields; field f of words[r, n] is q[n, F·r + f]), scales
[K/g, N], zeros uint8 [K/g, N] or None (zero point 2^(BITS − 1)). y [M, N] in x's dtype, fp32
accumulation, any M and N (masked edges), K % g == 0. BITS (4 or 2) is a constexpr of every kernel.

- M == 1 (decode), `_gemv_kernel`, CUDA cores. A program owns BLOCK_N output channels and the
  groups of one K split; it reads [BLOCK_K/F, BLOCK_N] word tiles, N contiguous, so a thread
  holds whole words of a few channels and every tile, decoded or not, keeps the word tile's
  thread layout (no shared-memory conversion). Field f of a word sits at bit BITS·f; masked in
  place (the fields below bit 23) or in the word shifted right by 12 (the others), it is the fp32
  bit pattern of the subnormal q · 2^(p − 149), exactly, where p (p + BITS <= 23) is its bit
  position after the shift; x is scaled by 2^(85 − p), so each FFMA adds q x · 2^-64: one AND
  and one FFMA per weight. A bf16 x becomes that scaled fp32 in one integer op, (bits << 16) +
  ((85 − p) << 23) (adding to the exponent field). This needs FFMA without flush-to-zero
  (Triton's default) and |x| < 2^43. The products of a group are summed, then scaled once; the zero point leaves the
  loop: Σ_k (q_k − z) s x_k = s Σ_k q_k x_k − z s Σ_k x_k, and the last term, summed over the
  split's groups from a [GPS, g] tile of x, is loaded before the loop so that its latency hides
  behind the word loads. SPLIT_K splits the groups over programs: the H100 runs this kernel
  latency-bound, so the launch makes many short one-warp programs of about K_PER_SPLIT k each
  (`GEMV_CONFIG`, `gemv_split`); the split that finishes a channel block last adds the bias and
  writes y (`split_k.last_split_total`), one launch per call.
- 1 < M <= SMALL_M_GEMV_MAX_M, `_small_m_gemv_kernel`: the GEMV's decoding, one word row a
  step, each weight decoded once (one AND) for all M rows (one FFMA a row), split K and the
  last-split epilogue as for M == 1 (the workspace holds [M, N] sums).
- otherwise 1 < M < 256, `_gemm_kernel`: each [BLOCK_K/F, BLOCK_N] word tile is unpacked by shifts to a
  [BLOCK_K, BLOCK_N] code tile (k order), dequantized to x's dtype ((q − z) · s, one group per
  K tile) and multiplied on tensor cores (`tl.dot`); one 16-row tile covers M <= 16 (W read
  once); split K for the small-M tile as in `kernels/int4_gemm.py`.
- M >= 256 (prefill, compute bound): `_dequantize_kernel` writes Wᵀ [K, N] in x's dtype and
  cuBLAS multiplies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from angel_compile.kernels.int4_gemm import DEQUANTIZE_MIN_M, _nibble_to_fp32
from angel_compile.kernels.split_k import (
    finish_gemv,
    finish_small_m_gemv,
    finish_split_k,
    gemv_workspace,
    split_k_for,
    split_k_output,
    split_k_tiles,
    store_or_add,
)
from angel_compile.kernels.tiling import grouped_tile, rows_and_contiguous

# M == 1, per BITS: one-warp programs of BLOCK_N channels, one word row per K tile (BLOCK_K = F),
# about K_PER_SPLIT k (one group at g = 128 / 64) per split: the best of tile × split sweeps on an
# H100 with HBM-resident weights (benchmarks/RESULTS.md, K-major GEMV). The kernel is latency-bound
# there; many short programs hide the loads.
GEMV_CONFIG = {
    4: {"BLOCK_N": 128, "BLOCK_K": 8, "K_PER_SPLIT": 128, "num_warps": 1, "num_stages": 1},
    2: {"BLOCK_N": 256, "BLOCK_K": 16, "K_PER_SPLIT": 64, "num_warps": 1, "num_stages": 1},
}
# 1 < M <= SMALL_M_GEMV_MAX_M: the GEMV's decoding shared by the rows (`_small_m_gemv_kernel`),
# one-warp programs of 256 channels, ~256 k a split: the best of H100 sweeps at M = 2..4 (INT4 and
# INT2, both Llama shapes; benchmarks/RESULTS.md); at M = 8 the tl.dot GEMM is faster.
SMALL_M_GEMV_MAX_M = 4
SMALL_M_GEMV_CONFIG = {"BLOCK_N": 256, "K_PER_SPLIT": 256, "num_warps": 1, "num_stages": 1}
# otherwise M <= 16: one 16-row tile; SPLIT_K is chosen per shape by `split_k_for`.
SMALL_M_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
# 16 < M < 256
LARGE_M_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}


@triton.jit
def _scale_x(raw, SHIFT: tl.constexpr):
    """Loaded x as fp32 times 2^(85 − SHIFT): exact (a power of two)."""
    EXPONENT: tl.constexpr = 85 - SHIFT
    if raw.dtype == tl.bfloat16:
        # bf16 bits << 16 are the fp32 bits of x; adding EXPONENT to the exponent field scales it.
        bits = raw.to(tl.uint16, bitcast=True).to(tl.uint32) * 65536 + (EXPONENT << 23)
        return bits.to(tl.float32, bitcast=True)
    return raw.to(tl.float32) * (2.0**EXPONENT)


@triton.jit
def _word_dot(dot, words, x_ptrs, x_mask, BITS: tl.constexpr):
    """dot + Σ_f (field f of `words` as the subnormal q · 2^(p − 149)) · (x[f] · 2^(85 − p)).

    words uint32 [R, BLOCK_N] (or [1, BLOCK_N]); x_ptrs [R, 1] (or [BLOCK_M, 1]) point at the x of
    each word's field 0, x_mask masks them (None: all valid). Fields below bit 23 are masked in
    place, the others from words >> 12 (bits 20..31 moved to 8..19).
    """
    FIELDS: tl.constexpr = 32 // BITS
    IN_PLACE: tl.constexpr = (23 - BITS) // BITS + 1
    for f in tl.static_range(IN_PLACE):
        dot = _field_dot(dot, words, BITS * f, x_ptrs + f, x_mask, BITS)
    high = words >> 12
    for f in tl.static_range(IN_PLACE, FIELDS):
        dot = _field_dot(dot, high, BITS * f - 12, x_ptrs + f, x_mask, BITS)
    return dot


@triton.jit
def _field_dot(dot, src, P: tl.constexpr, x_ptrs, x_mask, BITS: tl.constexpr):
    """dot + (the field at bit P of src, as q · 2^(P − 149)) · (x · 2^(85 − P))."""
    w = (src & (((1 << BITS) - 1) << P)).to(tl.float32, bitcast=True)
    if x_mask is None:
        raw = tl.load(x_ptrs)
    else:
        raw = tl.load(x_ptrs, mask=x_mask, other=0.0)
    return tl.fma(w, _scale_x(raw, P), dot)  # explicit: FP fusion may be off by default


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr,
    N, K, stride_wk, stride_sk,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GPS: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    FIELDS: tl.constexpr = 32 // BITS  # k per word
    ROWS: tl.constexpr = BLOCK_K // FIELDS  # word rows per K tile
    TILES: tl.constexpr = GROUP // BLOCK_K  # K tiles per group
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_r = tl.arange(0, ROWS)  # [ROWS]
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_r[:, None] * stride_wk + offs_n[None, :]  # [ROWS, BLOCK_N]
    g_begin, g_end = split_k_tiles(K // GROUP, tl.program_id(1), SPLIT_K)
    # Σ_g z s Σx over this split's groups (at most GPS of them), loaded before the words
    offs_g = g_begin + tl.arange(0, GPS)
    g_mask = offs_g < g_end
    x_group = tl.load(x_ptr + offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :], mask=g_mask[:, None], other=0.0)
    x_sum = tl.sum(x_group.to(tl.float32), axis=1)  # [GPS]
    gn_mask = g_mask[:, None] & n_mask[None, :]
    gn_offs = offs_g[:, None] * stride_sk + offs_n[None, :]
    scales = tl.load(s_ptr + gn_offs, mask=gn_mask, other=0.0).to(tl.float32)  # [GPS, BLOCK_N]
    if HAS_ZEROS:
        zeros = tl.load(z_ptr + gn_offs, mask=gn_mask, other=0).to(tl.float32)
    else:
        zeros = float(1 << (BITS - 1))
    zero_term = tl.sum(zeros * scales * x_sum[:, None], axis=0)  # [BLOCK_N]
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # Σ s q x · 2^-64 per word position
    for g in tl.range(g_begin, g_end, num_stages=STAGES):
        scale = tl.load(s_ptr + g * stride_sk + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        dot = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # the group's Σ q x · 2^-64 per word position
        for t in tl.static_range(TILES):
            row0 = g * (GROUP // FIELDS) + t * ROWS
            words = tl.load(w_ptrs + row0 * stride_wk, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
            x_ptrs = x_ptr + ((row0 + offs_r) * FIELDS)[:, None]  # [ROWS, 1]
            dot = _word_dot(dot, words.to(tl.uint32, bitcast=True), x_ptrs, None, BITS)
        acc = tl.fma(dot, scale[None, :], acc)
    total = tl.sum(acc, axis=0) * (2.0**64) - zero_term  # [BLOCK_N]
    finish_gemv(total, offs_n, n_mask, partial_ptr, arrived_ptr, pid_n, bias_ptr, out_ptr, HAS_BIAS, SPLIT_K)


@triton.jit
def _small_m_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, partial_ptr, arrived_ptr,
    M, N, K, stride_xm, stride_wk, stride_sk, stride_om,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GPS: tl.constexpr,
):  # fmt: skip
    # One word row a step: field f's weights [BLOCK_N] are decoded once (one AND) and used by the
    # BLOCK_M rows of x (one FFMA each); x of a step is the same in every lane.
    FIELDS: tl.constexpr = 32 // BITS
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask, m_mask = offs_n < N, offs_m < M
    x_rows = x_ptr + offs_m * stride_xm  # [BLOCK_M]
    g_begin, g_end = split_k_tiles(K // GROUP, tl.program_id(1), SPLIT_K)
    zero_term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # Σ_g z s Σx per row and channel
    for i in tl.static_range(GPS):
        g = g_begin + i
        rows_live = m_mask & (offs_m * 0 + g < g_end)  # [BLOCK_M]: a split may own fewer than GPS groups
        channels_live = n_mask & (offs_n * 0 + g < g_end)
        x_offs = g * GROUP + tl.arange(0, GROUP)
        x_group = tl.load(x_rows[:, None] + x_offs[None, :], mask=rows_live[:, None], other=0.0)  # [BLOCK_M, g]
        scale = tl.load(s_ptr + g * stride_sk + offs_n, mask=channels_live, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + g * stride_sk + offs_n, mask=channels_live, other=0).to(tl.float32)
        else:
            zero = float(1 << (BITS - 1))
        zero_term += tl.sum(x_group.to(tl.float32), axis=1)[:, None] * (zero * scale)[None, :]
    w_row = w_ptr + offs_n[None, :]  # [1, BLOCK_N]
    x_col = x_rows[:, None]  # [BLOCK_M, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_begin, g_end):
        scale = tl.load(s_ptr + g * stride_sk + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in tl.static_range(GROUP // FIELDS):
            row = g * (GROUP // FIELDS) + r
            # [1, BLOCK_N] and [BLOCK_M, 1] tiles, not vectors: they take the layout of dot (whose
            # threads hold 16-byte runs of channels) with no conversion through shared memory
            words = tl.load(w_row + row * stride_wk, mask=n_mask[None, :], other=0, eviction_policy="evict_first")
            dot = _word_dot(dot, words.to(tl.uint32, bitcast=True), x_col + row * FIELDS, m_mask[:, None], BITS)
        acc = tl.fma(dot, scale[None, :], acc)
    total = acc * (2.0**64) - zero_term
    finish_small_m_gemv(
        total, offs_m, offs_n, m_mask, n_mask, N, partial_ptr, arrived_ptr, pid_n, bias_ptr, out_ptr, stride_om,
        HAS_BIAS, SPLIT_K,
    )  # fmt: skip


@triton.jit
def _unpack_tile(words, BITS: tl.constexpr):
    """int32 words [R, BLOCK_N] -> fp32 codes [F·R, BLOCK_N] in k order (row F·r + f = field f of row r)."""
    FIELDS: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = words.shape[0]
    COLS: tl.constexpr = words.shape[1]
    shifts = BITS * tl.arange(0, FIELDS)
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [R, F, BLOCK_N]
    return _nibble_to_fp32(tl.reshape(codes, (ROWS * FIELDS, COLS)))


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wk, stride_sk, stride_om,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    t_begin, t_end = split_k_tiles(K // BLOCK_K, tl.program_id(1), SPLIT_K)  # BLOCK_K divides GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    m_mask, n_mask = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]  # [BLOCK_M, BLOCK_K]
    FIELDS: tl.constexpr = 32 // BITS
    w_ptrs = w_ptr + tl.arange(0, BLOCK_K // FIELDS)[:, None] * stride_wk + offs_n[None, :]  # [BLOCK_K/F, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        words = tl.load(w_ptrs + (k0 // FIELDS) * stride_wk, mask=n_mask[None, :], other=0)
        g = k0 // GROUP
        scale = tl.load(s_ptr + g * stride_sk + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
        if HAS_ZEROS:
            zero = tl.load(z_ptr + g * stride_sk + offs_n, mask=n_mask, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        w = ((_unpack_tile(words, BITS) - zero[None, :]) * scale[None, :]).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    store_or_add(out_ptrs, acc, m_mask[:, None] & n_mask[None, :], SPLIT_K)


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, stride_wk, stride_sk, stride_ok,
    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One group × BLOCK_N channels of Wᵀ [K, N] per program, written in out's dtype.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    n_mask = offs_n < N
    rows = g * (GROUP * BITS // 32) + tl.arange(0, GROUP * BITS // 32)
    words = tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], mask=n_mask[None, :], other=0)
    scale = tl.load(s_ptr + g * stride_sk + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + g * stride_sk + offs_n, mask=n_mask, other=0).to(tl.float32)
    else:
        zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
    w = (_unpack_tile(words, BITS) - zero[None, :]) * scale[None, :]  # [GROUP, BLOCK_N]
    out_ptrs = out_ptr + (g * GROUP + tl.arange(0, GROUP))[:, None] * stride_ok + offs_n[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=n_mask[None, :])


def dequantize_kmajor_triton(
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Wᵀ [K, N] in `dtype` from the K-major layout (CUDA)."""
    k, n = words.shape[0] * (32 // bits), words.shape[1]
    out = torch.empty((k, n), dtype=dtype, device=words.device)
    block_n = 64
    _dequantize_kernel[(triton.cdiv(n, block_n), k // group_size)](
        words, scales, scales if zeros is None else zeros, out, n, words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, HAS_ZEROS=zeros is not None, GROUP=group_size, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def gemv_split(groups: int, group_size: int, k_per_split: int) -> int:
    """Splits of the K groups: max(1, k_per_split / g) groups each, the last split possibly fewer.

    Not rounded up to a power of two: empty splits would still run the epilogue (for K = 14,336
    at g = 128 that was 8 of 64 splits, and 3–5% of the GEMV's time on an H100).
    """
    return triton.cdiv(groups, max(1, k_per_split // group_size))


def pop_gemv_split(meta: dict, groups: int, group_size: int) -> int:
    """The launch's K split: meta's SPLIT_K if set, else `gemv_split` of its K_PER_SPLIT. Both keys
    leave `meta` (the rest goes to the kernel)."""
    k_per_split = meta.pop("K_PER_SPLIT")
    return meta.pop("SPLIT_K", None) or gemv_split(groups, group_size, k_per_split)


def _gemv(x2, words, scales, zeros, bits, group_size, bias, config):
    n, k = words.shape[1], x2.shape[1]
    meta = {**GEMV_CONFIG[bits], **(config or {})}
    meta["BLOCK_K"] = min(meta["BLOCK_K"], group_size)
    groups = k // group_size
    split = pop_gemv_split(meta, groups, group_size)
    stages = meta.pop("num_stages")
    row_blocks = triton.cdiv(n, meta["BLOCK_N"])
    partial, arrived = gemv_workspace(x2.device, n, row_blocks)
    out = x2.new_empty((1, n))
    any_ptr = scales  # stands for absent tensors; never read when the flag is off
    _gemv_kernel[(row_blocks, split)](
        x2, words, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None else bias, out,
        partial, arrived, n, k, words.stride(0), scales.stride(0),
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GROUP=group_size, SPLIT_K=split,
        GPS=triton.next_power_of_2(triton.cdiv(groups, split)), STAGES=stages, **meta,
    )  # fmt: skip
    return out


def _small_m_gemv(x2, words, scales, zeros, bits, group_size, bias, config):
    m, k = x2.shape
    n = words.shape[1]
    meta = {**SMALL_M_GEMV_CONFIG, **(config or {})}
    groups = k // group_size
    split = pop_gemv_split(meta, groups, group_size)
    row_blocks = triton.cdiv(n, meta["BLOCK_N"])
    partial, arrived = gemv_workspace(x2.device, m * n, row_blocks)
    out = x2.new_empty((m, n))
    any_ptr = scales
    _small_m_gemv_kernel[(row_blocks, split)](
        x2, words, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None else bias, out,
        partial, arrived, m, n, k, x2.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, GROUP=group_size,
        BLOCK_M=triton.next_power_of_2(m), SPLIT_K=split, GPS=triton.next_power_of_2(triton.cdiv(groups, split)),
        **meta,
    )  # fmt: skip
    return out


def _gemm(x2, words, scales, zeros, bits, group_size, bias, config):
    m, k = x2.shape
    n = words.shape[1]
    meta = {**(SMALL_M_CONFIG if m <= 16 else LARGE_M_CONFIG), **(config or {})}
    meta["BLOCK_K"] = min(meta["BLOCK_K"], group_size)
    split = meta.pop("SPLIT_K", None)
    if split is None:
        split = split_k_for(n, k, meta["BLOCK_N"], meta["BLOCK_K"]) if m <= 16 else 1
    out = split_k_output(m, n, split, x2.dtype, x2.device)
    any_ptr = scales
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)
    _gemm_kernel[grid](
        x2, words, scales, any_ptr if zeros is None else zeros, any_ptr if bias is None or split > 1 else bias, out,
        m, n, k, x2.stride(0), words.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None and split == 1, GROUP=group_size,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", GROUP_M=8, SPLIT_K=split, **meta,
    )  # fmt: skip
    return finish_split_k(out, bias, split, x2.dtype)


def kmajor_linear_triton(
    x: torch.Tensor,
    words: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype; `bits`-bit weights as in ops/kmajor.py.

    `config` (BLOCK_* sizes, SPLIT_K, num_warps, num_stages) replaces the default tile of the
    path M selects (M == 1: GEMV; 1 < M <= SMALL_M_GEMV_MAX_M without config: the small-M GEMV;
    M >= 256 without config: dequantize + cuBLAS; else the tl.dot GEMM); with a config, 1 < M
    takes the small-M GEMV only if it sets SMALL_M_GEMV (and K_PER_SPLIT, BLOCK_N). Tests and
    sweeps use it.
    """
    *lead, k = x.shape
    n = words.shape[1]
    x2, words, scales, zeros, bias = rows_and_contiguous(x, words, scales, zeros, bias)  # x2 [M, K]
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    config = None if config is None else dict(config)
    small_m_gemv = m <= SMALL_M_GEMV_MAX_M if config is None else config.pop("SMALL_M_GEMV", False)
    if m == 1:
        out = _gemv(x2, words, scales, zeros, bits, group_size, bias, config)
    elif small_m_gemv:
        out = _small_m_gemv(x2, words, scales, zeros, bits, group_size, bias, config)
    elif m >= DEQUANTIZE_MIN_M and config is None:
        w_t = dequantize_kmajor_triton(words, scales, zeros, bits, group_size, x.dtype)  # [K, N]
        out = torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t
    else:
        out = _gemm(x2, words, scales, zeros, bits, group_size, bias, config)
    return out.reshape(*lead, n)
