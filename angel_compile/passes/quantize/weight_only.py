"""Weight-only INT8 quantization of linear layers (pass `int8_weight_only`).

Matches: every linear layer whose weight is a float parameter, in any of the forms
`quantize/linear.py` recognises (aten.linear, aten.addmm / aten.mm of a weight).
Emits:   `angel::int8_weight_only_linear(x, weight_int8, weight_scale, bias)`, with
         weight_int8 int8 [N, K] and weight_scale float32 [N] registered as buffers
         `<layer>.weight_int8` / `<layer>.weight_scale` (per-output-channel symmetric,
         format documented in `ops/int8_weight_only.py`). The float weight is deleted when
         nothing else uses it (a tied embedding keeps it).
Leaves:  linear-like nodes whose weight is computed, a buffer, not 2-D or not float, and
         layers matching `exclude`; each is listed in the stats with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from angel_compile.passes.base import Pass, PassContext, PassResult, register_pass
from angel_compile.passes.quantize.handlers import Int8WeightOnlyScheme
from angel_compile.passes.quantize.linear import layer_matches
from angel_compile.passes.quantize.quantize import quantize_layers

_SCHEME = Int8WeightOnlyScheme()


@register_pass
@dataclass(frozen=True)
class Int8WeightOnly(Pass):
    """Per-channel symmetric int8 weights for linear layers; activations untouched.

    exclude: glob patterns of layer paths to leave in float (e.g. ["lm_head", "layers.0.*"]).
    """

    name: ClassVar[str] = "int8_weight_only"
    exclude: tuple[str, ...] = ()

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        def assign(layer: str):
            pattern = layer_matches(layer, self.exclude)
            return (None, f"excluded by pattern '{pattern}'") if pattern else (_SCHEME, None)

        return quantize_layers(gm, ctx, self.name, assign)
