"""INT4 / INT2 / 3:4 ternary layers to the K-major layouts of the Triton decode kernels (pass `kmajor_layout`).

Matches: `angel::int4_weight_only_linear`, `angel::int2_weight_only_linear` and
         `angel::ternary_3of4_linear` nodes whose packed weight, scales (and zero points) are
         buffers (get_attr) on a device type listed in `devices` (default: cuda).
Emits:   `angel::int4_kmajor_linear` / `angel::int2_kmajor_linear(x, words, scales, zeros,
         group_size, bias)`, the same weights in the layout of `ops/kmajor.py`, as buffers
         `<layer>.weight_words` int32 [K/F, N] (F = 8 or 16 codes a word),
         `<layer>.weight_scales_kmajor` [K/g, N] and `<layer>.weight_zeros_kmajor`
         uint8 [K/g, N]; for ternary `angel::ternary_kmajor_linear(x, lo, hi, scales,
         group_size, bias)` (`ops/ternary_kmajor.py`) with buffers `<layer>.weight_lo` int32
         [K/32, N], `<layer>.weight_hi` int32 [K/128, N] and `<layer>.weight_scales_kmajor`.
         The row-major buffers are deleted when nothing else reads them. The output is the
         same function of x (exactly the same codes, scales, zeros).
Leaves:  nodes whose weights are computed rather than stored, or stored on another device (a
         graph compiled on CPU keeps the ONNX layouts); ternary layers whose K is not a
         multiple of 128; each is listed in the stats with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from angel_compile.ops.kmajor import to_kmajor
from angel_compile.ops.ternary_kmajor import ternary_kmajor_supported, to_ternary_kmajor
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, get_attr_value, register_pass
from angel_compile.passes.graph_utils import copy_source_meta, erase_if_unused, fake_mode_of, infer_val
from angel_compile.passes.quantize.rewrite import add_buffer

# row-major op -> (bits, K-major op); bits None: 3:4 ternary
_CONVERSIONS = {
    torch.ops.angel.int4_weight_only_linear.default: (4, torch.ops.angel.int4_kmajor_linear.default),
    torch.ops.angel.int2_weight_only_linear.default: (2, torch.ops.angel.int2_kmajor_linear.default),
    torch.ops.angel.ternary_3of4_linear.default: (None, torch.ops.angel.ternary_kmajor_linear.default),
}


@register_pass
@dataclass(frozen=True)
class KMajorLayout(Pass):
    """Converts INT4 / INT2 / 3:4 ternary layers whose weights live on `devices` to the K-major layouts.

    devices: device types ("cuda", "cpu") whose layers are converted.
    """

    name: ClassVar[str] = "kmajor_layout"
    devices: tuple[str, ...] = ("cuda",)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = PassStats()
        fake_mode = fake_mode_of(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _CONVERSIONS:
                continue
            bits, kmajor_op = _CONVERSIONS[node.target]
            stats.matched += 1
            if bits is None:
                x, packed, scales, group_size, bias = node.args
                zeros = None
            else:
                x, packed, scales, zeros, group_size, bias = node.args
            stored = [n for n in (packed, scales, zeros) if n is not None]
            if any(n.op != "get_attr" for n in stored):
                stats.skip(node, "the packed weight, scales or zeros are computed, not stored buffers")
                continue
            packed_value = get_attr_value(gm, packed.target)
            if packed_value.device.type not in self.devices:
                where = packed_value.device.type
                stats.skip(node, f"weights on {where}; this pass converts those on {list(self.devices)}")
                continue
            layer = packed.target.rsplit(".", 1)[0]
            scales_value = get_attr_value(gm, scales.target)
            with gm.graph.inserting_before(node):
                if bits is None:
                    k = scales_value.shape[1] * group_size  # g = K for one scale a channel
                    reason = ternary_kmajor_supported(k, group_size)
                    if reason:
                        stats.skip(node, reason)
                        continue
                    lo, hi, scales_t = to_ternary_kmajor(packed_value, scales_value, k)
                    weights = (
                        add_buffer(gm, f"{layer}.weight_lo", lo, fake_mode),
                        add_buffer(gm, f"{layer}.weight_hi", hi, fake_mode),
                        add_buffer(gm, f"{layer}.weight_scales_kmajor", scales_t, fake_mode),
                    )
                else:
                    zeros_value = None if zeros is None else get_attr_value(gm, zeros.target)
                    words, scales_t, zeros_t = to_kmajor(packed_value, scales_value, zeros_value, bits)
                    weights = (
                        add_buffer(gm, f"{layer}.weight_words", words, fake_mode),
                        add_buffer(gm, f"{layer}.weight_scales_kmajor", scales_t, fake_mode),
                        None if zeros_t is None else add_buffer(gm, f"{layer}.weight_zeros_kmajor", zeros_t, fake_mode),
                    )
                new = gm.graph.call_function(kmajor_op, (x, *weights, group_size, bias))
            infer_val(new, fake_mode)
            copy_source_meta(new, node, self.name, layer)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            erase_if_unused(gm, stored)
            stats.rewritten += 1
        if stats.rewritten:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, stats.rewritten > 0, stats)
