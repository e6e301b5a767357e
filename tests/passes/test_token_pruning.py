"""The token_pruning pass: on a tiny merge model (fast) and end to end on the LLaVA / Whisper+LM test models."""

import pytest
import torch

import angel_compile
from angel_compile.capture import capture_model
from angel_compile.errors import PassError, RecipeError, UnsupportedError
from angel_compile.lowering.ort import ort_session
from angel_compile.models.multimodal import build_audio_test_case, build_vlm_test_case
from angel_compile.passes.base import PassContext, build_pass
from angel_compile.passes.token_pruning import PRUNE_TOKENS, TokenPruning
from tests.passes.token_pruning_models import TOKEN, TinyMergeModel, tiny_dynamic_shapes, tiny_inputs


def _recipe(**options):
    return {"name": "test", "passes": [{"name": "token_pruning", "options": options}]}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyMergeModel().eval()


def _reference(model, inputs, keep, method="mmr", lambda_=0.5, threshold=1.0, tokens=20):
    """The original model run on the pruned token set, built by hand."""
    merged = model.merged(inputs["input_ids"], inputs["features"])
    mask = inputs["input_ids"] == TOKEN
    pruned, positions = torch.ops.angel.prune_tokens(merged, mask, tokens, keep, method, lambda_, threshold, 0)
    return model.language(pruned, inputs["position_ids"].gather(1, positions))


def test_pass_on_a_tiny_graph_follows_the_shorter_sequence(tiny):
    inputs = tiny_inputs(batch=2)
    gm = capture_model(tiny, (), inputs, tiny_dynamic_shapes())
    result = TokenPruning(ratio=0.5, lambda_=0.7)(gm, PassContext())
    assert result.modified and result.stats.rewritten == 1
    assert result.stats.details["kept"] == 10 and result.stats.details["modality_tokens"] == 20
    assert sum(n.target == PRUNE_TOKENS for n in gm.graph.nodes) == 1
    with torch.no_grad():
        out = gm(**inputs)
        assert out.shape == (2, 27 - 10, 16)
        assert torch.equal(out, _reference(tiny, inputs, 10, lambda_=0.7))
        # one graph for every text length: the pruned length is symbolic
        other = tiny_inputs(batch=2, before=9, after=2, seed=1)
        assert torch.equal(gm(**other), _reference(tiny, other, 10, lambda_=0.7))
    again = TokenPruning(ratio=0.5)(gm, PassContext())
    assert not again.modified


def test_ratio_zero_is_bit_exact_and_onnx_matches(tiny, tmp_path):
    inputs = tiny_inputs(batch=1)
    compiled = angel_compile.compile(tiny, (), inputs, recipe=_recipe(ratio=0.0), dynamic_shapes=tiny_dynamic_shapes())
    with torch.no_grad():
        assert torch.equal(compiled(**inputs), tiny(**inputs))
    pruning = angel_compile.compile(
        tiny, (), inputs, recipe=_recipe(ratio=0.75, method="topk"), dynamic_shapes=tiny_dynamic_shapes()
    )
    session = ort_session(pruning.export_onnx(tmp_path / "pruned.onnx"))
    other = tiny_inputs(batch=1, before=6, after=3, seed=2)
    (out,) = session.run(None, {k: v.numpy() for k, v in other.items()})
    expected = _reference(tiny, other, 5, method="topk").detach()
    assert out.shape == tuple(expected.shape)
    assert torch.allclose(torch.from_numpy(out), expected, atol=1e-5)


def test_bad_options_and_models_are_rejected(tiny):
    with pytest.raises(RecipeError, match=r"ratio=1.0 must be in \[0, 1\)"):
        build_pass("token_pruning", {"ratio": 1.0})
    with pytest.raises(RecipeError, match="method 'fastv'"):
        build_pass("token_pruning", {"method": "fastv"})
    assert build_pass("token_pruning", {"lambda": 0.3}).lambda_ == 0.3  # the recipe key `lambda`
    inputs = tiny_inputs()
    gm = capture_model(tiny, (), inputs, tiny_dynamic_shapes())
    with pytest.raises(UnsupportedError, match="budget=21 exceeds the 20 vision tokens"):
        TokenPruning(budget=21)(gm, PassContext())
    static = capture_model(tiny, (), inputs)
    with pytest.raises(UnsupportedError, match="is static"):
        TokenPruning()(static, PassContext())
    text_only = capture_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedError, match="searched for aten.masked_scatter"):
        TokenPruning()(text_only, PassContext())


@pytest.mark.parametrize(
    "build, ratio, modality", [(build_vlm_test_case, 0.75, "vision"), (build_audio_test_case, 0.5, "audio")]
)
def test_end_to_end_on_the_multimodal_test_models(build, ratio, modality):
    case = build()
    recipe = _recipe(ratio=ratio, method="mmr", modality=modality)
    compiled = angel_compile.compile(case.model, (), case.inputs, recipe=recipe, dynamic_shapes=case.dynamic_shapes)
    keep = compiled.report["token_pruning"].stats.details["kept"]
    assert keep == -(-case.num_tokens * (100 - int(ratio * 100)) // 100)  # ceil((1 - r)·N)
    args = tuple(case.inputs.values())
    with torch.no_grad():
        out = compiled(**case.inputs)
        merged = case.model.merged_embeddings(*args)
        mask = case.inputs["input_ids"] == case.token_id
        threshold = 0.9 if modality == "audio" else 1.0
        pruned, positions = torch.ops.angel.prune_tokens(merged, mask, case.num_tokens, keep, "mmr", 0.5, threshold, 0)
        expected = case.model.language_forward(pruned, case.inputs["position_ids"].gather(1, positions))
    assert out.shape == expected.shape == (1, case.inputs["input_ids"].shape[1] - case.num_tokens + keep, 256)
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_failing_pass_names_itself(tiny):
    inputs = tiny_inputs()
    with pytest.raises(PassError, match="token_pruning"):
        angel_compile.compile(tiny, (), inputs, recipe=_recipe())  # static capture
