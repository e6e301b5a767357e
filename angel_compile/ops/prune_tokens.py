"""`angel::prune_tokens`: keep a budget of the visual/audio tokens of a merged embedding sequence.

    prune_tokens(embeds [B, S, D], token_mask bool [B, S], num_tokens, keep, method, lambda_,
                 merge_threshold, seed) -> (pruned [B, S - num_tokens + keep, D],
                                            positions int64 [B, S - num_tokens + keep])

`token_mask` marks the N = `num_tokens` modality tokens of every sample (the same count in
each row); the others are text and always kept. Of the N modality tokens, `keep` survive:

1. Merging (audio, `merge_threshold` < 1): the adjacent pairs whose cosine similarity
   exceeds the threshold are joined, most similar first and at most N − keep of them, so at
   least `keep` groups remain; a group's feature is the mean of its members and it sits at
   the position of its first member.
2. Importance, without attention maps: imp(i) = cos(x_i, c), c the mean (fp32) embedding of
   the sample's text tokens (of its modality tokens when it has no text): the fp32 dot product
   of x_i / ‖x_i‖ and c / ‖c‖ (`unit_features_reference`).
3. Selection of `keep` of the (groups of) tokens by `method`:
   - `mmr`: greedy Maximal Marginal Relevance. The first pick is argmax imp; then each step
     picks argmax_i λ·imp(i) − (1 − λ)·max(0, max_{j picked} cos(x_i, x_j)). Ties go to the
     lower index. cos is the fp32 dot product of the unit features rounded to the embeddings'
     dtype (so bf16 embeddings run the similarity GEMMs on bf16 tensor cores, products exact).
   - `diversity`: mmr with λ = 0; `topk`: the `keep` most important (FastV-like proxy);
   - `stride`: tokens ⌊i·N/keep⌋, i < keep (uniform); `random`: a seeded random subset.
4. The kept tokens keep their original order: `positions` lists, ascending, the sequence
   positions of the text tokens and of the kept (representative) modality tokens, and
   `pruned[b, t] = embeds'[b, positions[b, t]]`, embeds' being embeds with merged features
   written at their groups' positions. Callers gather position ids and masks with `positions`.

With keep = N nothing is merged or dropped: pruned == embeds and positions == arange(S).
The reference below is the CPU implementation. On CUDA (`lowering/triton.py`) the unit features
and importance come from one Triton pass over the features and the greedy MMR runs as the exact
lazy (candidate-round) greedy, both in `kernels/mmr_select.py`; MMR without merging replays the
whole op as CUDA graphs cached per shape (`lowering/prune_tokens_cuda.py`), the other methods run
`prune_tokens_forward` with those two steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F

METHODS = ("mmr", "diversity", "topk", "stride", "random")
IntLike = int | torch.SymInt

# (normalized features [B, M, D], importance [B, M], keep, lambda_) -> picks [B, keep] in pick order
MmrSelect = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]
# (features [B, M, D], context [B, D]) -> (unit features [B, M, D], importance [B, M] fp32)
UnitFeatures = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _kept_fraction(ratio: float) -> tuple[int, int]:
    """1 − r as a fraction p / q (q ≤ 10⁹): 1 − 0.9 is 0.09999999999999998 in floating point, 1/10 here."""
    fraction = Fraction(round(1.0 - ratio, 9)).limit_denominator(10**9)
    return fraction.numerator, fraction.denominator


def kept_count(num_tokens: IntLike, ratio: float) -> IntLike:
    """k = ceil((1 − r)·N): how many of N tokens survive pruning ratio r ∈ [0, 1).

    Integer arithmetic only, so that N may be a `torch.SymInt` (a modality token count that is a
    dynamic dimension of the captured graph): k is then the symbolic ⌊(p·N + q − 1) / q⌋.
    """
    kept, whole = _kept_fraction(ratio)
    return (num_tokens * kept + whole - 1) // whole


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The column indices of the True entries of each row of mask [B, S], ascending -> [B, count] int64.

    Every row must hold `count` True entries (a row with more keeps its first `count`). A
    cumulative sum and a scatter instead of boolean indexing (a host sync) or a sort.
    """
    batch, seq = mask.shape
    slot = torch.where(mask, mask.long().cumsum(dim=1) - 1, count).clamp_(max=count)  # the rest: a spare column
    positions = torch.empty(batch, count + 1, dtype=torch.int64, device=mask.device)
    positions.scatter_(1, slot, torch.arange(seq, device=mask.device).expand(batch, seq))
    return positions[:, :count]


