"""Capture: a model in, one canonical ATen-level GraphModule out.

Canonical form (what every pass sees):
- ATen ops with `meta["val"]` on every value (FakeTensor, symbolic sizes where dynamic);
- parameters as `get_attr` nodes whose targets are the module paths of the original
  parameters (e.g. "model.layers.0.mlp.up_proj.weight"), each an `nn.Parameter`;
- no decompositions beyond what capture needs (`DECOMPOSITIONS` is empty), so a linear
  layer stays one node (`aten.linear` from torch.export, `aten.mm`/`addmm` from aot_autograd)
  and attention stays one scaled-dot-product node.

Two ways in: `capture_model` (torch.export, for `angel_compile.compile`) and
`freeze_parameters` (for the graph aot_autograd hands the torch.compile backend, where
parameters arrive as inputs).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from angel_compile import meta
from angel_compile.errors import CaptureError
from angel_compile.passes.base import set_attr_value

# Empty on purpose: passes match linear layers and attention as single nodes.
DECOMPOSITIONS: dict = {}

_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]")


def capture_model(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_args: tuple[Any, ...] = (),
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """torch.export the model (non-strict) and return the canonical GraphModule.

    The GraphModule is called like the model (same argument names, same output pytree).
    """
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    elif isinstance(model, torch.nn.Module):
        try:
            program = _export(model, tuple(example_args), dict(example_kwargs or {}), dynamic_shapes)
        except Exception as exc:
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''} (angel-compile needs a model torch.export "
                "accepts in non-strict mode; check example inputs and dynamic_shapes)"
            ) from exc
    else:
        raise CaptureError(f"expected an nn.Module or a torch.export.ExportedProgram, got {type(model).__name__}")
    with warnings.catch_warnings():
        # torch's own pytree deprecation warning, raised while it copies the program.
        warnings.simplefilter("ignore", FutureWarning)
        return program.run_decompositions(DECOMPOSITIONS).module()


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """torch.export (non-strict); where the dynamic dims' constraints fail, again with the guards as runtime asserts.

    torch 2.11 cannot prove some guards that hold for every size, e.g. min(64·s, 192·s) == 64·s
    for the sequence length s of SmolLM2 (9 query / 3 KV heads of 64), and rejects the declared
    dynamic dim ("Constraints violated"). Deferred to run time, such a guard becomes an assert in
    the graph, which passes; a guard that fails for some size raises when the graph runs at it.
    """
    export = functools.partial(torch.export.export, model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    with torch.no_grad():
        try:
            return export()
        except Exception as exc:
            if dynamic_shapes is None or "Constraints violated" not in str(exc):
                raise
            return export(prefer_deferred_runtime_asserts_over_guards=True)


def parameter_path(source_name: str, fallback: str) -> str:
    """Module path of a parameter from dynamo's source name.

    "L['self']._modules['lm_head']._parameters['weight']" -> "lm_head.weight".
    """
    parts = _SOURCE_PART.findall(source_name)
    return ".".join(parts) if parts else fallback


def freeze_parameters(gm: fx.GraphModule, parameters: Mapping[int, tuple[str, torch.Tensor]]) -> list[int]:
    """Turn the placeholders at the given input positions into get_attr parameters, in place.

    parameters: input position -> (module path, real tensor). Returns the positions of the
    inputs the graph still takes, in order.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    kept = []
    for index, node in enumerate(placeholders):
        if index not in parameters:
            kept.append(index)
            continue
        path, tensor = parameters[index]
        target = path if not _attribute_taken(gm, path) else f"_frozen.{path}"
        set_attr_value(gm, target, tensor.detach(), as_parameter=True)
        with gm.graph.inserting_before(first):
            attr = gm.graph.get_attr(target)
        attr.meta[meta.VAL] = node.meta[meta.VAL]
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return kept


def _attribute_taken(gm: fx.GraphModule, path: str) -> bool:
    owner: Any = gm
    for part in path.split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
        if not isinstance(owner, torch.nn.Module):
            return True
    return True
