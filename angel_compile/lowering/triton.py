"""op -> Triton kernel: registers each angel op's CUDA implementation.

The ops' CPU implementation is their plain-PyTorch reference (`ops/`); on CUDA tensors the
dispatcher calls the Triton kernel registered here. Triton is imported on first CUDA call.
"""

from __future__ import annotations

import torch

from angel_compile.ops.fp8_linear import fp8_linear
from angel_compile.ops.int2 import int2_weight_only_linear
from angel_compile.ops.int4 import int4_weight_only_linear, w4a8_linear
from angel_compile.ops.int8_weight_only import int8_weight_only_linear
from angel_compile.ops.kmajor import int2_kmajor_linear, int4_kmajor_linear
from angel_compile.ops.prune_tokens import prune_tokens
from angel_compile.ops.sparse_attention import sparse_attention
from angel_compile.ops.ternary import ternary_3of4_linear
from angel_compile.ops.ternary_kmajor import ternary_kmajor_linear
from angel_compile.ops.w8a8_int8 import w8a8_int8_linear


@int8_weight_only_linear.register_kernel("cuda")
def _int8_weight_only_linear_cuda(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    from angel_compile.kernels.int8_weight_only import int8_weight_only_linear_triton

    return int8_weight_only_linear_triton(x, weight, scale, bias)


@sparse_attention.register_kernel("cuda")
def _sparse_attention_cuda(
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
    from angel_compile.ops.sparse_attention import sparse_attention_forward
    from angel_compile.sparse.selection import SparseAttentionConfig

    config = SparseAttentionConfig(
        method, block_size, min_seq_len, sink_blocks, local_blocks, top_k, budget_decay, threshold
    )
    # Selection runs as PyTorch ops on the GPU (why: sparse/selection.py), attention in Triton.
    return sparse_attention_forward(q, k, v, scale, config, _block_sparse_attention_cuda)


def _block_sparse_attention_cuda(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, scale: float, block_size: int
) -> torch.Tensor:
    from angel_compile.kernels.block_sparse_attention import block_sparse_attention_triton
    from angel_compile.ops.sparse_attention import block_masked_attention, kernel_unsupported
    from angel_compile.sparse.selection import block_mask_to_index

    if kernel_unsupported(q.shape[-1], q.dtype, block_size):
        # The pass emits only what the kernel supports; a hand-built call still gets the right answer.
        return block_masked_attention(q, k, v, block_mask, scale, block_size)
    index, count = block_mask_to_index(block_mask)
    return block_sparse_attention_triton(q, k, v, index, count, scale, block_size)


@int4_weight_only_linear.register_kernel("cuda")
def _int4_weight_only_linear_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    from angel_compile.kernels.int4_gemm import int4_weight_only_linear_triton

    return int4_weight_only_linear_triton(x, packed, scales, zeros, group_size, bias)


def _kmajor_linear_cuda(bits: int):
    def kmajor_linear_cuda(
        x: torch.Tensor,
        words: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from angel_compile.kernels.kmajor_gemm import kmajor_linear_triton

        return kmajor_linear_triton(x, words, scales, zeros, bits, group_size, bias)

    return kmajor_linear_cuda


int4_kmajor_linear.register_kernel("cuda")(_kmajor_linear_cuda(4))
int2_kmajor_linear.register_kernel("cuda")(_kmajor_linear_cuda(2))


@ternary_kmajor_linear.register_kernel("cuda")
def _ternary_kmajor_linear_cuda(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    from angel_compile.kernels.ternary_kmajor import ternary_kmajor_linear_triton

    return ternary_kmajor_linear_triton(x, lo, hi, scales, group_size, bias)


@w4a8_linear.register_kernel("cuda")
def _w4a8_linear_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    from angel_compile.kernels.int4_gemm import w4a8_linear_triton

    return w4a8_linear_triton(x, packed, scales, zeros, group_size, input_scale, bias)


@prune_tokens.register_kernel("cuda")
def _prune_tokens_cuda(
    embeds: torch.Tensor,
    token_mask: torch.Tensor,
    num_tokens: int,
    keep: int,
    method: str,
    lambda_: float,
    merge_threshold: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from angel_compile.kernels.mmr_select import mmr_select_triton, unit_features_triton
    from angel_compile.lowering.prune_tokens_cuda import prune_tokens_mmr_graphed
    from angel_compile.ops.prune_tokens import prune_tokens_forward

    graphable = method in ("mmr", "diversity") and merge_threshold >= 1.0 and 0 < keep < num_tokens
    if graphable and not torch.cuda.is_current_stream_capturing():
        return prune_tokens_mmr_graphed(embeds, token_mask, num_tokens, keep, lambda_ if method == "mmr" else 0.0)
    # Gathers and merging are PyTorch ops on the GPU; unit features and importance are one Triton
    # pass, and the greedy MMR runs in candidate rounds (top-k, a GEMM and Triton kernels per round).
    return prune_tokens_forward(
        embeds, token_mask, num_tokens, keep, method, lambda_, merge_threshold, seed, mmr_select_triton,
        unit_features_triton,
    )  # fmt: skip


@int2_weight_only_linear.register_kernel("cuda")
def _int2_weight_only_linear_cuda(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    from angel_compile.kernels.int2_gemm import int2_weight_only_linear_triton

    return int2_weight_only_linear_triton(x, packed, scales, zeros, group_size, bias)


@ternary_3of4_linear.register_kernel("cuda")
def _ternary_3of4_linear_cuda(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    from angel_compile.kernels.ternary_gemm import ternary_3of4_linear_triton

    return ternary_3of4_linear_triton(x, packed, scales, group_size, bias)


@fp8_linear.register_kernel("cuda")
def _fp8_linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    from angel_compile.kernels.scaled_gemm import fp8_linear_triton

    return fp8_linear_triton(x, weight, weight_scale, input_scale, bias)


@w8a8_int8_linear.register_kernel("cuda")
def _w8a8_int8_linear_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    from angel_compile.kernels.scaled_gemm import w8a8_int8_linear_triton

    return w8a8_int8_linear_triton(x, weight, weight_scale, bias, input_multiplier)
