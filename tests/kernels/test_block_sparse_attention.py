"""The block-sparse attention Triton kernel, run by the Triton interpreter on CPU, vs the reference."""

import pytest
import torch

from angel_compile.kernels.block_sparse_attention import VARIANTS, block_sparse_attention_triton
from angel_compile.ops.sparse_attention import (
    block_masked_attention,
    block_sparse_attention_reference,
    dense_causal_attention,
)
from angel_compile.sparse.selection import SparseAttentionConfig, block_mask_to_index, causal_block_mask, select_blocks
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process, relative_error

SCALE = 0.125


def _qkv(seq: int, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    return (torch.randn(1, h, seq, dim, dtype=dtype) for h in (heads, kv_heads, kv_heads))


def _bound(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_n", [64, 32])  # one tile per key block, and two
def test_full_density_is_dense_causal_attention(dtype, block_n):
    q, k, v = _qkv(256, dtype)
    index, count = block_mask_to_index(causal_block_mask(4).expand(1, 4, 4, 4))
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 64, config={"BLOCK_N": block_n})
    expected = dense_causal_attention(q.float(), k.float(), v.float(), SCALE)
    assert out.dtype == dtype and out.shape == (1, 4, 256, 64)
    assert relative_error(out, expected) < _bound(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["stem", "s2o"])
def test_selected_blocks_match_the_reference_with_gqa(dtype, method):
    q, k, v = _qkv(256, dtype, heads=4, kv_heads=1)
    config = SparseAttentionConfig(method, 64, 0, sink_blocks=1, local_blocks=0, top_k=1, threshold=0.4)
    index, count = block_mask_to_index(select_blocks(q.float(), k.float(), v.float(), config, SCALE))
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 64, config={"BLOCK_N": 64})
    expected = block_sparse_attention_reference(q.float(), k.float(), v.float(), index, SCALE, 64)
    assert relative_error(out, expected) < _bound(dtype)


def test_sequence_not_a_multiple_of_the_block():
    q, k, v = _qkv(200, torch.float32, heads=2, kv_heads=2)
    mask = causal_block_mask(4).expand(1, 2, 4, 4).clone()
    mask[..., 3, 1] = False  # a gap before the (partial) last block
    index, count = block_mask_to_index(mask)
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 64, config={"BLOCK_N": 64})
    expected = block_sparse_attention_reference(q, k, v, index, SCALE, 64)
    assert relative_error(out, expected) < 1e-5


def test_block_of_128_with_64_key_tiles():
    q, k, v = _qkv(256, torch.float16, heads=2, kv_heads=1)
    index, count = block_mask_to_index(causal_block_mask(2).expand(1, 2, 2, 2))
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 128, config={"BLOCK_N": 64})
    expected = dense_causal_attention(q.float(), k.float(), v.float(), SCALE)
    assert relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_the_reference(variant):
    # The interpreter runs every variant, tensor descriptors (USE_TMA) included. 320 tokens:
    # a partial last block, whose descriptor rows past S belong to the next K/V head.
    q, k, v = _qkv(320, torch.float16, heads=4, kv_heads=2)
    mask = causal_block_mask(3).expand(1, 4, 3, 3).clone()
    mask[:, 1, 2, 1] = False  # a gap before the diagonal block
    index, count = block_mask_to_index(mask)
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 128, config=VARIANTS[variant])
    expected = block_sparse_attention_reference(q.float(), k.float(), v.float(), index, SCALE, 128)
    assert relative_error(out, expected) < 2e-3


def test_tma_variant_on_non_contiguous_kv_uses_pointer_loads():
    q, k, v = _qkv(256, torch.float16, heads=2, kv_heads=2)
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))  # [B, S, H, D] in memory
    index, count = block_mask_to_index(causal_block_mask(2).expand(1, 2, 2, 2))
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 128, config=VARIANTS["tma-fused-n128-w8-s2"])
    expected = dense_causal_attention(q.float(), k.float(), v.float(), SCALE)
    assert relative_error(out, expected) < 2e-3


def test_scale_must_be_positive():
    q, k, v = _qkv(128, torch.float32, heads=2, kv_heads=2)
    index, count = block_mask_to_index(causal_block_mask(2).expand(1, 2, 2, 2))
    with pytest.raises(ValueError, match="scale"):
        block_sparse_attention_triton(q, k, v, index, count, -SCALE, 64, config={"BLOCK_N": 64})


