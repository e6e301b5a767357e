"""INT2, ternary and DAQ schemes in the `quantize` pass, their recipes, ONNX export and bad input."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import angel_compile
from angel_compile.capture import capture_model
from angel_compile.errors import RecipeError
from angel_compile.lowering.ort import ort_session
from angel_compile.passes.base import PassContext
from angel_compile.passes.quantize.quantize import Quantize
from angel_compile.quant.daq import check_weight_pair, delta_fidelity
from angel_compile.recipe import load_recipe
from tests.utils import relative_error

INT2 = torch.ops.angel.int2_weight_only_linear.default
TERNARY = torch.ops.angel.ternary_3of4_linear.default


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _recipe(scheme, **options):
    return {"name": "test", "passes": [{"name": "quantize", "options": {"scheme": scheme, **options}}]}


def test_int2_layer_matches_its_format_and_a_ragged_k_stays_float(two_linears):
    gm = capture_model(two_linears, (torch.randn(4, 32),))
    result = Quantize(scheme={"type": "int2_weight_only", "group_size": 32})(gm, PassContext())
    gm = result.graph_module
    # up: K = 32 quantized; down: K = 48 is no multiple of 32 and stays float with the reason.
    assert _count(gm, INT2) == 1 and result.stats.rewritten == 1
    assert any("K = 48 is not divisible by the group size 32" in why for why in result.stats.skipped.values())
    x = torch.randn(4, 32)
    hidden = torch.relu(
        torch.ops.angel.int2_weight_only_linear(
            x, gm.up.weight_packed, gm.up.weight_scales, gm.up.weight_zeros, 32, two_linears.up.bias
        )
    )
    expected = torch.nn.functional.linear(two_linears.down(hidden), two_linears.gate * 0.5)
    torch.testing.assert_close(gm(x), expected)


@pytest.mark.parametrize("group_size, rewritten", [(None, 2), (32, 1)])
def test_ternary_per_channel_takes_k_48_grouped_leaves_it(two_linears, group_size, rewritten):
    gm = capture_model(two_linears, (torch.randn(4, 32),))
    result = Quantize(scheme={"type": "ternary", "group_size": group_size})(gm, PassContext())
    assert _count(result.graph_module, TERNARY) == rewritten
    details = result.stats.details
    assert details["weight_bytes_after"] < details["weight_bytes_before"] / 8


def test_ternary_2bit_packing_runs_through_the_int2_op(two_linears):
    gm = capture_model(two_linears, (torch.randn(4, 32),))
    result = Quantize(scheme={"type": "ternary", "packing": "2bit", "group_size": 32})(gm, PassContext())
    assert _count(result.graph_module, INT2) == 1 and not hasattr(result.graph_module.up, "weight_zeros")


# The toy's hidden size is 64: group 128 leaves every layer but down_proj (K = 128) in float.
@pytest.mark.parametrize("recipe, rewritten", [("int2-gptq", 14), ("ternary-1.25", 2)])
def test_recipes_on_the_toy_llama(toy_llama, recipe, rewritten):
    ids = torch.randint(0, 256, (1, 16))
    batches = [
        {"input_ids": torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    compiled = angel_compile.compile(
        copy.deepcopy(toy_llama), example_kwargs={"input_ids": ids}, recipe=recipe, calibration_data=batches
    )
    op = INT2 if recipe == "int2-gptq" else TERNARY
    assert _count(compiled.graph_module, op) == rewritten  # of 2 layers × 7 linears; lm_head excluded
    logits = compiled(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert relative_error(logits, toy_llama(ids).logits) < 1.0


def test_ternary_model_exports_to_onnx_and_runs_in_onnxruntime(toy_llama, tmp_path):
    ids = torch.randint(0, 256, (1, 16))
    compiled = angel_compile.compile(
        copy.deepcopy(toy_llama),
        example_kwargs={"input_ids": ids},
        recipe=_recipe(
            {"type": "ternary", "group_size": 32},
            rules=[{"pattern": "*mlp*", "scheme": {"type": "int2_weight_only", "group_size": 32}}],
        ),
    )
    path = compiled.export_onnx(tmp_path / "ternary.onnx")
    session = ort_session(path)
    (logits,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[:1]
    np.testing.assert_allclose(logits, compiled(input_ids=ids).logits.detach().numpy(), rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def toy_pair(toy_llama, tmp_path_factory):
    """(base file, fine-tuned model): the toy's weights plus a small low-rank delta on every linear."""
    path = tmp_path_factory.mktemp("daq") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in toy_llama.state_dict().items() if "embed" not in k}, str(path))
    post = copy.deepcopy(toy_llama)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in post.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != 256:
                n, k = module.weight.shape
                delta = torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g)
                module.weight += delta * 0.02 * module.weight.abs().mean() / delta.abs().mean()
    return str(path), post


