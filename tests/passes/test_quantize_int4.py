"""INT4 weight-only and W4A8 schemes in the `quantize` pass, their recipes and bad input."""

import copy

import numpy as np
import pytest
import torch

import angel_compile
from angel_compile import meta
from angel_compile.capture import capture_model
from angel_compile.errors import CalibrationError, RecipeError
from angel_compile.lowering.ort import ort_session
from angel_compile.ops.int4 import dequantize_int4
from angel_compile.passes.base import PassContext, build_pass
from angel_compile.passes.quantize.quantize import Quantize
from angel_compile.recipe import load_recipe
from tests.utils import outlier_layer, relative_error

INT4 = torch.ops.angel.int4_weight_only_linear.default
W4A8 = torch.ops.angel.w4a8_linear.default
INT8 = torch.ops.angel.int8_weight_only_linear.default
LINEAR = torch.ops.aten.linear.default


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _toy_inputs(count: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (1, 32), generator=g)} for _ in range(count)]


SEQ = torch.export.Dim("seq", min=2, max=64)


@pytest.fixture(scope="module")
def toy_graph(toy_llama):
    """The toy LLaMA captured once (dynamic sequence length); tests quantize deep copies."""
    return capture_model(toy_llama, (), {"input_ids": torch.randint(0, 256, (1, 16))}, {"input_ids": {1: SEQ}})


def _quantize(toy_graph, recipe, batches=None):
    """(graph, stats) after the recipe's quantize pass (its first) on a copy of the captured toy."""
    pass_ = load_recipe(recipe).build_passes()[0]
    result = pass_(copy.deepcopy(toy_graph), PassContext(calibration_data=batches))
    return result.graph_module, result.stats


def _quantize_recipe(scheme, **options):
    return {"name": "test", "passes": [{"name": "quantize", "options": {"scheme": scheme, **options}}]}


def test_rtn_layer_matches_the_format_and_a_ragged_k_stays_float(two_linears):
    gm = capture_model(two_linears, (torch.randn(4, 32),))
    result = Quantize(scheme={"type": "int4_weight_only", "group_size": 32})(gm, PassContext())
    gm = result.graph_module
    # up: K = 32 quantized; down: K = 48 stays float and says why; gate's weight is computed.
    assert _count(gm, INT4) == 1 and result.stats.rewritten == 1
    assert "layer 'down': K = 48 is not divisible by the group size 32" in result.stats.skipped.values()
    packed, scales, zeros = (gm.get_buffer(f"up.weight_{s}") for s in ("packed", "scales", "zeros"))
    assert packed.shape == (48, 16) and scales.shape == zeros.shape == (48, 1)
    weight = dequantize_int4(packed, scales, zeros, 32)
    assert (weight - two_linears.up.weight).abs().max() <= scales.max() / 2 + 1e-6
    x = torch.randn(4, 32)
    hidden = two_linears.down(torch.relu(x @ weight.T + two_linears.up.bias))
    torch.testing.assert_close(gm(x), hidden @ (two_linears.gate * 0.5).T, rtol=1e-4, atol=1e-4)
    assert result.stats.details["weight_bytes_after"] == 48 * 16 + 48 * 4 + 48


