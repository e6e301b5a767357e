"""Greedy Maximal Marginal Relevance selection in Triton (reference: `ops/prune_tokens.py`).

The greedy is exact and runs in rounds of "lazy" steps instead of one N-wide scan per pick.

Design. State per batch row: max_sim [N] (fp32, the max of 0 and the similarities to the
picks so far), a picked flag and a key [N] (int64) that orders the tokens as the reference's
argmax does: score s = λ·imp − (1 − λ)·max_sim, higher first, then the lower index. The first
pick is argmax imp. Then every round
  1. takes the C best open tokens by key, in no order (`_top_keys_kernel`, one program per
     row): the lowest of them is the threshold T, the best token outside the candidates, and
     the other C − 1 are the candidates;
  2. computes the similarities of all N tokens to those C tokens, sims [N, C], in one
     batched GEMM (tensor cores for fp16/bf16 with fp32 accumulation and output: the products
     are exact, as in the reference's fp32 einsum; fp32 stays fp32, TF32 only where torch's
     matmul precision allows it, as for the reference), and copies the candidates' rows of it
     transposed into a [C, C] block (`_candidate_sims_kernel`), so that the similarities of
     every candidate to a pick are one contiguous row;
  3. runs the greedy inside the candidates (`_candidate_greedy_kernel`, one program per batch
     row, one step per pick: one max reduction and one contiguous row load): it picks the
     best candidate by its updated key and accepts it only while that key beats T's key;
  4. raises max_sim with the accepted columns of sims and recomputes every key
     (`_update_kernel`, tiles of N × C).
Rows finish after different numbers of rounds; a finished row's rounds are no-ops. The host
reads how many picks the slowest row still lacks (one sync) and queues that many rounds
divided by C − 1 (each round picks at most C − 1), so a few syncs cover all rounds.

Exactness. Scores only fall as picks are added, so T's key (computed from all picks before
the round) is at least the current key of every open token that is not a candidate. A
candidate whose updated key beats it (keys are unique: the index breaks score ties, and −0.0
is read as 0.0) beats every token, so it is exactly the sequential greedy's next pick; when no
candidate beats T the round ends, and the next round starts from fresh keys, whose best token
is always accepted. Every similarity cos(i, p) of a token to a pick comes from one GEMM call
and is used by the round's greedy and by the update alike, and identical features give
identical similarities, so the picks are those of the sequential greedy on these similarity
values, ties included. They differ from the reference's fp32 einsum only in summation order
(relative error ~1e-7): picks agree except where two scores are that close without being equal
(say, duplicates of two different picked tokens, whose self-similarities round to 1 ± 1 ulp).
Scores are computed as the reference computes them (λ·imp and (1 − λ)·max_sim rounded to
fp32, then subtracted; no fused multiply-add).

Cost per row: keep greedy steps (a reduction and a dependent load each) plus, per round, a
top-k over N, a GEMM of 2·N·D·C flops and one pass over sims [N, C]; memory is N·D + N·C·4 +
C·C·4 bytes (no N × N matrix). The number of rounds R ≥ (keep − 1) / C depends on the data: with
C = 256, D = 3584 and locally redundant features (16 neighbours around a centre, as in
`benchmarks/bench_token_pruning.py`), keep = N/4 took 7 rounds for N = 2048 and 16 for 8192.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16384  # a token index fits the 16-bit field of the key
CLOSED: tl.constexpr = tl.constexpr(-(2**63))  # the key of picked tokens, below every open key
OPEN_MAX: tl.constexpr = tl.constexpr(2**63 - 1)  # above every key
SIGN32: tl.constexpr = tl.constexpr(-(2**31))  # flips int32 order into uint32 order


@triton.jit
def _score_key(score):
    """The high 32 bits of a key: the fp32 score's bits as an order-preserving int64, shifted up."""
    score = tl.where(score == 0.0, 0.0, score)  # −0.0 ties +0.0, as in argmax
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude order
    return bits.to(tl.int64) << 32


