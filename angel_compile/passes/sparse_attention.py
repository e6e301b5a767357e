"""Block-sparse causal prefill attention (pass `sparse_attention`).

Matches two forms of causal prefill attention, reading `meta["val"]` for shapes and dtypes:
  - `aten.scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale,
    enable_gqa)` (transformers' "sdpa" attention);
  - the eager pattern (transformers' "eager" attention):
        matmul(q, transpose(k, 2, 3)) -> mul / div by a constant (the scale) -> add(mask)
        -> softmax(dim=-1) [-> to(dtype)] [-> dropout(p=0) / clone] -> matmul(·, v)
    whose attention weights nothing else reads.
  Both must be causal — `is_causal=True` without a mask, or a mask proven to be exactly
  key <= query from the nodes that build it (`attention_mask.py`) — with q [B, Hq, S, D],
  k/v [B, Hkv, S, D] (as many queries as keys: prefill), D in {64, 128}, a float16 / bfloat16
  / float32 dtype, and Hq a multiple of Hkv: through `enable_gqa=True`, or K/V repeated by
  transformers' repeat_kv (unsqueeze(x, 2) -> expand [B, Hkv, r, S, D] -> [clone] -> view
  [B, Hkv·r, S, D]).
Emits:   `angel::sparse_attention(q, k, v, scale, method, block_size, min_seq_len,
         sink_blocks, local_blocks, top_k, budget_decay, threshold)` with the unrepeated K/V
         when the repeat was recognised; the attention nodes, the repeat and a mask nothing
         else uses are erased. The op runs dense causal attention below `min_seq_len`, so a
         graph captured with dynamic shapes is right at every length. When the overrides
         give a layer's heads different parameters, each run of consecutive heads with the
         same parameters gets its own op on a slice of the heads (heads overridden to
         "dense" get the op with min_seq_len = DENSE_MIN_SEQ_LEN: always dense), and the
         outputs are concatenated back in head order.
Leaves:  decode (one query token), attention with dropout, non-causal or unproven masks
         (padding from an `attention_mask` input, arbitrary additive masks), K/V shorter or
         longer than the queries, unsupported head dims / dtypes, layers matching `exclude`
         and layers whose every head the overrides make dense; each is listed in the stats
         with the reason.

Options: the method and its parameters (formulas in `sparse/selection.py`), `exclude` (glob
patterns of attention-module paths kept dense) and `overrides`, per-layer and per-head
parameters (schema in `sparse/overrides.py`):

    passes:
      - name: sparse_attention
        options:
          method: stem
          top_k: 16
          exclude: ["layers.5.*"]
          overrides:
            - {layers: "0-1", method: dense}
            - {layers: "*", heads: [0, 1], local_blocks: 8}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from angel_compile import meta
from angel_compile.errors import UnsupportedError
from angel_compile.ops.sparse_attention import SUPPORTED_BLOCK_SIZES, kernel_unsupported
from angel_compile.passes.attention_mask import prove_causal
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, register_pass
from angel_compile.passes.graph_utils import copy_source_meta, fake_mode_of, infer_val
from angel_compile.passes.quantize.linear import layer_matches
from angel_compile.sparse.overrides import PARAMETERS, config_of, head_values, layer_index, parse_overrides
from angel_compile.sparse.selection import SparseAttentionConfig

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SPARSE_ATTENTION = torch.ops.angel.sparse_attention.default
SOFTMAX = (aten.softmax.int, aten._softmax.default)
# min_seq_len of heads the overrides make dense: no sequence reaches it, so the op is dense causal attention.
DENSE_MIN_SEQ_LEN = 2**31 - 1
_DEFAULT = SparseAttentionConfig()
_VIEWS = (aten._unsafe_view.default, aten.view.default, aten.reshape.default)
# between softmax and the value matmul in eager attention: dtype casts and dropout in eval mode
_PASS_THROUGH = (aten._to_copy.default, aten.clone.default, aten.alias.default, aten.to.dtype)
_DROPOUT = (aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default)


@register_pass
@dataclass(frozen=True)
class SparseAttention(Pass):
    """Causal prefill attention -> `angel::sparse_attention`; see the module docstring for the options."""

    name: ClassVar[str] = "sparse_attention"
    method: str = _DEFAULT.method
    block_size: int = _DEFAULT.block_size
    min_seq_len: int = _DEFAULT.min_seq_len
    sink_blocks: int = _DEFAULT.sink_blocks
    local_blocks: int = _DEFAULT.local_blocks
    top_k: int = _DEFAULT.top_k
    budget_decay: float = _DEFAULT.budget_decay
    threshold: float = _DEFAULT.threshold
    exclude: tuple[str, ...] = ()
    overrides: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        base = self.options()
        _kernel_config(base)  # ValueError naming the option
        for position, override in enumerate(parse_overrides(self.overrides, base)):
            try:
                _kernel_config({**base, **override.values})
            except ValueError as exc:
                raise ValueError(f"overrides[{position}]: {exc}") from None

    def options(self) -> dict[str, Any]:
        """The pass's own parameter values (before overrides)."""
        return {name: getattr(self, name) for name in PARAMETERS}

    def head_configs(self, layer: str, heads: int) -> list[SparseAttentionConfig | None]:
        """The config of each query head of the attention module at path `layer` (None: dense)."""
        base = self.options()
        per_head = head_values(parse_overrides(self.overrides, base), base, layer_index(layer), heads)
        return [_kernel_config(values) for values in per_head]

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = PassStats()
        fake_mode = fake_mode_of(gm)
        methods: dict[str, int] = {}
        candidates = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (SDPA, *SOFTMAX)]
        for node in candidates:
            layer = _layer_of(node)
            match = _match_sdpa(node) if node.target == SDPA else _match_eager(node)
            if isinstance(match, str):
                stats.skip(node, f"layer '{layer}': {match}")
                continue
            stats.matched += 1
            pattern = layer_matches(layer, self.exclude)
            if pattern:
                stats.skip(node, f"layer '{layer}': excluded by pattern '{pattern}'")
                continue
            try:
                configs = self.head_configs(layer, match.heads)
            except ValueError as exc:
                raise UnsupportedError(f"{self.name}: layer '{layer}': {exc}") from None
            if all(config is None for config in configs):
                stats.skip(node, f"layer '{layer}': every head is dense by the overrides")
                continue
            for config in configs:
                method = "dense" if config is None else config.method
                methods[method] = methods.get(method, 0) + 1
            _rewrite(gm, match, configs, fake_mode, self.name, layer)
            stats.rewritten += 1
        if stats.matched == 0 and ctx.whole_model and not _has_sparse_attention(gm):
            seen = "; ".join(f"{node}: {why}" for node, why in stats.skipped.items()) or "none found"
            raise UnsupportedError(
                f"{self.name}: the graph has no causal prefill attention to make sparse (looked for {SDPA} "
                f"and eager matmul -> softmax -> matmul); attention nodes seen: {seen}"
            )
        if stats.rewritten:
            gm.graph.lint()
            gm.recompile()
        stats.details = {"heads_by_method": methods}
        return PassResult(gm, stats.rewritten > 0, stats)


