"""Replacing a matched linear layer by a quantized op: the steps every scheme shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from angel_compile.passes.base import set_attr_value
from angel_compile.passes.graph_utils import copy_source_meta, erase_if_unused, infer_val, set_tensor_val
from angel_compile.passes.quantize.linear import LinearMatch


def add_buffer(gm: fx.GraphModule, target: str, value: torch.Tensor, fake_mode: FakeTensorMode) -> fx.Node:
    """Register `value` as buffer `target` and return a get_attr node for it at the graph's insertion point."""
    set_attr_value(gm, target, value)
    node = gm.graph.get_attr(target)
    set_tensor_val(node, value, fake_mode)
    return node


def add_tensor(
    gm: fx.GraphModule, match: LinearMatch, suffix: str, value: torch.Tensor, fake_mode: FakeTensorMode
) -> fx.Node:
    """Register `value` as buffer `<layer>.<suffix>` and return a get_attr node placed before the layer."""
    with gm.graph.inserting_before(match.node):
        return add_buffer(gm, f"{match.layer}.{suffix}", value, fake_mode)


def swap_linear(
    gm: fx.GraphModule,
    match: LinearMatch,
    op: torch._ops.OpOverload,
    args: tuple[Any, ...],
    pass_name: str,
    fake_mode: FakeTensorMode,
) -> fx.Node:
    """Put `op(*args)` where the matched linear was and erase what only it used (weight, transpose)."""
    with gm.graph.inserting_before(match.node):
        new = gm.graph.call_function(op, args)
    infer_val(new, fake_mode)
    copy_source_meta(new, match.node, pass_name, match.layer)
    match.node.replace_all_uses_with(new)
    gm.graph.erase_node(match.node)
    erase_if_unused(gm, [n for n in (match.transpose, match.weight) if n is not None])
    return new


def weight_nk(gm: fx.GraphModule, match: LinearMatch) -> torch.Tensor:
    """The layer's weight as [N, K] (out features, in features), whatever its stored layout."""
    weight = gm.get_parameter(match.weight.target)
    return weight.t() if match.weight_is_kn else weight
