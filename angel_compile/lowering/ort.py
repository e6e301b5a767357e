"""onnxruntime implementations of our ONNX domain, and a session factory that registers them.

onnxruntime-extensions runs Python custom ops only in its own domain `ai.onnx.contrib`, so
`ort_session` loads the model, maps every `ai.angel` node to the implementation registered
here under `ai.onnx.contrib` (the op type tells which: `Angel<OpType>[Bias]` by arity), and
creates the session from that in-memory copy. The file on disk keeps our domain.
Implementations are float32 (onnxruntime's CPU provider); other dtypes raise a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

from angel_compile.errors import UnsupportedError
from angel_compile.lowering.onnx import ANGEL_ONNX_DOMAIN

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
_F32, _I8 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8


def _int8_linear(x: np.ndarray, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # Same order of operations as the PyTorch reference: matmul with the integer values, then scale.
    return np.matmul(x, weight.T.astype(np.float32)) * scale


@onnx_op(op_type="AngelInt8WeightOnlyLinear", inputs=[_F32, _I8, _F32], outputs=[_F32])
def _int8_weight_only_linear(x, weight, scale):
    return _int8_linear(x, weight, scale)


@onnx_op(op_type="AngelInt8WeightOnlyLinearBias", inputs=[_F32, _I8, _F32, _F32], outputs=[_F32])
def _int8_weight_only_linear_bias(x, weight, scale, bias):
    return _int8_linear(x, weight, scale) + bias


# op type in our domain -> {number of inputs: implementation op type in EXTENSIONS_DOMAIN}
IMPLEMENTATIONS = {
    "Int8WeightOnlyLinear": {3: "AngelInt8WeightOnlyLinear", 4: "AngelInt8WeightOnlyLinearBias"},
}


def _map_to_implementations(model: onnx.ModelProto) -> None:
    graphs = [model.graph] + [f for f in model.functions]
    for graph in graphs:
        for node in graph.node:
            if node.domain != ANGEL_ONNX_DOMAIN:
                continue
            arity = len([i for i in node.input if i])
            implemented = IMPLEMENTATIONS.get(node.op_type, {})
            if arity not in implemented:
                raise UnsupportedError(
                    f"ONNX node '{node.name}' ({ANGEL_ONNX_DOMAIN}::{node.op_type} with {arity} inputs) has no "
                    f"onnxruntime implementation; implemented: {sorted(IMPLEMENTATIONS)}"
                )
            node.domain, node.op_type = EXTENSIONS_DOMAIN, implemented[arity]
    for opset in model.opset_import:
        if opset.domain == ANGEL_ONNX_DOMAIN:
            opset.domain = EXTENSIONS_DOMAIN


def ort_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An InferenceSession for an exported model, with every angel op implementation registered."""
    model = onnx.load(str(path))
    _map_to_implementations(model)
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