@triton.jit
def _order_key(score, token, N):
    """int64 key: fp32 score in the high 32 bits (order-preserving), then N − 1 − token (lower index wins)."""
    return _score_key(score) | ((N - 1 - token).to(tl.int64) << 16)


@triton.jit
def _top_keys_kernel(
    keys_ptr,  # [B, N] int64: unique open keys; picked tokens all hold CLOSED
    top_ptr,  # [B, C] int64 out: the C largest keys, in no order
    tokens_ptr,  # [B, C] int64 out: their tokens
    N,
    C,
    stride_kb,
    stride_tb,
    stride_cb,
    BLOCK_N: tl.constexpr,
):
    # One program per batch row, all N keys in registers (N <= MAX_TOKENS). A key is its score's
    # 32 order-preserving bits over the token's index field, so the C largest keys are: every
    # key whose score bits exceed t, the C-th largest score bits, then the tokens whose score
    # bits equal t in index order (the lower index, the larger key; also the CLOSED keys once
    # fewer than C tokens are open). t is built bit by bit from the top: a bit stays set while
    # at least C score bits (flipped at the sign bit, compared unsigned) are >= the prefix. A
    # cumulative sum gives each taken key its slot. One launch of 32 block-wide counts; it
    # replaced `torch.topk` on the int64 keys, which was slower (benchmarks/RESULTS.md).
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    keys = tl.load(keys_ptr + b * stride_kb + offs, mask=valid, other=CLOSED)
    unsigned = ((keys >> 32).to(tl.int32) ^ SIGN32).to(tl.uint32, bitcast=True)
    threshold = tl.zeros((), dtype=tl.uint32)
    for bit in range(31, -1, -1):
        trial = threshold | (tl.full((), 1, tl.uint32) << bit)
        enough = tl.sum((valid & (unsigned >= trial)).to(tl.int32), axis=0) >= C
        threshold = tl.where(enough, trial, threshold)
    above = valid & (unsigned > threshold)
    tied = valid & (unsigned == threshold)
    taken = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= C - tl.sum(above.to(tl.int32), axis=0)))
    slot = tl.cumsum(taken.to(tl.int32), axis=0) - 1
    tl.store(top_ptr + b * stride_tb + slot, keys, mask=taken)
    tl.store(tokens_ptr + b * stride_cb + slot, offs.to(tl.int64), mask=taken)


