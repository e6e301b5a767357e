"""The token_pruning pass: on a tiny merge model (fast), end to end on the LLaVA / Whisper+LM test models, and on
Qwen2-VL's language model with its [3, B, S] mRoPE position ids."""

import re

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

import angel_compile
from angel_compile.capture import capture_model
from angel_compile.errors import PassError, RecipeError, UnsupportedError
from angel_compile.lowering.ort import ort_session
from angel_compile.models.multimodal import (
    IMAGE_TOKEN,
    build_audio_test_case,
    build_qwen2vl_test_case,
    build_vlm_test_case,
    qwen2vl_pixel_values,
    qwen2vl_prompt,
    synthetic_image,
)
from angel_compile.passes.base import PassContext, build_pass
from angel_compile.passes.token_pruning import PRUNE_TOKENS, TokenPruning
from tests.passes.token_pruning_models import (
    TOKEN,
    TinyCacheModel,
    TinyMergeModel,
    TinyPrefixModel,
    prefix_dynamic_shapes,
    prefix_inputs,
    tiny_dynamic_shapes,
    tiny_inputs,
)


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


def test_one_graph_serves_any_modality_token_count(tiny, tmp_path):
    """A dynamic features dimension: N and keep = ceil((1 - r)·N) are symbolic, in PyTorch and in ONNX."""
    inputs = tiny_inputs(batch=2)
    dynamic = tiny_dynamic_shapes(dynamic_tokens=True)
    compiled = angel_compile.compile(tiny, (), inputs, recipe=_recipe(ratio=0.9), dynamic_shapes=dynamic)
    details = compiled.report["token_pruning"].stats.details
    symbol = re.fullmatch(r"\((s\d+)//2\)", details["modality_tokens"]).group(1)  # N = B·N / 2
    assert details["kept"] == f"(((({symbol}//2)) + 9)//10)"
    session = ort_session(compiled.export_onnx(tmp_path / "dynamic.onnx"))
    for tokens, before, after in ((20, 3, 4), (12, 5, 1), (36, 2, 7)):
        other = tiny_inputs(batch=2, before=before, tokens=tokens, after=after, seed=tokens)
        keep = -(-tokens // 10)
        with torch.no_grad():
            out = compiled(**other)
            expected = _reference(tiny, other, keep, tokens=tokens)
        assert out.shape == (2, before + keep + after, 16)
        assert torch.equal(out, expected)
        (onnx_out,) = session.run(None, {k: v.numpy() for k, v in other.items()})
        assert torch.allclose(torch.from_numpy(onnx_out), expected, atol=1e-5)
    # a budget is checked against the symbolic count when it can be, else when the graph runs
    gm = capture_model(tiny, (), inputs, dynamic)
    with pytest.raises(UnsupportedError, match=r"budget=61 exceeds the \(s\d+//2\) vision tokens"):
        TokenPruning(budget=61)(gm, PassContext())
    result = TokenPruning(budget=8)(gm, PassContext())
    assert result.stats.details["kept"] == 8 and "checked when the graph runs" in result.stats.details["note"]
    with torch.no_grad():
        assert gm(**tiny_inputs(batch=2, tokens=12)).shape == (2, 3 + 8 + 4, 16)
        with pytest.raises(ValueError, match=r"keep=8 must be in \[1, 4\]"):
            gm(**tiny_inputs(batch=2, tokens=4))


def test_a_concatenated_prefix_of_features_is_pruned():
    """cat([features, token embeddings], dim=1): the mask is the features' span; text and token count dynamic."""
    torch.manual_seed(0)
    model = TinyPrefixModel().eval()
    inputs = prefix_inputs(batch=2)
    gm = capture_model(model, (), inputs, prefix_dynamic_shapes())
    result = TokenPruning(ratio=0.75)(gm, PassContext())
    assert result.stats.rewritten == 1 and result.stats.details["merge"] == "cat"
    for tokens, text in ((20, 7), (8, 3), (28, 12)):
        other = prefix_inputs(batch=2, tokens=tokens, text=text, seed=tokens)
        keep = -(-tokens // 4)
        with torch.no_grad():
            merged = model.merged(other["input_ids"], other["features"])
            mask = torch.arange(tokens + text).expand(2, -1) < tokens
            pruned, _ = torch.ops.angel.prune_tokens(merged, mask, tokens, keep, "mmr", 0.5, 1.0, 0)
            expected = model.language(pruned, torch.arange(keep + text).expand(2, -1))
            out = gm(**other)
        assert out.shape == (2, keep + text, 16)
        assert torch.equal(out, expected)


def test_the_returned_kv_cache_follows_the_pruned_sequence():
    """A prefill returning its keys/values: the cache holds the S' kept positions, as the hand-built reference's."""
    torch.manual_seed(0)
    model = TinyCacheModel().eval()
    inputs = tiny_inputs(batch=2)
    gm = capture_model(model, (), inputs, tiny_dynamic_shapes())
    assert TokenPruning(ratio=0.75)(gm, PassContext()).modified
    with torch.no_grad():
        logits, keys, values = gm(**inputs)
        merged = model.merged(inputs["input_ids"], inputs["features"])
        pruned, kept = torch.ops.angel.prune_tokens(merged, inputs["input_ids"] == TOKEN, 20, 5, "mmr", 0.5, 1.0, 0)
        expected = model.language_with_cache(pruned, inputs["position_ids"].gather(1, kept))
    assert keys.shape == values.shape == (2, 2, 27 - 15, 16)
    for out, reference in zip((logits, keys, values), expected, strict=True):
        assert torch.equal(out, reference)


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


@pytest.fixture(scope="module")
def qwen2vl():
    return build_qwen2vl_test_case()


def _qwen2vl_reference(model, inputs, keep, method):
    """Qwen2-VL's language model run by hand on the pruned token set, with the kept tokens' own mRoPE ids.

    -> (logits, kept positions [B, S'], the logits with positions renumbered 0..S'-1 instead).
    """
    ids = inputs["input_ids"]
    mask = ids == IMAGE_TOKEN
    tokens = int(mask[0].sum())
    embeds = model.language_model.embed_tokens(ids).masked_scatter(mask.unsqueeze(-1), inputs["image_embeds"])
    pruned, kept = torch.ops.angel.prune_tokens(embeds, mask, tokens, keep, method, 0.5, 1.0, 0)
    position_ids = inputs["position_ids"].gather(2, kept.expand(3, -1, -1))  # [3, B, S']
    attention_mask = inputs["attention_mask"].gather(1, kept)
    logits = model.language_forward(pruned, position_ids, attention_mask)
    renumbered = torch.arange(kept.shape[1]).expand(3, *kept.shape)
    return logits, kept, model.language_forward(pruned, renumbered, attention_mask)


def test_qwen2vl_capture_is_rewritten_with_a_dynamic_sequence(qwen2vl):
    gm = capture_model(qwen2vl.model, (), qwen2vl.inputs, qwen2vl.dynamic_shapes)
    result = TokenPruning(ratio=0.5)(gm, PassContext())
    assert result.modified and result.stats.matched == 1 and result.stats.rewritten == 1
    assert result.stats.details["merge"] == "masked_scatter"
    assert result.stats.details["modality_tokens"] == 16 and result.stats.details["kept"] == 8
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(PRUNE_TOKENS) == 1 and targets.count(torch.ops.aten.masked_scatter.default) == 1
    # the mRoPE ids are gathered along the sequence: [3, B, S] -> [3, B, S - 8]
    (position_ids,) = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "position_ids"]
    (gathered,) = [u for u in position_ids.users if u.target == torch.ops.aten.index.Tensor]
    (prune,) = [n for n in gm.graph.nodes if n.target == PRUNE_TOKENS]
    shape, pruned_length = gathered.meta["val"].shape, prune.meta["val"][0].shape[1]
    assert shape[:2] == (3, 1) and statically_known_true(shape[2] == pruned_length)
    assert str(pruned_length) == result.stats.details["sequence"]  # S - 8, symbolic
    assert not TokenPruning(ratio=0.5)(gm, PassContext()).modified


def test_qwen2vl_ratio_zero_is_bit_exact(qwen2vl):
    recipe = _recipe(ratio=0.0)
    compiled = angel_compile.compile(
        qwen2vl.model, (), qwen2vl.inputs, recipe=recipe, dynamic_shapes=qwen2vl.dynamic_shapes
    )
    assert compiled.report["token_pruning"].stats.details["kept"] == 16
    with torch.no_grad():
        assert torch.equal(compiled(**qwen2vl.inputs), qwen2vl.model(**qwen2vl.inputs))


@pytest.mark.parametrize("ratio, method, keep", [(0.5, "mmr", 8), (0.75, "mmr", 4), (0.75, "stride", 4)])
def test_qwen2vl_pruned_graph_is_the_language_model_on_the_kept_tokens(qwen2vl, ratio, method, keep):
    recipe = _recipe(ratio=ratio, method=method)
    compiled = angel_compile.compile(
        qwen2vl.model, (), qwen2vl.inputs, recipe=recipe, dynamic_shapes=qwen2vl.dynamic_shapes
    )
    assert compiled.report["token_pruning"].stats.details["kept"] == keep
    with torch.no_grad():
        out = compiled(**qwen2vl.inputs)
        expected, kept, renumbered = _qwen2vl_reference(qwen2vl.model, qwen2vl.inputs, keep, method)
    assert out.shape == expected.shape == (1, 29 - 16 + keep, 256)
    assert torch.allclose(out, expected, atol=1e-5)
    # the kept tokens keep their own mRoPE ids: renumbering them would change the logits
    assert not torch.allclose(out, renumbered, atol=1e-5)
    if method == "stride":  # text 0-5 and 22-28, image tokens 6 + ⌊i·16/4⌋
        assert kept.tolist() == [[0, 1, 2, 3, 4, 5, 6, 10, 14, 18, 22, 23, 24, 25, 26, 27, 28]]


def test_qwen2vl_one_graph_serves_other_text_lengths_and_a_batch():
    case = build_qwen2vl_test_case(batch=2)
    recipe = _recipe(ratio=0.75, method="mmr")
    compiled = angel_compile.compile(case.model, (), case.inputs, recipe=recipe, dynamic_shapes=case.dynamic_shapes)
    images = torch.cat([synthetic_image(), synthetic_image().flip(-1)])
    pixel_values, grid_thw = qwen2vl_pixel_values(images, patch=4)
    for before, after in ((5, 6), (9, 2), (1, 20)):
        ids = qwen2vl_prompt(16, before, after, seed=3, batch=2)
        inputs = case.model.prepare_inputs(ids, pixel_values, grid_thw)
        with torch.no_grad():
            out = compiled(**inputs)
            expected, _, _ = _qwen2vl_reference(case.model, inputs, 4, "mmr")
        assert out.shape == expected.shape == (2, before + after + 2 + 4, 256)
        assert torch.allclose(out, expected, atol=1e-5)


def _qwen2vl_images_inputs(model, sizes, before=4, between=3, after=5):
    """Inputs for one prompt holding one image of each size (text, <vision start, pads, end>..., text)."""
    pixel_values, grid_thw = zip(*(qwen2vl_pixel_values(synthetic_image(size), patch=4) for size in sizes), strict=True)
    parts = []
    for index, size in enumerate(sizes):
        text = qwen2vl_prompt(0, before if index == 0 else between, 0, seed=index)[:, :-2]  # text only
        image = qwen2vl_prompt((size // 8) ** 2, 0, 0, seed=index)  # start, pads, end
        parts += [text, image]
    parts.append(qwen2vl_prompt(0, after, 0, seed=9)[:, :-2])
    return model.prepare_inputs(torch.cat(parts, dim=1), torch.cat(pixel_values), torch.cat(grid_thw))


def test_qwen2vl_one_graph_serves_any_image_count_and_size(qwen2vl):
    dynamic = dict(qwen2vl.dynamic_shapes, image_embeds={0: torch.export.Dim("image_tokens", min=1, max=1024)})
    recipe = _recipe(ratio=0.75, method="mmr")
    compiled = angel_compile.compile(qwen2vl.model, (), qwen2vl.inputs, recipe=recipe, dynamic_shapes=dynamic)
    details = compiled.report["token_pruning"].stats.details
    symbol = details["modality_tokens"]
    assert re.fullmatch(r"s\d+", symbol) and details["kept"] == f"(({symbol} + 3)//4)"  # ceil(N / 4)
    for sizes in ((32,), (48,), (32, 32), (48, 32, 64)):  # 16, 36, 32 and 116 image tokens
        inputs = _qwen2vl_images_inputs(qwen2vl.model, sizes)
        tokens = sum((size // 8) ** 2 for size in sizes)
        assert inputs["image_embeds"].shape[0] == tokens
        keep = -(-tokens // 4)
        with torch.no_grad():
            out = compiled(**inputs)
            expected, _, _ = _qwen2vl_reference(qwen2vl.model, inputs, keep, "mmr")
        assert out.shape == expected.shape == (1, inputs["input_ids"].shape[1] - tokens + keep, 256)
        assert torch.allclose(out, expected, atol=1e-5)
