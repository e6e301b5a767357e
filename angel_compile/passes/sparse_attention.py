"""Block-sparse causal prefill attention (pass `sparse_attention`).

Matches: `aten.scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale,
         enable_gqa)` that is causal — `is_causal=True` without a mask, or a mask proven to
         be exactly key <= query from the nodes that build it (`attention_mask.py`) — with
         q [B, Hq, S, D], k/v [B, Hkv, S, D] (as many queries as keys: prefill), D in
         {64, 128}, a float16 / bfloat16 / float32 dtype, and Hq a multiple of Hkv: through
         `enable_gqa=True`, or K/V repeated by transformers' repeat_kv
         (unsqueeze(x, 2) -> expand [B, Hkv, r, S, D] -> [clone] -> view [B, Hkv·r, S, D]).
Emits:   `angel::sparse_attention(q, k, v, scale, method, block_size, min_seq_len,
         sink_blocks, local_blocks, top_k, budget_decay, threshold)` with the unrepeated K/V
         when the repeat was recognised (the repeat and a mask nothing else uses are erased).
         The op runs dense causal attention below `min_seq_len`, so a graph captured with
         dynamic shapes is right at every length.
Leaves:  decode (one query token), attention with dropout, non-causal or unproven masks
         (padding from an `attention_mask` input, arbitrary additive masks), K/V shorter or
         longer than the queries, unsupported head dims / dtypes, and layers matching
         `exclude`; each is listed in the stats with the reason.

Options: the method and its parameters (formulas in `sparse/selection.py`), `exclude` (glob
patterns of attention-module paths kept dense) and `layer_overrides`, which maps a glob
pattern to option values for the layers it matches (the first matching pattern wins):

    passes:
      - name: sparse_attention
        options:
          method: stem
          top_k: 16
          layer_overrides: {"layers.0.*": {method: static, local_blocks: 8}}
          exclude: ["layers.1.*"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from angel_compile import meta
from angel_compile.errors import UnsupportedError
from angel_compile.ops.sparse_attention import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from angel_compile.passes.attention_mask import prove_causal
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, register_pass
from angel_compile.passes.graph_utils import copy_source_meta, fake_mode_of, infer_val
from angel_compile.passes.quantize.linear import layer_matches
from angel_compile.sparse.selection import SparseAttentionConfig

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SPARSE_ATTENTION = torch.ops.angel.sparse_attention.default
_DEFAULT = SparseAttentionConfig()
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SparseAttentionConfig))
_VIEWS = (aten._unsafe_view.default, aten.view.default, aten.reshape.default)


@register_pass
@dataclass(frozen=True)
class SparseAttention(Pass):
    """Causal prefill SDPA -> `angel::sparse_attention`; see the module docstring for the options."""

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
    layer_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config_for("")  # validates the options (ValueError naming them)
        for pattern, values in self.layer_overrides.items():
            if not isinstance(values, Mapping):
                raise ValueError(f"layer_overrides['{pattern}'] must map option names to values, got {values!r}")
            unknown = sorted(set(values) - set(_CONFIG_FIELDS))
            if unknown:
                raise ValueError(
                    f"layer_overrides['{pattern}'] has unknown option(s) {unknown}; accepted: {list(_CONFIG_FIELDS)}"
                )
            try:
                self.config_for(pattern, values)
            except ValueError as exc:
                raise ValueError(f"layer_overrides['{pattern}']: {exc}") from None

    def config_for(self, layer: str, values: Mapping[str, Any] | None = None) -> SparseAttentionConfig:
        """The parameters for a layer: the pass's options, then its first matching override."""
        if values is None:
            values = next((v for p, v in self.layer_overrides.items() if layer_matches(layer, (p,))), {})
        base = {name: getattr(self, name) for name in _CONFIG_FIELDS}
        config = SparseAttentionConfig(**{**base, **values})
        if config.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size={config.block_size} must be one of the kernel's {SUPPORTED_BLOCK_SIZES}")
        return config

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = PassStats()
        fake_mode = fake_mode_of(gm)
        methods: dict[str, int] = {}
        for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]:
            layer = _layer_of(node)
            match = _match(node)
            if isinstance(match, str):
                stats.skip(node, f"layer '{layer}': {match}")
                continue
            stats.matched += 1
            pattern = layer_matches(layer, self.exclude)
            if pattern:
                stats.skip(node, f"layer '{layer}': excluded by pattern '{pattern}'")
                continue
            config = self.config_for(layer)
            _rewrite(gm, node, match, config, fake_mode, self.name, layer)
            methods[config.method] = methods.get(config.method, 0) + 1
            stats.rewritten += 1
        if stats.matched == 0 and ctx.whole_model and not _has_sparse_attention(gm):
            seen = "; ".join(f"{node}: {why}" for node, why in stats.skipped.items()) or "none found"
            raise UnsupportedError(
                f"{self.name}: the graph has no causal prefill attention to make sparse (looked for {SDPA}); "
                f"attention nodes seen: {seen}"
            )
        if stats.rewritten:
            gm.graph.lint()
            gm.recompile()
        stats.details = {"methods": methods}
        return PassResult(gm, stats.rewritten > 0, stats)


