"""compile() / export_onnx() / ort_session() on the transformers families, and bad input."""

import pytest
import torch

import angel_compile
from angel_compile.errors import CaptureError
from angel_compile.models import TOY_ARCHITECTURES, build_toy_model
from tests.utils import dynamic_batch_seq, relative_error


@pytest.mark.parametrize("arch", TOY_ARCHITECTURES)
@pytest.mark.parametrize("dynamic", [True, False])
def test_no_recipe_is_faithful(arch, dynamic):
    model = build_toy_model(arch)
    ids = torch.randint(0, 256, (2, 16))
    compiled = angel_compile.compile(
        model, (), {"input_ids": ids}, dynamic_shapes=dynamic_batch_seq() if dynamic else None
    )
    check = torch.randint(0, 256, (3, 27)) if dynamic else torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert relative_error(compiled(input_ids=check).logits, model(check).logits) < 1e-4
    assert compiled.passes_ran == []


@pytest.mark.parametrize("arch", TOY_ARCHITECTURES)
def test_int8_weight_only_end_to_end(arch):
    model = build_toy_model(arch)
    ids = torch.randint(0, 256, (2, 16))
    compiled = angel_compile.compile(
        model, (), {"input_ids": ids}, recipe="int8-weight-only", dynamic_shapes=dynamic_batch_seq()
    )
    ops = compiled.count_ops()
    assert "aten.linear.default" not in ops and "aten.addmm.default" not in ops
    assert ops["angel.int8_weight_only_linear.default"] == compiled.report["int8_weight_only"].stats.rewritten > 0
    check = torch.randint(0, 256, (3, 21))
    with torch.no_grad():
        err = relative_error(compiled(input_ids=check).logits, model(check).logits)
    assert 0 < err < 5e-2
    assert compiled.passes_ran == ["int8_weight_only"]


def test_compile_accepts_an_exported_program(toy_llama):
    ids = torch.randint(0, 256, (1, 10))
    program = torch.export.export(toy_llama, (), {"input_ids": ids}, strict=False)
    compiled = angel_compile.compile(program, (), {"input_ids": ids}, recipe="int8-weight-only")
    assert relative_error(compiled(input_ids=ids).logits, toy_llama(ids).logits) < 5e-2


def test_onnx_export_runs_in_onnxruntime_with_our_custom_op(toy_llama, tmp_path):
    import onnx

    ids = torch.randint(0, 256, (2, 16))
    path = angel_compile.export_onnx(
        toy_llama,
        (),
        tmp_path / "model.onnx",
        example_kwargs={"input_ids": ids},
        recipe="int8-weight-only",
        dynamic_shapes=dynamic_batch_seq(),
    )
    model_proto = onnx.load(str(path))
    angel_nodes = [n for n in model_proto.graph.node if n.domain == "ai.angel"]
    assert len(angel_nodes) == 15 and {n.op_type for n in angel_nodes} == {"Int8WeightOnlyLinear"}
    assert any(o.domain == "ai.angel" and o.version == 1 for o in model_proto.opset_import)
    session = angel_compile.ort_session(path)
    compiled = angel_compile.compile(
        toy_llama, (), {"input_ids": ids}, recipe="int8-weight-only", dynamic_shapes=dynamic_batch_seq()
    )
    check = torch.randint(0, 256, (3, 19))  # another shape than the export's: dynamic axes work
    (ort_logits,) = session.run(None, {"input_ids": check.numpy()})
    expected = compiled(input_ids=check).logits
    assert relative_error(torch.from_numpy(ort_logits), expected) < 1e-5


def test_a_model_that_fails_to_export_gets_a_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on data: torch.export cannot capture it
                return x
            return -x

    with pytest.raises(CaptureError, match="torch.export could not capture DataDependent"):
        angel_compile.compile(DataDependent(), (torch.randn(3),))


def test_compile_rejects_what_is_not_a_model():
    with pytest.raises(CaptureError, match="expected an nn.Module or a torch.export.ExportedProgram"):
        angel_compile.compile(lambda x: x, (torch.randn(2),))


def test_ort_session_names_an_angel_node_it_cannot_run(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from angel_compile.errors import UnsupportedError

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="ai.angel", name="mystery")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.angel", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match="node 'mystery' \\(ai.angel::NoSuchOp with 1 inputs\\)"):
        angel_compile.ort_session(tmp_path / "m.onnx")
