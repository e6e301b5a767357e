"""angel::prune_tokens on a GPU (CUDA graphs per shape, `lowering/prune_tokens_cuda.py`) vs the CPU reference."""

import copy

import pytest
import torch

from angel_compile.capture import capture_model
from angel_compile.lowering import prune_tokens_cuda
from angel_compile.ops.prune_tokens import prune_tokens_forward
from angel_compile.passes.base import PassContext
from angel_compile.passes.token_pruning import TokenPruning
from tests.passes.token_pruning_models import TOKEN, tiny_dynamic_shapes, tiny_inputs

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


class _MergeThenMix(torch.nn.Module):
    """Embeddings with projected features scattered in at TOKEN, then a per-token MLP over embeddings + positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 32)
        self.project = torch.nn.Linear(12, 32)
        self.position = torch.nn.Embedding(64, 32)
        self.out = torch.nn.Linear(32, 16)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids == TOKEN).unsqueeze(-1)
        embeds = self.embed(input_ids).masked_scatter(mask, self.project(features))
        return self.out(torch.relu(embeds + self.position(position_ids)))


@pytest.mark.parametrize("dynamic_tokens", [False, True])
def test_the_pass_on_a_cuda_graph_module_matches_the_cpu_one(dynamic_tokens):
    """token_pruning's graph run on the GPU (the graphed op inside an FX graph) vs the same graph on CPU.

    With a dynamic token count the graph computes N and keep from the features' size.
    """
    torch.manual_seed(0)
    model = _MergeThenMix().eval()
    inputs = tiny_inputs(batch=2)
    gm = capture_model(model, (), inputs, tiny_dynamic_shapes(dynamic_tokens=dynamic_tokens))
    gm = TokenPruning(ratio=0.5)(gm, PassContext()).graph_module
    gm_cuda = copy.deepcopy(gm).cuda()
    # two text lengths (one graph, two cached op shapes), and with a dynamic count 12 and 36 tokens
    cases = [(0, 3, 20), (1, 9, 20)] + ([(2, 5, 12), (3, 2, 36)] if dynamic_tokens else [])
    with torch.no_grad():
        for seed, before, tokens in cases:
            case = tiny_inputs(batch=2, before=before, tokens=tokens, seed=seed)
            expected = gm(**case)
            out = gm_cuda(**{name: value.cuda() for name, value in case.items()})
            assert out.shape == expected.shape == (2, before + 4 + tokens // 2, 16)
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
