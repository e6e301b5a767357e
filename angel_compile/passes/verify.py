"""Graph verification run by the PassManager after every pass.

Checks: `graph.lint()` (well-formed, get_attr targets exist); every placeholder and every
call_function that returns something carries `meta["val"]`; every angel custom op accepts
its arguments under its schema and its fake impl reproduces the node's recorded
`meta["val"]` (shape and dtype).
"""

from __future__ import annotations

import torch
from torch import fx

from angel_compile import meta
from angel_compile.ops import ANGEL_NAMESPACE
from angel_compile.passes.graph_utils import fake_mode_of


class GraphVerificationError(Exception):
    pass


def _returns_nothing(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and len(target._schema.returns) == 0


def verify_graph(gm: fx.GraphModule) -> None:
    """Raise GraphVerificationError naming the first node that breaks an invariant."""
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises bare RuntimeError/AssertionError subclasses
        raise GraphVerificationError(f"graph lint failed: {exc}") from exc
    fake_mode = fake_mode_of(gm)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_function") and not _returns_nothing(node):
            if meta.VAL not in node.meta:
                raise GraphVerificationError(f"node '{node.name}' ({node.op} {node.target}) has no meta['val']")
        if node.op == "call_function" and getattr(node.target, "namespace", None) == ANGEL_NAMESPACE:
            _verify_custom_op(node, fake_mode)


def _verify_custom_op(node: fx.Node, fake_mode) -> None:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get(meta.VAL))
    try:
        with fake_mode:
            expected = node.target(*args, **kwargs)
    except Exception as exc:
        raise GraphVerificationError(
            f"node '{node.name}': {node.target} rejects its arguments ({type(exc).__name__}: {exc}); "
            f"schema: {node.target._schema}"
        ) from exc
    recorded = node.meta.get(meta.VAL)
    # An op with several outputs (angel::prune_tokens) records a tuple of tensors.
    several = isinstance(expected, tuple) and isinstance(recorded, tuple) and len(recorded) == len(expected)
    pairs = zip(recorded, expected, strict=True) if several else [(recorded, expected)]
    for recorded, expected in pairs:
        if not isinstance(recorded, torch.Tensor):
            raise GraphVerificationError(f"node '{node.name}': meta['val'] is not a tensor")
        if recorded.dtype != expected.dtype or [str(s) for s in recorded.shape] != [str(s) for s in expected.shape]:
            raise GraphVerificationError(
                f"node '{node.name}': meta['val'] {recorded.dtype}{list(recorded.shape)} disagrees with "
                f"{node.target}'s fake impl {expected.dtype}{list(expected.shape)}"
            )
