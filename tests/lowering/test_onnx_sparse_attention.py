"""angel::sparse_attention through ONNX (domain ai.angel) and onnxruntime."""

import numpy as np
import onnx
import pytest
import torch

from angel_compile.lowering.onnx import ANGEL_ONNX_DOMAIN, export_onnx_program
from angel_compile.lowering.ort import ort_session


class SparseAttentionModule(torch.nn.Module):
    def __init__(self, method: str, min_seq_len: int = 0) -> None:
        super().__init__()
        self.method, self.min_seq_len = method, min_seq_len

    def forward(self, q, k, v):
        out = torch.ops.angel.sparse_attention(q, k, v, 0.125, self.method, 64, self.min_seq_len, 1, 1, 2, 0.5, 0.05)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("method, min_seq_len", [("static", 0), ("stem", 0), ("s2o", 0), ("stem", 10**6)])
def test_onnx_round_trip_matches_pytorch(tmp_path, method, min_seq_len):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 320, 64), torch.randn(1, 2, 320, 64), torch.randn(1, 2, 320, 64)
    module = SparseAttentionModule(method, min_seq_len)
    path = export_onnx_program(module, (q, k, v), None, tmp_path / "sparse_attention.onnx")
    model = onnx.load(str(path))
    (node,) = [n for n in model.graph.node if n.domain == ANGEL_ONNX_DOMAIN]
    assert node.op_type == "SparseAttention"
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["method"] == method.encode()
    session = ort_session(path)
    (out,) = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), (q, k, v), strict=True)})
    np.testing.assert_allclose(out, module(q, k, v).numpy(), rtol=1e-5, atol=1e-6)