def _kernel_config(values: Mapping[str, Any]) -> SparseAttentionConfig | None:
    config = config_of(values)
    block_size = values.get("block_size", _DEFAULT.block_size)
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} must be one of the kernel's {SUPPORTED_BLOCK_SIZES}")
    return config


@dataclass(frozen=True)
class _Match:
    output: fx.Node  # the node whose uses the op takes over (SDPA, or eager's value matmul)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    heads: int
    dead_candidates: tuple[fx.Node, ...]  # erased if the rewrite leaves them unused


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node) -> str | None:
    """Why q, k, v [B, H, S, D] are not a causal prefill the kernel takes, or None."""
    qv, kv, vv = (n.meta.get(meta.VAL) for n in (q, k, v))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
        return "q, k, v are not 4-D [B, H, S, D] tensors"
    if statically_known_true(qv.shape[2] == 1):
        return "decode (one query token): stays dense"
    if not statically_known_true(qv.shape[2] == kv.shape[2]):
        return f"queries ({qv.shape[2]}) and keys ({kv.shape[2]}) differ in length: not a causal prefill"
    head_dim = qv.shape[3]
    if vv.shape[3] != head_dim:
        return f"v's head dim {vv.shape[3]} differs from q's {head_dim}: not supported by the kernel"
    if kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return f"q, k, v dtypes differ ({qv.dtype}, {kv.dtype}, {vv.dtype}): not supported by the kernel"
    reason = kernel_unsupported(head_dim, qv.dtype)  # the block size was checked with the options
    if reason:
        return reason
    if not isinstance(qv.shape[1], int):
        return f"the number of query heads ({qv.shape[1]}) is not static"
    return None


def _finish_match(
    output: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, scale: float, dead: tuple[Any, ...]
) -> _Match | str:
    """The match once causality is established: K/V unrepeated, heads checked."""
    k_source, k_repeat = _unrepeated(k)
    v_source, v_repeat = _unrepeated(v)
    heads, kv_heads = q.meta[meta.VAL].shape[1], k_source.meta[meta.VAL].shape[1]
    if heads % kv_heads or v_source.meta[meta.VAL].shape[1] != kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    dead_nodes = tuple(n for n in (*dead, *k_repeat, *v_repeat) if isinstance(n, fx.Node))
    return _Match(output, q, k_source, v_source, scale, heads, dead_nodes)


