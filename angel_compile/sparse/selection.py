"""Block selection for causal prefill attention: static (A-shape), Stem and S2O.

The sequence is cut into n = ceil(S / b) blocks of b = `block_size` tokens, the same blocks
for queries and keys. A method returns a block mask M [B, Hq, n, n] (bool): M[i, j] says
query block i attends to key block j. Every mask is causal (M[i, j] => j <= i) and always
holds the *forced* blocks
    F(i) = {j <= i : j < sink_blocks} ∪ {j : i - local_blocks <= j <= i}
(attention sinks, and the diagonal block with the `local_blocks` blocks before it). Inside
the kept blocks attention is exact (token-level causal mask on the diagonal block).
Density = Σ M / (B · Hq · n(n+1)/2), the fraction of causal blocks computed.

Block estimates (the dynamic methods). With q̄_i, k̄_j the mean of the queries / keys of a
block (GQA: query head h uses key head h // (Hq / Hkv)) and s the softmax scale,
    P[i, j] = softmax_{j' <= i}(s · q̄_i · k̄_{j'})[j]        estimated attention mass of block j
    ν_j     = mean_{t in block j} ‖v_t‖₂                      value magnitude of block j

static   M = F. Input independent: the baseline every dynamic method must beat.

stem     Output-aware metric w[i, j] = P[i, j] · ν_j (score-only ranking: w = P, with
         `output_aware=False`): the estimated magnitude of block j's contribution to the
         output, so a block with large values is kept even at moderate attention mass.
         Token position-decay budget: query block i keeps F(i) plus the top k(i) blocks of
         the rest ranked by w, with a budget that decays linearly along the sequence,
             k(i) = max(1, ceil(top_k · (1 − budget_decay · i / (n − 1)))),
         from top_k at the first query block to top_k · (1 − budget_decay) at the last
         (budget_decay = 0 is uniform top-k). Early query blocks keep a larger share of their
         causal context: their outputs feed every later token through the layers, so their
         errors compound, while late blocks have the most redundant context. Initial blocks
         (the sinks) are always kept, whatever the budget.

s2o      Key blocks outside F(i) are visited in order of decreasing P[i, j] — an index
         permutation π_i (argsort; no data moves). With A_0 = Σ_{j in F(i)} P[i, j] and
         A_r = A_0 + Σ_{r' < r} P[i, π_i(r')], block π_i(r) is kept while
             P[i, π_i(r)] >= threshold · A_r,
         and the visit stops at the first block that fails (every later block has less mass
         and more mass accumulated before it). The number of kept blocks adapts per head and
         per query block: a peaked distribution stops after a few blocks, a flat one reads on.

Why selection is PyTorch ops on the GPU, not a Triton kernel: it is one memory-bound pass
over Q and K (block means; ~0.7 ms for Q+K at 128K tokens, 32+8 heads, d=128, bf16), one
small batched GEMM [n, d] × [d, n] per head, and row-wise softmax / top-k / sort on
[B · Hq · n, n] (n = 1024 at 128K with b = 128): a few milliseconds against the ~30 ms
the attention itself takes at 10% density. A fused kernel would save part of that, not
change the picture; `benchmarks/bench_sparse_attention.py` times selection with the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("static", "stem", "s2o")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Parameters of `angel::sparse_attention` (formulas in the module docstring).

    method: "static", "stem" or "s2o". block_size: tokens per query / key block (a power of
    two, >= 16). min_seq_len: sequences shorter than this run dense causal attention.
    sink_blocks, local_blocks: forced blocks (all methods). top_k, budget_decay: stem budget.
    threshold: s2o stopping ratio.
    """

    method: str = "stem"
    block_size: int = 128
    min_seq_len: int = 4096
    sink_blocks: int = 1
    local_blocks: int = 2
    top_k: int = 16
    budget_decay: float = 0.5
    threshold: float = 0.02

    def __post_init__(self) -> None:
        errors = []
        if self.method not in METHODS:
            errors.append(f"method={self.method!r} is unknown (methods: {list(METHODS)})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            errors.append(f"block_size={self.block_size} must be a power of two >= 16")
        if self.min_seq_len < 0:
            errors.append(f"min_seq_len={self.min_seq_len} must be >= 0")
        if self.sink_blocks < 0:
            errors.append(f"sink_blocks={self.sink_blocks} must be >= 0")
        if self.local_blocks < 0:
            errors.append(f"local_blocks={self.local_blocks} must be >= 0")
        if self.top_k <= 0:
            errors.append(f"top_k={self.top_k} must be > 0")
        if not 0.0 <= self.budget_decay <= 1.0:
            errors.append(f"budget_decay={self.budget_decay} must be in [0, 1]")
        if not 0.0 <= self.threshold < 1.0:
            errors.append(f"threshold={self.threshold} must be in [0, 1)")
        if errors:
            raise ValueError("; ".join(errors))


def causal_block_mask(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] bool: key block j <= query block i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def forced_block_mask(n: int, sink_blocks: int, local_blocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] bool: F(i) = sinks ∪ the diagonal and `local_blocks` blocks before it (causal)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < sink_blocks) | (i - j <= local_blocks))


