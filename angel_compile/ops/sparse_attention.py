"""`angel::sparse_attention`: block-sparse causal prefill attention with GQA.

    sparse_attention(q [B, Hq, S, D], k [B, Hkv, S, D], v [B, Hkv, S, D], scale, method,
                     block_size, min_seq_len, sink_blocks, local_blocks, top_k,
                     budget_decay, threshold) -> [B, Hq, S, D]      (Hq a multiple of Hkv)

The output is stored [B, S, Hq, D] (strides of a transposed tensor), like SDPA's.

Query head h reads key/value head h // (Hq / Hkv). With S < min_seq_len it is dense causal
attention, softmax(s · q kᵀ + causal) v. Otherwise a block mask M [B, Hq, n, n] is chosen
by `method` (`angel_compile.sparse.selection`, formulas there) and

    out[i] = Σ_{t <= i, block(t) in M[block(i)]} softmax_t(s · q_i · k_t) v_t

i.e. exact attention restricted to the kept key blocks (token-causal on the diagonal block).

The plain-PyTorch reference below is the CPU implementation; `lowering/triton.py` registers
the CUDA one (selection in PyTorch ops, attention in the Triton block-sparse kernel of
`kernels/block_sparse_attention.py`), whose ground truth is `block_sparse_attention_reference`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from angel_compile.sparse.selection import SparseAttentionConfig, select_blocks

# What the Triton kernel takes (the pass emits the op only for these; fp32 runs with tf32
# dots on the GPU, exact ones in the interpreter).
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BLOCK_SIZES = (64, 128)  # the kernel's BLOCK_M: one query block per program


def kernel_unsupported(head_dim: int, dtype: torch.dtype, block_size: int | None = None) -> str | None:
    """Why the Triton kernel cannot take q/k/v of this head dim and dtype (in blocks of `block_size`), or None."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} is not supported by the kernel {SUPPORTED_HEAD_DIMS}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by the kernel {SUPPORTED_DTYPES}"
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        return f"block size {block_size} is not supported by the kernel {SUPPORTED_BLOCK_SIZES}"
    return None


# block attention: (q, k, v, block_mask [B, Hq, n, n], scale, block_size) -> out [B, Hq, S, D]
BlockAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(s · q kᵀ + causal) v with GQA; q [B, Hq, S, D], k/v [B, Hkv, S, D]."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def block_masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, scale: float, block_size: int
) -> torch.Tensor:
    """Attention restricted to the kept blocks of block_mask [B, Hq, n, n] (dense masked; reference)."""
    seq = q.shape[2]
    # token mask [B, Hq, S, S]: key t visible to query i iff its block is kept and t <= i
    tokens = block_mask.repeat_interleave(block_size, dim=-1)[..., :seq]
    tokens = tokens.repeat_interleave(block_size, dim=-2)[..., :seq, :]
    tokens = tokens & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=tokens, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def block_sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, scale: float, block_size: int
) -> torch.Tensor:
    """What the Triton kernel computes, from its inputs.

    block_index int32 [B, Hq, n_qblocks, max_kblocks]: the key blocks of each query block,
    padded with -1 (any order). Every query block must list at least its diagonal block.
    """
    n = block_index.shape[2]
    valid = block_index >= 0
    spill = torch.where(valid, block_index.long(), n)  # -1 -> spill column n, dropped below
    mask = torch.zeros((*block_index.shape[:3], n + 1), dtype=torch.bool, device=q.device)
    mask.scatter_(-1, spill, valid)
    return block_masked_attention(q, k, v, mask[..., :n], scale, block_size)


def sparse_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    config: SparseAttentionConfig,
    block_attention: BlockAttention = block_masked_attention,
) -> torch.Tensor:
    """The op's semantics with a pluggable block attention (reference on CPU, Triton on CUDA)."""
    if q.shape[2] < max(config.min_seq_len, 2):
        return dense_causal_attention(q, k, v, scale)
    block_mask = select_blocks(q, k, v, config, scale)
    return block_attention(q, k, v, block_mask, scale, config.block_size)


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: SparseAttentionConfig
) -> torch.Tensor:
    """The CPU implementation of the op: selection, then dense attention masked to the kept blocks."""
    return sparse_attention_forward(q, k, v, scale, config)


@torch.library.custom_op("angel::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    method: str,
    block_size: int,
    min_seq_len: int,
    sink_blocks: int,
    local_blocks: int,
    top_k: int,
    budget_decay: float,
    threshold: float,
) -> torch.Tensor:
    config = SparseAttentionConfig(
        method, block_size, min_seq_len, sink_blocks, local_blocks, top_k, budget_decay, threshold
    )
    return _bshd(sparse_attention_reference(q, k, v, scale, config))


@sparse_attention.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    method: str,
    block_size: int,
    min_seq_len: int,
    sink_blocks: int,
    local_blocks: int,
    top_k: int,
    budget_decay: float,
    threshold: float,
) -> torch.Tensor:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be [B, H, S, D]")
    torch._check(k.shape == v.shape, lambda: f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of key/value heads")
    torch._check(q.shape[2] == k.shape[2], lambda: "causal prefill needs as many queries as keys")
    torch._check(q.shape[3] == k.shape[3], lambda: "q and k head dims differ")
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)


def _bshd(out: torch.Tensor) -> torch.Tensor:
    # [B, H, S, D] stored as [B, S, H, D], the layout SDPA's meta gives its output (and the
    # kernel writes): transformers views the transposed output as [B, S, H·D] without a copy.
    return out.transpose(1, 2).contiguous().transpose(1, 2)
