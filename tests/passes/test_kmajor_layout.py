"""The `kmajor_layout` pass alone on a tiny graph (INT4 and INT2), its device guard, the recipes and ONNX export."""

import copy

import pytest
import torch

import angel_compile
from angel_compile.capture import capture_model
from angel_compile.errors import UnsupportedError
from angel_compile.ops.int2 import unpack_int2
from angel_compile.ops.int4 import unpack_int4
from angel_compile.ops.kmajor import unpack_kmajor
from angel_compile.passes.base import PassContext, get_attr_value
from angel_compile.passes.quantize.kmajor_layout import KMajorLayout
from angel_compile.passes.quantize.quantize import Quantize

ROW_MAJOR = torch.ops.angel.int4_weight_only_linear.default
KMAJOR = torch.ops.angel.int4_kmajor_linear.default
# bits -> (scheme type, row-major op, K-major op, unpack of the row-major bytes)
SCHEMES = {
    4: ("int4_weight_only", ROW_MAJOR, KMAJOR, unpack_int4),
    2: (
        "int2_weight_only",
        torch.ops.angel.int2_weight_only_linear.default,
        torch.ops.angel.int2_kmajor_linear.default,
        unpack_int2,
    ),
}


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _quantized(two_linears, bits: int):
    """two_linears with its one quantizable layer (up, K = 32) in row-major INT4 / INT2, and an input."""
    scheme, row_major, _, _ = SCHEMES[bits]
    x = torch.randn(4, 32)
    gm = capture_model(two_linears, (x,))
    gm = Quantize(scheme={"type": scheme, "group_size": 32})(gm, PassContext()).graph_module
    assert _count(gm, row_major) == 1
    return gm, x


@pytest.fixture
def int4_graph(two_linears):
    return _quantized(two_linears, 4)


@pytest.mark.parametrize("bits", [4, 2])
def test_converts_the_layer_with_the_same_codes_and_output(two_linears, bits):
    _, row_major, kmajor, unpack = SCHEMES[bits]
    gm, x = _quantized(two_linears, bits)
    expected = gm(x)
    packed = next(n for n in gm.graph.nodes if n.target == row_major).args[1]
    codes = unpack(get_attr_value(gm, packed.target))
    result = KMajorLayout(devices=("cpu",))(gm, PassContext())
    gm = result.graph_module
    assert result.modified and result.stats.rewritten == 1
    assert _count(gm, row_major) == 0 and _count(gm, kmajor) == 1
    node = next(n for n in gm.graph.nodes if n.target == kmajor)
    words = get_attr_value(gm, node.args[1].target)
    assert node.args[1].target == "up.weight_words" and words.dtype == torch.int32 and words.shape == (bits, 48)
    assert torch.equal(unpack_kmajor(words, bits), codes)
    assert node.meta["val"].shape == (4, 48)
    assert not hasattr(gm.up, "weight_packed")  # the row-major buffers are gone
    assert torch.equal(gm(x), expected)  # the same function, bit for bit
    again = KMajorLayout(devices=("cpu",))(gm, PassContext())
    assert not again.modified and again.stats.matched == 0


def test_weights_on_another_device_stay_and_say_why(int4_graph):
    gm, _ = int4_graph
    before = copy.deepcopy(gm.graph)
    result = KMajorLayout()(gm, PassContext())  # default: CUDA only; these weights are on CPU
    assert not result.modified and result.stats.matched == 1
    (reason,) = result.stats.skipped.values()
    assert "weights on cpu" in reason and "cuda" in reason
    assert str(result.graph_module.graph) == str(before)


def test_int4_recipes_keep_the_onnx_layout_on_cpu(two_linears):
    x = torch.randn(4, 32)
    recipe = {
        "name": "int4-kmajor-test",
        "passes": [
            {"name": "quantize", "options": {"scheme": {"type": "int4_weight_only", "group_size": 32}}},
            {"name": "kmajor_layout"},
        ],
    }
    compiled = angel_compile.compile(two_linears, (x,), recipe=recipe)
    counts = compiled.count_ops()
    assert counts.get(str(ROW_MAJOR)) == 1 and str(KMAJOR) not in counts
    for name in ("int4-rtn", "int4-gptq", "int4-awq", "int2-gptq"):
        passes = [spec.name for spec in angel_compile.load_recipe(name).passes]
        assert passes == ["quantize", "kmajor_layout"], name


def test_onnx_export_of_the_kmajor_layout_names_the_node(int4_graph, tmp_path):
    from angel_compile.lowering.onnx import export_onnx_program

    gm, x = int4_graph
    gm = KMajorLayout(devices=("cpu",))(gm, PassContext()).graph_module
    with pytest.raises(UnsupportedError, match=r"int4_kmajor_linear.*K-major.*kmajor_layout.*MatMulNBits"):
        export_onnx_program(gm, (x,), None, tmp_path / "model.onnx")


def _ternary_graph(in_features: int):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, 48), torch.nn.ReLU()).eval()
    x = torch.randn(4, in_features)
    gm = capture_model(model, (x,))
    scheme = {"type": "ternary", "packing": "3of4", "group_size": 32}
    return Quantize(scheme=scheme)(gm, PassContext()).graph_module, x


def test_converts_a_ternary_layer_with_the_same_codes_and_output():
    from angel_compile.ops.ternary import unpack_codes
    from angel_compile.ops.ternary_kmajor import ternary_kmajor_codes

    gm, x = _ternary_graph(128)
    expected = gm(x)
    row_major, kmajor = torch.ops.angel.ternary_3of4_linear.default, torch.ops.angel.ternary_kmajor_linear.default
    packed = next(n for n in gm.graph.nodes if n.target == row_major).args[1]
    codes = unpack_codes(get_attr_value(gm, packed.target))
    result = KMajorLayout(devices=("cpu",))(gm, PassContext())
    gm = result.graph_module
    assert result.stats.rewritten == 1 and _count(gm, row_major) == 0 and _count(gm, kmajor) == 1
    node = next(n for n in gm.graph.nodes if n.target == kmajor)
    lo, hi = (get_attr_value(gm, arg.target) for arg in node.args[1:3])
    assert lo.shape == (4, 48) and hi.shape == (1, 48)
    assert torch.equal(ternary_kmajor_codes(lo, hi), codes)
    assert torch.equal(gm(x), expected)  # the same function, bit for bit


def test_a_ternary_layer_with_k_not_a_multiple_of_128_stays_and_says_why():
    gm, _ = _ternary_graph(96)
    result = KMajorLayout(devices=("cpu",))(gm, PassContext())
    assert not result.modified and result.stats.matched == 1
    (reason,) = result.stats.skipped.values()
    assert "not divisible by 128" in reason
    assert [spec.name for spec in angel_compile.load_recipe("ternary-1.25").passes] == ["quantize", "kmajor_layout"]