@pytest.mark.parametrize(
    "scheme",
    [
        {"type": "int4_weight_only", "group_size": 32, "method": "rtn"},
        {"type": "int4_weight_only", "group_size": 32, "method": "gptq", "act_order": True, "block_size": 16},
        {"type": "int4_weight_only", "group_size": 64, "method": "awq", "symmetric": True, "awq_grid": 5},
        {"type": "w4a8", "group_size": 32, "method": "rtn"},
        {"type": "w4a8", "group_size": 64, "method": "gptq", "activation": "static"},
    ],
    ids=["rtn", "gptq", "awq", "w4a8", "w4a8-static-gptq"],
)
def test_schemes_on_the_toy_llama(toy_llama, toy_graph, scheme):
    batches = _toy_inputs()
    recipe = _quantize_recipe(scheme, exclude=["lm_head"])
    gm, stats = _quantize(toy_graph, recipe, batches)
    op = W4A8 if scheme["type"] == "w4a8" else INT4
    assert _count(gm, op) == 2 * 7 and _count(gm, LINEAR) == 1  # every layer but lm_head
    ids = _toy_inputs(1, seed=7)[0]["input_ids"]
    assert relative_error(gm(input_ids=ids).logits, toy_llama(ids).logits) < 0.15
    if scheme["method"] == "awq":
        placements = list(stats.details["smoothing"].values())
        # q/k/v and gate/up share a norm per layer; o_proj and down_proj read no norm.
        assert sum(p.startswith("folded into") for p in placements) == 2 * 2
        assert placements.count("multiply inserted") == 2 * 2
    if scheme.get("activation") == "static":
        assert all(gm.get_buffer(f"{name}.input_scale").numel() == 1 for name in ("model.layers.0.mlp.down_proj",))
    again = load_recipe(recipe).build_passes()[0](gm, PassContext(calibration_data=batches))
    assert not again.modified


def test_builtin_recipes_leave_layers_with_a_ragged_k_in_float(toy_graph):
    # The toy's hidden size 64 is not a multiple of 128: only down_proj (K = 128) is quantized.
    gm, stats = _quantize(toy_graph, "int4-gptq", _toy_inputs(2))
    assert _count(gm, INT4) == 2
    assert stats.details["schemes"] == {"int4_weight_only": 2}
    skipped = list(stats.skipped.values())
    assert "layer 'model.layers.0.self_attn.q_proj': K = 64 is not divisible by the group size 128" in skipped
    assert "layer 'lm_head': excluded by pattern 'lm_head'" in skipped
    for name in ("int4-rtn", "int4-awq", "w4a8-fp8"):
        ops = _count(_quantize(toy_graph, name, _toy_inputs(2))[0], W4A8 if name == "w4a8-fp8" else INT4)
        assert ops == 2, name


def test_a_recipe_mixes_schemes_per_layer_and_excludes_blocks(toy_graph):
    recipe = _quantize_recipe(
        {"type": "int4_weight_only", "group_size": 32, "method": "gptq"},
        rules=[{"pattern": "self_attn.*", "scheme": {"type": "int8_weight_only"}}],
        exclude=["lm_head", "layers.1.*"],  # the last block and the head stay in float
    )
    gm, stats = _quantize(toy_graph, recipe, _toy_inputs(2))
    assert stats.details["schemes"] == {"int4_weight_only": 3, "int8_weight_only": 4}
    layer_of = {n.meta[meta.PROVENANCE]["layer"]: n.target for n in gm.graph.nodes if n.target in (INT4, INT8)}
    assert layer_of["model.layers.0.mlp.up_proj"] == INT4 and layer_of["model.layers.0.self_attn.o_proj"] == INT8
    assert not any(layer.startswith("model.layers.1.") for layer in layer_of)
    assert _count(gm, LINEAR) == 7 + 1


