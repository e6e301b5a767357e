"""INT4 ops through ONNX: int4_weight_only_linear as com.microsoft.MatMulNBits, w4a8_linear
in our domain, both run by onnxruntime and compared with the PyTorch reference."""

import numpy as np
import onnx
import pytest
import torch

from angel_compile.lowering.onnx import ANGEL_ONNX_DOMAIN, MICROSOFT_DOMAIN, export_onnx_program
from angel_compile.lowering.ort import ort_session
from angel_compile.ops.int4 import quantize_int4_rtn


class Int4Linear(torch.nn.Module):
    def __init__(self, n: int, k: int, group_size: int, symmetric: bool, bias: bool, w4a8: bool = False) -> None:
        super().__init__()
        q = quantize_int4_rtn(torch.randn(n, k), group_size, symmetric)
        self.group_size, self.w4a8 = group_size, w4a8
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)
        self.register_buffer("zeros", q.zeros)
        self.register_buffer("bias", torch.randn(n) if bias else None)
        self.register_buffer("input_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a8:
            return torch.ops.angel.w4a8_linear(
                x, self.packed, self.scales, self.zeros, self.group_size, self.input_scale, self.bias
            )
        return torch.ops.angel.int4_weight_only_linear(
            x, self.packed, self.scales, self.zeros, self.group_size, self.bias
        )


def _run(tmp_path, module: torch.nn.Module, x: torch.Tensor) -> tuple[onnx.ModelProto, np.ndarray]:
    path = export_onnx_program(module, (x,), None, tmp_path / "int4.onnx")
    session = ort_session(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return onnx.load(str(path)), out


# 3 groups of 128 along K = 384: an odd number of zero points to pack two per byte.
@pytest.mark.parametrize("group_size, symmetric, bias", [(32, False, True), (64, True, False), (128, False, False)])
def test_int4_weight_only_becomes_matmul_nbits(tmp_path, group_size, symmetric, bias):
    torch.manual_seed(0)
    module, x = Int4Linear(24, 384, group_size, symmetric, bias), torch.randn(2, 5, 384)
    model, out = _run(tmp_path, module, x)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(MICROSOFT_DOMAIN, "MatMulNBits")]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attributes["bits"] == 4 and attributes["block_size"] == group_size
    np.testing.assert_allclose(out, module(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric, bias, static", [(False, True, False), (True, False, True)])
def test_w4a8_runs_in_our_domain(tmp_path, symmetric, bias, static):
    torch.manual_seed(0)
    module, x = Int4Linear(24, 256, 64, symmetric, bias, w4a8=True), torch.randn(3, 256)
    if static:
        module.input_scale = x.abs().amax() / 448
    model, out = _run(tmp_path, module, x)
    (node,) = [n for n in model.graph.node if n.domain == ANGEL_ONNX_DOMAIN]
    assert node.op_type == "W4A8Linear"
    np.testing.assert_allclose(out, module(x).numpy(), rtol=1e-5, atol=1e-5)
