"""op -> ONNX for the FP8 and INT8 W8A8 linear ops, in standard ONNX ops only (opset ≥ 19).

`angel::fp8_linear(x, weight, weight_scale, input_scale, bias)` (ops/fp8_linear.py):
    W  = DequantizeLinear(weight: float8e4m3fn [N, K], weight_scale [N] (axis 0) or scalar)
    static input_scale:  x' = DequantizeLinear(QuantizeLinear(x, s_x, fp8 zero), s_x)
    dynamic (per token): s_x = max(ReduceMax(|x|, last axis), tiny→1) / 448
                         x' = Cast(Cast(Clip(x / s_x, ±448), float8e4m3fn), float) · s_x
    y  = MatMul(x', Wᵀ) + bias
The weight stays FP8 in the file (1 byte a value); onnxruntime's CPU provider has no FP8
MatMul, so it multiplies the dequantized values in float: the Q/DQ form that TensorRT and
other FP8 backends fuse into an FP8 GEMM.

`angel::w8a8_int8_linear(x, weight, weight_scale, bias, input_multiplier)` (ops/w8a8_int8.py):
    x   = x · input_multiplier                                  (when given)
    s_x = max(ReduceMax(|x|, last axis), tiny→1) / 127
    xq  = Cast(Clip(Round(x / s_x), ±127), int8)              (Round: half to even, as torch)
    y   = Cast(MatMulInteger(xq, weightᵀ: int8 [K, N]), float) · s_x · weight_scale + bias
MatMulInteger accumulates in int32 exactly like the Triton kernel; weightᵀ is a transpose
of the int8 initializer that the exporter folds, so the file holds int8 [K, N].
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset19 as op

import angel_compile.ops  # noqa: F401  (registers the ops named below)

# Q/DQ with float8e4m3fn and per-axis scales need opset 19.
REQUIRED_OPSET = {
    torch.ops.angel.fp8_linear.default: 19,
    torch.ops.angel.w8a8_int8_linear.default: 19,
}
FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
_FLOAT = onnx.TensorProto.FLOAT


def _scalar(value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _row_scale(x, bound: float):
    """Per-row scale max|x| / bound [..., 1] (1 / bound for an all-zero row), in x's type."""
    amax = op.ReduceMax(op.Abs(x), op.Constant(value_ints=[-1]), keepdims=1)
    zero = _scalar(0.0, x)
    amax = op.Where(op.Greater(amax, zero), amax, _scalar(1.0, x))
    return op.Div(amax, _scalar(bound, x))


def _fp8_linear(x, weight, weight_scale, input_scale=None, bias=None):
    w = op.DequantizeLinear(weight, op.Reshape(weight_scale, op.Constant(value_ints=[-1])), axis=0)  # [N, K]
    w = op.CastLike(op.Transpose(w, perm=[1, 0]), x)  # [K, N]
    if input_scale is None:
        scale = _row_scale(x, FP8_E4M3_MAX)
        clipped = op.Clip(op.Div(x, scale), _scalar(-FP8_E4M3_MAX, x), _scalar(FP8_E4M3_MAX, x))
        codes = op.Cast(op.Cast(clipped, to=onnx.TensorProto.FLOAT8E4M3FN), to=_FLOAT)
        x_dq = op.Mul(op.CastLike(codes, x), scale)
    else:
        s = op.Squeeze(op.Cast(input_scale, to=_FLOAT))
        zero = op.Constant(value=onnx.helper.make_tensor("fp8_zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0]))
        x_dq = op.CastLike(op.DequantizeLinear(op.QuantizeLinear(op.Cast(x, to=_FLOAT), s, zero), s), x)
    y = op.MatMul(x_dq, w)
    return y if bias is None else op.Add(y, op.CastLike(bias, x))


def _w8a8_int8_linear(x, weight, weight_scale, bias=None, input_multiplier=None):
    if input_multiplier is not None:
        x = op.Mul(x, op.CastLike(input_multiplier, x))
    scale = _row_scale(x, INT8_MAX)  # [..., 1]
    clipped = op.Clip(op.Round(op.Div(x, scale)), _scalar(-INT8_MAX, x), _scalar(INT8_MAX, x))
    xq = op.Cast(clipped, to=onnx.TensorProto.INT8)
    acc = op.MatMulInteger(xq, op.Transpose(weight, perm=[1, 0]))  # int32 [..., N]
    y = op.Mul(op.Mul(op.CastLike(acc, x), scale), op.CastLike(weight_scale, x))
    return y if bias is None else op.Add(y, op.CastLike(bias, x))


TRANSLATIONS = {
    torch.ops.angel.fp8_linear.default: _fp8_linear,
    torch.ops.angel.w8a8_int8_linear.default: _w8a8_int8_linear,
}
