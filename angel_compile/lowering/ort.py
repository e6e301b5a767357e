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
from angel_compile.lowering.ort_lowbit import IMPLEMENTATIONS as LOWBIT_IMPLEMENTATIONS
from angel_compile.lowering.ort_prune_tokens import IMPLEMENTATIONS as PRUNE_TOKENS_IMPLEMENTATIONS

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


_SPARSE_ATTENTION_ATTRS = {
    "scale": PyCustomOpDef.dt_float,
    "method": PyCustomOpDef.dt_string,
    **dict.fromkeys(("block_size", "min_seq_len", "sink_blocks", "local_blocks", "top_k"), PyCustomOpDef.dt_int64),
    "budget_decay": PyCustomOpDef.dt_float,
    "threshold": PyCustomOpDef.dt_float,
}


@onnx_op(op_type="AngelSparseAttention", inputs=[_F32] * 3, outputs=[_F32], attrs=_SPARSE_ATTENTION_ATTRS)
def _sparse_attention(q, k, v, scale, method, **parameters):
    # The selection methods are defined once (sparse/selection.py): the op's PyTorch reference
    # runs on the numpy buffers (zero-copy) rather than a second implementation that could drift.
    import torch

    from angel_compile.ops.sparse_attention import sparse_attention_reference
    from angel_compile.sparse.selection import SparseAttentionConfig

    config = SparseAttentionConfig(method=method, **parameters)
    tensors = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v))
    with torch.no_grad():
        return sparse_attention_reference(*tensors, scale, config).numpy()


@onnx_op(
    op_type="AngelW4A8Linear",
    inputs=[_F32, PyCustomOpDef.dt_uint8, _F32, PyCustomOpDef.dt_uint8, _F32, _F32],
    outputs=[_F32],
    attrs={"group_size": PyCustomOpDef.dt_int64},
)
def _w4a8_linear(x, packed, scales, zeros, input_scale, bias, group_size):
    # The FP8 rounding is torch's (numpy has no float8): the op's reference runs on the buffers.
    import torch

    from angel_compile.ops.int4 import w4a8_linear_reference

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    def optional(a: np.ndarray) -> torch.Tensor | None:
        return tensor(a) if a.size else None  # an empty tensor stands for an absent input

    weights = (tensor(packed), tensor(scales), optional(zeros), int(group_size))
    with torch.no_grad():
        return w4a8_linear_reference(tensor(x), *weights, optional(input_scale), optional(bias)).numpy()


# op type in our domain -> {number of inputs: implementation op type in EXTENSIONS_DOMAIN}
IMPLEMENTATIONS = {
    "Int8WeightOnlyLinear": {3: "AngelInt8WeightOnlyLinear", 4: "AngelInt8WeightOnlyLinearBias"},
    "SparseAttention": {3: "AngelSparseAttention"},
    "W4A8Linear": {6: "AngelW4A8Linear"},
    **LOWBIT_IMPLEMENTATIONS,
    **PRUNE_TOKENS_IMPLEMENTATIONS,
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