@pytest.mark.parametrize("fmt", ["int4", "fp8"])  # int8 shares the per-channel path of fp8
def test_daq_preserves_the_delta_better_than_plain_scales(toy_llama, toy_pair, fmt):
    base_path, post = toy_pair
    ids = torch.randint(0, 256, (1, 16))
    fidelity = {}
    for daq in (False, True):
        scheme = {"type": "daq", "format": fmt, "base_model": base_path, "daq": daq, "group_size": 32}
        compiled = angel_compile.compile(
            copy.deepcopy(post), example_kwargs={"input_ids": ids}, recipe=_recipe(scheme, exclude=["lm_head"])
        )
        layer = "model.layers.0.mlp.down_proj"
        w_post = post.get_submodule(layer).weight
        w_base = toy_llama.get_submodule(layer).weight
        quantized = _dequantized(compiled.graph_module, layer, fmt, w_post.shape)
        fidelity[daq] = delta_fidelity(w_base, w_post, quantized)
        assert torch.isfinite(compiled(input_ids=ids).logits).all()
    # DAQ maximises sign preservation + cosine per scale unit; the plain search, the weight's MSE.
    assert sum(fidelity[True]) > sum(fidelity[False]), fidelity


def _dequantized(gm, layer, fmt, shape):
    from angel_compile.ops.int4 import dequantize_int4

    module = gm.get_submodule(layer)
    if fmt == "int4":
        return dequantize_int4(module.weight_packed, module.weight_scales, None, 32)
    codes = module.weight_int8 if fmt == "int8" else module.weight_fp8
    return codes.float() * module.weight_scale[:, None]


def test_daq_errors_name_the_mismatch(toy_llama, tmp_path):
    ids = torch.randint(0, 256, (1, 16))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}, str(wrong))
    scheme = {"type": "daq", "format": "int8", "base_model": str(wrong)}
    with pytest.raises(Exception, match=r"q_proj' is \(64, 64\) but .* is \(3, 3\)"):
        angel_compile.compile(copy.deepcopy(toy_llama), example_kwargs={"input_ids": ids}, recipe=_recipe(scheme))
    with pytest.raises(
        ValueError, match=r"only in base: \['a'\]; only in fine-tuned: \['b'\]; different shapes: \['c: "
    ):
        check_weight_pair({"a": torch.zeros(1), "c": torch.zeros(2)}, {"b": torch.zeros(1), "c": torch.zeros(3)})


@pytest.mark.parametrize(
    "scheme, message",
    [
        ({"type": "int2_weight_only", "group_size": 256}, "group_size 256 not one of [32, 64, 128]"),
        ({"type": "ternary", "packing": "1bit"}, "unknown packing '1bit'"),
        ({"type": "ternary", "packing": "2bit", "group_size": None}, "packing '2bit' needs a group_size"),
        ({"type": "daq", "format": "int3"}, "unknown format 'int3'"),
        ({"type": "daq", "format": "fp8"}, "daq: true needs base_model"),
    ],
)
def test_bad_scheme_options_are_recipe_errors(scheme, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(scheme))
    assert message in str(info.value)
