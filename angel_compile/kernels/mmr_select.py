"""Greedy Maximal Marginal Relevance selection in Triton (reference: `ops/prune_tokens.py`).

The greedy is exact and runs in rounds of "lazy" steps instead of one N-wide scan per pick.

Design. State per batch row: max_sim [N] (fp32, the max of 0 and the similarities to the
picks so far), a picked flag and a key [N] (int64) that orders the tokens as the reference's
argmax does: score s = λ·imp − (1 − λ)·max_sim, higher first, then the lower index. The first
pick is argmax imp. Then every round
  1. takes the C + 1 best open tokens by key (`torch.topk`): C candidates and the threshold T,
     the best token that is not a candidate;
  2. computes the similarities of all N tokens to the C candidates, sims [N, C], in one
     batched GEMM (tensor cores for fp16/bf16 with fp32 accumulation and output: the products
     are exact, as in the reference's fp32 einsum; fp32 stays fp32, TF32 only where torch's
     matmul precision allows it, as for the reference);
  3. runs the greedy inside the candidates (`_candidate_greedy_kernel`, one program per batch
     row, one step per pick: one max reduction and one load of a column of sims): it picks the
     best candidate by its updated key and accepts it only while that key beats T's key;
  4. raises max_sim with the accepted columns of sims and recomputes every key
     (`_update_kernel`, tiles of N × C).
Rows finish after different numbers of rounds; a finished row's rounds are no-ops. The host
reads how many picks the slowest row still lacks (one sync) and queues that many rounds
divided by C (each round picks at most C), so a few syncs cover all rounds.

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
top-k over N, a GEMM of 2·N·D·C flops and one pass over sims [N, C]; memory is N·D + N·C·4
bytes (no N × N matrix). The number of rounds R ≥ (keep − 1) / C depends on the data: with
C = 256, D = 3584 and locally redundant features (16 neighbours around a centre, as in
`benchmarks/bench_token_pruning.py`), keep = N/4 took 7 rounds for N = 2048 and 16 for 8192.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_TOKENS = 16384  # a token index fits the 16-bit field of the key
CLOSED: tl.constexpr = tl.constexpr(-(2**63))  # the key of picked tokens, below every open key


@triton.jit
def _order_key(score, token, N):
    """int64 key: fp32 score in the high 32 bits (order-preserving), then N − 1 − token (lower index wins)."""
    score = tl.where(score == 0.0, 0.0, score)  # −0.0 ties +0.0, as in argmax
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip the magnitude order
    return (bits.to(tl.int64) << 32) | ((N - 1 - token).to(tl.int64) << 16)


@triton.jit
def _candidate_greedy_kernel(
    sims_ptr,  # [B, N, C] fp32: cos(token, candidate)
    top_ptr,  # [B, C + 1] int64 keys of the candidates, then (if HAS_THRESHOLD) the threshold's
    cand_ptr,  # [B, C + 1] int64 tokens of the same
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
    stride_sb,
    stride_sn,
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
    open_ = in_c & (tl.load(top_ptr + b * stride_tb + pos, mask=in_c, other=CLOSED) != CLOSED)
    if HAS_THRESHOLD:
        threshold = tl.load(top_ptr + b * stride_tb + C)
    else:
        threshold = tl.full((), CLOSED, tl.int64)
    imp = tl.load(imp_ptr + b * stride_ib + tokens, mask=in_c, other=0.0)
    max_sim = tl.load(max_sim_ptr + b * stride_mb + tokens, mask=in_c, other=0.0)
    rows = sims_ptr + b * stride_sb + tokens * stride_sn  # [C] the candidates' rows of sims
    accepted = tl.zeros((BLOCK_C,), dtype=tl.int32)
    done = tl.load(done_ptr + b)
    go = done < keep
    while go:
        score = lam * imp - rest * max_sim
        key = tl.where(open_, _order_key(score, tokens, N) | pos, CLOSED)
        best_key = tl.max(key, axis=0)
        go = best_key > threshold  # it beats every token outside the candidates too
        best = (best_key & 0xFFFF).to(tl.int32)  # its position among the candidates
        tl.store(out_ptr + b * stride_ob + done, N - 1 - ((best_key >> 16) & 0xFFFF), mask=go)
        column = tl.load(rows + best, mask=in_c, other=0.0)  # cos(candidate, best)
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


def _similarities(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], tokens [B, K] -> cos(x_i, x_token) [B, N, K] fp32 (fp32 accumulation)."""
    chosen = x.gather(1, tokens.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # [B, K, D]
    if x.dtype == torch.float32:
        return torch.bmm(x, chosen.mT)
    return torch.bmm(x, chosen.mT, out_dtype=torch.float32)


def mmr_select_rounds(
    features: torch.Tensor, importance: torch.Tensor, keep: int, lambda_: float, config: dict | None = None
) -> tuple[torch.Tensor, int]:
    """`mmr_select_triton`, and how many candidate rounds it ran."""
    batch, count, _ = features.shape
    if count > MAX_TOKENS:
        raise ValueError(f"mmr_select_triton: {count} tokens exceed the kernel's limit of {MAX_TOKENS}")
    if not 0 < keep <= count:
        raise ValueError(f"mmr_select_triton: keep={keep} must be in [1, {count}]")
    config = {"CANDIDATES": 256, "BLOCK_N": 32, "num_warps": 4, "greedy_warps": 1} | (config or {})
    # CPU (the interpreter) has no fp32-output half GEMM: multiply in fp32, which is as exact.
    x = features.contiguous() if features.is_cuda else features.float().contiguous()
    imp = importance.float().contiguous()
    cands = min(config["CANDIDATES"], count)
    block_c = max(16, triton.next_power_of_2(cands))
    lam, rest = float(lambda_), 1.0 - float(lambda_)
    device = x.device

    out = torch.empty(batch, keep, dtype=torch.int64, device=device)
    picked = torch.zeros(batch, count, dtype=torch.int8, device=device)
    max_sim = torch.zeros(batch, count, dtype=torch.float32, device=device)
    keys = torch.empty(batch, count, dtype=torch.int64, device=device)
    accepted = torch.ones(batch, cands, dtype=torch.int8, device=device)
    done = torch.ones(batch, dtype=torch.int32, device=device)

    def update(sims: torch.Tensor) -> None:
        grid = (batch, triton.cdiv(count, config["BLOCK_N"]))
        _update_kernel[grid](
            sims, accepted, imp, max_sim, picked, keys, count, sims.shape[2], lam, rest,
            sims.stride(0), sims.stride(1), accepted.stride(0), imp.stride(0), max_sim.stride(0),
            picked.stride(0), keys.stride(0),
            BLOCK_N=config["BLOCK_N"], BLOCK_C=block_c, num_warps=config["num_warps"], enable_fp_fusion=False,
        )  # fmt: skip

    first = imp.argmax(dim=1, keepdim=True)  # [B, 1]: the first pick is the most important token
    out[:, :1] = first
    picked.scatter_(1, first, 1)
    update(_similarities(x, first))  # accepted[:, 0] = 1: raise max_sim with the first pick

    rounds = 0
    while (left := int((keep - done).max())) > 0:  # host sync: the picks the slowest row lacks
        for _ in range(math.ceil(left / cands)):  # each round makes at most `cands` picks per row
            rounds += 1
            top = keys.topk(min(cands + 1, count), dim=1)  # [B, C (+1)], best key first
            sims = _similarities(x, top.indices[:, :cands])  # [B, N, C]
            _candidate_greedy_kernel[(batch,)](
                sims, top.values, top.indices, imp, max_sim, picked, accepted, out, done,
                count, cands, keep, lam, rest,
                sims.stride(0), sims.stride(1), top.values.stride(0), top.indices.stride(0), imp.stride(0),
                max_sim.stride(0), picked.stride(0), accepted.stride(0), out.stride(0),
                HAS_THRESHOLD=count > cands, BLOCK_C=block_c, num_warps=config["greedy_warps"],
                enable_fp_fusion=False,
            )  # fmt: skip
            update(sims)
    return out, rounds


def mmr_select_triton(
    features: torch.Tensor, importance: torch.Tensor, keep: int, lambda_: float, config: dict | None = None
) -> torch.Tensor:
    """Greedy MMR over unit-norm features [B, N, D] (fp32/fp16/bf16) -> picks [B, keep] int64, in pick order.

    config: CANDIDATES (C, tokens per round), BLOCK_N (tokens per update tile), num_warps (update
    kernel), greedy_warps (candidate kernel).
    """
    return mmr_select_rounds(features, importance, keep, lambda_, config)[0]
