"""Visual / audio token pruning where the modality features enter the language model (pass `token_pruning`).

Matches: the merge of projected image/audio features into the text embeddings, before the
         first decoder layer: `aten.masked_scatter(embeds [B, S, D], mask [B, S, 1|D], features)`
         or `aten.index_put(embeds, [mask bool [B, S]], features)` (transformers' LLaVA,
         Qwen2-VL, Qwen2-Audio, ...), or `aten.cat([..., features [B, N, D], ...], dim=1)` of
         token-embedding pieces (`aten.embedding` outputs, through views, casts and scaling) and
         exactly one other piece, the features (BLIP-2-style prefixes); its mask is built in the
         graph. With several merges (image then video) the last one is pruned and the earlier
         modality's tokens count as text.
Emits:   `angel::prune_tokens(merged, mask [B, S], N, keep, method, lambda_, merge_threshold,
         seed)` right after the merge (N modality tokens per sample, keep = ceil((1 − ratio)·N)
         or `budget`), whose pruned embeddings replace the merge for everything downstream.
         The rest of the graph follows the shorter sequence S' = S − N + keep: every tensor
         that crosses from the merge's inputs to the rest of the graph with a sequence
         dimension laid out [..., B, S, ...] (input ids, position ids — also Qwen2-VL's
         [3, B, S] mRoPE ids, gathered along S for all three axes —, the attention mask) is
         gathered with the op's kept positions, and every use of the sequence length there
         reads S' (`sym_size` of the pruned embeddings). Kept tokens keep their original
         position ids; the causal mask and cache sizes follow S'.
Needs:   a graph captured with a dynamic sequence dimension (torch.export `Dim`), so that S'
         is the symbolic expression S − N + keep and one graph serves every text length; a
         static capture has its length baked into view/arange arguments and is rejected.
         N = numel(features) / (B·D) may be symbolic too (a dynamic image/audio dimension):
         the graph then computes N and keep = `kept_count(N, ratio)` (integer arithmetic) from
         the features' size, and one graph serves any image count and size; a budget that may
         exceed N is checked when the graph runs. The batch size is static. Position ids are
         kept when they exist before the merge (graph inputs, as transformers' VLMs take them);
         ids a model makes after the merge from the length (arange(S)) become arange(S'). For
         Qwen2-VL the vision tower and `get_rope_index` cannot be captured and run before the
         graph, which starts at the image embeddings (tested on transformers' Qwen2-VL,
         `models/multimodal.py`).

Options: ratio ∈ [0, 1) (or budget ≥ 1 kept tokens, which wins), method (mmr, diversity,
topk, stride, random; see ops/prune_tokens.py), lambda_ (MMR's importance weight, recipe key
`lambda`), modality (vision; audio merges adjacent tokens whose cosine similarity exceeds
merge_threshold before pruning), seed (random):

    passes:
      - name: token_pruning
        options: {ratio: 0.75, method: mmr, lambda: 0.5, modality: vision}
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from angel_compile import meta
from angel_compile.errors import UnsupportedError
from angel_compile.ops.prune_tokens import METHODS, IntLike, kept_count
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, register_pass
from angel_compile.passes.graph_utils import copy_source_meta, fake_mode_of, infer_val

aten = torch.ops.aten
PRUNE_TOKENS = torch.ops.angel.prune_tokens.default
MERGES = (aten.masked_scatter.default, aten.index_put.default, aten.cat.default)
# Ops a token-embedding piece of a concatenation may pass through after `aten.embedding` (first argument).
_EMBEDDING_PASS_THROUGH = (
    aten.slice.Tensor,
    aten.view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.expand.default,
    aten.clone.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.mul.Tensor,
)
MODALITIES = ("vision", "audio")
# Nodes that only check metadata: they may stay on the full-length tensors.
_ASSERTS = (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
)
_SEARCHED = (
    "aten.masked_scatter(embeds [B, S, D], mask [B, S, 1 or D], features), "
    "aten.index_put(embeds [B, S, D], [bool mask [B, S]], features) or "
    "aten.cat([token embeddings..., features [B, N, D], token embeddings...], dim=1)"
)


@register_pass
@dataclass(frozen=True)
class TokenPruning(Pass):
    """Prune modality tokens right after their merge into the embeddings; see the module docstring."""

    name: ClassVar[str] = "token_pruning"
    ratio: float = 0.75
    method: str = "mmr"
    lambda_: float = 0.5
    modality: str = "vision"
    merge_threshold: float = 0.9
    budget: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio={self.ratio} must be in [0, 1) (the fraction of modality tokens pruned)")
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not supported; supported: {list(METHODS)}")
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda={self.lambda_} must be in [0, 1]")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality '{self.modality}' is not supported; supported: {list(MODALITIES)}")
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"merge_threshold={self.merge_threshold} must be a cosine similarity in [-1, 1]")
        if self.budget < 0:
            raise ValueError(f"budget={self.budget} must be >= 1 kept tokens (0: use ratio)")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = PassStats()
        if any(n.op == "call_function" and n.target == PRUNE_TOKENS for n in gm.graph.nodes):
            stats.details = {"note": "the graph already prunes tokens"}
            return PassResult(gm, False, stats)
        merges = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MERGES and _may_merge(n)]
        matches = []
        for node in merges:
            match = _match(node)
            if isinstance(match, str):
                stats.skip(node, match)
            else:
                matches.append(match)
        if not matches:
            seen = "; ".join(f"{node}: {why}" for node, why in stats.skipped.items()) or "no such node"
            raise UnsupportedError(
                f"{self.name}: found no point where {self.modality} features are merged into the text embeddings; "
                f"searched for {_SEARCHED} (torch.where merges are not supported); seen: {seen}"
            )
        stats.matched = len(matches)
        merge, token_mask, features, num_tokens = matches[-1]
        for node, *_ in matches[:-1]:
            stats.skip(node, "an earlier merge: its tokens are kept as text (the last merge is pruned)")
        keep = self.budget or kept_count(num_tokens, self.ratio)
        if statically_known_true(keep > num_tokens):
            raise UnsupportedError(
                f"{self.name}: budget={keep} exceeds the {num_tokens} {self.modality} tokens per sample merged at "
                f"'{merge.name}'"
            )
        seq = merge.meta[meta.VAL].shape[1]
        if isinstance(seq, int):
            raise UnsupportedError(
                f"{self.name}: the sequence length of '{merge.name}' is static ({seq}); capture with a dynamic "
                "sequence dimension (e.g. dynamic_shapes={'input_ids': {1: Dim('seq')}, ...}) so that the graph "
                "can follow the pruned length"
            )
        threshold = self.merge_threshold if self.modality == "audio" else 1.0
        options = (self.method, self.lambda_, threshold, self.seed)
        _rewrite(gm, merge, token_mask, features, (num_tokens, keep, self.budget, self.ratio), options, self.name)
        stats.rewritten = 1
        stats.details = {
            "merge": merge.name,
            "modality_tokens": num_tokens if isinstance(num_tokens, int) else str(num_tokens),
            "kept": keep if isinstance(keep, int) else str(keep),
            "sequence": f"{seq} - {num_tokens - keep}" if isinstance(num_tokens, int) else str(seq - num_tokens + keep),
            "method": self.method,
        }
        if not isinstance(num_tokens, int) and self.budget:
            stats.details["note"] = f"budget={keep} <= {num_tokens} is checked when the graph runs"
        return PassResult(gm, True, stats)


def _may_merge(node: fx.Node) -> bool:
    """Concatenations other than along the sequence of [B, S, D] values (rotary halves, caches) are no merges."""
    if node.target != aten.cat.default:
        return True
    val = node.meta.get(meta.VAL)
    axis = node.args[1] if len(node.args) > 1 else 0
    return isinstance(val, torch.Tensor) and val.dim() == 3 and axis in (1, -2)


def _is_token_embedding(piece: Any) -> bool:
    """Whether a piece of a concatenation is a lookup of token embeddings (through views, casts, scaling)."""
    while isinstance(piece, fx.Node) and piece.op == "call_function":
        if piece.target == aten.embedding.default:
            return True
        if piece.target not in _EMBEDDING_PASS_THROUGH:
            return False
        piece = piece.args[0]
    return False


def _match(node: fx.Node) -> tuple[fx.Node, fx.Node | None, fx.Node, int | torch.SymInt] | str:
    """(merge, token-mask source (None: a concatenation), features, modality tokens per sample), or why not."""
    val = node.meta.get(meta.VAL)
    if not isinstance(val, torch.Tensor) or val.dim() != 3 or not val.dtype.is_floating_point:
        return "not a floating-point [B, S, D] embedding sequence"
    batch, _, dim = val.shape
    if not isinstance(batch, int) or not isinstance(dim, int):
        return "dynamic batch or hidden size (only the sequence and the modality token count may be dynamic)"
    if node.target == aten.cat.default:
        pieces = node.args[0]
        features = [p for p in pieces if not _is_token_embedding(p)]
        if len(features) != 1:
            return f"a concatenation of {len(features)} pieces that are not token embeddings (the features: one)"
        mask, features = None, features[0]
        if not isinstance(features, fx.Node) or features.meta[meta.VAL].dim() != 3:
            return "the concatenated features are not a [B, N, D] graph value"
    elif not isinstance(node.args[0], fx.Node) or not isinstance(node.args[2], fx.Node):
        return "embeddings or features are not graph values"
    elif node.target == aten.masked_scatter.default:
        mask, features = node.args[1], node.args[2]
        mask_val = mask.meta.get(meta.VAL)
        if mask_val is None or mask_val.dim() != 3 or mask_val.dtype != torch.bool:
            return "masked_scatter mask is not a bool [B, S, 1 or D] tensor"
    else:
        indices, features = node.args[1], node.args[2]
        if len(indices) != 1 or not isinstance(indices[0], fx.Node):
            return "index_put with more than one index tensor"
        mask = indices[0]
        mask_val = mask.meta.get(meta.VAL)
        if mask_val is None or mask_val.dim() != 2 or mask_val.dtype != torch.bool:
            return "index_put index is not a bool [B, S] mask"
    total = features.meta[meta.VAL].numel()
    if isinstance(total, int) and total % (batch * dim):
        return f"the merged features ({features.meta[meta.VAL].shape}) are not a whole number of tokens per sample"
    # A symbolic count (a dynamic image/audio dimension) that is not a whole number of tokens
    # per sample fails the op's own check of the mask's counts when the graph runs.
    return node, mask, features, total // (batch * dim)


def _rewrite(
    gm: fx.GraphModule,
    merge: fx.Node,
    mask: fx.Node | None,
    features: fx.Node,
    sizes: tuple[IntLike, IntLike, int, float],
    options: tuple[Any, ...],
    pass_name: str,
) -> None:
    """Insert the op after the merge and make everything downstream follow the pruned sequence.

    sizes: (modality tokens per sample, kept tokens, budget, ratio); the first two may be symbolic.
    """
    graph = gm.graph
    fake_mode = fake_mode_of(gm)
    merge_val = merge.meta[meta.VAL]
    batch, seq, dim = merge_val.shape
    # Values of the full-length world: what the merge is computed from, and checks (nodes the
    # output does not depend on, e.g. transformers' image-token count check on the input ids).
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live = _ancestors(output)
    upstream = _ancestors(merge) | {n for n in graph.nodes if n not in live}
    layer = "token_pruning"
    with graph.inserting_before(merge.next):  # inserting_before keeps the nodes in creation order
        created, num_tokens, keep = _count_args(graph, features, batch * dim, *sizes)
        if mask is None:  # a concatenation: True over the features' span
            created += _concat_mask(graph, merge, features)
            token_mask = created[-1]
        elif mask.meta[meta.VAL].dim() == 3:
            token_mask = graph.call_function(aten.select.int, (mask, 2, 0))
            created.append(token_mask)
        else:
            token_mask = mask
        prune = graph.call_function(PRUNE_TOKENS, (merge, token_mask, num_tokens, keep, *options))
        pruned = graph.call_function(operator.getitem, (prune, 0))
        positions = graph.call_function(operator.getitem, (prune, 1))
        length = graph.call_function(aten.sym_size.int, (pruned, 1))
    created += [prune, pruned, positions, length]
    for node in created:
        infer_val(node, fake_mode)
        copy_source_meta(node, merge, pass_name, layer)
    new_nodes = set(created)
    with graph.inserting_after(length):
        batch_index = graph.call_function(aten.arange.default, (batch,), {"device": merge_val.device})
    with graph.inserting_after(batch_index):
        batch_index_2d = graph.call_function(aten.unsqueeze.default, (batch_index, 1))
    new_nodes |= {batch_index, batch_index_2d}
    for node in (batch_index, batch_index_2d):
        infer_val(node, fake_mode)
    anchor = batch_index_2d
    # Every value computed before the merge that the rest of the graph uses is re-expressed at
    # the pruned length: the merge itself, tensors with a sequence dimension, the length itself
    # (also where it is computed outside the merge's inputs, e.g. text + features of a concatenation).
    frontier = [n for n in graph.nodes if n in upstream or n.op in ("placeholder", "get_attr")]
    frontier += [n for n in graph.nodes if n not in upstream and _is_length(n, seq) and merge not in _ancestors(n)]
    for source in frontier:
        users = [u for u in source.users if u not in upstream and u not in new_nodes and not _is_check(u, upstream)]
        if not users:
            continue
        if source is merge:
            replacement = pruned
        else:
            replacement = _shortened(graph, source, seq, positions, batch_index_2d, length, anchor, fake_mode)
            if replacement is None:
                continue
            if replacement is not length:
                new_nodes.add(replacement)
                anchor = replacement
        for user in users:
            user.replace_input_with(source, replacement)
    _move_after(graph, merge, upstream, anchor)
    _reinfer_downstream(graph, upstream | new_nodes, fake_mode)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


def _concat_mask(graph: fx.Graph, merge: fx.Node, features: fx.Node) -> list[fx.Node]:
    """Nodes building the bool [B, S] mask of a concatenation's features span; the last one is the mask."""
    nodes, pieces = [], []
    for piece in merge.args[0]:
        first = graph.call_function(aten.select.int, (piece, 2, 0))  # [B, s_i]
        pieces.append(graph.call_function(aten.full_like.default, (first, piece is features), {"dtype": torch.bool}))
        nodes += [first, pieces[-1]]
    return [*nodes, graph.call_function(aten.cat.default, (pieces, 1))]