def _match_sdpa(node: fx.Node) -> _Match | str:
    """The rewrite's inputs for a causal prefill SDPA node, or why it stays dense."""
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask", None)
    if _arg(node, 4, "dropout_p", 0.0) != 0.0:
        return "attention with dropout"
    reason = _check_qkv(q, k, v)
    if reason:
        return reason
    if mask is None:
        if not _arg(node, 5, "is_causal", False):
            return "not causal (no mask and is_causal=False)"
    else:
        reason = prove_causal(mask)
        if reason:
            return reason
    scale = _arg(node, 6, "scale", None)
    scale = 1.0 / math.sqrt(q.meta[meta.VAL].shape[3]) if scale is None else float(scale)
    return _finish_match(node, q, k, v, scale, (mask,))


def _match_eager(softmax: fx.Node) -> _Match | str:
    """The rewrite's inputs for eager attention around this softmax, or why it stays dense."""
    scores = softmax.args[0]
    rank = scores.meta[meta.VAL].dim() if isinstance(scores.meta.get(meta.VAL), torch.Tensor) else 0
    if rank != 4 or softmax.args[1] not in (-1, 3):
        return "softmax is not over the last dim of a 4-D score tensor (not attention)"
    # forward: softmax -> casts / dropout in eval mode -> matmul with the values
    weights = softmax
    while len(users := _real_users(weights)) == 1:
        (user,) = users
        if user.target in _DROPOUT:
            if _arg(user, 1, "p", 0.0) != 0.0 and _arg(user, 2, "train", True) is not False:
                return "attention with dropout"
        elif user.target not in _PASS_THROUGH:
            break
        weights = user
    if len(users) != 1 or users[0].target != aten.matmul.default or users[0].args[0] is not weights:
        return "softmax is not followed by one matmul with the values (or its weights are used elsewhere)"
    output = users[0]
    v = output.args[1]
    # backward: softmax <- add(mask) <- mul / div by the scale <- matmul(q, kᵀ)
    mask = None
    if scores.op == "call_function" and scores.target == aten.add.Tensor:
        left, right = scores.args[:2]
        scores, mask = (left, right) if _scaled_scores(left) is not None else (right, left)
    scaled = _scaled_scores(scores)
    if scaled is None:
        return "softmax input is not (q @ kᵀ) · scale [+ mask] (not attention)"
    q, k, scale = scaled
    if not isinstance(mask, fx.Node):
        return "not causal (no mask added to the scores)"
    reason = _check_qkv(q, k, v)
    if reason:
        return reason
    reason = prove_causal(mask)
    if reason:
        return reason
    return _finish_match(output, q, k, v, scale, (weights, mask))


def _real_users(node: fx.Node) -> list[fx.Node]:
    """The users of node other than torch.export's dtype assertions."""
    return [user for user in node.users if user.target != aten._assert_tensor_metadata.default]


def _scaled_scores(node: Any) -> tuple[fx.Node, fx.Node, float] | None:
    """(q, k, scale) if node is matmul(q, transpose(k, -2, -1)) times / over a constant, else None."""
    scale = 1.0
    if isinstance(node, fx.Node) and node.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor):
        left, right = node.args[:2]
        if node.target == aten.div.Tensor:
            if not isinstance(right, int | float):
                return None
            scale, node = 1.0 / right, left
        elif isinstance(right, int | float):
            scale, node = float(right), left
        elif isinstance(left, int | float):
            scale, node = float(left), right
        else:
            return None
    if not isinstance(node, fx.Node) or node.target != aten.matmul.default:
        return None
    q, key_t = node.args[:2]
    if not (isinstance(key_t, fx.Node) and key_t.target == aten.transpose.int):
        return None
    if {d % 4 for d in key_t.args[1:3]} != {2, 3}:
        return None
    return q, key_t.args[0], scale


