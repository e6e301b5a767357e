"""op -> ONNX for the ultra-low-bit weight ops (INT2, 3:4 ternary).

`angel::int2_weight_only_linear` becomes onnxruntime's `com.microsoft.MatMulNBits` with bits 2:
the INT2 layout of ops/int2.py is its B ([N, K/g, g/4], four codes a byte, lowest bits first);
zero points go four a byte (lowest bits = first group), their default 2 is our symmetric one.
The reshapes and the zero-point packing are ONNX ops on initializers, which the exporter folds.

`angel::ternary_3of4_linear` becomes a node of our domain (implemented in `lowering/ort.py`):
    Ternary3of4Linear(x: float [..., K], packed: uint8 [N, 5·⌈K/32⌉], scales: float [N, K/g],
                      bias?: float [N]) -> float [..., N]; attribute group_size (g = K: per channel)
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript import values

import angel_compile.ops  # noqa: F401  (registers the ops named below)

ANGEL_ONNX_DOMAIN = "ai.angel"  # the domain of lowering/onnx.py, which imports this module
_angel = values.Opset(ANGEL_ONNX_DOMAIN, 1)
_microsoft = values.Opset("com.microsoft", 1)


def _int2_weight_only_linear(x, packed, scales, zeros, group_size, bias=None):
    n, quarter_k = packed.shape  # initializers: static shapes
    k, blocks = 4 * quarter_k, 4 * quarter_k // group_size
    b = op.Reshape(packed, op.Constant(value_ints=[n, blocks, group_size // 4]))  # [N, K/g, g/4]
    s = op.Reshape(op.CastLike(scales, x), op.Constant(value_ints=[-1]))  # [N·K/g], in x's type
    zero_points = None
    if zeros is not None:
        # uint8 [N, K/g] -> four a byte [N·⌈K/g / 4⌉], lowest bits = first block, as MatMulNBits reads them.
        padded = -(-blocks // 4) * 4
        z = zeros if padded == blocks else op.Pad(zeros, op.Constant(value_ints=[0, 0, 0, padded - blocks]))
        z = op.Reshape(z, op.Constant(value_ints=[n, padded // 4, 4]))
        axis = op.Constant(value_ints=[2])
        packed_zeros = None
        for i in range(4):
            field = op.Slice(z, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]), axis)
            shift = op.Constant(value=onnx.helper.make_tensor(f"shift{i}", onnx.TensorProto.UINT8, [], [2 * i]))
            field = op.BitShift(field, shift, direction="LEFT")
            packed_zeros = field if packed_zeros is None else op.BitwiseOr(packed_zeros, field)
        zero_points = op.Reshape(packed_zeros, op.Constant(value_ints=[-1]))
    bias = None if bias is None else op.CastLike(bias, x)
    return _microsoft.MatMulNBits(x, b, s, zero_points, None, bias, K=k, N=n, bits=2, block_size=group_size)


def _ternary_3of4_linear(x, packed, scales, group_size, bias=None):
    scales = op.Cast(scales, to=onnx.TensorProto.FLOAT)
    if bias is None:
        return _angel.Ternary3of4Linear(x, packed, scales, group_size=group_size)
    return _angel.Ternary3of4Linear(x, packed, scales, op.Cast(bias, to=onnx.TensorProto.FLOAT), group_size=group_size)


def _ternary_3of4_linear_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(
        "Ternary3of4Linear",
        ANGEL_ONNX_DOMAIN,
        1,
        doc="1.25-bit 3:4-sparse ternary weights (angel::ternary_3of4_linear): y = x @ (t · scale)ᵀ + bias.",
        inputs=[
            param("x", "tensor(float)"),
            param("packed", "tensor(uint8)"),
            param("scales", "tensor(float)"),
            param("bias", "tensor(float)", param_option=OpSchema.FormalParameterOption.Optional),
        ],
        outputs=[param("y", "tensor(float)")],
        attributes=[OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "weights per scale along K")],
    )


TRANSLATIONS = {
    torch.ops.angel.int2_weight_only_linear.default: _int2_weight_only_linear,
    torch.ops.angel.ternary_3of4_linear.default: _ternary_3of4_linear,
}
SCHEMAS = [_ternary_3of4_linear_schema()]
