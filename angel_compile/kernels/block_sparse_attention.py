"""Triton block-sparse FlashAttention forward for causal prefill with GQA.

q [B, Hq, S, D], k/v [B, Hkv, S, D] (fp16 / bf16; fp32 for the interpreter), D in {64, 128},
out [B, Hq, S, D] (stored [B, S, Hq, D]); query head h reads key/value head h // (Hq / Hkv).
block_index int32 [B, Hq, n, max_kblocks] lists the key blocks of each query block
(block = `block_size` tokens for queries and keys), block_count int32 [B, Hq, n] how many.
Contract (what `selection.block_mask_to_index` produces): each list holds at least one block,
its entries are <= the query block, and every entry but the last is < the query block (the
lists are ascending and end with the diagonal block). Off-diagonal blocks then need no mask;
the last one gets the token-causal mask k <= q and the sequence-end mask. scale > 0.

One program per (batch · head, query block): BLOCK_M = block_size query rows, key blocks
read as block_size / BLOCK_N tiles of BLOCK_N keys in one flat loop (so the pipeliner sees
one loop over tiles whose addresses come from the index), FlashAttention-2 online softmax
in base 2 (s · log2 e folded into the score scale), fp32 accumulators, p·v accumulated in
the MMA. The grid is (batch · head, query block) with heads fastest: the query heads of a GQA
group, which read the same K/V, run at the same time (K/V come from L2 after the first), and
the last query blocks (the longest causal rows) are launched first. At 100% density this is
a dense causal kernel.

Launch options beside BLOCK_N / warps / stages (constexpr, off in the autotuned configs; the
Hopper default `HOPPER_CONFIGS` turns on FUSED_SCALE and USE_TMA and caps registers at 128):
FUSED_SCALE takes the row max of the raw scores and applies the scale inside one FMA per
score (exp2(s·x - m)); USE_TMA loads K/V tiles with Hopper tensor descriptors over k / v
viewed as [B·Hkv·S, D] (contiguous k / v only); WARP_SPECIALIZE asks the compiler to
warp-specialize the off-diagonal loop (loads in a producer warp). `VARIANTS` lists the
candidate configs that the benchmark times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from angel_compile.ops.sparse_attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS

LOG2E = 1.4426950408889634


def _configs(block_size: int) -> list[triton.Config]:
    # H100 space for FA-2-style forward kernels: 64/128-key tiles, 4 or 8 warps, 2-4 stages.
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (64, 128)
        if bn <= block_size
        for w in (4, 8)
        for s in (2, 3, 4)
    ]


def _variant(block_n: int, warps: int, stages: int, fused: bool, tma: bool, ws: bool = False, regs: int = 0) -> dict:
    config = dict(
        BLOCK_N=block_n, num_warps=warps, num_stages=stages, FUSED_SCALE=fused, USE_TMA=tma, WARP_SPECIALIZE=ws
    )
    return config | ({"maxnreg": regs} if regs else {})


# Candidate launch configs for block_size 128 on an H100, timed against each other by
# `python -m benchmarks.bench_sparse_attention --variants`. "ptr": K/V through pointer loads,
# "tma": through tensor descriptors; "unfused": scale multiplied into the scores, then the row
# max subtracted; "fused": one FMA per score; "ws": the key loop warp-specialized (triton 3.6
# and 3.9 compile it for sm_90 to the same code as without); "r128": at most 128 registers a
# thread, so that two programs (~96 KiB of shared memory each) share an SM and one's softmax
# overlaps the other's MMAs (the 64-key TMA tiles need 137 registers unbounded).
VARIANTS: dict[str, dict] = {
    "ptr-unfused-n128-w8-s2": _variant(128, 8, 2, fused=False, tma=False),
    "ptr-unfused-n64-w8-s3": _variant(64, 8, 3, fused=False, tma=False),
    "ptr-fused-n128-w8-s2": _variant(128, 8, 2, fused=True, tma=False),
    "ptr-fused-n128-w8-s3": _variant(128, 8, 3, fused=True, tma=False),
    "ptr-fused-n64-w8-s3": _variant(64, 8, 3, fused=True, tma=False),
    "tma-unfused-n128-w8-s2": _variant(128, 8, 2, fused=False, tma=True),
    "tma-fused-n128-w8-s2": _variant(128, 8, 2, fused=True, tma=True),
    "tma-fused-n128-w8-s3": _variant(128, 8, 3, fused=True, tma=True),
    "tma-fused-n64-w8-s3": _variant(64, 8, 3, fused=True, tma=True),
    "tma-fused-n64-w8-s2-r128": _variant(64, 8, 2, fused=True, tma=True, regs=128),
    "tma-fused-n64-w8-s3-r128": _variant(64, 8, 3, fused=True, tma=True, regs=128),
    "tma-fused-ws-n128-w8-s2": _variant(128, 8, 2, fused=True, tma=True, ws=True),
}


@triton.jit
def _kv_tile(k_ptrs, v_ptrs, k_desc, v_desc, row, start, offs_n, S,
             SEQ_MASK: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """kᵀ [D, BLOCK_N] and v [BLOCK_N, D] of keys start .. start + BLOCK_N (zeros past S)."""
    if USE_TMA:
        # Keys past S are the next head's rows (or the descriptor's zero fill): finite, and
        # the causal mask of the diagonal block drops them for every query row < S.
        k = k_desc.load([row + start, 0]).T
        v = v_desc.load([row + start, 0])
    elif SEQ_MASK:
        k_valid = (start + offs_n) < S
        k = tl.load(k_ptrs, mask=k_valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=k_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _attend_tile(q, k, v, m_i, l_i, acc, offs_m, offs_n, start, qk_scale,
                 CAUSAL: tl.constexpr, FUSED_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] raw scores q·kᵀ
    if CAUSAL:
        qk = tl.where((start + offs_n)[None, :] <= offs_m[:, None], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    elif FUSED_SCALE:
        # max(s·x) = s·max(x) for s > 0: the scale goes into one FMA per score, s·x - m.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    else:
        qk = qk * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # p·v accumulates into acc inside the MMA (no separate add of a [BLOCK_M, D] product)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, index_ptr, count_ptr,
    k_desc, v_desc,  # TMA descriptors of k / v as [B·Hkv·S, D] when USE_TMA, else None
    qk_scale, S, H, GROUP, N_QBLOCKS,
    S_BUCKET,  # autotuning key only: next power of two of S
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_ib, stride_ih, stride_iq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_S: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_SCALE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    # Heads vary fastest: the heads of one query block run side by side, so the query heads
    # of a GQA group read the same K/V blocks from L2, and the longest rows of every head
    # run first (better tail balance).
    bh = tl.program_id(0)
    qb = N_QBLOCKS - 1 - tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kvh = h // GROUP
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    if EVEN_S:
        q = tl.load(q_ptrs)  # [BLOCK_M, D]
    else:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < S, other=0.0)
    # k read transposed as [D, BLOCK_N] tiles, v as [BLOCK_N, D]
    k_base = k_ptr + b * stride_kb + kvh * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_base = v_ptr + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    kv_row = ((b * (H // GROUP) + kvh) * S).to(tl.int32)  # first descriptor row of this K/V head
    index_base = index_ptr + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(count_ptr + bh * N_QBLOCKS + qb)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    TILES: tl.constexpr = BLOCK_M // BLOCK_N
    # Off-diagonal blocks: entries 0 .. count-2, no masks.
    for t in tl.range(0, (count - 1) * TILES, warp_specialize=WARP_SPECIALIZE):
        kb = tl.load(index_base + t // TILES)
        start = kb * BLOCK_M + (t % TILES) * BLOCK_N
        k, v = _kv_tile(
            k_base + start * stride_ks, v_base + start * stride_vs, k_desc, v_desc, kv_row, start, offs_n, S,
            False, USE_TMA,
        )  # fmt: skip
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, offs_m, offs_n, start, qk_scale, False, FUSED_SCALE,
                                     DOT_PRECISION)  # fmt: skip
    # The last entry (the diagonal block): token-causal and sequence-end masks.
    kb = tl.load(index_base + count - 1)
    for tile in tl.static_range(TILES):
        start = kb * BLOCK_M + tile * BLOCK_N
        k, v = _kv_tile(
            k_base + start * stride_ks, v_base + start * stride_vs, k_desc, v_desc, kv_row, start, offs_n, S,
            True, USE_TMA,
        )  # fmt: skip
        m_i, l_i, acc = _attend_tile(q, k, v, m_i, l_i, acc, offs_m, offs_n, start, qk_scale, True, FUSED_SCALE,
                                     DOT_PRECISION)  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    if EVEN_S:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < S)


# (block_size, head dim) -> the launch config used on Hopper (sm_90+) when none is given: the
# fastest of VARIANTS on an H100 at 8K / 32K / 128K tokens, 0.84x / 0.87x / 0.93x cuDNN SDPA at
# 100% density (benchmarks/RESULTS.md, issue 5). Elsewhere the autotuned pointer-load kernel runs.
HOPPER_CONFIGS: dict[tuple[int, int], dict] = {(128, 128): VARIANTS["tma-fused-n64-w8-s2-r128"]}

_TUNED = {
    block_size: triton.autotune(configs=_configs(block_size), key=["HEAD_DIM", "BLOCK_M", "EVEN_S", "S_BUCKET"])(
        _block_sparse_attention_kernel
    )
    for block_size in SUPPORTED_BLOCK_SIZES
}


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int) -> tuple | None:
    """Descriptors of k and v as [B·Hkv·S, D] rows, or None where that view does not exist."""
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (k, v)):
        return None
    dim = k.shape[-1]
    return tuple(TensorDescriptor(t, [t.numel() // dim, dim], [dim, 1], [block_n, dim]) for t in (k, v))


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_count: torch.Tensor,
    scale: float,
    block_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch on the module's contract; `config` (a `VARIANTS` value, or at least {"BLOCK_N"}) skips autotuning.

    Without `config`: `HOPPER_CONFIGS` on sm_90+ GPUs where it has the shape, else autotuning.

    A config with USE_TMA runs the pointer loads instead where k / v are not contiguous.
    """
    bsz, heads, seq, dim = q.shape
    n = triton.cdiv(seq, block_size)
    if config is None and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9:
        config = HOPPER_CONFIGS.get((block_size, dim))
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {dim} is not supported {SUPPORTED_HEAD_DIMS}")
    if scale <= 0:
        raise ValueError(f"scale must be positive (the row max is taken before scaling), got {scale}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_index = block_index.contiguous()
    block_count = block_count.contiguous()
    # stored [B, S, H, D] like SDPA's output, so transposing it back is free
    out = torch.empty((bsz, seq, heads, dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    config = {"FUSED_SCALE": False, "USE_TMA": False, "WARP_SPECIALIZE": False, **(config or {})}
    descriptors = _tma_descriptors(k, v, config["BLOCK_N"]) if config["USE_TMA"] else None
    config["USE_TMA"] = descriptors is not None
    args = (
        q, k, v, out, block_index, block_count, *(descriptors or (None, None)),
        scale * LOG2E, seq, heads, heads // k.shape[1], n, triton.next_power_of_2(seq),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_index.stride(0), block_index.stride(1), block_index.stride(2),
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=dim,
        BLOCK_M=block_size,
        EVEN_S=seq % block_size == 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    grid = (bsz * heads, n)
    if "BLOCK_N" in config:
        _block_sparse_attention_kernel[grid](*args, **meta, **config)
    else:
        if block_size not in _TUNED:
            raise ValueError(f"block_size {block_size} has no tuned configs ({sorted(_TUNED)})")
        # Tuned once per power-of-two bucket of S (S_BUCKET), not for every sequence length.
        _TUNED[block_size][grid](*args, **meta, **config)
    return out