def _unrepeated(kv: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """(x, repeat nodes) if kv is repeat_kv(x): view(clone?(expand(unsqueeze(x, 2)))); else (kv, ())."""
    chain = []
    node = kv
    if node.op != "call_function" or node.target not in _VIEWS:
        return kv, ()
    chain.append(node)
    node = node.args[0]
    if node.op == "call_function" and node.target == aten.clone.default:
        chain.append(node)
        node = node.args[0]
    if node.op != "call_function" or node.target != aten.expand.default:
        return kv, ()
    chain.append(node)
    node = node.args[0]
    if node.op != "call_function" or node.target != aten.unsqueeze.default or node.args[1] != 2:
        return kv, ()
    chain.append(node)
    source = node.args[0]
    src, expanded, out = source.meta.get(meta.VAL), chain[-2].meta.get(meta.VAL), kv.meta.get(meta.VAL)
    if src is None or src.dim() != 4 or expanded is None or expanded.dim() != 5:
        return kv, ()
    repeats = expanded.shape[2]
    same = [(expanded.shape[0], src.shape[0]), (expanded.shape[1], src.shape[1]), (expanded.shape[3], src.shape[2])]
    same += [(expanded.shape[4], src.shape[3]), (out.shape[1], src.shape[1] * repeats), (out.shape[2], src.shape[2])]
    if not all(statically_known_true(a == b) for a, b in same):
        return kv, ()
    return source, tuple(chain)


def _rewrite(
    gm: fx.GraphModule,
    match: _Match,
    configs: list[SparseAttentionConfig | None],
    fake_mode: Any,
    pass_name: str,
    layer: str,
) -> None:
    """Replace match.output by the op (one per run of heads with equal parameters), erase what is dead."""
    graph, output = gm.graph, match.output

    def call(target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with graph.inserting_before(output):
            node = graph.call_function(target, args, kwargs)
        infer_val(node, fake_mode)
        copy_source_meta(node, output, pass_name, layer)
        return node

    def attention(q: fx.Node, k: fx.Node, v: fx.Node, config: SparseAttentionConfig | None) -> fx.Node:
        parameters = dataclasses.replace(_DEFAULT, min_seq_len=DENSE_MIN_SEQ_LEN) if config is None else config
        return call(SPARSE_ATTENTION, q, k, v, match.scale, *(getattr(parameters, f) for f in PARAMETERS))

    runs = _runs(configs)
    if len(runs) == 1:
        new = attention(match.q, match.k, match.v, configs[0])
    else:
        group = match.heads // match.k.meta[meta.VAL].shape[1]
        pieces = []
        for start, end in runs:
            q = call(aten.slice.Tensor, match.q, 1, start, end)
            if start % group == 0 and end % group == 0:  # whole GQA groups: K/V stay shared
                k, v = (call(aten.slice.Tensor, x, 1, start // group, end // group) for x in (match.k, match.v))
            else:  # a run that splits a group reads its own copy of the K/V heads
                low, high = start // group, (end - 1) // group + 1
                k, v = (
                    call(
                        aten.slice.Tensor,
                        call(aten.repeat_interleave.self_int, call(aten.slice.Tensor, x, 1, low, high), group, 1),
                        1,
                        start - low * group,
                        end - low * group,
                    )  # fmt: skip
                    for x in (match.k, match.v)
                )
            pieces.append(call(aten.transpose.int, attention(q, k, v, configs[start]), 1, 2))  # [B, S, h, D]
        # concatenated as [B, S, H, D] and viewed [B, H, S, D]: the layout SDPA's output has
        new = call(aten.transpose.int, call(aten.cat.default, pieces, 2), 1, 2)
    if any(user.target in _VIEWS for user in output.users) and not _same_strides(new, output):
        # contiguous, like the eager matmul output that a view reads
        new = call(aten.clone.default, new, memory_format=torch.contiguous_format)
    output.replace_all_uses_with(new)
    graph.erase_node(output)
    _erase_dead(gm, match.dead_candidates)


def _runs(configs: list[SparseAttentionConfig | None]) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive heads with equal configs."""
    starts = [h for h in range(len(configs)) if h == 0 or configs[h] != configs[h - 1]]
    return list(zip(starts, [*starts[1:], len(configs)], strict=True))


def _same_strides(a: fx.Node, b: fx.Node) -> bool:
    return a.meta[meta.VAL].stride() == b.meta[meta.VAL].stride()


def _erase_dead(gm: fx.GraphModule, roots: tuple[fx.Node, ...]) -> None:
    """Erase roots and their inputs once nothing but metadata assertions uses them.

    torch.export checks intermediate dtypes with `_assert_tensor_metadata` nodes; they are
    side-effectful for fx's dead-code elimination, so they would keep an unused mask alive.
    """
    pending = list(roots)
    while pending:
        node = pending.pop()
        if node._erased or node.op != "call_function" or node.target == SDPA:
            continue
        users = list(node.users)
        if any(u.target != aten._assert_tensor_metadata.default for u in users):
            continue
        for user in users:
            gm.graph.erase_node(user)
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        pending.extend(inputs)


def _layer_of(node: fx.Node) -> str:
    stack = node.meta.get(meta.NN_MODULE_STACK) or {}
    return list(stack.values())[-1][0] if stack else node.name


def _has_sparse_attention(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target == SPARSE_ATTENTION for n in gm.graph.nodes)