def mmr_select_reference(features: torch.Tensor, importance: torch.Tensor, keep: int, lambda_: float) -> torch.Tensor:
    """Greedy MMR over unit-norm features [B, M, D] -> the picked indices [B, keep], in pick order."""
    x = features.float()
    imp = importance.float()
    batch = torch.arange(x.shape[0], device=x.device)
    max_sim = torch.zeros_like(imp)
    picked = torch.zeros_like(imp, dtype=torch.bool)
    order = []
    for step in range(keep):
        score = imp if step == 0 else lambda_ * imp - (1.0 - lambda_) * max_sim
        index = score.masked_fill(picked, -math.inf).argmax(dim=1)  # [B]
        order.append(index)
        picked[batch, index] = True
        sim = torch.einsum("bmd,bd->bm", x, x[batch, index])
        max_sim = torch.maximum(max_sim, sim)
    return torch.stack(order, dim=1)


def unit_features_reference(features: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, M, D], context [B, D] -> (unit rows in features' dtype, importance [B, M] fp32).

    unit = x / max(‖x‖, 1e-12) in fp32, rounded to features' dtype; importance = cos(x, c), the
    fp32 dot product of the fp32 unit row with c / max(‖c‖, 1e-12).
    """
    unit = F.normalize(features.float(), dim=-1)
    importance = torch.bmm(unit, F.normalize(context.float(), dim=-1).unsqueeze(-1)).squeeze(-1)
    return unit.to(features.dtype), importance


def select(
    unit: torch.Tensor,
    importance: torch.Tensor,
    keep: int,
    method: str,
    lambda_: float,
    seed: int,
    mmr_select: MmrSelect = mmr_select_reference,
) -> torch.Tensor:
    """Indices [B, keep] (ascending) of the tokens `method` keeps out of unit features [B, M, D]."""
    batch, count, _ = unit.shape
    if method in ("mmr", "diversity"):
        chosen = mmr_select(unit, importance.float(), keep, lambda_ if method == "mmr" else 0.0)
    elif method == "topk":
        chosen = importance.float().topk(keep, dim=1).indices
    elif method == "stride":
        chosen = (torch.arange(keep, device=unit.device) * count // keep).expand(batch, keep)
    elif method == "random":
        generator = torch.Generator().manual_seed(seed)
        rows = [torch.randperm(count, generator=generator)[:keep] for _ in range(batch)]
        chosen = torch.stack(rows).to(unit.device)
    else:
        raise ValueError(f"prune_tokens: unknown method '{method}'; supported: {list(METHODS)}")
    return ascending(chosen, count)


def ascending(chosen: torch.Tensor, count: int) -> torch.Tensor:
    """Distinct indices [B, K] into [0, count) -> the same indices sorted ascending (no sort kernel)."""
    kept = torch.zeros(chosen.shape[0], count, dtype=torch.bool, device=chosen.device).scatter_(1, chosen, True)
    return true_positions(kept, chosen.shape[1])


def merge_adjacent(
    features: torch.Tensor, positions: torch.Tensor, keep: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Join adjacent tokens whose cosine similarity exceeds `threshold`, most similar pairs first.

    features [B, N, D], positions [B, N] -> (group features [B, M, D], group first positions [B, M]).
    Every row joins the same number of pairs J (the smallest count above the threshold in the
    batch, at most N − keep), so M = N − J ≥ keep and the rows stack.
    """
    unit = F.normalize(features.float(), dim=-1)
    adjacent = (unit[:, :-1] * unit[:, 1:]).sum(-1)  # [B, N-1]: cos(x_j, x_{j+1})
    joins_allowed = features.shape[1] - keep
    above = (adjacent > threshold).sum(dim=1)
    joins = int(min(int(above.min()), joins_allowed)) if adjacent.numel() else 0
    if joins == 0:
        return features, positions
    strongest = adjacent.topk(joins, dim=1).indices  # the pairs (j, j+1) to join
    starts_group = torch.ones_like(positions, dtype=torch.bool)
    starts_group.scatter_(1, strongest + 1, False)
    group = starts_group.long().cumsum(dim=1) - 1  # [B, N] group id of each token
    groups = features.shape[1] - joins
    sums = torch.zeros(features.shape[0], groups, features.shape[2], dtype=torch.float32, device=features.device)
    sums.scatter_add_(1, group.unsqueeze(-1).expand_as(features), features.float())
    sizes = torch.zeros(features.shape[0], groups, device=features.device)
    sizes.scatter_add_(1, group, torch.ones_like(group, dtype=torch.float32))
    merged = (sums / sizes.unsqueeze(-1)).to(features.dtype)
    first = positions[starts_group].view(features.shape[0], groups)
    return merged, first


def check_counts(token_mask: torch.Tensor, num_tokens: int, keep: int) -> None:
    """Every row holds `num_tokens` modality tokens and 0 < keep <= num_tokens (a host sync), else ValueError."""
    counts = token_mask.bool().sum(dim=1)
    if not bool((counts == num_tokens).all()):
        raise ValueError(
            f"prune_tokens: every sample must hold {num_tokens} modality tokens (the count the graph was "
            f"compiled for); token_mask counts {counts.tolist()}"
        )
    if not 0 < keep <= num_tokens:
        raise ValueError(f"prune_tokens: keep={keep} must be in [1, {num_tokens}] (the number of modality tokens)")


def split_tokens(
    embeds: torch.Tensor, mask: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> text positions [B, S − N], modality positions [B, N] (each ascending), modality features [B, N, D]."""
    seq, dim = embeds.shape[1:]
    text_positions, token_positions = true_positions(~mask, seq - num_tokens), true_positions(mask, num_tokens)
    features = embeds.gather(1, token_positions.unsqueeze(-1).expand(-1, -1, dim))
    return text_positions, token_positions, features


def context_embedding(embeds: torch.Tensor, text_positions: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[B, D] fp32: the mean embedding of the text tokens, or of the modality features when there is no text."""
    if text_positions.shape[1] == 0:
        return features.float().mean(dim=1)
    return embeds.gather(1, text_positions.unsqueeze(-1).expand(-1, -1, embeds.shape[2])).float().mean(dim=1)


def kept_sequence(
    embeds: torch.Tensor, mask: torch.Tensor, num_tokens: int, kept_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text and the kept modality positions [B, K] -> (embeds at their positions, the positions), ascending."""
    kept = (~mask).scatter_(1, kept_positions, True)
    positions = true_positions(kept, embeds.shape[1] - num_tokens + kept_positions.shape[1])
    return embeds.gather(1, positions.unsqueeze(-1).expand(-1, -1, embeds.shape[2])), positions


def prune_tokens_forward(
    embeds: torch.Tensor,
    token_mask: torch.Tensor,
    num_tokens: int,
    keep: int,
    method: str,
    lambda_: float,
    merge_threshold: float,
    seed: int,
    mmr_select: MmrSelect = mmr_select_reference,
    unit_features: UnitFeatures = unit_features_reference,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's semantics (module docstring) with a pluggable greedy MMR and unit-feature step (reference or Triton)."""
    batch, seq, dim = embeds.shape
    check_counts(token_mask, num_tokens, keep)
    mask = token_mask.bool()
    if keep == num_tokens:
        arange = torch.arange(seq, device=embeds.device).expand(batch, seq)
        return embeds.clone(), arange.clone()
    text_positions, token_positions, features = split_tokens(embeds, mask, num_tokens)
    merging = merge_threshold < 1.0
    if merging:
        features, token_positions = merge_adjacent(features, token_positions, keep, merge_threshold)
    unit, importance = unit_features(features, context_embedding(embeds, text_positions, features))
    chosen = select(unit, importance, keep, method, lambda_, seed, mmr_select)  # [B, keep], ascending
    kept_positions = token_positions.gather(1, chosen)  # ascending
    pruned, positions = kept_sequence(embeds, mask, num_tokens, kept_positions)
    if merging:  # a kept group's row holds the mean of its members
        slots = torch.searchsorted(positions, kept_positions)
        kept_features = features.gather(1, chosen.unsqueeze(-1).expand(-1, -1, dim))
        pruned.scatter_(1, slots.unsqueeze(-1).expand(-1, -1, dim), kept_features)
    return pruned, positions


@torch.library.custom_op("angel::prune_tokens", mutates_args=())
def prune_tokens(
    embeds: torch.Tensor,
    token_mask: torch.Tensor,
    num_tokens: int,
    keep: int,
    method: str,
    lambda_: float,
    merge_threshold: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return prune_tokens_forward(embeds, token_mask, num_tokens, keep, method, lambda_, merge_threshold, seed)


@prune_tokens.register_fake
def _(
    embeds: torch.Tensor,
    token_mask: torch.Tensor,
    num_tokens: int,
    keep: int,
    method: str,
    lambda_: float,
    merge_threshold: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(embeds.dim() == 3, lambda: "embeds must be [B, S, D]")
    torch._check(token_mask.dim() == 2, lambda: "token_mask must be [B, S]")
    torch._check(0 < keep <= num_tokens, lambda: f"keep={keep} must be in [1, num_tokens={num_tokens}]")
    length = embeds.shape[1] - num_tokens + keep
    return (
        embeds.new_empty((embeds.shape[0], length, embeds.shape[2])),
        embeds.new_empty((embeds.shape[0], length), dtype=torch.int64),
    )
