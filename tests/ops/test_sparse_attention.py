"""angel::sparse_attention: the reference against dense attention, and the selection invariants."""

import pytest
import torch

from angel_compile.ops.sparse_attention import (
    block_sparse_attention_reference,
    dense_causal_attention,
    sparse_attention_reference,
)
from angel_compile.sparse.selection import (
    SparseAttentionConfig,
    block_density,
    block_mask_to_index,
    causal_block_mask,
    forced_block_mask,
    select_blocks,
    stem_budget,
)
from tests.utils import relative_error

OP = torch.ops.angel.sparse_attention
SCALE = 0.125


def _qkv(seq: int = 320, heads: int = 4, kv_heads: int = 2, dim: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    q = torch.randn(2, heads, seq, dim)
    k = torch.randn(2, kv_heads, seq, dim)
    # a few loud keys / values, so that block selection has structure to find
    k[:, :, 70:75] *= 4
    v = torch.randn(2, kv_heads, seq, dim) * torch.linspace(0.2, 2.0, seq)[:, None]
    return q, k, v


def _call(q, k, v, config: SparseAttentionConfig):
    c = config
    args = (c.method, c.block_size, c.min_seq_len, c.sink_blocks, c.local_blocks, c.top_k, c.budget_decay, c.threshold)
    return OP(q, k, v, SCALE, *args)


@pytest.mark.parametrize(
    "config",
    [
        SparseAttentionConfig("static", 64, 0, sink_blocks=0, local_blocks=10),
        SparseAttentionConfig("stem", 64, 0, top_k=5, budget_decay=0.0),
        SparseAttentionConfig("s2o", 64, 0, threshold=0.0),
    ],
    ids=["static", "stem", "s2o"],
)
def test_dense_equivalent_budgets_equal_dense_attention(config):
    q, k, v = _qkv()
    out = _call(q, k, v, config)
    assert relative_error(out, dense_causal_attention(q, k, v, SCALE)) < 1e-6


def test_below_min_seq_len_is_dense():
    q, k, v = _qkv()
    config = SparseAttentionConfig("static", 64, min_seq_len=321, sink_blocks=0, local_blocks=0)
    assert torch.equal(_call(q, k, v, config), dense_causal_attention(q, k, v, SCALE))


@pytest.mark.parametrize("method", ["static", "stem", "s2o"])
def test_sparse_output_is_attention_over_the_selected_blocks(method):
    q, k, v = _qkv()
    config = SparseAttentionConfig(method, 64, 0, local_blocks=0, top_k=1, threshold=0.3)
    mask = select_blocks(q, k, v, config, SCALE)
    index, _ = block_mask_to_index(mask)
    expected = block_sparse_attention_reference(q, k, v, index, SCALE, 64)
    out = _call(q, k, v, config)
    assert torch.allclose(out, expected, atol=1e-6)
    assert block_density(mask) < 1.0
    assert 0 < relative_error(out, dense_causal_attention(q, k, v, SCALE)) < 1.0


def test_block_index_reference_matches_a_hand_built_mask():
    q, k, v = _qkv(seq=256, heads=2, kv_heads=1)
    # query block 3 reads key blocks 0 and 3 only; the others read everything causal
    index = torch.full((2, 2, 4, 4), -1, dtype=torch.int32)
    for i in range(4):
        index[:, :, i, : i + 1] = torch.arange(i + 1, dtype=torch.int32)
    index[:, :, 3] = torch.tensor([3, 0, -1, -1], dtype=torch.int32)  # any order
    out = block_sparse_attention_reference(q, k, v, index, SCALE, 64)
    dense = dense_causal_attention(q, k, v, SCALE)
    assert torch.allclose(out[:, :, :192], dense[:, :, :192], atol=1e-6)
    keys = torch.cat([torch.arange(64), torch.arange(192, 256)])
    rows = torch.arange(192, 256)
    scores = (q[:, :, rows] @ k[:, :, keys].repeat_interleave(2, 1).transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    expected = scores.softmax(-1) @ v[:, :, keys].repeat_interleave(2, 1)
    assert torch.allclose(out[:, :, 192:], expected, atol=1e-5)


@pytest.mark.parametrize("method", ["static", "stem", "s2o"])
def test_selection_keeps_sinks_local_and_diagonal_and_is_causal(method):
    q, k, v = _qkv(seq=640)
    config = SparseAttentionConfig(method, 64, 0, sink_blocks=2, local_blocks=1, top_k=1, threshold=0.5)
    mask = select_blocks(q, k, v, config, SCALE)
    n = mask.shape[-1]
    assert mask.shape == (2, 4, n, n) and n == 10
    assert not (mask & ~causal_block_mask(n)).any()
    assert (mask | ~forced_block_mask(n, 2, 1)).all()
    assert mask.diagonal(dim1=-2, dim2=-1).all()


def test_density_grows_with_the_budget():
    q, k, v = _qkv(seq=1024)
    stem = [
        block_density(select_blocks(q, k, v, SparseAttentionConfig("stem", 64, top_k=t), SCALE))
        for t in (1, 2, 4, 8, 16)
    ]
    s2o = [
        block_density(select_blocks(q, k, v, SparseAttentionConfig("s2o", 64, threshold=t), SCALE))
        for t in (0.5, 0.1, 0.02, 0.0)
    ]
    static = [
        block_density(select_blocks(q, k, v, SparseAttentionConfig("static", 64, local_blocks=w), SCALE))
        for w in (0, 2, 8)
    ]
    for densities in (stem, s2o, static):
        assert densities == sorted(densities) and densities[0] < densities[-1]
    assert s2o[-1] == 1.0


def test_stem_budget_decays_linearly_from_top_k():
    budget = stem_budget(9, top_k=8, budget_decay=0.5)
    assert budget.tolist() == [8, 8, 7, 7, 6, 6, 5, 5, 4]
    assert stem_budget(5, 3, 0.0).tolist() == [3] * 5  # no decay: uniform top-k
    q, k, v = _qkv(seq=1024)
    mask = select_blocks(q, k, v, SparseAttentionConfig("stem", 64, sink_blocks=0, local_blocks=0, top_k=6), SCALE)
    kept = mask.sum(-1)  # the diagonal is forced, the budget comes on top
    expected = torch.minimum(stem_budget(16, 6, 0.5) + 1, torch.arange(1, 17))
    assert torch.equal(kept, expected.expand_as(kept))


def test_output_aware_metric_prefers_blocks_with_large_values():
    q, k, v = _qkv(seq=512, heads=2, kv_heads=2)
    k = torch.zeros_like(k)  # every key block gets the same attention mass
    v[:, :, 128:192] *= 10  # ... but block 2's values are 10x larger
    config = SparseAttentionConfig("stem", 64, sink_blocks=0, local_blocks=0, top_k=1, budget_decay=0.0)
    aware = select_blocks(q, k, v, config, SCALE)
    assert aware[:, :, 3:, 2].all()


def test_block_mask_to_index_lists_ascending_with_the_diagonal_last():
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    index, count = block_mask_to_index(mask)
    assert index.tolist() == [[0, -1, -1], [0, 1, -1], [1, 2, -1]]
    assert count.tolist() == [1, 2, 2]


def test_op_passes_torch_library_checks():
    q, k, v = _qkv(seq=192)
    torch.library.opcheck(OP, (q, k, v, SCALE, "stem", 64, 0, 1, 1, 2, 0.5, 0.02))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"top_k": 0}, "top_k=0 must be > 0"),
        ({"block_size": 96}, "block_size=96 must be a power of two"),
        ({"method": "bigbird"}, "method='bigbird' is unknown"),
        ({"threshold": 1.5}, "threshold=1.5"),
    ],
)
def test_config_rejects_out_of_range_parameters(changes, message):
    with pytest.raises(ValueError, match=message):
        SparseAttentionConfig(**changes)


def test_reference_is_what_the_op_runs_on_cpu():
    q, k, v = _qkv()
    config = SparseAttentionConfig("s2o", 64, 0)
    assert torch.equal(_call(q, k, v, config), sparse_attention_reference(q, k, v, SCALE, config))
