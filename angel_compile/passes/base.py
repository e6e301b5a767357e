"""The Pass contract: a frozen dataclass of options that maps a GraphModule to a PassResult.

A pass:
- is registered under a unique `name` with `@register_pass` (that name is what recipes use);
- takes `(gm, ctx)` and returns `PassResult(gm, modified, stats)`, `modified` being honest
  (False when nothing changed, e.g. on a second run);
- keeps `meta["val"]` valid on every node it creates and records provenance (`meta.py`);
- leaves a node it cannot handle as it was and lists it in `stats.skipped` with the reason.
"""

from __future__ import annotations

import dataclasses
import keyword
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

import torch
from torch import fx

from angel_compile.errors import AngelCompileError, RecipeError


@dataclass
class PassStats:
    """What a pass saw and did. `skipped` maps a node name to why the pass left it alone."""

    matched: int = 0
    rewritten: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def skip(self, node: fx.Node, reason: str) -> None:
        self.skipped[node.name] = reason


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: PassStats


@dataclass
class PassContext:
    """What passes may need besides the graph.

    example_args / example_kwargs: real inputs the graph can be run on (for numerics, and
    for calibration-free checks); None when only fake inputs exist.
    whole_model: the graph is the whole model (torch.export), not one of the pieces dynamo
    may split a model into; a pass finding nothing to apply to is then an error.
    calibration_data: batches of model inputs for passes that calibrate (each a Tensor, a
    tuple of args, a dict of kwargs or (args, kwargs); see calibration.normalize_batch).
    """

    example_args: tuple[Any, ...] | None = None
    example_kwargs: dict[str, Any] | None = None
    whole_model: bool = True
    calibration_data: list[Any] | None = None


class Pass:
    """Base class; subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str]

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    @classmethod
    def option_docs(cls) -> list[tuple[str, str, str]]:
        """(option, type, default) for each option, for `angel-compile passes`."""
        hints = get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f.name, getattr(hints[f.name], "__name__", str(hints[f.name])), repr(default)))
        return rows


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under `cls.name`."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name '{cls.name}' is registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass by name (importing `angel_compile.passes` registers the built-ins)."""
    import angel_compile.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def build_pass(name: str, options: Mapping[str, Any], recipe_name: str = "custom") -> Pass:
    """Instantiate pass `name` with `options`, raising RecipeError naming what is wrong."""
    passes = registered_passes()
    if name not in passes:
        raise RecipeError(f"recipe '{recipe_name}': unknown pass '{name}'; registered passes: {list(passes)}")
    cls = passes[name]
    accepted = [f.name for f in dataclasses.fields(cls)]
    # A Python keyword (`lambda`) is a field with a trailing underscore (`lambda_`); recipes may use either.
    options = {f"{key}_" if keyword.iskeyword(key) else key: value for key, value in options.items()}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise RecipeError(
            f"recipe '{recipe_name}': pass '{name}' has no option(s) {unknown}; accepted options: {accepted}"
        )
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError, AngelCompileError) as exc:
        raise RecipeError(f"recipe '{recipe_name}': pass '{name}': {exc}") from exc


def count_nodes(gm: fx.GraphModule) -> int:
    return len(gm.graph.nodes)


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    """The object a get_attr target names (dotted path from gm)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def set_attr_value(gm: fx.GraphModule, target: str, value: torch.Tensor, as_parameter: bool = False) -> None:
    """Register `value` at dotted `target` under gm, creating container modules on the way."""
    *path, leaf = target.split(".")
    owner: torch.nn.Module = gm
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, torch.nn.Module())
        owner = getattr(owner, part)
    if as_parameter:
        owner.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(leaf, value)


def delete_attr_value(gm: fx.GraphModule, target: str) -> None:
    *path, leaf = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    delattr(owner, leaf)
