"""The `int4_kmajor_layout` pass alone on a tiny graph, its device guard, the recipes and ONNX export."""

import copy

import pytest
import torch

import angel_compile
from angel_compile.capture import capture_model
from angel_compile.errors import UnsupportedError
from angel_compile.ops.int4 import unpack_int4
from angel_compile.ops.int4_kmajor import unpack_int4_kmajor
from angel_compile.passes.base import PassContext, get_attr_value
from angel_compile.passes.quantize.kmajor_layout import Int4KMajorLayout
from angel_compile.passes.quantize.quantize import Quantize

ROW_MAJOR = torch.ops.angel.int4_weight_only_linear.default
KMAJOR = torch.ops.angel.int4_kmajor_linear.default


def _count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


@pytest.fixture
def int4_graph(two_linears):
    """two_linears with its one quantizable layer (up, K = 32) in row-major INT4, and an input."""
    x = torch.randn(4, 32)
    gm = capture_model(two_linears, (x,))
    gm = Quantize(scheme={"type": "int4_weight_only", "group_size": 32})(gm, PassContext()).graph_module
    assert _count(gm, ROW_MAJOR) == 1
    return gm, x


def test_converts_the_layer_with_the_same_codes_and_output(int4_graph):
    gm, x = int4_graph
    expected = gm(x)
    packed = next(n for n in gm.graph.nodes if n.target == ROW_MAJOR).args[1]
    codes = unpack_int4(get_attr_value(gm, packed.target))
    result = Int4KMajorLayout(devices=("cpu",))(gm, PassContext())
    gm = result.graph_module
    assert result.modified and result.stats.rewritten == 1
    assert _count(gm, ROW_MAJOR) == 0 and _count(gm, KMAJOR) == 1
    node = next(n for n in gm.graph.nodes if n.target == KMAJOR)
    words = get_attr_value(gm, node.args[1].target)
    assert node.args[1].target == "up.weight_words" and words.dtype == torch.int32 and words.shape == (4, 48)
    assert torch.equal(unpack_int4_kmajor(words), codes)
    assert node.meta["val"].shape == (4, 48)
    assert not hasattr(gm.up, "weight_packed")  # the row-major buffers are gone
    assert torch.equal(gm(x), expected)  # the same function, bit for bit
    again = Int4KMajorLayout(devices=("cpu",))(gm, PassContext())
    assert not again.modified and again.stats.matched == 0


def test_weights_on_another_device_stay_and_say_why(int4_graph):
    gm, _ = int4_graph
    before = copy.deepcopy(gm.graph)
    result = Int4KMajorLayout()(gm, PassContext())  # default: CUDA only; these weights are on CPU
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
            {"name": "int4_kmajor_layout"},
        ],
    }
    compiled = angel_compile.compile(two_linears, (x,), recipe=recipe)
    counts = compiled.count_ops()
    assert counts.get(str(ROW_MAJOR)) == 1 and str(KMAJOR) not in counts
    for name in ("int4-rtn", "int4-gptq", "int4-awq"):
        passes = [spec.name for spec in angel_compile.load_recipe(name).passes]
        assert passes == ["quantize", "int4_kmajor_layout"], name


def test_onnx_export_of_the_kmajor_layout_names_the_node(int4_graph, tmp_path):
    from angel_compile.lowering.onnx import export_onnx_program

    gm, x = int4_graph
    gm = Int4KMajorLayout(devices=("cpu",))(gm, PassContext()).graph_module
    with pytest.raises(UnsupportedError, match=r"int4_kmajor_linear.*K-major.*MatMulNBits"):
        export_onnx_program(gm, (x,), None, tmp_path / "model.onnx")
