"""The fused speculative decode step, the plain greedy step it must equal, and `generate`.

One `SpeculativeDecoder` call is one decode step, with static shapes and no data-dependent
Python control flow, so `torch.compile(decoder, backend="angel")` makes it one graph and it can
be captured as a CUDA graph:

1. the draft reads the tokens the last step accepted (a window of k+1 slots, `pending_count`
   of them valid) with the target's features for them, extending its own KV cache;
2. it drafts a token tree level by level (top-b per level; a chain is branching 1), each level
   one draft forward under the tree's ancestor mask;
3. the target verifies the root (the last accepted token) and every drafted token in ONE
   forward, positions = length + tree depth, attention mask = the tree's ancestors;
4. the deepest node whose whole path matches the target's greedy choices is accepted, plus the
   target's own next token after it (the bonus), so every step emits 1..k+1 tokens;
5. the accepted path's keys/values move to consecutive cache slots (trees only: in a chain they
   are there already), lengths advance by the number accepted; rejected slots lie past the
   length and are invisible.

Each batch row has its own lengths; a row that has its `max_new` tokens stops advancing while
the others go on. Greedy speculative output equals greedy decoding of the target token for
token (up to floating-point ties between the verify forward over several tokens and a
one-token forward).

Sampling (temperature T > 0; Leviathan et al. 2023, Chen et al. 2023, and SpecInfer's
multi-draft rule for trees, Miao et al. 2024): the prefill samples the first token from the
target; in step 2 every node's children are drawn i.i.d. (with replacement: siblings may repeat
a token) from the draft's q = softmax(draft logits / T); in step 4 the walk starts at the root with the
target's p = softmax(target logits / T) after it and, level by level, tries the children of the
current node in order: child x is accepted with probability min(1, p(x) / q(x)); on a rejection
p <- norm(max(0, p - q)) and the next sibling is tried. An accepted child becomes the current
node (p: the target's distribution after it); when every child is rejected, or at a leaf, the
step's last token is drawn from the current p (the residual, or the bonus). The tokens are then
distributed exactly as sampling the target at temperature T, one token at a time (up to
floating-point rounding). The random numbers are a tensor input (`uniforms`, redrawn before
every step by `run_to_end`; a loop of its own, e.g. CUDA-graph replays, calls
`state.draw_uniforms()` before each step), so the sampling step compiles to one graph too.
Steps 1, 3 and 5 are the greedy ones. No top-k / top-p filtering.

State (all tensors, updated in place; build with `new_state`):
target_k/target_v [layers, B, kv, capacity, d]; draft_k/draft_v [1, B, kv, capacity, d];
target_len, draft_len [B] int64; pending_features [B, k+1, n_features * hidden];
pending_tokens [B, k+1]; pending_count [B]; output [B, max_new + k + 2] (the last slot a
sink for writes that must not land); output_len [B]; max_new [] int64; active_steps [B] (steps
in which the row still advanced). Sampling only (None when greedy): temperature [] float32;
uniforms [B, 2N+1] float32 in [0, 1), N drafted nodes: one per node to draw it, one per node to
accept it, one for the step's last token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from angel_compile.errors import UnsupportedError
from angel_compile.speculative.draft import EagleDraft, check_draft_fits
from angel_compile.speculative.llama import (
    LlamaShape,
    cache_attention_mask,
    causal_mask,
    check_llama,
    empty_cache,
    target_forward,
)
from angel_compile.speculative.tree import TokenTree

DEFAULT_K = 4


@dataclass
class DecodeState:
    """The tensors one decode step reads and updates in place (see the module docstring)."""

    target_k: torch.Tensor
    target_v: torch.Tensor
    draft_k: torch.Tensor
    draft_v: torch.Tensor
    target_len: torch.Tensor
    draft_len: torch.Tensor
    pending_features: torch.Tensor
    pending_tokens: torch.Tensor
    pending_count: torch.Tensor
    output: torch.Tensor
    output_len: torch.Tensor
    max_new: torch.Tensor
    active_steps: torch.Tensor
    temperature: torch.Tensor | None = None
    uniforms: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        values = (getattr(self, f.name) for f in fields(self))
        return tuple(value for value in values if value is not None)

    def finished(self) -> bool:
        return bool((self.output_len >= self.max_new).all())

    def draw_uniforms(self, generator: torch.Generator | None = None) -> None:
        """Fresh random numbers for the next sampling step, from `generator` (on the state's device)."""
        if self.uniforms is not None:
            torch.rand(self.uniforms.shape, generator=generator, out=self.uniforms)


@dataclass
class GreedyState:
    """State of the plain greedy step: the target's cache, its next input token and the output."""

    target_k: torch.Tensor
    target_v: torch.Tensor
    target_len: torch.Tensor
    next_token: torch.Tensor
    output: torch.Tensor
    output_len: torch.Tensor
    max_new: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def finished(self) -> bool:
        return bool((self.output_len >= self.max_new).all())


def resolve_tree(k: int | None = None, tree: TokenTree | tuple[int, ...] | list[int] | None = None) -> TokenTree:
    """The draft tree from `k` (a chain) or `tree` (branching per depth); errors name the bad value."""
    if tree is not None:
        tree = tree if isinstance(tree, TokenTree) else TokenTree(tuple(tree))
        if k is not None and k != tree.depth:
            raise UnsupportedError(f"k={k} disagrees with the tree {tree.branching} of depth {tree.depth}")
        return tree
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
        raise UnsupportedError(f"k must be an int >= 1; got {k!r}")
    return TokenTree.chain(DEFAULT_K if k is None else k)


def _check_prompt(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise UnsupportedError("input_ids must be an int64 tensor [batch, prompt_length] (equal-length prompts)")
    if input_ids.shape[1] < 1:
        raise UnsupportedError("input_ids must hold at least one prompt token per row")
    if max_new_tokens < 1:
        raise UnsupportedError(f"max_new_tokens must be >= 1; got {max_new_tokens}")


def _check_temperature(temperature: float) -> None:
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not math.isfinite(temperature) or temperature < 0:
        raise UnsupportedError(f"temperature must be a finite number >= 0 (0: greedy); got {temperature!r}")


def _probabilities(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(logits / T) in float32: [..., V]."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def _sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V] (not necessarily normalized), uniforms [...] in [0, 1) -> tokens [...]."""
    cdf = probs.cumsum(-1)
    # 1 - u lies in (0, 1], so the threshold lies in (0, total]: the first token whose cumulative
    # mass reaches it has positive probability and exists.
    threshold = (1 - uniforms)[..., None] * cdf[..., -1:]
    return (cdf < threshold).sum(-1)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; p itself where that is empty (p == q up to rounding)."""
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), p)


def _prefill_target(
    target: nn.Module,
    shape: LlamaShape,
    input_ids: torch.Tensor,
    target_k: torch.Tensor,
    target_v: torch.Tensor,
    feature_layers: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the target's cache with the prompt; out: its logits after the prompt [B, V], features [B, P, F]."""
    prompt = input_ids.shape[1]
    lengths = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    depths = torch.arange(prompt, device=input_ids.device)
    logits, _, features = target_forward(
        target, shape, input_ids, depths, causal_mask(prompt, input_ids.device), target_k, target_v, lengths,
        feature_layers,
    )  # fmt: skip
    return logits[:, -1], features


def _output_buffer(batch: int, max_new: int, extra: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    output = torch.zeros(batch, max_new + extra + 1, dtype=torch.long, device=device)
    return output, torch.zeros(batch, dtype=torch.long, device=device), torch.tensor(max_new, device=device)


class GreedyDecoder(nn.Module):
    """Plain greedy decoding of the target, one token per call, same forward and cache as speculation."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target
        self.shape = check_llama(target)

    def new_state(self, input_ids: torch.Tensor, max_new_tokens: int, capacity: int | None = None) -> GreedyState:
        """Prefill the target with `input_ids` [B, P]; the state holds the first new token."""
        _check_prompt(input_ids, max_new_tokens)
        batch, prompt = input_ids.shape
        capacity = capacity or prompt + max_new_tokens + 1
        if capacity < prompt + max_new_tokens + 1:
            raise UnsupportedError(f"cache capacity {capacity} < prompt {prompt} + max_new_tokens {max_new_tokens} + 1")
        dtype, device = _dtype(self.target), input_ids.device
        s = self.shape
        target_k, target_v = empty_cache(s.layers, batch, s.kv_heads, capacity, s.head_dim, dtype, device)
        with torch.no_grad():
            logits, _ = _prefill_target(self.target, s, input_ids, target_k, target_v)
        first = logits.argmax(-1)
        output, output_len, max_new = _output_buffer(batch, max_new_tokens, 0, device)
        output[:, 0] = first
        output_len += 1
        target_len = torch.full((batch,), prompt, dtype=torch.long, device=device)
        return GreedyState(target_k, target_v, target_len, first[:, None].clone(), output, output_len, max_new)

    def forward(
        self,
        target_k: torch.Tensor,
        target_v: torch.Tensor,
        target_len: torch.Tensor,
        next_token: torch.Tensor,
        output: torch.Tensor,
        output_len: torch.Tensor,
        max_new: torch.Tensor,
    ) -> torch.Tensor:
        """One greedy token per row: the target over next_token [B, 1]; returns the new token [B]."""
        one = torch.zeros(1, dtype=torch.long, device=next_token.device)
        seen = torch.ones(1, 1, dtype=torch.bool, device=next_token.device)
        logits, _, _ = target_forward(self.target, self.shape, next_token, one, seen, target_k, target_v, target_len)
        token = logits[:, -1].argmax(-1)  # [B]
        active = output_len < max_new
        sink = output.shape[1] - 1
        output.scatter_(1, torch.where(active, output_len, sink)[:, None], token[:, None])
        target_len.add_(active.long())
        output_len.add_(active.long())
        next_token.copy_(token[:, None])
        return token


class SpeculativeDecoder(nn.Module):
    """The fused EAGLE decode step (see the module docstring); `forward(*state.tensors())`."""

    def __init__(self, target: nn.Module, draft: EagleDraft, tree: TokenTree) -> None:
        super().__init__()
        self.shape = check_llama(target)
        if not isinstance(draft, EagleDraft):
            raise UnsupportedError(f"draft must be an EagleDraft (speculative.draft); got {type(draft).__name__}")
        check_draft_fits(draft, self.shape)
        self.target = target
        self.draft = draft
        self.tree = tree
        for name, value in tree.tensors(device=next(target.parameters()).device).items():
            self.register_buffer(f"tree_{name}", value, persistent=False)
        # Draft slots of the nodes the draft reads (every level but the leaves), after the root.
        self.draft_tree_slots = tree.num_drafted - tree.level_sizes[-1]

    @property
    def window(self) -> int:
        return self.tree.depth + 1

    def capacity_needed(self, prompt: int, max_new_tokens: int) -> int:
        return prompt + max_new_tokens + self.window + self.tree.num_drafted + 1

    def new_state(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        capacity: int | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> DecodeState:
        """Prefill target and draft with `input_ids` [B, P] (equal lengths); the state holds the first new token.

        temperature 0: greedy (the first token is the target's argmax); > 0: the first token is
        sampled from the target with `generator` (on the input's device; None: the global RNG),
        and the state holds the sampling tensors (`temperature`, `uniforms`).
        """
        _check_prompt(input_ids, max_new_tokens)
        _check_temperature(temperature)
        batch, prompt = input_ids.shape
        needed = self.capacity_needed(prompt, max_new_tokens)
        capacity = capacity or needed
        if capacity < needed:
            raise UnsupportedError(
                f"cache capacity {capacity} < {needed} (prompt {prompt} + max_new_tokens {max_new_tokens} + "
                f"window {self.window} + tree {self.tree.num_drafted} + 1)"
            )
        device, s, c = input_ids.device, self.shape, self.draft.config
        target_dtype, draft_dtype = _dtype(self.target), _dtype(self.draft)
        target_k, target_v = empty_cache(s.layers, batch, s.kv_heads, capacity, s.head_dim, target_dtype, device)
        draft_k, draft_v = empty_cache(1, batch, c.kv_heads, capacity, c.head_dim, draft_dtype, device)
        with torch.no_grad():
            logits, features = _prefill_target(self.target, s, input_ids, target_k, target_v, c.feature_layers)
            draft_len = torch.zeros(batch, dtype=torch.long, device=device)
            if prompt > 1:
                # The draft reads positions 0..P-2 now; position P-1 (next token: `first`) is pending.
                count = prompt - 1
                slots = torch.arange(count, device=device)[None].expand(batch, -1)
                self.draft.forward_cached(
                    self.draft.fuse_features(features[:, :-1].to(draft_dtype)),
                    self.target.model.embed_tokens(input_ids[:, 1:]).to(draft_dtype),
                    slots,
                    slots,
                    cache_attention_mask(draft_len, causal_mask(count, device), capacity),
                    draft_k[0],
                    draft_v[0],
                )
                draft_len += count
        sampling = {}
        if temperature > 0:
            sampling["temperature"] = torch.tensor(float(temperature), device=device)
            sampling["uniforms"] = torch.zeros(batch, 2 * self.tree.num_drafted + 1, device=device)
            u = torch.rand(batch, generator=generator, device=device)
            first = _sample(_probabilities(logits, sampling["temperature"]), u)
        else:
            first = logits.argmax(-1)
        pending_features = torch.zeros(batch, self.window, features.shape[-1], dtype=target_dtype, device=device)
        pending_features[:, 0] = features[:, -1]
        pending_tokens = torch.zeros(batch, self.window, dtype=torch.long, device=device)
        pending_tokens[:, 0] = first
        output, output_len, max_new = _output_buffer(batch, max_new_tokens, self.window, device)
        output[:, 0] = first
        output_len += 1
        return DecodeState(
            target_k=target_k,
            target_v=target_v,
            draft_k=draft_k,
            draft_v=draft_v,
            target_len=torch.full((batch,), prompt, dtype=torch.long, device=device),
            draft_len=draft_len,
            pending_features=pending_features,
            pending_tokens=pending_tokens,
            pending_count=torch.ones(batch, dtype=torch.long, device=device),
            output=output,
            output_len=output_len,
            max_new=max_new,
            active_steps=torch.zeros(batch, dtype=torch.long, device=device),
            **sampling,
        )

    def forward(
        self,
        target_k: torch.Tensor,
        target_v: torch.Tensor,
        draft_k: torch.Tensor,
        draft_v: torch.Tensor,
        target_len: torch.Tensor,
        draft_len: torch.Tensor,
        pending_features: torch.Tensor,
        pending_tokens: torch.Tensor,
        pending_count: torch.Tensor,
        output: torch.Tensor,
        output_len: torch.Tensor,
        max_new: torch.Tensor,
        active_steps: torch.Tensor,
        temperature: torch.Tensor | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One speculative step; updates the state in place and returns the drafted tokens accepted [B].

        With `temperature` and `uniforms` (a sampling state) it drafts and accepts by rejection
        sampling (see the module docstring), else greedily.
        """
        tree, draft = self.tree, self.draft
        device = target_len.device
        hidden = self.shape.hidden
        draft_dtype, target_dtype = draft_k.dtype, target_k.dtype
        embed, lm_head = self.target.model.embed_tokens, self.target.lm_head
        window = torch.arange(self.window, device=device)
        capacity = draft_k.shape[3]

        # 1. The draft catches up on the tokens the last step accepted.
        window_slots = draft_len[:, None] + window  # [B, W]
        window_hidden = draft.forward_cached(
            draft.fuse_features(pending_features.to(draft_dtype)),
            embed(pending_tokens).to(draft_dtype),
            window_slots,
            window_slots,
            cache_attention_mask(draft_len, causal_mask(self.window, device), capacity),
            draft_k[0],
            draft_v[0],
        )  # [B, W, h]
        last = (pending_count - 1)[:, None]  # [B, 1]
        level_hidden = window_hidden.gather(1, last[..., None].expand(-1, -1, hidden))  # [B, 1, h]
        level_tokens = [pending_tokens.gather(1, last)]  # the root: the last accepted token
        base = draft_len + pending_count  # [B], equals target_len

        # 2. Draft the tree level by level: the top-b children of every node of the level above, or
        # b children drawn i.i.d. from the draft's distribution q after it.
        draft_probs = []  # sampling: q after each node of each level but the leaves, [B, nodes above, V]
        for depth in range(1, tree.depth + 1):
            width = tree.branching[depth - 1]
            nodes = tree.level_range(depth)
            scores = lm_head(level_hidden.to(target_dtype))  # [B, nodes above, V]
            if temperature is None:
                children = scores.topk(width, dim=-1).indices.flatten(1)  # [B, nodes]
            else:
                draft_probs.append(_probabilities(scores, temperature))
                draw = uniforms[:, nodes.start - 1 : nodes.stop - 1].unflatten(1, (-1, width))  # [B, above, b]
                children = _sample(draft_probs[-1][:, :, None], draw).flatten(1)  # [B, nodes]
            level_tokens.append(children)
            if depth == tree.depth:
                break
            offsets = torch.arange(nodes.start - 1, nodes.stop - 1, device=device)
            slots = base[:, None] + offsets  # [B, nodes]
            sees = self.tree_ancestor_mask[nodes.start : nodes.stop, 1 : self.draft_tree_slots + 1]
            level_hidden = draft.forward_cached(
                level_hidden.repeat_interleave(width, dim=1),  # each child reads its parent's output
                embed(children).to(draft_dtype),
                (base + depth - 1)[:, None].expand(-1, len(nodes)),
                slots,
                cache_attention_mask(base, sees, capacity),
                draft_k[0],
                draft_v[0],
            )
        node_tokens = torch.cat(level_tokens, dim=1)  # [B, N+1], breadth-first

        # 3. One target forward verifies every node.
        logits, _, features = target_forward(
            self.target, self.shape, node_tokens, self.tree_depths, self.tree_ancestor_mask, target_k, target_v,
            target_len, draft.config.feature_layers,
        )  # fmt: skip

        # 4. Accept the deepest node whose every ancestor (and itself) is the target's choice, or
        # walk down the tree by rejection sampling.
        if temperature is None:
            greedy = logits.argmax(-1)  # [B, N+1]: the target's choice after each node
            matched = (node_tokens == greedy[:, self.tree_parents]) | (self.tree_depths == 0)
            rejected_on_path = (self.tree_ancestor_mask[None] & ~matched[:, None, :]).any(-1)  # [B, N+1]
            best = torch.where(rejected_on_path, -1, self.tree_depths).argmax(-1)  # [B]
            accepted = self.tree_depths[best]  # [B]
            path = self.tree_path_to[best]  # [B, k+1] node indices, root first
            emitted = greedy.gather(1, path)  # [B, k+1]; valid up to `accepted`, the last being the bonus
        else:
            n = tree.num_drafted
            target_probs = _probabilities(logits, temperature)  # [B, N+1, V]: p after each node
            best, last_token = self._sample_path(
                node_tokens, target_probs, torch.cat(draft_probs, dim=1), uniforms[:, n : 2 * n], uniforms[:, 2 * n]
            )
            accepted = self.tree_depths[best]
            path = self.tree_path_to[best]
            # The path's drafted tokens, then the sampled one after the last accepted node.
            path_tokens = torch.cat([node_tokens.gather(1, path)[:, 1:], last_token[:, None]], dim=1)
            emitted = torch.where(window == accepted[:, None], last_token[:, None], path_tokens)  # [B, k+1]
        kept_features = features.gather(1, path[..., None].expand(-1, -1, features.shape[-1]))

        # 5. Commit: move the path's keys/values next to each other, advance the lengths.
        active = output_len < max_new
        if not tree.is_chain:
            source = target_len[:, None] + path  # [B, k+1]
            destination = target_len[:, None] + window
            for cache in (target_k, target_v):
                layers, _, kv, _, d = cache.shape
                index = source[None, :, None, :, None].expand(layers, -1, kv, -1, d)
                moved = cache.gather(3, index)
                cache.scatter_(3, destination[None, :, None, :, None].expand(layers, -1, kv, -1, d), moved)
        writes = active[:, None] & (window[None, :] <= accepted[:, None])
        sink = output.shape[1] - 1
        output.scatter_(1, torch.where(writes, output_len[:, None] + window, sink), emitted)
        advance = torch.where(active, accepted + 1, 0)
        target_len.add_(advance)
        output_len.add_(advance)
        active_steps.add_(active.long())
        draft_len.copy_(torch.where(active, base, draft_len))
        pending_count.copy_(torch.where(active, accepted + 1, pending_count))
        pending_tokens.copy_(torch.where(active[:, None], emitted, pending_tokens))
        pending_features.copy_(torch.where(active[:, None, None], kept_features, pending_features))
        return accepted

    def _sample_path(
        self,
        node_tokens: torch.Tensor,
        target_probs: torch.Tensor,
        draft_probs: torch.Tensor,
        accept_uniforms: torch.Tensor,
        last_uniforms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recursive rejection sampling down the tree (one child per level for a chain).

        node_tokens [B, N+1]; target_probs [B, N+1, V]: p after each node; draft_probs [B, M, V]:
        q after each of the first M nodes (all but the leaves), which its children were drawn
        from; accept_uniforms [B, N] (one per drafted node), last_uniforms [B].
        Out: the deepest accepted node [B] and the token sampled after it [B].
        """
        tree = self.tree
        rows = torch.arange(node_tokens.shape[0], device=node_tokens.device)
        node = torch.zeros_like(rows)
        walking = torch.ones_like(rows, dtype=torch.bool)  # rows whose node's children are tried next
        p = target_probs[:, 0]  # the (residual) distribution the step's next token must follow
        for depth in range(tree.depth):
            width = tree.branching[depth]
            q = draft_probs[rows, node]  # [B, V]
            first_child = tree.level_range(depth + 1).start + (node - tree.level_range(depth).start) * width
            trying = walking
            for j in range(width):
                child = torch.where(trying, first_child + j, 1)  # rows done trying read node 1, unused
                token = node_tokens[rows, child]
                # accepted with probability min(1, p(x) / q(x)); q(x) > 0 as x was drawn from q
                accept = trying & (accept_uniforms[rows, child - 1] * q[rows, token] < p[rows, token])
                rejected = trying & ~accept
                node = torch.where(accept, child, node)
                p = torch.where(rejected[:, None], _residual(p, q), p)
                trying = rejected
            walking = walking & ~trying  # rows that rejected every child stop with the residual p
            p = torch.where(walking[:, None], target_probs[rows, node], p)
        return node, _sample(p, last_uniforms)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


@dataclass
class GenerateStats:
    """What a speculative generation did: steps run, and tokens emitted by them over all rows."""

    steps: int
    new_tokens: int
    row_steps: int

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a row gets per step (drafted tokens accepted + the bonus), 1..k+1."""
        return self.new_tokens / max(self.row_steps, 1)


def speculative_stats(state: DecodeState, steps: int) -> GenerateStats:
    # The prefill emits each row's first token; the steps emit the rest.
    new_tokens = int(state.output_len.sum()) - state.output_len.shape[0]
    return GenerateStats(steps=steps, new_tokens=new_tokens, row_steps=int(state.active_steps.sum()))


def run_to_end(
    step: Callable[..., torch.Tensor], state: DecodeState | GreedyState, generator: torch.Generator | None = None
) -> int:
    """Call `step(*state.tensors())` until every row has its tokens; returns the number of calls.

    A sampling state's uniforms are redrawn from `generator` (None: the global RNG) before each call.
    """
    steps = 0
    while not state.finished():
        if isinstance(state, DecodeState):
            state.draw_uniforms(generator)
        step(*state.tensors())
        steps += 1
    return steps


def greedy_generate(target: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of `target` with the same functional forward: [B, P + max_new_tokens]."""
    decoder = GreedyDecoder(target)
    with torch.no_grad():
        state = decoder.new_state(input_ids, max_new_tokens)
        run_to_end(decoder, state)
    return torch.cat([input_ids, state.output[:, :max_new_tokens]], dim=1)


def generate(
    target: nn.Module,
    draft: EagleDraft | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    k: int | None = None,
    tree: TokenTree | tuple[int, ...] | list[int] | None = None,
    temperature: float = 0.0,
    step: nn.Module | None = None,
    return_stats: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, GenerateStats]:
    """Speculative decoding of `target` with the EAGLE `draft`: greedy, or sampling at `temperature`.

    input_ids [B, P] int64 (equal-length prompts). k: drafted tokens per step (a chain; default
    4) or tree: branching per depth, e.g. (2, 2, 1) (at most `tree.MAX_TREE_NODES` nodes).
    step: a compiled step to call instead of the eager one, e.g. `compiled.compile_step(...)`;
    its target, draft and tree are used (draft may then be None; k/tree must agree if given).
    temperature 0: greedy, token-identical to `greedy_generate(target, ...)`. temperature > 0:
    rejection sampling (chains and trees; see the module docstring), so each row is distributed
    exactly as sampling the target from softmax(logits / temperature) token by token; random
    numbers come from `generator` (on the input's device; None: the global RNG).
    Out: [B, P + max_new_tokens]; with return_stats also the `GenerateStats`.
    """
    _check_temperature(temperature)
    if step is None:
        if draft is None:
            raise UnsupportedError("generate needs a draft (an EagleDraft) or a compiled step")
        decoder = SpeculativeDecoder(target, draft, resolve_tree(k, tree))
    else:
        decoder = getattr(step, "_orig_mod", step)
        if not isinstance(decoder, SpeculativeDecoder) or decoder.target is not target:
            raise UnsupportedError("step must be a (compiled) SpeculativeDecoder built on this target")
        if (k is not None or tree is not None) and resolve_tree(k, tree) != decoder.tree:
            raise UnsupportedError(f"the step drafts the tree {decoder.tree.branching}; k/tree ask for another")
    with torch.no_grad():
        state = decoder.new_state(input_ids, max_new_tokens, temperature=temperature, generator=generator)
        steps = run_to_end(decoder if step is None else step, state, generator)
    sequences = torch.cat([input_ids, state.output[:, :max_new_tokens]], dim=1)
    return (sequences, speculative_stats(state, steps)) if return_stats else sequences
