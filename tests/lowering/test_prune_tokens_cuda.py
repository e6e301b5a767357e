"""angel::prune_tokens on a GPU (CUDA graphs per shape, `lowering/prune_tokens_cuda.py`) vs the CPU reference."""

import pytest
import torch

from angel_compile.lowering import prune_tokens_cuda
from angel_compile.ops.prune_tokens import prune_tokens_forward

pytestmark = pytest.mark.gpu


def _inputs(seed: int, batch: int = 2, text: int = 40, tokens: int = 1024, dim: int = 256):
    """Rows of ±1: unit rows are ±1/16 exactly, so every similarity and importance is exact in any
    summation order and equal scores tie exactly (the ties go to the lower index on both sides).
    Modality tokens: 4 copies of each of 256 sign patterns, shuffled; text: one sign pattern."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (batch, tokens // 4, dim), generator=generator) * 2.0 - 1.0
    visual = signs.repeat_interleave(4, dim=1)[:, torch.randperm(tokens, generator=generator)]
    text_row = torch.randint(0, 2, (batch, 1, dim), generator=generator) * 2.0 - 1.0
    embeds = torch.cat([text_row.expand(-1, text // 2, -1), visual, text_row.expand(-1, text - text // 2, -1)], 1)
    mask = torch.zeros(batch, text + tokens, dtype=torch.bool)
    mask[:, text // 2 : text // 2 + tokens] = True
    return embeds.to(torch.bfloat16), mask


@pytest.mark.parametrize("method, keep", [("mmr", 256), ("mmr", 103), ("diversity", 256)])
def test_graphed_op_prunes_as_the_reference_on_cpu(method, keep):
    for seed in (0, 1):  # the second call of a shape replays the first call's graphs on new inputs
        embeds, mask = _inputs(seed)
        args = (1024, keep, method, 0.5, 1.0, 0)
        pruned, positions = torch.ops.angel.prune_tokens(embeds.cuda(), mask.cuda(), *args)
        expected, expected_positions = prune_tokens_forward(embeds, mask, *args)
        assert torch.equal(positions.cpu(), expected_positions)
        assert torch.equal(pruned.cpu(), expected)
    assert any(key[5] == keep for key in prune_tokens_cuda._RUNNERS)  # it did take the graphed path


def test_graphed_op_rejects_rows_with_another_token_count():
    embeds, mask = _inputs(2)
    torch.ops.angel.prune_tokens(embeds.cuda(), mask.cuda(), 1024, 200, "mmr", 0.5, 1.0, 0)  # captures
    mask[1, 0] = True  # row 1 now has 1025 modality tokens
    with pytest.raises(ValueError, match=r"counts \[1024, 1025\]"):
        torch.ops.angel.prune_tokens(embeds.cuda(), mask.cuda(), 1024, 200, "mmr", 0.5, 1.0, 0)
