"""Greedy speculative decoding is lossless: token-identical to the target's own greedy decoding."""

import pytest
import torch

from angel_compile.errors import UnsupportedError
from angel_compile.models import build_toy_model
from angel_compile.speculative import (
    DraftConfig,
    EagleDraft,
    SpeculativeDecoder,
    TokenTree,
    generate,
    greedy_generate,
    load_draft,
    save_draft,
)
from tests.speculative.models import oracle_draft, predictable_target, random_draft

TREES = [(1, 1, 1, 1), (2, 2, 1), (3, 2)]


@pytest.fixture(scope="module")
def target():
    return predictable_target(layer_scale=3.0)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (batch, length), generator=generator) for batch, length in ((1, 1), (3, 7), (2, 13))]


def test_functional_greedy_matches_transformers_generate(target, prompts):
    for ids in prompts[1:2]:
        reference = target.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
        assert torch.equal(greedy_generate(target, ids, 12), reference)


@pytest.mark.parametrize("tree", TREES)
def test_lossless_with_a_partly_right_draft(target, prompts, tree):
    draft = oracle_draft(target)
    accepted = []
    for ids, new_tokens in zip(prompts, (5, 23, 17), strict=True):
        out, stats = generate(target, draft, ids, new_tokens, tree=tree, return_stats=True)
        assert torch.equal(out, greedy_generate(target, ids, new_tokens)), (tree, ids.shape, new_tokens)
        accepted.append(stats.mean_accepted_length)
    # The draft guesses the permutation map; context overrides it now and then.
    assert 1.2 < sum(accepted) / len(accepted) <= len(tree) + 1


def test_exact_draft_accepts_everything(prompts):
    target = predictable_target(layer_scale=0.0)
    ids = prompts[1]
    for tree in ((1, 1, 1), (2, 2, 1)):
        out, stats = generate(target, oracle_draft(target), ids, 24, tree=tree, return_stats=True)
        assert torch.equal(out, greedy_generate(target, ids, 24))
        assert stats.mean_accepted_length == pytest.approx(len(tree) + 1, abs=0.35)


@pytest.mark.parametrize("tree", [(1, 1, 1), (2, 2)])
def test_lossless_with_a_random_draft_on_a_random_target(tree, prompts):
    target = build_toy_model("llama", seed=3).double()
    ids = prompts[1]
    out, stats = generate(target, random_draft(target), ids, 20, tree=tree, return_stats=True)
    assert torch.equal(out, greedy_generate(target, ids, 20))
    assert 1.0 <= stats.mean_accepted_length < 1.5


def test_saved_draft_round_trip(tmp_path, target, prompts):
    draft = oracle_draft(target)
    path = save_draft(draft, tmp_path / "draft.safetensors", dtype=torch.float64)
    loaded = load_draft(path, dtype=torch.float64)
    assert loaded.config == draft.config
    ids = prompts[2]
    assert torch.equal(generate(target, loaded, ids, 9, k=3), generate(target, draft, ids, 9, k=3))


def test_bf16_draft_with_fp32_target(prompts):
    target = predictable_target(layer_scale=0.0).float()
    draft = oracle_draft(target).to(torch.bfloat16)
    out, stats = generate(target, draft, prompts[1], 16, k=3, return_stats=True)
    assert torch.equal(out, greedy_generate(target, prompts[1], 16))
    assert stats.mean_accepted_length > 3


def test_tree_tensors():
    tree = TokenTree((2, 2, 1))
    assert tree.num_drafted == 2 + 4 + 4
    tensors = tree.tensors()
    assert tensors["parents"].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    assert tensors["depths"].tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert tensors["path_to"][9].tolist() == [0, 2, 5, 9]
    assert tensors["path_to"][2].tolist() == [0, 2, 2, 2]
    assert tensors["ancestor_mask"][9].nonzero().flatten().tolist() == [0, 2, 5, 9]


def test_bad_input_is_named(target):
    ids = torch.randint(0, 256, (1, 4))
    draft = oracle_draft(target)
    with pytest.raises(UnsupportedError, match="k .* must be >= 1"):
        generate(target, draft, ids, 4, k=0)
    with pytest.raises(UnsupportedError, match="limit is 64"):
        generate(target, draft, ids, 4, tree=(4, 4, 4))
    with pytest.raises(UnsupportedError, match="branching factor"):
        TokenTree((2, 0))
    wrong = EagleDraft(DraftConfig(32, 256, (0,), 4, 2, 8, 64, 10000.0))
    with pytest.raises(UnsupportedError, match="hidden size 32 != target's 64"):
        SpeculativeDecoder(target, wrong, TokenTree.chain(2))
    wrong_vocab = EagleDraft(DraftConfig(64, 300, (0, 5), 4, 2, 16, 128, 10000.0))
    with pytest.raises(UnsupportedError, match="vocabulary 300 != target's 256.*feature_layers"):
        SpeculativeDecoder(target, wrong_vocab, TokenTree.chain(2))
    with pytest.raises(UnsupportedError, match="temperature must be a finite number >= 0"):
        generate(target, draft, ids, 4, temperature=-0.7)
    with pytest.raises(UnsupportedError, match="max_new_tokens"):
        generate(target, draft, ids, 0)
    with pytest.raises(UnsupportedError, match="int64 tensor"):
        generate(target, draft, ids[0], 4)


@pytest.mark.gpu
def test_step_replays_as_a_cuda_graph_on_the_gpu():
    from benchmarks.bench_speculative import StepRunner

    target = predictable_target(layer_scale=3.0).float().cuda()
    ids = torch.randint(0, 256, (4, 9), device="cuda")
    decoder = SpeculativeDecoder(target, oracle_draft(target), TokenTree((2, 2, 1)))
    runner = StepRunner(decoder, decoder, ids, 20, "cuda")
    runner.decode()
    assert torch.equal(runner.state.output[:, :20], greedy_generate(target, ids, 20)[:, 9:])
