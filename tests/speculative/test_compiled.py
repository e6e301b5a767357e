"""The step as one graph under torch.compile(backend="angel"), with a recipe that quantizes the target."""

import json

import pytest
import torch

from angel_compile.errors import RecipeError
from angel_compile.recipe import load_recipe
from angel_compile.speculative import compile_step, generate, greedy_generate
from angel_compile.speculative.compiled import speculative_pass
from tests.speculative.models import oracle_draft, predictable_target


def test_int8_target_bf16_draft_recipe_compiles_one_graph_and_stays_lossless(tmp_path):
    torch._dynamo.reset()
    target = predictable_target(layer_scale=3.0).float()
    draft = oracle_draft(target)
    step = compile_step(target, draft, recipe="speculative-eagle-int8", debug_dir=str(tmp_path))
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    out, stats = generate(target, None, ids, 14, step=step, return_stats=True)
    # The permutation map has wide logit margins, so int8 weights do not change a greedy choice here.
    assert torch.equal(out, greedy_generate(target, ids, 14))
    assert stats.mean_accepted_length > 1.1
    rows = json.loads((tmp_path / "summary.json").read_text())
    rows = rows if isinstance(rows, list) else rows["passes"]
    assert [row["pass"] for row in rows] == ["int8_weight_only", "speculative_decoding"]  # one graph (fullgraph)
    details = rows[1]["details"]
    # The target's 14 layer linears and its LM head are int8, its tied embedding stays float;
    # the draft's 9 linear weights stay float.
    assert (details["target_quantized"], details["target_float_weights"]) == (15, 1)
    assert (details["draft_quantized"], details["draft_float_weights"]) == (0, 9)
    assert details["tree"] == [1, 1, 1, 1] and details["attention_calls"] == 2 + 4


def test_sampling_step_compiles_one_graph_and_draws_what_the_eager_step_draws():
    torch._dynamo.reset()
    target = predictable_target(layer_scale=3.0).float()
    draft = oracle_draft(target)
    recipe = {"name": "tree", "passes": [{"name": "speculative_decoding", "options": {"tree": [2, 1]}}]}
    step = compile_step(target, draft, recipe=recipe)
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(1))

    def sample(step, draft) -> torch.Tensor:
        generator = torch.Generator().manual_seed(5)
        return generate(target, draft, ids, 12, tree=(2, 1), temperature=1.0, step=step, generator=generator)

    # The random numbers are inputs of the step, so the compiled graph draws the same tokens.
    assert torch.equal(sample(step, None), sample(None, draft))


def test_recipe_options_are_checked():
    assert speculative_pass("speculative-eagle").token_tree().branching == (1, 1, 1, 1)
    with pytest.raises(RecipeError, match="k .* must be >= 1"):
        load_recipe({"name": "bad", "passes": [{"name": "speculative_decoding", "options": {"k": 0}}]})
    with pytest.raises(RecipeError, match="limit is 64"):
        load_recipe({"name": "bad", "passes": [{"name": "speculative_decoding", "options": {"tree": [8, 8]}}]})
    with pytest.raises(RecipeError, match="has no 'speculative_decoding' pass"):
        speculative_pass("int8-weight-only")


@pytest.mark.gpu
def test_compiled_int8_step_replays_as_a_cuda_graph_on_the_gpu():
    from benchmarks.bench_speculative import StepRunner

    torch._dynamo.reset()
    target = predictable_target(layer_scale=3.0).float().cuda()
    step = compile_step(target, oracle_draft(target), recipe="speculative-eagle-int8")
    ids = torch.randint(0, 256, (2, 5), device="cuda")
    runner = StepRunner(step, step, ids, 14, "cuda")  # the compiled module keeps new_state
    runner.decode()
    assert torch.equal(runner.state.output[:, :14], greedy_generate(target, ids, 14)[:, 5:])