@dataclass(frozen=True)
class _Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    dead_candidates: tuple[fx.Node, ...]  # the mask and K/V repeats, erased if the rewrite leaves them unused


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _match(node: fx.Node) -> _Match | str:
    """The rewrite's inputs for a causal prefill SDPA node, or why it stays dense."""
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask", None)
    if _arg(node, 4, "dropout_p", 0.0) != 0.0:
        return "attention with dropout"
    qv, kv, vv = (n.meta.get(meta.VAL) for n in (q, k, v))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
        return "q, k, v are not 4-D [B, H, S, D] tensors"
    if statically_known_true(qv.shape[2] == 1):
        return "decode (one query token): stays dense"
    if not statically_known_true(qv.shape[2] == kv.shape[2]):
        return f"queries ({qv.shape[2]}) and keys ({kv.shape[2]}) differ in length: not a causal prefill"
    head_dim = qv.shape[3]
    if head_dim not in SUPPORTED_HEAD_DIMS or vv.shape[3] != head_dim:
        return f"head dim {head_dim} (v: {vv.shape[3]}) is not supported by the kernel {SUPPORTED_HEAD_DIMS}"
    if qv.dtype not in SUPPORTED_DTYPES or kv.dtype != qv.dtype or vv.dtype != qv.dtype:
        return f"dtype {qv.dtype} is not supported by the kernel {SUPPORTED_DTYPES}"
    if mask is None:
        if not _arg(node, 5, "is_causal", False):
            return "not causal (no mask and is_causal=False)"
    else:
        reason = prove_causal(mask)
        if reason:
            return reason
    scale = _arg(node, 6, "scale", None)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    k_source, k_repeat = _unrepeated(k)
    v_source, v_repeat = _unrepeated(v)
    heads, kv_heads = qv.shape[1], k_source.meta[meta.VAL].shape[1]
    if heads % kv_heads or v_source.meta[meta.VAL].shape[1] != kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} key/value heads"
    dead = tuple(n for n in (*k_repeat, *v_repeat, mask) if isinstance(n, fx.Node))
    return _Match(q, k_source, v_source, scale, dead)


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
    node: fx.Node,
    match: _Match,
    config: SparseAttentionConfig,
    fake_mode: Any,
    pass_name: str,
    layer: str,
) -> None:
    args = (match.q, match.k, match.v, match.scale, *(getattr(config, f) for f in _CONFIG_FIELDS))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(SPARSE_ATTENTION, args)
    infer_val(new, fake_mode)
    copy_source_meta(new, node, pass_name, layer)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    _erase_dead(gm, match.dead_candidates)


def _erase_dead(gm: fx.GraphModule, roots: tuple[fx.Node, ...]) -> None:
    """Erase roots and their inputs once nothing but metadata assertions uses them.

    torch.export checks intermediate dtypes with `_assert_tensor_metadata` nodes; they are
    side-effectful for fx's dead-code elimination, so they would keep an unused mask alive.
    """
    pending = list(roots)
    while pending:
        node = pending.pop()
        if node.graph is not gm.graph or node.op != "call_function" or node.target == SDPA:
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
