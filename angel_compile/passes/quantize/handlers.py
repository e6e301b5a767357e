"""The built-in schemes: configs and their handlers (numerics live in `ops/` and `quant/`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from angel_compile.ops.int8_weight_only import quantize_int8_per_channel
from angel_compile.passes.quantize.schemes import LayerSite, Scheme, register_scheme


@dataclass(frozen=True)
class Int8WeightOnlyScheme(Scheme):
    """Per-output-channel symmetric int8 weights; activations unchanged."""

    type: ClassVar[str] = "int8_weight_only"


@register_scheme(Int8WeightOnlyScheme)
def quantize_int8_weight_only(config: Int8WeightOnlyScheme, site: LayerSite) -> int:
    q, scale = quantize_int8_per_channel(site.weight())
    args = (site.match.x, site.add_tensor("weight_int8", q), site.add_tensor("weight_scale", scale), site.match.bias)
    site.swap(torch.ops.angel.int8_weight_only_linear.default, args)
    return q.numel() + scale.numel() * scale.element_size()
