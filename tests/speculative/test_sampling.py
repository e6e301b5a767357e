"""Speculative sampling (temperature > 0) is distributed exactly as sampling the target itself."""

import math

import pytest
import torch

from angel_compile.errors import UnsupportedError
from angel_compile.speculative import SpeculativeDecoder, TokenTree, generate, greedy_generate
from tests.speculative.models import oracle_draft, predictable_target, random_draft, tiny_vocab_target

VOCAB = 8
SAMPLES = 8000


def exact_three_token_distribution(target, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """p(x1) p(x2 | x1) p(x3 | x1, x2) after `prompt` [1, P], from the target's own forward: [V**3],
    outcome x1 * V**2 + x2 * V + x3."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))  # [V*V, 2]: (x1, x2)
    ids = torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)
    with torch.no_grad():
        log_p = torch.log_softmax(target(ids).logits[:, -3:] / temperature, dim=-1)  # after prompt, x1, x2
    first_two = log_p[:, 0].gather(1, pairs[:, :1]) + log_p[:, 1].gather(1, pairs[:, 1:])  # [V*V, 1]
    return (first_two + log_p[:, 2]).exp().flatten()


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the outcomes expected >= 5 times (the rarer ones pooled), and its dof."""
    common = expected >= 5
    observed = torch.cat([counts[common], counts[~common].sum()[None]])
    expected = torch.cat([expected[common], expected[~common].sum()[None]])
    return float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1


@pytest.mark.parametrize(("tree", "temperature"), [((1, 1), 1.0), ((2, 1), 0.7), ((3,), 1.0)])
def test_first_tokens_follow_the_targets_sampling_distribution(tree, temperature):
    target = tiny_vocab_target(VOCAB)
    draft = random_draft(target)  # its q differs from the target's p: some drafts are rejected
    prompt = torch.tensor([[3, 1, 4]])
    generator = torch.Generator().manual_seed(0)
    ids = prompt.expand(SAMPLES, -1)
    out, stats = generate(
        target, draft, ids, 3, tree=tree, temperature=temperature, generator=generator, return_stats=True
    )
    x1, x2, x3 = out[:, 3], out[:, 4], out[:, 5]  # x1 from the prefill, x2 and x3 from the first step
    counts = torch.bincount(x1 * VOCAB**2 + x2 * VOCAB + x3, minlength=VOCAB**3).double()
    statistic, dof = chi_square(counts, SAMPLES * exact_three_token_distribution(target, prompt, temperature))
    # Mean dof, deviation sqrt(2 dof); accepting every draft or resampling from p instead of the
    # residual gives ten times the bound here.
    assert statistic < dof + 6 * math.sqrt(2 * dof), (statistic, dof)
    assert 1.2 < stats.mean_accepted_length < len(tree) + 1  # rows accept different lengths


@pytest.mark.parametrize("tree", [(1, 1, 1), (2, 2, 1)])
def test_near_zero_temperature_samples_the_greedy_tokens(tree):
    # Over many steps: the cache, the draft's pending tokens and the output follow the accepted path.
    target = predictable_target(layer_scale=3.0)
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    out, stats = generate(
        target, oracle_draft(target), ids, 20, tree=tree, temperature=1e-5, generator=generator, return_stats=True
    )
    assert torch.equal(out, greedy_generate(target, ids, 20))
    assert stats.mean_accepted_length > 1.2


def test_the_generator_makes_sampling_reproducible():
    target = predictable_target(layer_scale=3.0)
    draft = oracle_draft(target)
    ids = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))

    def sample(seed: int) -> torch.Tensor:
        return generate(target, draft, ids, 10, k=2, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_temperature_zero_keeps_the_greedy_state():
    target = predictable_target(layer_scale=3.0)
    decoder = SpeculativeDecoder(target, oracle_draft(target), TokenTree.chain(2))
    ids = torch.randint(0, 256, (2, 4))
    greedy = decoder.new_state(ids, 6)
    assert greedy.temperature is None and greedy.uniforms is None and len(greedy.tensors()) == 13
    sampling = decoder.new_state(ids, 6, temperature=0.5)
    assert sampling.uniforms.shape == (2, 2 * 2 + 1) and len(sampling.tensors()) == 15


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), float("inf")])
def test_bad_temperature_is_named(temperature):
    target = predictable_target(layer_scale=3.0)
    with pytest.raises(UnsupportedError, match="temperature must be"):
        generate(target, oracle_draft(target), torch.randint(0, 256, (1, 4)), 4, temperature=temperature)