def _count_args(
    graph: fx.Graph, features: fx.Node, per_sample: int, num_tokens: IntLike, keep: IntLike, budget: int, ratio: float
) -> tuple[list[fx.Node], Any, Any]:
    """([new nodes], num_tokens, keep) as the op's arguments: ints, or nodes computing them when N is symbolic.

    With a dynamic image/audio dimension N = numel(features) / (B·D) is an expression of the
    graph's symbols, and keep is the budget or a `kept_count` node: the one definition of k, run
    on the graph's N (integer arithmetic, so torch.export traces it into symbolic ops).
    """
    if isinstance(num_tokens, int):
        return [], num_tokens, keep
    numel = graph.call_function(aten.sym_numel.default, (features,))
    count = graph.call_function(operator.floordiv, (numel, per_sample))
    if budget:
        return [numel, count], count, budget
    keep_node = graph.call_function(kept_count, (count, ratio))
    return [numel, count, keep_node], count, keep_node


def _shortened(
    graph: fx.Graph,
    source: fx.Node,
    seq: torch.SymInt,
    positions: fx.Node,
    batch_index: fx.Node,
    length: fx.Node,
    anchor: fx.Node,
    fake_mode: Any,
) -> fx.Node | None:
    """The pruned-length version of a value crossing from before the merge, or None if it has no sequence dim."""
    val = source.meta.get(meta.VAL)
    if isinstance(val, torch.SymInt):
        if statically_known_true(val == seq):
            return length
        if val.node.expr.free_symbols & seq.node.expr.free_symbols:
            raise UnsupportedError(
                f"token_pruning: '{source.name}' ({val}) is derived from the sequence length and used after the "
                "merge; only the length itself can be re-expressed"
            )
        return None
    if not isinstance(val, torch.Tensor):
        return None
    dims = [d for d, size in enumerate(val.shape) if statically_known_true(size == seq)]
    if not dims:
        return None
    batch = positions.meta[meta.VAL].shape[0]
    dim = dims[0]
    if len(dims) > 1 or dim == 0 or not statically_known_true(val.shape[dim - 1] == batch):
        raise UnsupportedError(
            f"token_pruning: '{source.name}' {tuple(val.shape)} is used after the merge with a sequence dimension "
            "that is not laid out [..., batch, seq, ...]; cannot gather it at the kept positions"
        )
    # x[..., b, positions[b], ...]: advanced indices on adjacent dims keep their place.
    indices = [None] * (dim - 1) + [batch_index, positions]
    with graph.inserting_after(anchor):
        gathered = graph.call_function(aten.index.Tensor, (source, indices))
    infer_val(gathered, fake_mode)
    gathered.meta[meta.PROVENANCE] = {"pass": "token_pruning", "replaces": [source.name], "layer": None}
    return gathered