def test_output_is_stored_like_sdpa_output():
    q, k, v = _qkv(128, torch.float32, heads=2, kv_heads=2)
    index, count = block_mask_to_index(causal_block_mask(2).expand(1, 2, 2, 2))
    out = block_sparse_attention_triton(q, k, v, index, count, SCALE, 64, config={"BLOCK_N": 64})
    assert out.transpose(1, 2).is_contiguous()  # [B, S, H, D] in memory


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_autotuned_matches_reference(dim, dtype):
    torch.manual_seed(0)
    q = torch.randn(1, 8, 4096, dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(1, 2, 4096, dim, dtype=dtype, device="cuda") for _ in range(2))
    for method in ("static", "stem", "s2o"):
        config = SparseAttentionConfig(method, 128, 0, top_k=8)
        index, count = block_mask_to_index(select_blocks(q, k, v, config, dim**-0.5))
        out = block_sparse_attention_triton(q, k, v, index, count, dim**-0.5, 128)
        expected = block_sparse_attention_reference(q.float(), k.float(), v.float(), index, dim**-0.5, 128)
        assert relative_error(out, expected) < 1e-2
    config = SparseAttentionConfig("stem", 128, 0, top_k=8)
    out = torch.ops.angel.sparse_attention(q, k, v, dim**-0.5, "stem", 128, 0, 1, 2, 8, 0.5, 0.02)  # the kernel
    mask = select_blocks(q, k, v, config, dim**-0.5)  # what the op selects from the same inputs
    expected = block_masked_attention(q.float(), k.float(), v.float(), mask, dim**-0.5, 128)
    assert relative_error(out, expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gpu_variants_match_reference(variant):
    torch.manual_seed(0)
    q = torch.randn(1, 8, 4000, 128, dtype=torch.bfloat16, device="cuda")  # a partial last block
    k, v = (torch.randn(1, 2, 4000, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    index, count = block_mask_to_index(select_blocks(q, k, v, SparseAttentionConfig("stem", 128, 0, top_k=8), 0.088))
    out = block_sparse_attention_triton(q, k, v, index, count, 0.088, 128, config=VARIANTS[variant])
    expected = block_sparse_attention_reference(q.float(), k.float(), v.float(), index, 0.088, 128)
    assert relative_error(out, expected) < 1e-2


SM90_VARIANTS = ("ptr-unfused-n64-w8-s3", "ptr-unfused-n128-w8-s2", "tma-fused-n128-w8-s2")


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the kernel for an H100 (bf16, d=128, 128-token blocks) in the SM90_VARIANTS configs."""
    from angel_compile.kernels.block_sparse_attention import _block_sparse_attention_kernel as kernel

    pointers = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", o_ptr="*bf16", index_ptr="*i32", count_ptr="*i32")

    def pointer_or_stride(name: str, type_: str) -> bool:
        # What the launcher specializes for Llama shapes: 16-byte aligned pointers and strides.
        return name in pointers or (type_ == "i32" and "stride" in name)

    def compile_ptx(config: dict) -> str:
        config = dict(config)
        warps, stages = config.pop("num_warps"), config.pop("num_stages")
        types = {**pointers, "qk_scale": "fp32"}
        constexprs = dict(HEAD_DIM=128, BLOCK_M=128, EVEN_S=True, DOT_PRECISION="tf32", **config)
        if config["USE_TMA"]:
            types |= dict.fromkeys(("k_desc", "v_desc"), f"tensordesc<bf16[{config['BLOCK_N']}, 128]>")
        else:
            constexprs.update(k_desc=None, v_desc=None)
        return compile_sm90_ptx(kernel, types, constexprs, warps, stages, aligned=pointer_or_stride)

    return {name: compile_ptx(VARIANTS[name]) for name in SM90_VARIANTS}


def test_sm90_code_uses_wgmma_exp2_and_tma():
    ptx = ptx_from_fresh_process(__name__)
    for name, code in ptx.items():
        assert "wgmma.mma_async" in code  # Hopper tensor cores for q·kᵀ and p·v
        assert "ex2.approx" in code  # the base-2 softmax
        tma = "cp.async.bulk.tensor" in code  # K/V tiles through the tensor memory accelerator
        assert tma == VARIANTS[name]["USE_TMA"], name
