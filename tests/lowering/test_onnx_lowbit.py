"""Ultra-low-bit ops through ONNX: int2_weight_only_linear as com.microsoft.MatMulNBits (bits 2),
ternary_3of4_linear in our domain; both run by onnxruntime and compared with the PyTorch reference."""

import numpy as np
import onnx
import pytest
import torch

from angel_compile.lowering.onnx import ANGEL_ONNX_DOMAIN, MICROSOFT_DOMAIN, export_onnx_program
from angel_compile.lowering.ort import ort_session
from angel_compile.ops.int2 import quantize_int2_rtn
from angel_compile.ops.ternary import quantize_ternary_3of4


class LowBitLinear(torch.nn.Module):
    def __init__(self, n: int, k: int, group_size: int | None, kind: str, symmetric: bool, bias: bool) -> None:
        super().__init__()
        w = torch.randn(n, k)
        self.kind = kind
        if kind == "int2":
            q = quantize_int2_rtn(w, group_size, symmetric)
            self.register_buffer("zeros", q.zeros)
        else:
            q = quantize_ternary_3of4(w, group_size)
        self.group_size = q.group_size
        self.register_buffer("packed", q.packed)
        self.register_buffer("scales", q.scales)
        self.register_buffer("bias", torch.randn(n) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int2":
            return torch.ops.angel.int2_weight_only_linear(
                x, self.packed, self.scales, self.zeros, self.group_size, self.bias
            )
        return torch.ops.angel.ternary_3of4_linear(x, self.packed, self.scales, self.group_size, self.bias)


def _run(tmp_path, module: torch.nn.Module, x: torch.Tensor) -> tuple[onnx.ModelProto, np.ndarray]:
    path = export_onnx_program(module, (x,), None, tmp_path / "lowbit.onnx")
    session = ort_session(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return onnx.load(str(path)), out


# K = 320 with group 64: 5 zero points per row, packed four a byte with a padded last byte.
@pytest.mark.parametrize("k, group_size, symmetric, bias", [(320, 64, False, True), (256, 32, True, False)])
def test_int2_becomes_matmul_nbits_and_matches(tmp_path, k, group_size, symmetric, bias):
    torch.manual_seed(0)
    module, x = LowBitLinear(24, k, group_size, "int2", symmetric, bias), torch.randn(2, 3, k)
    model, out = _run(tmp_path, module, x)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(MICROSOFT_DOMAIN, "MatMulNBits")]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attributes["bits"] == 2 and attributes["block_size"] == group_size
    np.testing.assert_allclose(out, module(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k, group_size, bias", [(256, 128, True), (96, None, False)])
def test_ternary_runs_in_our_domain(tmp_path, k, group_size, bias):
    torch.manual_seed(0)
    module, x = LowBitLinear(24, k, group_size, "ternary", False, bias), torch.randn(2, 3, k)
    model, out = _run(tmp_path, module, x)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert (ANGEL_ONNX_DOMAIN, "Ternary3of4Linear") in ops
    np.testing.assert_allclose(out, module(x).numpy(), rtol=1e-5, atol=1e-5)
