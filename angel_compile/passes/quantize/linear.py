"""Matching linear layers in an ATen graph, whichever form capture left them in.

A linear layer y = x W^T + b appears as
    aten.linear(x, W, b?)                                   (torch.export, no decomposition)
    aten.addmm(b, x2d, aten.t(W))  /  aten.mm(x2d, aten.t(W))   (aot_autograd, core ATen)
with `aten.permute(W, [1, 0])` or `aten.transpose(W, 0, 1)` in place of `aten.t`, or
    aten.addmm(b, x2d, Wkn)                                 (GPT-2's Conv1D: a [K, N] weight)
`match_linear` recognises all of them and says why when a linear-like node cannot be treated
as a layer with a parameter weight.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx

from angel_compile import meta
from angel_compile.passes.base import get_attr_value

aten = torch.ops.aten
LINEAR_TARGETS = (aten.linear.default, aten.addmm.default, aten.mm.default)
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)
FLOAT_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LinearMatch:
    node: fx.Node  # the linear / addmm / mm node
    x: fx.Node  # activation [..., K]
    weight: fx.Node  # get_attr of the parameter: [N, K], or [K, N] when weight_is_kn
    transpose: fx.Node | None  # the aten.t / permute between weight and mm, if any
    weight_is_kn: bool  # stored as [K, N] and used directly by mm/addmm (GPT-2 Conv1D)
    bias: fx.Node | None  # [N] or None
    layer: str  # module path, e.g. "model.layers.0.mlp.up_proj"


def _is_plain_transpose(node: fx.Node) -> bool:
    if node.target == aten.t.default:
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    return node.target == aten.transpose.int and sorted(node.args[1:3]) in ([0, 1], [-2, -1], [-1, 0], [0, -1])


def match_linear(gm: fx.GraphModule, node: fx.Node) -> LinearMatch | str:
    """A LinearMatch for a linear-like node, or a string saying why it is not one we can treat."""
    transpose, weight_is_kn = None, False
    if node.target == aten.linear.default:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:
        if node.target == aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                return "addmm with beta/alpha != 1"
            bias, x, rhs = node.args[0], node.args[1], node.args[2]
        else:
            bias, (x, rhs) = None, node.args[:2]
        if isinstance(rhs, fx.Node) and rhs.op == "call_function" and _is_plain_transpose(rhs):
            transpose, weight = rhs, rhs.args[0]
        elif isinstance(rhs, fx.Node) and rhs.op == "get_attr":
            weight, weight_is_kn = rhs, True
        else:
            return "right operand is neither a weight nor a transposed weight"
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "weight is computed in the graph, not a parameter"
    value = get_attr_value(gm, weight.target)
    if not isinstance(value, torch.nn.Parameter):
        return f"weight '{weight.target}' is a buffer or constant, not a parameter"
    if value.dim() != 2:
        return f"weight '{weight.target}' is {value.dim()}-D, expected 2-D"
    if value.dtype not in FLOAT_WEIGHT_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_WEIGHT_DTYPES)
        return f"weight dtype {str(value.dtype).removeprefix('torch.')} not supported (supported: {supported})"
    x_val = x.meta.get(meta.VAL) if isinstance(x, fx.Node) else None
    if x_val is None or x_val.dtype != value.dtype:
        return f"activation dtype {getattr(x_val, 'dtype', None)} differs from weight dtype {value.dtype}"
    layer = weight.target.removesuffix(".weight")
    return LinearMatch(node, x, weight, transpose, weight_is_kn, bias, layer)


def layer_matches(layer: str, patterns: tuple[str, ...]) -> str | None:
    """The first glob pattern that matches the layer path, or None.

    A pattern matches the whole path or any dotted suffix of it, so "lm_head" matches
    "lm_head" and "model.lm_head", and "layers.0.*" matches "model.layers.0.mlp.up_proj".
    """
    for pattern in patterns:
        if fnmatch.fnmatchcase(layer, pattern) or fnmatch.fnmatchcase(layer, "*." + pattern):
            return pattern
    return None
