"""op -> ONNX: angel custom ops become nodes of our ONNX domain.

Domain `ai.angel`, opset version 1. Each angel op has an `onnx.defs.OpSchema` (registered
before export so the checker knows it) and an onnxscript translation handed to
`torch.onnx.export(..., dynamo=True, custom_translation_table=...)`. onnxruntime runs these
nodes through the implementations in `lowering/ort.py`.

Ops:
    Int8WeightOnlyLinear(x: T, weight: int8 [N, K], scale: float [N], bias?: T [N]) -> T
        y = (x @ weight^T) * scale + bias   (see ops/int8_weight_only.py)
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
from onnxscript import values

from angel_compile.errors import UnsupportedError

# opset 23 + optimization fails in onnxruntime 1.32 with dynamic shapes.
from angel_compile.pipeline import DEFAULT_OPSET

ANGEL_ONNX_DOMAIN = "ai.angel"
ANGEL_ONNX_OPSET = 1

_angel = values.Opset(ANGEL_ONNX_DOMAIN, ANGEL_ONNX_OPSET)
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _int8_weight_only_linear(x, weight, scale, bias=None):
    if bias is None:
        return _angel.Int8WeightOnlyLinear(x, weight, scale)
    return _angel.Int8WeightOnlyLinear(x, weight, scale, bias)


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
        )
    ]


def translation_table() -> dict[Any, Any]:
    """torch op overload -> onnxscript translation, for torch.onnx.export."""
    return {torch.ops.angel.int8_weight_only_linear.default: _int8_weight_only_linear}


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
    """Export with torch.onnx (dynamo) and our translations; returns the written path."""
    register_schemas()
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
