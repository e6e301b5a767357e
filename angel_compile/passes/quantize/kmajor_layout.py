"""INT4 / INT2 layers to the K-major word layout of the Triton decode kernels (pass `kmajor_layout`).

Matches: `angel::int4_weight_only_linear` and `angel::int2_weight_only_linear` nodes whose packed
         weight, scales and zero points are buffers (get_attr) on a device type listed in
         `devices` (default: cuda).
Emits:   `angel::int4_kmajor_linear` / `angel::int2_kmajor_linear(x, words, scales, zeros,
         group_size, bias)`, the same weights in the layout of `ops/kmajor.py`, as buffers
         `<layer>.weight_words` int32 [K/F, N] (F = 8 or 16 codes a word),
         `<layer>.weight_scales_kmajor` [K/g, N] and `<layer>.weight_zeros_kmajor`
         uint8 [K/g, N]; the row-major buffers are deleted when nothing else reads them. The
         output is bit-for-bit the same function of x (exactly the same codes, scales, zeros).
Leaves:  nodes whose weights are computed rather than stored, or stored on another device (a
         graph compiled on CPU keeps onnxruntime's MatMulNBits layout for ONNX export); each
         is listed in the stats with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from angel_compile.ops.kmajor import to_kmajor
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, get_attr_value, register_pass
from angel_compile.passes.graph_utils import copy_source_meta, erase_if_unused, fake_mode_of, infer_val
from angel_compile.passes.quantize.rewrite import add_buffer

# row-major op -> (bits, K-major op)
_CONVERSIONS = {
    torch.ops.angel.int4_weight_only_linear.default: (4, torch.ops.angel.int4_kmajor_linear.default),
    torch.ops.angel.int2_weight_only_linear.default: (2, torch.ops.angel.int2_kmajor_linear.default),
}


@register_pass
@dataclass(frozen=True)
class KMajorLayout(Pass):
    """Converts INT4 / INT2 weight-only layers whose weights live on `devices` to the K-major layout.

    devices: device types ("cuda", "cpu") whose INT4 / INT2 layers are converted.
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
            zeros_value = None if zeros is None else get_attr_value(gm, zeros.target)
            words, scales_t, zeros_t = to_kmajor(packed_value, get_attr_value(gm, scales.target), zeros_value, bits)
            with gm.graph.inserting_before(node):
                args = (
                    x,
                    add_buffer(gm, f"{layer}.weight_words", words, fake_mode),
                    add_buffer(gm, f"{layer}.weight_scales_kmajor", scales_t, fake_mode),
                    None if zeros_t is None else add_buffer(gm, f"{layer}.weight_zeros_kmajor", zeros_t, fake_mode),
                    group_size,
                    bias,
                )
                new = gm.graph.call_function(kmajor_op, args)
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
