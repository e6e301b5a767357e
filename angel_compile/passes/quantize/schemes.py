"""Quantization schemes: each a frozen config dataclass with a registered handler.

Users only touch configs, written in recipes as mappings with a `type` key:

    {type: int8_weight_only}
    {type: int4_weight_only, group_size: 128, symmetric: false, method: gptq}

`parse_scheme` turns such a mapping into its config (rejecting unknown types and fields by
name); the `quantize` pass calls the handler registered for the config's class on every
layer the scheme is assigned to. A handler receives a `LayerSite` (the layer, its weight as
[N, K], its calibration statistics, and helpers to add tensors and swap in the new op) and
returns the bytes of what it stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from angel_compile.calibration import ActivationStats
from angel_compile.passes.quantize.linear import LinearMatch
from angel_compile.passes.quantize.rewrite import add_tensor, swap_linear, weight_nk


@dataclass(frozen=True)
class Scheme:
    """Base of scheme configs."""

    type: ClassVar[str]

    def statistics(self) -> set[str]:
        """Calibration statistics this scheme needs (see calibration.STATISTICS)."""
        return set()

    def smoothing(self) -> str | None:
        """'smoothquant' or 'awq' when the scheme rescales input channels before quantizing."""
        return None

    def input_scale(self, matches: list[LinearMatch], gm: fx.GraphModule, stats: ActivationStats) -> torch.Tensor:
        """For smoothing schemes: the per-input-channel scale s [K] shared by `matches`."""
        raise NotImplementedError(f"scheme '{self.type}' does not smooth its inputs")

    def unsupported(self, weight: torch.Tensor) -> str | None:
        """Why this scheme cannot quantize a weight [N, K], or None."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}


@dataclass
class LayerSite:
    """One layer being quantized, with what a handler needs."""

    gm: fx.GraphModule
    match: LinearMatch
    fake_mode: FakeTensorMode
    pass_name: str
    stats: ActivationStats | None

    @property
    def layer(self) -> str:
        return self.match.layer

    def weight(self) -> torch.Tensor:
        """The (possibly smoothed) float weight as [N, K]."""
        return weight_nk(self.gm, self.match)

    def add_tensor(self, suffix: str, value: torch.Tensor) -> fx.Node:
        return add_tensor(self.gm, self.match, suffix, value, self.fake_mode)

    def swap(self, op: torch._ops.OpOverload, args: tuple[Any, ...]) -> fx.Node:
        return swap_linear(self.gm, self.match, op, args, self.pass_name, self.fake_mode)


Handler = Callable[[Any, LayerSite], int]
_SCHEMES: dict[str, type[Scheme]] = {}
_HANDLERS: dict[type[Scheme], Handler] = {}


def register_scheme(cls: type[Scheme]) -> Callable[[Handler], Handler]:
    """Decorator for a handler: `@register_scheme(Int8WeightOnlyScheme) def quantize(config, site): ...`."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"scheme config {cls.__name__} must be a frozen dataclass")

    def decorate(handler: Handler) -> Handler:
        _SCHEMES[cls.type] = cls
        _HANDLERS[cls] = handler
        return handler

    return decorate


def registered_schemes() -> dict[str, type[Scheme]]:
    import angel_compile.passes.quantize.handlers  # noqa: F401  (registers the built-in schemes)
    import angel_compile.passes.quantize.handlers_fp8_int8  # noqa: F401
    import angel_compile.passes.quantize.handlers_int4  # noqa: F401
    import angel_compile.passes.quantize.handlers_lowbit  # noqa: F401

    return dict(sorted(_SCHEMES.items()))


def handler_for(config: Scheme) -> Handler:
    return _HANDLERS[type(config)]


def parse_scheme(data: Mapping[str, Any] | Scheme | None) -> Scheme | None:
    """A scheme config from its recipe mapping; None stays None (leave the layer in float)."""
    if data is None or isinstance(data, Scheme):
        return data
    schemes = registered_schemes()
    if not isinstance(data, Mapping) or "type" not in data:
        raise ValueError(f"a scheme must be a mapping with a 'type' key (one of {list(schemes)}), got {data!r}")
    kind = data["type"]
    if kind not in schemes:
        raise ValueError(f"unknown scheme type '{kind}'; available: {list(schemes)}")
    cls = schemes[kind]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - {"type"} - set(fields))
    if unknown:
        raise ValueError(f"scheme '{kind}' has no field(s) {unknown}; accepted: {fields}")
    return cls(**{k: v for k, v in data.items() if k != "type"})
