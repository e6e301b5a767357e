"""`angel::prune_tokens` with MMR on a GPU as three CUDA graphs per shape (see `ops/prune_tokens.py`).

The op's selection is a few dozen small kernels around the lazy greedy's rounds
(`kernels/mmr_select.py`); launched one by one from Python they cost several times the GPU time
they take. So for each (shape, dtype, num_tokens, keep, λ, stream) the op keeps static input
buffers and three CUDA graphs:
  - prepare: split text and modality tokens, the context, unit features and importance (Triton),
    the greedy's first pick, and a flag for rows whose modality-token count is wrong;
  - round: one candidate round, replayed until every row has its picks (host syncs as in
    `mmr_select_rounds`; the first sync also reads the flag and raises on bad input);
  - status: the picks still missing and the flag, copied into pinned host memory, so that each
    sync is one small graph and a stream synchronize rather than a few eager kernels and a
    pageable copy;
  - finish: the picks in ascending order, the kept positions and the pruned sequence.
A call copies its inputs into the buffers, replays the graphs and returns copies of the outputs:
the same values as `prune_tokens_forward` with the Triton steps. Only MMR (and diversity)
without merging runs here; other methods, merging (its join count is a host-side decision) and
calls made while a graph is being captured take `prune_tokens_forward`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from angel_compile.kernels.mmr_select import DEFAULT_CONFIG, GraphedGreedy, LazyGreedy, unit_features_triton
from angel_compile.ops.prune_tokens import (
    ascending,
    check_counts,
    context_embedding,
    kept_sequence,
    split_tokens,
)

CACHE_SIZE = 4  # shapes whose buffers and graphs stay on the GPU


class GraphedMmrPrune:
    """The op for one shape: static buffers, the prepare / round / finish graphs (captured on the first call)."""

    def __init__(self, embeds: torch.Tensor, mask: torch.Tensor, num_tokens: int, keep: int, lambda_: float) -> None:
        batch, _, dim = embeds.shape
        self.num_tokens, self.keep = num_tokens, keep
        self.embeds = torch.empty_like(embeds)
        self.mask = torch.empty_like(mask)
        features = embeds.new_empty((batch, num_tokens, dim))
        self.greedy = GraphedGreedy(LazyGreedy(features, keep, lambda_, DEFAULT_CONFIG))
        self.status = torch.empty(2, dtype=torch.int32, device=embeds.device)  # [picks still missing, bad rows]
        self.status_host = torch.empty(2, dtype=torch.int32, pin_memory=True)
        self.prepare_graph: torch.cuda.CUDAGraph | None = None
        self.status_graph: torch.cuda.CUDAGraph | None = None
        self.finish_graph: torch.cuda.CUDAGraph | None = None

    def _prepare(self) -> None:
        text_positions, self.token_positions, features = split_tokens(self.embeds, self.mask, self.num_tokens)
        unit, importance = unit_features_triton(features, context_embedding(self.embeds, text_positions, features))
        self.greedy.greedy.start(unit, importance)
        self.bad_rows = (self.mask.sum(dim=1) != self.num_tokens).any().to(torch.int32)

    def _status(self) -> None:
        self.status[0] = (self.keep - self.greedy.greedy.done).max()
        self.status[1] = self.bad_rows
        self.status_host.copy_(self.status, non_blocking=True)

    def _read_status(self) -> tuple[int, int]:
        """(picks still missing in the worst row, whether any row has a wrong token count): a host sync."""
        if self.status_graph is None:  # the first read runs eagerly, then is captured
            self._status()
            self.status_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.status_graph):
                self._status()
        else:
            self.status_graph.replay()
        torch.cuda.current_stream(self.status.device).synchronize()
        left, bad = self.status_host.tolist()
        return left, bad

    def _finish(self) -> None:
        chosen = ascending(self.greedy.greedy.out, self.num_tokens)
        kept_positions = self.token_positions.gather(1, chosen)
        self.pruned, self.positions = kept_sequence(self.embeds, self.mask, self.num_tokens, kept_positions)

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.embeds.copy_(embeds)
        self.mask.copy_(mask)
        first_call = self.prepare_graph is None
        if first_call:  # run eagerly once (it compiles the Triton kernels), then capture
            self._prepare()
            self.prepare_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.prepare_graph):
                self._prepare()
        self.prepare_graph.replay()
        state = self.greedy.greedy
        left = self.keep - 1  # after the first pick
        while True:
            for _ in range(state.rounds_for(left)):
                self.greedy.round()
            left, bad = self._read_status()
            if bad:  # rows with another modality-token count ran on clamped positions: reject the call
                check_counts(mask, self.num_tokens, self.keep)
            if left <= 0:
                break
        if first_call:
            self._finish()
            self.finish_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.finish_graph):
                self._finish()
        self.finish_graph.replay()
        return self.pruned.clone(), self.positions.clone()


_RUNNERS: OrderedDict[tuple, GraphedMmrPrune] = OrderedDict()


def prune_tokens_mmr_graphed(
    embeds: torch.Tensor, token_mask: torch.Tensor, num_tokens: int, keep: int, lambda_: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MMR pruning (no merging, 0 < keep < num_tokens) through the cached `GraphedMmrPrune` of this shape and stream."""
    mask = token_mask.bool()
    stream = torch.cuda.current_stream(embeds.device).cuda_stream
    key = (embeds.device, stream, embeds.shape, embeds.dtype, num_tokens, keep, float(lambda_))
    if key not in _RUNNERS:
        _RUNNERS[key] = GraphedMmrPrune(embeds, mask, num_tokens, keep, lambda_)
        if len(_RUNNERS) > CACHE_SIZE:
            _RUNNERS.popitem(last=False)
    _RUNNERS.move_to_end(key)
    return _RUNNERS[key](embeds, mask)
