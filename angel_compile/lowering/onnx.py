"""op -> ONNX: angel custom ops become nodes of our ONNX domain.

Domain `ai.angel`, opset version 1. Each angel op has an `onnx.defs.OpSchema` (registered
before export so the checker knows it) and an onnxscript translation handed to
`torch.onnx.export(..., dynamo=True, custom_translation_table=...)`. onnxruntime runs these
nodes through the implementations in `lowering/ort.py`.

Ops:
    Int8WeightOnlyLinear(x: T, weight: int8 [N, K], scale: float [N], bias?: T [N]) -> T
        y = (x @ weight^T) * scale + bias   (see ops/int8_weight_only.py)
    SparseAttention(q: T [B, Hq, S, D], k: T [B, Hkv, S, D], v: T [B, Hkv, S, D]) -> T [B, Hq, S, D]
        attributes scale, method, block_size, min_seq_len, sink_blocks, local_blocks, top_k,
        budget_decay, threshold: block-sparse causal attention (see ops/sparse_attention.py)
    W4A8Linear(x: float [..., K], packed: uint8 [N, K/2], scales: float [N, K/g],
               zeros: uint8 [N, K/g] or [0], input_scale: float [1] or [0], bias: float [N] or [0])
        -> float [..., N]; attribute group_size. An empty tensor ([0]) stands for an absent
        input (symmetric weights, dynamic per-token activation scales, no bias), so the node
        always has six inputs. FP8 activations × INT4 weights (see ops/int4.py).

`angel::int4_weight_only_linear` needs no custom op: it becomes onnxruntime's
`com.microsoft.MatMulNBits` (bits 4, block_size = group size), whose layout ops/int4.py
shares. The translation only reshapes packed [N, K/2] to B [N, K/g, g/2] and scales to
[N·K/g], and packs the zero points two per byte (low nibble = even group) with ONNX ops on
the initializers, which the exporter's optimizer folds into constants: the file holds
MatMulNBits alone. Our format has no K padding, so MatMulNBits' ragged last block never
occurs. onnx's Python package has no schema for that contrib op; `register_schemas` adds
one so the exporter can build the node (onnxruntime brings its own).

`angel::fp8_linear` and `angel::w8a8_int8_linear` need no custom op either: standard
QuantizeLinear / DequantizeLinear (float8e4m3fn), Cast, Round and MatMulInteger at opset ≥ 19
(`lowering/onnx_fp8_int8.py`); `export_onnx_program` raises the opset for graphs holding them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript import values

from angel_compile.errors import UnsupportedError
from angel_compile.lowering.onnx_fp8_int8 import REQUIRED_OPSET
from angel_compile.lowering.onnx_fp8_int8 import TRANSLATIONS as FP8_INT8_TRANSLATIONS
from angel_compile.lowering.onnx_lowbit import SCHEMAS as LOWBIT_SCHEMAS
from angel_compile.lowering.onnx_lowbit import TRANSLATIONS as LOWBIT_TRANSLATIONS
from angel_compile.lowering.onnx_prune_tokens import SCHEMAS as PRUNE_TOKENS_SCHEMAS
from angel_compile.lowering.onnx_prune_tokens import TRANSLATIONS as PRUNE_TOKENS_TRANSLATIONS

# opset 23 + optimization fails in onnxruntime 1.32 with dynamic shapes.
from angel_compile.pipeline import DEFAULT_OPSET

ANGEL_ONNX_DOMAIN = "ai.angel"
ANGEL_ONNX_OPSET = 1

_angel = values.Opset(ANGEL_ONNX_DOMAIN, ANGEL_ONNX_OPSET)
MICROSOFT_DOMAIN = "com.microsoft"
_microsoft = values.Opset(MICROSOFT_DOMAIN, 1)
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _int8_weight_only_linear(x, weight, scale, bias=None):
    if bias is None:
        return _angel.Int8WeightOnlyLinear(x, weight, scale)
    return _angel.Int8WeightOnlyLinear(x, weight, scale, bias)


def _int4_weight_only_linear(x, packed, scales, zeros, group_size, bias=None):
    n, half_k = packed.shape  # initializers: static shapes
    k, blocks = 2 * half_k, 2 * half_k // group_size
    b = op.Reshape(packed, op.Constant(value_ints=[n, blocks, group_size // 2]))  # [N, K/g, g/2]
    s = op.Reshape(op.CastLike(scales, x), op.Constant(value_ints=[-1]))  # [N·K/g], in x's type
    zero_points = None
    if zeros is not None:
        # uint8 [N, K/g] -> two per byte [N·⌈K/g / 2⌉], low nibble = even block, as MatMulNBits reads them.
        z = zeros if blocks % 2 == 0 else op.Pad(zeros, op.Constant(value_ints=[0, 0, 0, 1]))
        z = op.Reshape(z, op.Constant(value_ints=[n, (blocks + 1) // 2, 2]))
        axis = op.Constant(value_ints=[2])
        low = op.Slice(z, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]), axis)
        high = op.Slice(z, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]), axis)
        four = op.Constant(value=onnx.helper.make_tensor("four", onnx.TensorProto.UINT8, [], [4]))
        packed_zeros = op.BitwiseOr(low, op.BitShift(high, four, direction="LEFT"))
        zero_points = op.Reshape(packed_zeros, op.Constant(value_ints=[-1]))
    bias = None if bias is None else op.CastLike(bias, x)
    return _microsoft.MatMulNBits(x, b, s, zero_points, None, bias, K=k, N=n, bits=4, block_size=group_size)


def _w4a8_linear(x, packed, scales, zeros, group_size, input_scale=None, bias=None):
    def empty(dtype: int):
        return op.Constant(value=onnx.helper.make_tensor("empty", dtype, [0], []))

    float32 = onnx.TensorProto.FLOAT
    return _angel.W4A8Linear(
        x,
        packed,
        op.Cast(scales, to=float32),
        empty(onnx.TensorProto.UINT8) if zeros is None else zeros,
        empty(float32)
        if input_scale is None
        else op.Reshape(op.Cast(input_scale, to=float32), op.Constant(value_ints=[1])),
        empty(float32) if bias is None else op.Cast(bias, to=float32),
        group_size=group_size,
    )


def _sparse_attention(
    q, k, v, scale, method, block_size, min_seq_len, sink_blocks, local_blocks, top_k, budget_decay, threshold
):
    return _angel.SparseAttention(
        q,
        k,
        v,
        scale=scale,
        method=method,
        block_size=block_size,
        min_seq_len=min_seq_len,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        top_k=top_k,
        budget_decay=budget_decay,
        threshold=threshold,
    )


def _sparse_attention_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    kinds = OpSchema.AttrType
    return OpSchema(
        "SparseAttention",
        ANGEL_ONNX_DOMAIN,
        ANGEL_ONNX_OPSET,
        doc="Block-sparse causal prefill attention with GQA (angel::sparse_attention).",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T")],
        outputs=[param("out", "T")],
        type_constraints=[("T", _FLOAT_TYPES, "activation type")],
        attributes=[
            attr("scale", kinds.FLOAT, "softmax scale"),
            attr("method", kinds.STRING, "static, stem or s2o"),
            *(
                attr(name, kinds.INT, name)
                for name in ("block_size", "min_seq_len", "sink_blocks", "local_blocks", "top_k")
            ),
            attr("budget_decay", kinds.FLOAT, "stem budget decay"),
            attr("threshold", kinds.FLOAT, "s2o stopping ratio"),
        ],
    )


def _w4a8_linear_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    return OpSchema(
        "W4A8Linear",
        ANGEL_ONNX_DOMAIN,
        ANGEL_ONNX_OPSET,
        doc="FP8 (E4M3) activations x INT4 group-wise weights (angel::w4a8_linear); empty inputs are absent.",
        inputs=[
            param("x", "tensor(float)"),
            param("packed", "tensor(uint8)"),
            param("scales", "tensor(float)"),
            param("zeros", "tensor(uint8)"),
            param("input_scale", "tensor(float)"),
            param("bias", "tensor(float)"),
        ],
        outputs=[param("y", "tensor(float)")],
        attributes=[OpSchema.Attribute("group_size", OpSchema.AttrType.INT, "weights per scale along K")],
    )


def _matmul_nbits_schema() -> OpSchema:
    """onnxruntime's contrib op, as far as the exporter needs to know it."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    attr, kinds = OpSchema.Attribute, OpSchema.AttrType
    return OpSchema(
        "MatMulNBits",
        MICROSOFT_DOMAIN,
        1,
        doc="onnxruntime contrib op: Y = A @ dequantize(B)ᵀ + bias, block-wise quantized B.",
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("scales", "T1"),
            param("zero_points", "T3", param_option=optional),
            param("g_idx", "T4", param_option=optional),
            param("bias", "T1", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", _FLOAT_TYPES, "activation type"),
            ("T2", ["tensor(uint8)"], "packed weights"),
            ("T3", ["tensor(uint8)", *_FLOAT_TYPES], "zero points"),
            ("T4", ["tensor(int32)"], "group index"),
        ],
        attributes=[
            *(attr(name, kinds.INT, name) for name in ("K", "N", "bits", "block_size")),
            attr("accuracy_level", kinds.INT, "accuracy level", required=False),
        ],
    )