@triton.jit
def _candidate_sims_kernel(
    sims_ptr,  # [B, N, C] fp32: cos(token, candidate)
    cand_ptr,  # [B, C] int64 the candidates' tokens
    out_ptr,  # [B, C, C] fp32 out: out[b, j, c] = cos(candidate c, candidate j)
    C,
    stride_sb,
    stride_sn,
    stride_cb,
    stride_ob,
    stride_oj,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The candidates' rows of sims, transposed: a pick's column becomes one contiguous row.
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # candidate c
    cols = tl.arange(0, BLOCK_C)  # candidate j
    mask = (rows < C)[:, None] & (cols < C)[None, :]
    tokens = tl.load(cand_ptr + b * stride_cb + rows, mask=rows < C, other=0)
    tile = tl.load(sims_ptr + b * stride_sb + tokens[:, None] * stride_sn + cols[None, :], mask=mask)
    tl.store(out_ptr + b * stride_ob + cols[None, :] * stride_oj + rows[:, None], tile, mask=mask)


@triton.jit
def _candidate_greedy_kernel(
    cand_sims_ptr,  # [B, C, C] fp32: row j = cos(candidate c, candidate j) over c
    top_ptr,  # [B, C] int64 keys of the C best open tokens, in no order (the lowest is the threshold)
    cand_ptr,  # [B, C] int64 tokens of the same
    imp_ptr,  # [B, N] fp32 importance
    max_sim_ptr,  # [B, N] fp32, before this round
    picked_ptr,  # [B, N] int8, set here for the accepted tokens
    accepted_ptr,  # [B, C] int8 out: which candidates were picked this round
    out_ptr,  # [B, keep] int64 picks in pick order
    done_ptr,  # [B] int32 picks made so far
    N,
    C,
    keep,
    lam,
    rest,  # 1 − λ, rounded from the float64 value as the reference's scalar is
    stride_xb,
    stride_xj,
    stride_tb,
    stride_cb,
    stride_ib,
    stride_mb,
    stride_pb,
    stride_ab,
    stride_ob,
    HAS_THRESHOLD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    pos = tl.arange(0, BLOCK_C)
    in_c = pos < C
    tokens = tl.load(cand_ptr + b * stride_cb + pos, mask=in_c, other=0)  # [C] int64
    top = tl.load(top_ptr + b * stride_tb + pos, mask=in_c, other=CLOSED)
    if HAS_THRESHOLD:  # the lowest of the C keys is the threshold T: the best token outside the candidates
        threshold = tl.min(tl.where(in_c, top, OPEN_MAX), axis=0)
    else:
        threshold = tl.full((), CLOSED, tl.int64)
    open_ = top > threshold  # picked tokens (CLOSED keys) and T itself are no candidates
    lam_imp = lam * tl.load(imp_ptr + b * stride_ib + tokens, mask=in_c, other=0.0)
    max_sim = tl.load(max_sim_ptr + b * stride_mb + tokens, mask=in_c, other=0.0)
    rows = cand_sims_ptr + b * stride_xb + pos  # + best · stride_xj: cos(candidate, best), contiguous
    accepted = tl.zeros((BLOCK_C,), dtype=tl.int32)
    done = tl.load(done_ptr + b)
    go = done < keep
    tie = ((N - 1 - tokens) << 16) | pos  # the low 32 bits of the keys: constant through the round
    while go:
        key = tl.where(open_, _score_key(lam_imp - rest * max_sim) | tie, CLOSED)
        best_key = tl.max(key, axis=0)
        go = best_key > threshold  # it beats every token outside the candidates too
        best = (best_key & 0xFFFF).to(tl.int32)  # its position among the candidates
        tl.store(out_ptr + b * stride_ob + done, N - 1 - ((best_key >> 16) & 0xFFFF), mask=go)
        column = tl.load(rows + best * stride_xj, mask=in_c, other=0.0)  # cos(candidate, best)
        max_sim = tl.where(go, tl.maximum(max_sim, column), max_sim)
        now = tl.where(go, pos == best, False)  # (not `go & ...`: the interpreter makes that int32)
        open_ = open_ & ~now
        accepted = tl.where(now, 1, accepted)
        done += go.to(tl.int32)
        go = go & (done < keep)
    tl.store(accepted_ptr + b * stride_ab + pos, accepted.to(tl.int8), mask=in_c)
    tl.store(picked_ptr + b * stride_pb + tokens, tl.full((BLOCK_C,), 1, tl.int8), mask=accepted != 0)
    tl.store(done_ptr + b, done)


@triton.jit
def _update_kernel(
    sims_ptr,  # [B, N, C] fp32
    accepted_ptr,  # [B, C] int8: the columns of sims that were picked
    imp_ptr,  # [B, N] fp32
    max_sim_ptr,  # [B, N] fp32, raised in place
    picked_ptr,  # [B, N] int8
    keys_ptr,  # [B, N] int64 out
    N,
    C,
    lam,
    rest,
    stride_sb,
    stride_sn,
    stride_ab,
    stride_ib,
    stride_mb,
    stride_pb,
    stride_kb,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < N
    cols = tl.arange(0, BLOCK_C)
    accepted = tl.load(accepted_ptr + b * stride_ab + cols, mask=cols < C, other=0) != 0
    sims = tl.load(
        sims_ptr + b * stride_sb + offs[:, None] * stride_sn + cols[None, :],
        mask=valid[:, None] & accepted[None, :],
        other=-float("inf"),
    )  # [BLOCK_N, BLOCK_C]
    max_sim = tl.load(max_sim_ptr + b * stride_mb + offs, mask=valid, other=0.0)
    max_sim = tl.maximum(max_sim, tl.max(sims, axis=1))
    tl.store(max_sim_ptr + b * stride_mb + offs, max_sim, mask=valid)
    imp = tl.load(imp_ptr + b * stride_ib + offs, mask=valid, other=0.0)
    picked = tl.load(picked_ptr + b * stride_pb + offs, mask=valid, other=1) != 0
    key = tl.where(picked, CLOSED, _order_key(lam * imp - rest * max_sim, offs, N))
    tl.store(keys_ptr + b * stride_kb + offs, key, mask=valid)


@triton.jit
def _unit_rows_kernel(
    x_ptr,  # [B, M, D] features
    context_ptr,  # [B, D] fp32 unit context
    unit_ptr,  # [B, M, D] out, x's dtype
    imp_ptr,  # [B, M] fp32 out
    D,
    stride_xb,
    stride_xm,
    stride_cb,
    stride_ub,
    stride_um,
    stride_ib,
    BLOCK_D: tl.constexpr,
):
    # One token per program: ‖x‖ in a first pass over the row, then unit = x / ‖x‖ (rounded as
    # F.normalize rounds: an IEEE division) and its dot product with the unit context.
    m = tl.program_id(0)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    row = x_ptr + b * stride_xb + m * stride_xm
    squares = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        x = tl.load(row + d + offs, mask=d + offs < D, other=0.0).to(tl.float32)
        squares += x * x
    norm = tl.maximum(tl.sqrt_rn(tl.sum(squares, axis=0)), 1e-12)
    dots = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        valid = d + offs < D
        unit = tl.div_rn(tl.load(row + d + offs, mask=valid, other=0.0).to(tl.float32), norm)
        tl.store(unit_ptr + b * stride_ub + m * stride_um + d + offs, unit.to(unit_ptr.dtype.element_ty), mask=valid)
        dots += unit * tl.load(context_ptr + b * stride_cb + d + offs, mask=valid, other=0.0)
    tl.store(imp_ptr + b * stride_ib + m, tl.sum(dots, axis=0))


def unit_features_triton(features: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops/prune_tokens.unit_features_reference` in one pass over the features (summation order aside)."""
    batch, count, dim = features.shape
    x = features.contiguous()
    unit_context = torch.nn.functional.normalize(context.float(), dim=-1).contiguous()
    unit = torch.empty_like(x)
    importance = torch.empty(batch, count, dtype=torch.float32, device=x.device)
    _unit_rows_kernel[(count, batch)](
        x, unit_context, unit, importance, dim, x.stride(0), x.stride(1), unit_context.stride(0),
        unit.stride(0), unit.stride(1), importance.stride(0),
        BLOCK_D=min(1024, triton.next_power_of_2(dim)), num_warps=4,
    )  # fmt: skip
    return unit, importance


def _similarities(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], tokens [B, K] -> cos(x_i, x_token) [B, N, K] fp32 (fp32 accumulation)."""
    chosen = x.gather(1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # [B, K, D]
    if x.dtype == torch.float32:
        return torch.bmm(x, chosen.mT)
    return torch.bmm(x, chosen.mT, out_dtype=torch.float32)


DEFAULT_CONFIG = {"CANDIDATES": 256, "BLOCK_N": 32, "num_warps": 4, "greedy_warps": 1, "top_warps": 8}


class LazyGreedy:
    """The state buffers of the lazy greedy for one shape, and the launches of its steps."""

    def __init__(self, x: torch.Tensor, keep: int, lambda_: float, config: dict) -> None:
        batch, count, _ = x.shape
        device = x.device
        self.keep, self.config = keep, config
        self.lam, self.rest = float(lambda_), 1.0 - float(lambda_)
        self.cands = min(config["CANDIDATES"], count)  # the C best open tokens: C − 1 candidates and T (or all)
        self.block_c = max(16, triton.next_power_of_2(self.cands))
        self.x = torch.empty_like(x)
        self.imp = torch.empty(batch, count, dtype=torch.float32, device=device)
        self.out = torch.empty(batch, keep, dtype=torch.int64, device=device)
        self.picked = torch.empty(batch, count, dtype=torch.int8, device=device)
        self.max_sim = torch.empty(batch, count, dtype=torch.float32, device=device)
        self.keys = torch.empty(batch, count, dtype=torch.int64, device=device)
        self.top = torch.empty(batch, self.cands, dtype=torch.int64, device=device)  # the C best keys, no order
        self.tokens = torch.empty(batch, self.cands, dtype=torch.int64, device=device)  # their tokens
        self.accepted = torch.empty(batch, self.cands, dtype=torch.int8, device=device)
        self.cand_sims = torch.empty(batch, self.cands, self.cands, dtype=torch.float32, device=device)
        self.done = torch.empty(batch, dtype=torch.int32, device=device)

    def start(self, x: torch.Tensor, imp: torch.Tensor) -> None:
        """Load the inputs and make the first pick, argmax imp."""
        self.x.copy_(x)
        self.imp.copy_(imp)
        self.picked.zero_()
        self.max_sim.zero_()
        self.accepted.fill_(1)  # the update below raises max_sim with column 0, the first pick
        self.done.fill_(1)
        first = self.imp.argmax(dim=1, keepdim=True)  # [B, 1]
        self.out[:, :1] = first
        self.picked.scatter_(1, first, 1)
        self._update(_similarities(self.x, first))

    def picks_left(self) -> int:
        """The picks the slowest row still lacks (a host sync)."""
        return int((self.keep - self.done).max())

    def rounds_for(self, left: int) -> int:
        """Rounds to queue for `left` missing picks: a round makes at most C − 1 picks a row."""
        return math.ceil(left / max(1, self.cands - 1))

    def round(self) -> None:
        batch, count = self.keys.shape
        block_r = 16
        _top_keys_kernel[(batch,)](
            self.keys, self.top, self.tokens, count, self.cands, self.keys.stride(0), self.top.stride(0),
            self.tokens.stride(0), BLOCK_N=triton.next_power_of_2(count), num_warps=self.config["top_warps"],
        )  # fmt: skip
        sims = _similarities(self.x, self.tokens)  # [B, N, C]
        _candidate_sims_kernel[(batch, triton.cdiv(self.cands, block_r))](
            sims, self.tokens, self.cand_sims, self.cands, sims.stride(0), sims.stride(1), self.tokens.stride(0),
            self.cand_sims.stride(0), self.cand_sims.stride(1), BLOCK_R=block_r, BLOCK_C=self.block_c, num_warps=4,
        )  # fmt: skip
        _candidate_greedy_kernel[(batch,)](
            self.cand_sims, self.top, self.tokens, self.imp, self.max_sim, self.picked, self.accepted, self.out,
            self.done, count, self.cands, self.keep, self.lam, self.rest,
            self.cand_sims.stride(0), self.cand_sims.stride(1), self.top.stride(0), self.tokens.stride(0),
            self.imp.stride(0), self.max_sim.stride(0), self.picked.stride(0), self.accepted.stride(0),
            self.out.stride(0),
            HAS_THRESHOLD=count > self.cands, BLOCK_C=self.block_c, num_warps=self.config["greedy_warps"],
            enable_fp_fusion=False,
        )  # fmt: skip
        self._update(sims)

    def _update(self, sims: torch.Tensor) -> None:
        batch, count = self.keys.shape
        grid = (batch, triton.cdiv(count, self.config["BLOCK_N"]))
        _update_kernel[grid](
            sims, self.accepted, self.imp, self.max_sim, self.picked, self.keys, count, sims.shape[2],
            self.lam, self.rest, sims.stride(0), sims.stride(1), self.accepted.stride(0), self.imp.stride(0),
            self.max_sim.stride(0), self.picked.stride(0), self.keys.stride(0),
            BLOCK_N=self.config["BLOCK_N"], BLOCK_C=self.block_c, num_warps=self.config["num_warps"],
            enable_fp_fusion=False,
        )  # fmt: skip


class GraphedGreedy:
    """A `LazyGreedy` whose round is a captured CUDA graph: one replay instead of six launches."""

    def __init__(self, greedy: LazyGreedy) -> None:
        self.greedy = greedy
        self.graph: torch.cuda.CUDAGraph | None = None

    def round(self) -> None:
        if self.graph is None:  # the first round runs eagerly: it compiles the kernels before the capture
            self.greedy.round()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.greedy.round()
        else:
            self.graph.replay()


_GRAPHS: OrderedDict[tuple, GraphedGreedy] = OrderedDict()
GRAPH_CACHE_SIZE = 8  # shapes whose buffers and round graph stay on the GPU


def _graphed(x: torch.Tensor, keep: int, lambda_: float, config: dict) -> GraphedGreedy:
    stream = torch.cuda.current_stream(x.device).cuda_stream
    key = (x.device, stream, x.shape, x.dtype, keep, float(lambda_), tuple(sorted(config.items())))
    if key not in _GRAPHS:
        _GRAPHS[key] = GraphedGreedy(LazyGreedy(x, keep, lambda_, config))
        if len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return _GRAPHS[key]


def mmr_select_rounds(
    features: torch.Tensor, importance: torch.Tensor, keep: int, lambda_: float, config: dict | None = None
) -> tuple[torch.Tensor, int]:
    """`mmr_select_triton`, and how many candidate rounds it ran."""
    count = features.shape[1]
    if count > MAX_TOKENS:
        raise ValueError(f"mmr_select_triton: {count} tokens exceed the kernel's limit of {MAX_TOKENS}")
    if not 0 < keep <= count:
        raise ValueError(f"mmr_select_triton: keep={keep} must be in [1, {count}]")
    config = DEFAULT_CONFIG | (config or {})
    if config["CANDIDATES"] < 2:
        raise ValueError(f"mmr_select_triton: CANDIDATES={config['CANDIDATES']} must be >= 2 (candidates and T)")
    # CPU (the interpreter) has no fp32-output half GEMM: multiply in fp32, which is as exact.
    x = features if features.is_cuda else features.float()
    # On a GPU the rounds replay a CUDA graph (launching six kernels a round costs more host time
    # than the GPU spends on them), unless the caller is capturing a graph itself.
    graphed = x.is_cuda and not torch.cuda.is_current_stream_capturing() and config.get("cuda_graph", True)
    greedy = _graphed(x, keep, lambda_, config) if graphed else LazyGreedy(x, keep, lambda_, config)
    state = greedy.greedy if graphed else greedy
    state.start(x, importance.float())
    rounds = 0
    while (left := state.picks_left()) > 0:
        for _ in range(state.rounds_for(left)):
            rounds += 1
            greedy.round()
    return state.out.clone(), rounds


def mmr_select_triton(
    features: torch.Tensor, importance: torch.Tensor, keep: int, lambda_: float, config: dict | None = None
) -> torch.Tensor:
    """Greedy MMR over unit-norm features [B, N, D] (fp32/fp16/bf16) -> picks [B, keep] int64, in pick order.

    config: CANDIDATES (C >= 2, the best open tokens a round looks at), BLOCK_N (tokens per update
    tile), num_warps (update kernel), greedy_warps (candidate kernel), top_warps (top-C kernel),
    cuda_graph (default True: on a GPU, replay each round as a CUDA graph cached per shape,
    `GRAPH_CACHE_SIZE` shapes).
    """
    return mmr_select_rounds(features, importance, keep, lambda_, config)[0]
