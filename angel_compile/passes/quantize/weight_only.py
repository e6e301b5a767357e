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

import torch
from torch import fx

from angel_compile.errors import UnsupportedError
from angel_compile.ops.int8_weight_only import quantize_int8_per_channel
from angel_compile.passes.base import (
    Pass,
    PassContext,
    PassResult,
    PassStats,
    get_attr_value,
    register_pass,
    set_attr_value,
)
from angel_compile.passes.graph_utils import copy_source_meta, erase_if_unused, fake_mode_of, infer_val, set_tensor_val
from angel_compile.passes.quantize.linear import LINEAR_TARGETS, LinearMatch, layer_matches, match_linear


@register_pass
@dataclass(frozen=True)
class Int8WeightOnly(Pass):
    """Per-channel symmetric int8 weights for linear layers; activations untouched.

    exclude: glob patterns of layer paths to leave in float (e.g. ["lm_head", "layers.0.*"]).
    """

    name: ClassVar[str] = "int8_weight_only"
    exclude: tuple[str, ...] = ()

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = PassStats()
        fake_mode = fake_mode_of(gm)
        float_bytes = int8_bytes = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in LINEAR_TARGETS:
                continue
            match = match_linear(gm, node)
            if isinstance(match, str):
                stats.skip(node, match)
                continue
            stats.matched += 1
            pattern = layer_matches(match.layer, self.exclude)
            if pattern is not None:
                stats.skip(node, f"layer '{match.layer}' excluded by pattern '{pattern}'")
                continue
            weight = get_attr_value(gm, match.weight.target)
            float_bytes += weight.numel() * weight.element_size()
            int8_bytes += self._rewrite(gm, match, weight, fake_mode)
            stats.rewritten += 1
        if stats.matched == 0 and ctx.whole_model and not _already_quantized(gm):
            reasons = "; ".join(f"{node}: {why}" for node, why in stats.skipped.items()) or "none found"
            raise UnsupportedError(
                f"{self.name}: the graph has no linear layer with a float parameter weight (looked for "
                f"{', '.join(str(t) for t in LINEAR_TARGETS)}); linear-like nodes seen: {reasons}"
            )
        if stats.rewritten:
            gm.graph.lint()
            gm.recompile()
        stats.details = {"weight_bytes_before": float_bytes, "weight_bytes_after": int8_bytes}
        return PassResult(gm, modified=stats.rewritten > 0, stats=stats)

    def _rewrite(self, gm: fx.GraphModule, match: LinearMatch, weight: torch.Tensor, fake_mode) -> int:
        """Replace one matched layer; returns the bytes of the quantized weight and scale."""
        q, scale = quantize_int8_per_channel(weight.t() if match.weight_is_kn else weight)
        q_target, scale_target = f"{match.layer}.weight_int8", f"{match.layer}.weight_scale"
        set_attr_value(gm, q_target, q)
        set_attr_value(gm, scale_target, scale)
        graph = gm.graph
        with graph.inserting_before(match.node):
            q_node = graph.get_attr(q_target)
            scale_node = graph.get_attr(scale_target)
            set_tensor_val(q_node, q, fake_mode)
            set_tensor_val(scale_node, scale, fake_mode)
            linear = graph.call_function(
                torch.ops.angel.int8_weight_only_linear.default, (match.x, q_node, scale_node, match.bias)
            )
        infer_val(linear, fake_mode)
        copy_source_meta(linear, match.node, self.name, match.layer)
        match.node.replace_all_uses_with(linear)
        graph.erase_node(match.node)
        erase_if_unused(gm, [n for n in (match.transpose, match.weight) if n is not None])
        return q.numel() + scale.numel() * scale.element_size()


def _already_quantized(gm: fx.GraphModule) -> bool:
    return any(n.target == torch.ops.angel.int8_weight_only_linear.default for n in gm.graph.nodes)
