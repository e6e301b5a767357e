"""onnxruntime implementations of the ultra-low-bit nodes of our domain (see lowering/onnx_lowbit.py).

Registered with onnxruntime-extensions under `ai.onnx.contrib`; `lowering/ort.py` maps the
`ai.angel` nodes to them (`IMPLEMENTATIONS`). float32 only, like the other implementations.
"""

from __future__ import annotations

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, onnx_op

_F32, _U8 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8
_ATTRS = {"group_size": PyCustomOpDef.dt_int64}


def _ternary_3of4(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, group_size: int, bias) -> np.ndarray:
    # The unpacking is defined once (ops/ternary.py): its reference runs on the numpy buffers.
    import torch

    from angel_compile.ops.ternary import ternary_3of4_linear_reference

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    with torch.no_grad():
        b = None if bias is None else tensor(bias)
        return ternary_3of4_linear_reference(tensor(x), tensor(packed), tensor(scales), int(group_size), b).numpy()


@onnx_op(op_type="AngelTernary3of4Linear", inputs=[_F32, _U8, _F32], outputs=[_F32], attrs=_ATTRS)
def _ternary_3of4_linear(x, packed, scales, group_size):
    return _ternary_3of4(x, packed, scales, group_size, None)


@onnx_op(op_type="AngelTernary3of4LinearBias", inputs=[_F32, _U8, _F32, _F32], outputs=[_F32], attrs=_ATTRS)
def _ternary_3of4_linear_bias(x, packed, scales, bias, group_size):
    return _ternary_3of4(x, packed, scales, group_size, bias)


# op type in our domain -> {number of inputs: implementation op type}
IMPLEMENTATIONS = {"Ternary3of4Linear": {3: "AngelTernary3of4Linear", 4: "AngelTernary3of4LinearBias"}}
