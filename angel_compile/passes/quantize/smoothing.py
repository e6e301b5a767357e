"""Input-channel smoothing (SmoothQuant, AWQ): W ← W·diag(s), x ← x / s, exact in float.

Layers that read the same activation (q, k and v read the attention norm's output) share one
`s`. Dividing x by s is folded into the norm that produces x when the graph allows it:
    RMSNorm   x = mul(w_norm, y)                    -> w_norm / s
    LayerNorm x = aten.layer_norm(y, [K], w, b, ε)  -> w / s, b / s
(reached through view-like ops, every user of the norm being one of the smoothed layers).
Otherwise an explicit `x * (1/s)` multiply is inserted in front of each layer.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from angel_compile.passes.base import get_attr_value, set_attr_value
from angel_compile.passes.graph_utils import infer_val, set_tensor_val
from angel_compile.passes.quantize.linear import LinearMatch

aten = torch.ops.aten
VIEW_LIKE = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.clone.default,
    aten.alias.default,
)


def _keeps_channels(node: fx.Node) -> bool:
    """Ops that move rows around but keep each value in its channel (the last dim)."""
    if node.op != "call_function":
        return False
    if node.target == aten.slice.Tensor:  # e.g. transformers' logits_to_keep slice before lm_head
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim not in (-1, node.args[0].meta["val"].dim() - 1)
    if node.target not in VIEW_LIKE:
        return False
    # A view that merges or splits the last dim (o_proj's [B, S, H, D] -> [B, S, H·D]) mixes channels.
    return node.args[0].meta["val"].shape[-1] == node.meta["val"].shape[-1]


def activation_root(node: fx.Node) -> fx.Node:
    """The node producing an activation, looking through ops that keep channels."""
    while _keeps_channels(node):
        node = node.args[0]
    return node


def _users_through_views(node: fx.Node) -> set[fx.Node]:
    users = set()
    for user in node.users:
        users |= _users_through_views(user) if _keeps_channels(user) else {user}
    return users


def _own_weight_node(gm: fx.GraphModule, match: LinearMatch) -> fx.Node:
    """A get_attr for the layer's weight that nothing else reads (tied embeddings share theirs)."""
    readers = {match.transpose or match.node}
    if set(match.weight.users) <= readers:
        return match.weight
    target = f"{match.layer}.weight_untied"
    set_attr_value(gm, target, get_attr_value(gm, match.weight.target), as_parameter=True)
    with gm.graph.inserting_before(match.transpose or match.node):
        own = gm.graph.get_attr(target)
    own.meta.update(match.weight.meta)
    (match.transpose or match.node).replace_input_with(match.weight, own)
    return own


def _norm_parameters(gm: fx.GraphModule, root: fx.Node, width: int) -> list[str] | None:
    """get_attr targets of the norm producing `root` whose values scale its output channels."""
    if root.op != "call_function":
        return None
    if root.target == aten.mul.Tensor:
        params = [a for a in root.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        if len(params) == 1 and tuple(get_attr_value(gm, params[0].target).shape) == (width,):
            return [params[0].target]
    if root.target == aten.layer_norm.default:
        weight, bias = (list(root.args) + [None, None, None, None])[2:4]
        targets = [a.target for a in (weight, bias) if isinstance(a, fx.Node) and a.op == "get_attr"]
        if weight is not None and len(targets) == (2 if bias is not None else 1):
            return targets
    return None


def apply_input_scale(
    gm: fx.GraphModule, matches: list[LinearMatch], scale: torch.Tensor, fake_mode: FakeTensorMode
) -> str:
    """Rescale the layers' weights by `scale` [K] and their shared input by 1/scale.

    Returns where 1/scale went: "folded into <targets>" or "multiply inserted".
    """
    for match in matches:
        weight_node = _own_weight_node(gm, match)
        weight = get_attr_value(gm, weight_node.target).detach()
        # New tensors: the user's model keeps its weights.
        smoothed = weight * scale.to(weight.dtype)[:, None] if match.weight_is_kn else weight * scale.to(weight.dtype)
        set_attr_value(gm, weight_node.target, smoothed, as_parameter=True)
    root = activation_root(matches[0].x)
    layer_nodes = {m.node for m in matches}
    norm_targets = _norm_parameters(gm, root, scale.numel())
    if norm_targets is not None and _users_through_views(root) <= layer_nodes:
        for target in norm_targets:
            value = get_attr_value(gm, target).detach()
            set_attr_value(gm, target, value / scale.to(value.dtype), as_parameter=True)
        return f"folded into {', '.join(norm_targets)}"
    inverse_target = f"{matches[0].layer}.input_inverse_scale"
    x_dtype = matches[0].x.meta["val"].dtype
    inverse = (1.0 / scale).to(x_dtype)
    set_attr_value(gm, inverse_target, inverse)
    for match in matches:
        with gm.graph.inserting_before(match.node):
            inverse_node = gm.graph.get_attr(inverse_target)
            scaled = gm.graph.call_function(aten.mul.Tensor, (match.x, inverse_node))
        set_tensor_val(inverse_node, inverse, fake_mode)
        infer_val(scaled, fake_mode)
        match.node.replace_input_with(match.x, scaled)
    return "multiply inserted"