def _schemas() -> list[OpSchema]:
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    return [
        OpSchema(
            "Int8WeightOnlyLinear",
            ANGEL_ONNX_DOMAIN,
            ANGEL_ONNX_OPSET,
            doc="y = (x @ weight^T) * scale + bias; weight int8 [N, K], per-output-channel float scale [N].",
            inputs=[
                param("x", "T"),
                param("weight", "tensor(int8)"),
                param("scale", "tensor(float)"),
                param("bias", "T", param_option=optional),
            ],
            outputs=[param("y", "T")],
            type_constraints=[("T", _FLOAT_TYPES, "activation type")],
        ),
        _sparse_attention_schema(),
        _w4a8_linear_schema(),
        _matmul_nbits_schema(),
        *LOWBIT_SCHEMAS,
        *PRUNE_TOKENS_SCHEMAS,
    ]


def translation_table() -> dict[Any, Any]:
    """torch op overload -> onnxscript translation, for torch.onnx.export."""
    return {
        torch.ops.angel.int8_weight_only_linear.default: _int8_weight_only_linear,
        torch.ops.angel.sparse_attention.default: _sparse_attention,
        torch.ops.angel.int4_weight_only_linear.default: _int4_weight_only_linear,
        torch.ops.angel.w4a8_linear.default: _w4a8_linear,
        **FP8_INT8_TRANSLATIONS,
        **LOWBIT_TRANSLATIONS,
        **PRUNE_TOKENS_TRANSLATIONS,
    }


