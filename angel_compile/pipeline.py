"""`compile()`: capture -> passes -> a runnable, inspectable, exportable `CompiledModel`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from angel_compile.capture import capture_model
from angel_compile.passes.base import PassContext
from angel_compile.passes.manager import PassManager, PipelineReport
from angel_compile.recipe import Recipe, load_recipe

RecipeLike = str | Path | Mapping[str, Any] | Recipe | None
# Matches lowering/onnx.py; the ONNX stack is imported only when exporting (it is slow to load).
DEFAULT_OPSET = 18


class CompiledModel:
    """The rewritten graph: call it like the model; `.report` says which passes ran and what they did."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        report: PipelineReport,
        recipe: Recipe,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        dynamic_shapes: Any,
    ) -> None:
        self.graph_module = graph_module
        self.report = report
        self.recipe = recipe
        self.example_args = example_args
        self.example_kwargs = example_kwargs
        self.dynamic_shapes = dynamic_shapes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)

    @property
    def passes_ran(self) -> list[str]:
        return self.report.ran()

    def count_ops(self) -> dict[str, int]:
        """How often each call_function target occurs in the graph."""
        counts: dict[str, int] = {}
        for node in self.graph_module.graph.nodes:
            if node.op == "call_function":
                counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return counts

    def export_onnx(self, path: str | Path, opset_version: int = DEFAULT_OPSET) -> Path:
        """Write the rewritten model as ONNX (angel ops in our domain; see lowering/onnx.py)."""
        from angel_compile.lowering.onnx import export_onnx_program

        return export_onnx_program(
            self.graph_module, self.example_args, self.example_kwargs, path, self.dynamic_shapes, opset_version
        )


def compile(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[Any] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    recipe: RecipeLike = None,
    dynamic_shapes: Any = None,
    debug_dir: str | Path | None = None,
    disable: Sequence[str] = (),
    stop_after: str | None = None,
    check_numerics: bool | None = None,
    progress: Callable[[str], None] | None = None,
    calibration_data: Iterable[Any] | None = None,
) -> CompiledModel:
    """Capture `model` with torch.export and run the recipe's passes on it.

    example_inputs / example_kwargs: real inputs used for capture (and, with a debug dir or
    check_numerics, to compare every stage with the captured graph).
    dynamic_shapes: as for torch.export.export, e.g. {"input_ids": {1: Dim("seq")}}.
    debug_dir (or env ANGEL_DEBUG_DIR): write each stage, its diff and a summary table.
    disable / stop_after: pass names to skip / the pass after which to stop.
    calibration_data: batches of model inputs for recipes that calibrate (static FP8, GPTQ,
    SmoothQuant, AWQ); each a Tensor, a tuple of args, a dict of kwargs or (args, kwargs).
    """
    resolved = load_recipe(recipe)
    manager = PassManager(
        resolved.build_passes(),
        debug_dir=debug_dir,
        disable=disable,
        stop_after=stop_after,
        check_numerics=check_numerics,
        progress=progress,
    )
    args, kwargs = tuple(example_inputs), dict(example_kwargs or {})
    gm = capture_model(model, args, kwargs, dynamic_shapes)
    batches = None if calibration_data is None else list(calibration_data)
    context = PassContext(example_args=args, example_kwargs=kwargs, calibration_data=batches)
    gm, report = manager.run(gm, context)
    return CompiledModel(gm, report, resolved, args, kwargs, dynamic_shapes)


def export_onnx(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[Any],
    path: str | Path,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    recipe: RecipeLike = None,
    dynamic_shapes: Any = None,
    opset_version: int = DEFAULT_OPSET,
    calibration_data: Iterable[Any] | None = None,
) -> Path:
    """compile() with the recipe, then write ONNX to `path`; returns the path."""
    compiled = compile(
        model,
        example_inputs,
        example_kwargs,
        recipe=recipe,
        dynamic_shapes=dynamic_shapes,
        calibration_data=calibration_data,
    )
    return compiled.export_onnx(path, opset_version)