class NormThenLinear(torch.nn.Module):
    """x * norm_weight -> linear: the norm's weight can take AWQ's 1/s."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.ones(weight.shape[1]))
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x * self.norm_weight)


def test_gptq_and_awq_beat_rtn_through_the_pass_on_a_layer_with_outliers():
    weight, x_cal, x_test = outlier_layer()
    model = NormThenLinear(weight).eval()
    rows = torch.export.Dim("rows", min=2, max=1024)
    expected = model(x_test)
    errors = {}
    for method in ("rtn", "gptq", "awq"):
        gm = capture_model(model, (x_cal[:8],), dynamic_shapes=({0: rows},))
        pass_ = Quantize(scheme={"type": "int4_weight_only", "group_size": 128, "method": method, "awq_grid": 10})
        result = pass_(gm, PassContext(calibration_data=list(x_cal.split(256))))
        assert _count(result.graph_module, INT4) == 1
        errors[method] = relative_error(result.graph_module(x_test), expected)
    assert errors["gptq"] < 0.6 * errors["rtn"], errors
    assert errors["awq"] < 0.9 * errors["rtn"], errors
    assert "folded into norm_weight" in result.stats.details["smoothing"].values()


def test_int4_recipe_exports_to_onnx_and_runs_in_onnxruntime(toy_llama, tmp_path):
    ids = torch.randint(0, 256, (1, 16))
    compiled = angel_compile.compile(
        copy.deepcopy(toy_llama),
        example_kwargs={"input_ids": ids},
        recipe=_quantize_recipe({"type": "int4_weight_only", "group_size": 32}),
    )
    path = compiled.export_onnx(tmp_path / "int4.onnx")
    session = ort_session(path)
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[:1]
    expected = compiled(input_ids=ids).logits
    np.testing.assert_allclose(logits, expected.detach().numpy(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize(
    "scheme, message",
    [
        ({"type": "int4_weight_only", "group_size": 96}, "group_size 96 not supported; one of [16, 32, 64, 128, 256]"),
        ({"type": "int4_weight_only", "method": "hqq"}, "unknown method 'hqq'; one of ['rtn', 'gptq', 'awq']"),
        ({"type": "int4_weight_only", "damp_percent": 0}, "damp_percent must be in (0, 1], got 0"),
        ({"type": "int4_weight_only", "awq_grid": 0}, "awq_grid must be >= 1, got 0"),
        ({"type": "int4_weight_only", "method": "awq", "clip_search": True}, "clip_search applies to methods rtn"),
        (
            {"type": "w4a8", "activation": "per_channel"},
            "unknown activation 'per_channel'; one of ['dynamic', 'static']",
        ),
        ({"type": "w4a8", "bits": 3}, "scheme 'w4a8' has no field(s) ['bits']"),
        (
            {"type": "w4a8", "activation": "static", "method": "awq"},
            "activation 'static' cannot be combined with method 'awq'",
        ),
    ],
)
def test_bad_scheme_options_are_recipe_errors(scheme, message):
    with pytest.raises(RecipeError) as info:
        build_pass("quantize", {"scheme": scheme})
    assert message in str(info.value)


def test_calibration_problems_are_clear_errors(two_linears, tmp_path):
    rows = torch.export.Dim("rows", min=2, max=64)

    def captured():
        return capture_model(two_linears, (torch.randn(4, 32),), dynamic_shapes=({0: rows},))

    gptq = {"type": "int4_weight_only", "group_size": 16, "method": "gptq"}
    with pytest.raises(CalibrationError, match="need calibration data: pass calibration_data="):
        Quantize(scheme=gptq)(captured(), PassContext(calibration_data=[]))
    bad = torch.randn(6, 32)
    bad[2, 5] = float("inf")
    with pytest.raises(CalibrationError, match=r"non-finite activation \(NaN or inf\) in batch 1"):
        Quantize(scheme=gptq)(captured(), PassContext(calibration_data=[torch.randn(6, 32), bad]))
    # A file saved for RTN-free AWQ holds no Hessians: GPTQ must not start from it.
    path = tmp_path / "awq.safetensors"
    awq = {"type": "int4_weight_only", "group_size": 16, "method": "awq"}
    Quantize(scheme=awq, calibration={"save": str(path)})(captured(), PassContext(calibration_data=[bad.nan_to_num()]))
    with pytest.raises(CalibrationError, match=r"lacks statistics these schemes need \(down: \['hessian'\]"):
        Quantize(scheme=gptq, calibration={"load": str(path)})(captured(), PassContext())
    other = capture_model(torch.nn.Linear(64, 8), (torch.randn(2, 64),))
    with pytest.raises(CalibrationError, match="does not fit this model"):
        Quantize(scheme=gptq, calibration={"load": str(path)})(other, PassContext())