def stem_budget(n: int, top_k: int, budget_decay: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] int64: k(i) = max(1, ceil(top_k · (1 − budget_decay · i / (n − 1))))."""
    position = torch.arange(n, device=device, dtype=torch.float64) / max(n - 1, 1)
    return torch.ceil(top_k * (1.0 - budget_decay * position)).clamp_(min=1).long()


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [B, H, S, D] -> block means [B, H, n, D] in float32 (a partial last block: mean of its tokens)."""
    bsz, heads, seq, dim = x.shape
    n = math.ceil(seq / block_size)
    if seq != n * block_size:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * block_size - seq))
    # sum(dtype=float32) accumulates in fp32 without materialising an fp32 copy of x.
    sums = x.reshape(bsz, heads, n, block_size, dim).sum(dim=3, dtype=torch.float32)
    counts = torch.full((n,), float(block_size), device=x.device)
    counts[-1] = seq - (n - 1) * block_size
    return sums / counts[:, None]


def block_value_norms(v: torch.Tensor, block_size: int) -> torch.Tensor:
    """v [B, Hkv, S, D] -> ν [B, Hkv, n]: the mean over each block of the tokens' ‖v_t‖₂."""
    norms = torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32)  # [B, Hkv, S]
    return pool_blocks(norms[..., None], block_size)[..., 0]


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """P [B, Hq, n, n] float32: softmax over causal key blocks of the pooled scores s · q̄_i · k̄_j."""
    group = q.shape[1] // k.shape[1]
    q_bar = pool_blocks(q, block_size)  # [B, Hq, n, D]
    k_bar = pool_blocks(k, block_size).repeat_interleave(group, dim=1)  # [B, Hq, n, D]
    scores = (q_bar @ k_bar.transpose(-1, -2)) * scale  # [B, Hq, n, n]
    causal = causal_block_mask(scores.shape[-1], q.device)
    return scores.masked_fill_(~causal, float("-inf")).softmax(dim=-1)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: SparseAttentionConfig,
    scale: float,
    output_aware: bool = True,
) -> torch.Tensor:
    """Block mask M [B, Hq, n, n] (bool, causal) of `config.method` for q [B, Hq, S, D], k/v [B, Hkv, S, D].

    output_aware=False ranks stem's blocks by P alone (for comparing the two metrics).
    """
    bsz, heads, seq, _ = q.shape
    n = math.ceil(seq / config.block_size)
    forced = forced_block_mask(n, config.sink_blocks, config.local_blocks, q.device)
    if config.method == "static":
        return forced.expand(bsz, heads, n, n).clone()
    mass = block_attention_mass(q, k, config.block_size, scale)  # [B, Hq, n, n]
    free = causal_block_mask(n, q.device) & ~forced  # candidates beyond F(i)
    if config.method == "stem":
        metric = mass
        if output_aware:
            group = heads // k.shape[1]
            metric = mass * block_value_norms(v, config.block_size).repeat_interleave(group, dim=1)[:, :, None, :]
        metric = metric.masked_fill(~free, float("-inf"))
        values, order = metric.topk(min(config.top_k, n), dim=-1)  # [B, Hq, n, k_max]
        budget = stem_budget(n, config.top_k, config.budget_decay, q.device)  # [n]
        rank = torch.arange(values.shape[-1], device=q.device)
        keep = (rank[None, :] < budget[:, None]) & torch.isfinite(values)
    else:
        forced_mass = (mass * forced).sum(dim=-1, keepdim=True)  # A_0: [B, Hq, n, 1]
        ordered, order = mass.masked_fill(~free, 0.0).sort(dim=-1, descending=True)  # the permutation π_i
        accumulated = forced_mass + ordered.cumsum(dim=-1) - ordered  # A_r, mass visited before rank r
        passes = (ordered > 0) & (ordered >= config.threshold * accumulated)
        keep = passes.int().cummin(dim=-1).values.bool()  # stop at the first block that fails
    # topk / sort indices are distinct within a row, so each position is written once.
    chosen = torch.zeros(bsz, heads, n, n, dtype=torch.bool, device=q.device).scatter_(-1, order, keep)
    return chosen | forced


def block_density(block_mask: torch.Tensor) -> float:
    """Fraction of causal blocks a causal block mask [..., n, n] computes."""
    n = block_mask.shape[-1]
    causal_blocks = block_mask[..., 0, 0].numel() * n * (n + 1) // 2
    return block_mask.sum().item() / causal_blocks


def block_mask_to_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., n, n] bool -> (index int32 [..., n, n], count int32 [..., n]).

    index[..., i, :count[..., i]] lists the kept key blocks of query block i in ascending
    order (so the diagonal block, when kept, is last), padded with -1.
    """
    n = block_mask.shape[-1]
    position = torch.where(block_mask, block_mask.int().cumsum(dim=-1) - 1, n)  # unkept -> spill column n
    index = torch.full((*block_mask.shape[:-1], n + 1), -1, dtype=torch.int32, device=block_mask.device)
    blocks = torch.arange(n, dtype=torch.int32, device=block_mask.device).expand(block_mask.shape)
    index.scatter_(-1, position.long(), blocks)
    return index[..., :n].contiguous(), block_mask.sum(dim=-1, dtype=torch.int32)