def register_schemas() -> None:
    """Make onnx's checker and shape inference aware of our domain (idempotent)."""
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes about optional packages (torchvision) and its own warnings."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx_program(
    module: torch.nn.Module,
    example_args: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None,
    path: str | Path,
    dynamic_shapes: Any = None,
    opset_version: int = DEFAULT_OPSET,
) -> Path:
    """Export with torch.onnx (dynamo) and our translations; returns the written path.

    A graph holding ops whose translation needs a newer opset (`REQUIRED_OPSET`: FP8 / INT8
    Q/DQ need 19) is exported at that opset instead of a lower `opset_version`.
    """
    register_schemas()
    if isinstance(module, torch.fx.GraphModule):
        kmajor_ops = (
            torch.ops.angel.int4_kmajor_linear.default,
            torch.ops.angel.int2_kmajor_linear.default,
            torch.ops.angel.ternary_kmajor_linear.default,
        )
        kmajor = [n.name for n in module.graph.nodes if n.target in kmajor_ops]
        if kmajor:
            raise UnsupportedError(
                f"ONNX export: nodes {kmajor} hold INT4/INT2/ternary weights in the K-major layout of the "
                "Triton kernels (pass 'kmajor_layout'); export a model compiled without that pass (or with "
                "its weights on CPU), whose layers keep their ONNX layouts (MatMulNBits, ai.angel ternary)"
            )
        targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
        opset_version = max([opset_version] + [REQUIRED_OPSET[t] for t in targets if t in REQUIRED_OPSET])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                tuple(example_args),
                kwargs=dict(example_kwargs or {}),
                dynamo=True,
                opset_version=opset_version,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                verbose=False,
            )
    except Exception as exc:
        raise UnsupportedError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    program.save(str(path))
    return path