def _is_length(node: fx.Node, seq: torch.SymInt) -> bool:
    val = node.meta.get(meta.VAL)
    return node.op == "call_function" and isinstance(val, torch.SymInt) and statically_known_true(val == seq)


def _is_check(node: fx.Node, upstream: set[fx.Node]) -> bool:
    if node.op == "call_module" and node.target == "_guards_fn":  # torch.export's input checks
        return True
    return node.op == "call_function" and node.target in _ASSERTS and all(n in upstream for n in node.all_input_nodes)


def _move_after(graph: fx.Graph, merge: fx.Node, upstream: set[fx.Node], anchor: fx.Node) -> None:
    """Move nodes placed before the merge that now read pruned values (`sym_size(input_ids)`) after `anchor`."""
    early = []
    for node in graph.nodes:
        if node is merge:
            break
        if node.op == "call_function" and node not in upstream and not _is_check(node, upstream):
            early.append(node)
    for node in early:
        anchor.append(node)
        anchor = node


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    pending = [node]
    while pending:
        for parent in pending.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                pending.append(parent)
    return seen


def _reinfer_downstream(graph: fx.Graph, fixed: set[fx.Node], fake_mode: Any) -> None:
    """Recompute `meta["val"]` of every node after the merge: their shapes now follow the pruned length."""
    for node in graph.nodes:
        if node in fixed or node.op != "call_function" or node.target in _ASSERTS:
            continue
        infer_val(node, fake_mode)
