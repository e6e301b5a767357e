"""angel::prune_tokens reference: selection methods, merging, budget and fake shapes."""

import pytest
import torch
import torch.nn.functional as F

from angel_compile.ops.prune_tokens import (
    kept_count,
    merge_adjacent,
    mmr_select_reference,
    prune_tokens_forward,
    select,
)


def _case(batch=2, text=5, tokens=24, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, text + tokens, dim, generator=g)
    mask = torch.zeros(batch, text + tokens, dtype=torch.bool)
    mask[:, 2 : 2 + tokens] = True
    return embeds, mask


def test_kept_count_is_ceil_of_the_kept_fraction():
    assert [kept_count(100, r) for r in (0.0, 0.5, 0.75, 0.9)] == [100, 50, 25, 10]
    assert kept_count(64, 0.9) == 7


@pytest.mark.parametrize("method", ["mmr", "diversity", "topk", "stride", "random"])
def test_keeping_everything_is_the_identity(method):
    embeds, mask = _case()
    pruned, positions = prune_tokens_forward(embeds, mask, 24, 24, method, 0.5, 1.0, 0)
    assert torch.equal(pruned, embeds) and torch.equal(positions, torch.arange(29).expand(2, 29))


@pytest.mark.parametrize("method", ["mmr", "diversity", "topk", "stride", "random"])
def test_text_is_kept_and_order_preserved(method):
    embeds, mask = _case()
    pruned, positions = prune_tokens_forward(embeds, mask, 24, 6, method, 0.5, 1.0, 3)
    assert pruned.shape == (2, 11, 16) and positions.shape == (2, 11)
    assert bool((positions[:, 1:] > positions[:, :-1]).all())  # ascending: original order
    text = torch.tensor([0, 1, 26, 27, 28])
    assert all(bool(torch.isin(text, row).all()) for row in positions)
    assert torch.equal(pruned, embeds.gather(1, positions.unsqueeze(-1).expand(-1, -1, 16)))


def test_stride_topk_and_mmr_with_lambda_one():
    features = torch.randn(1, 12, 8)
    importance = torch.randn(1, 12)
    assert select(features, importance, 4, "stride", 0.5, 0).tolist() == [[0, 3, 6, 9]]
    top = importance.topk(4).indices.sort().values
    assert torch.equal(select(features, importance, 4, "topk", 0.5, 0), top)
    assert torch.equal(select(features, importance, 4, "mmr", 1.0, 0), top)  # λ = 1: importance only


def test_mmr_prefers_diverse_tokens_over_duplicates():
    # Tokens 0..2 are copies of one direction with the highest importance; token 3 is different.
    x = F.normalize(torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [0.0, 1.0]]]), dim=-1)
    importance = torch.tensor([[0.9, 0.89, 0.88, 0.5]])
    assert mmr_select_reference(x, importance, 2, 0.5).tolist() == [[0, 3]]
    assert select(x, importance, 2, "topk", 0.5, 0).tolist() == [[0, 1]]


def test_merging_joins_the_most_similar_neighbours_and_averages():
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 0.0]]])
    positions = torch.arange(10, 15).unsqueeze(0)
    merged, first = merge_adjacent(features, positions, keep=2, threshold=0.9)
    assert first.tolist() == [[10, 12, 14]]
    assert torch.equal(merged, torch.tensor([[[1.0, 0.0], [0.0, 1.5], [-1.0, 0.0]]]))
    # at most N - keep joins: with keep = 4 only one pair joins
    assert merge_adjacent(features, positions, keep=4, threshold=0.9)[0].shape[1] == 4


def test_audio_merge_then_prune_writes_group_means():
    embeds, mask = _case(batch=1, tokens=8)
    embeds[0, 2:6] = embeds[0, 2]  # four identical frames: one group
    pruned, positions = prune_tokens_forward(embeds, mask, 8, 4, "topk", 0.5, 0.99, 0)
    assert pruned.shape == (1, 9, 16)
    if 2 in positions[0].tolist():
        assert torch.allclose(pruned[0, positions[0].tolist().index(2)], embeds[0, 2])


def test_bad_counts_and_budgets_are_rejected():
    embeds, mask = _case()
    with pytest.raises(ValueError, match="must hold 20 modality tokens"):
        prune_tokens_forward(embeds, mask, 20, 5, "mmr", 0.5, 1.0, 0)
    with pytest.raises(ValueError, match="keep=30"):
        prune_tokens_forward(embeds, mask, 24, 30, "mmr", 0.5, 1.0, 0)
    with pytest.raises(ValueError, match="unknown method"):
        prune_tokens_forward(embeds, mask, 24, 5, "fastv", 0.5, 1.0, 0)


def test_fake_impl_gives_the_symbolic_pruned_length():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    embeds, mask = _case()
    with mode:
        fake = mode.from_tensor(embeds, symbolic_context=None)
        pruned, positions = torch.ops.angel.prune_tokens(fake, mode.from_tensor(mask), 24, 6, "mmr", 0.5, 1.0, 0)
    assert tuple(pruned.shape) == (2, 11, 16) and positions.dtype == torch.int64
