"""Small helpers passes share: fake-value inference, provenance, erasing what a rewrite left dead."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from angel_compile import meta


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The FakeTensorMode the graph's `meta["val"]` values were made under (a new one if none)."""
    vals = [node.meta.get(meta.VAL) for node in gm.graph.nodes if node.op == "placeholder"]
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]) or FakeTensorMode(
        allow_non_fake_inputs=True
    )


def set_tensor_val(node: fx.Node, value: torch.Tensor, fake_mode: FakeTensorMode) -> None:
    """Give a get_attr node the fake version of the real tensor it names."""
    node.meta[meta.VAL] = fake_mode.from_tensor(value, static_shapes=True)


def infer_val(node: fx.Node, fake_mode: FakeTensorMode) -> Any:
    """Run the node's target on its inputs' `meta["val"]` and store the result as its own."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta[meta.VAL])
    with fake_mode:
        node.meta[meta.VAL] = node.target(*args, **kwargs)
    return node.meta[meta.VAL]


def copy_source_meta(new: fx.Node, old: fx.Node, pass_name: str, layer: str | None = None) -> None:
    """Carry the original node's source info over and record provenance."""
    for key in (meta.NN_MODULE_STACK, "stack_trace"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    replaced = old.meta.get(meta.PROVENANCE, {}).get("replaces", [old.name])
    new.meta[meta.PROVENANCE] = {"pass": pass_name, "replaces": list(replaced), "layer": layer}


def erase_if_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> list[str]:
    """Erase the given nodes (and attributes only they referenced) once nothing uses them.

    Returns the attribute targets that were deleted from the module.
    """
    from angel_compile.passes.base import delete_attr_value

    deleted = []
    for node in nodes:
        if node.graph is not gm.graph or node.users:
            continue
        gm.graph.erase_node(node)
        if node.op == "get_attr" and not any(n.op == "get_attr" and n.target == node.target for n in gm.graph.nodes):
            delete_attr_value(gm, node.target)
            deleted.append(node.target)
    return deleted
