"""Prefill with pruned visual tokens on a GPU: a Qwen2-VL-7B-shaped language model, 4 layers, bf16.

Random weights (hidden 3584, MLP 18944, 28 query / 4 KV heads, SDPA; `--layers 28` for the full
depth, whose prefill the selection is a smaller share of), batch 1, a prompt of
128 text tokens around 2,048 or 8,192 visual tokens. For each pruning ratio (0 / 75 / 90%):
  - prefill: the language model's forward on the (pruned) embeddings, median ms;
  - selection: `angel::prune_tokens` with MMR (λ = 0.5) on the merged embeddings — the lazy
    greedy of `kernels/mmr_select.py` (candidate rounds: top-k, GEMM, Triton kernels) plus the
    gathers — ms, the rounds it ran, its share of the pruned prefill (the goal is < 3%), and
    the total (selection + pruned prefill) vs the unpruned prefill;
  - the same greedy MMR as PyTorch ops on the GPU (`mmr_select_reference`: one batched
    GEMV + argmax per pick), for comparison.
Then the selection alone (`mmr_select_rounds` on bf16 unit features with the same local
redundancy) for 2,048 / 8,192 / 16,384 tokens and each `--candidates` count; with `--profile`,
its GPU kernel time by step (top-C, candidate greedy, similarity GEMM, the rest) at 2,048 / 8,192.
Prefill: same-run medians of `triton.testing.do_bench`. Selection: the median wall time of
several synchronised calls (the rounds' host syncs are part of the cost).

    python -m benchmarks.bench_token_pruning --visual 2048 8192
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import transformers
import triton.testing

import angel_compile  # noqa: F401  (registers the op and its CUDA kernel)
from angel_compile.kernels.mmr_select import mmr_select_rounds
from angel_compile.ops.prune_tokens import kept_count, mmr_select_reference, prune_tokens_forward

TEXT_TOKENS = 128
DIM = 3584
RATIOS = (0.0, 0.75, 0.9)
SELECTION_ALONE = (2048, 8192, 16384)


def _language_model(layers: int) -> torch.nn.Module:
    config = transformers.Qwen2Config(
        hidden_size=DIM,
        intermediate_size=18944,
        num_hidden_layers=layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=1024,  # the embedding table is not used: the model gets inputs_embeds
        max_position_embeddings=32768,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialised on the GPU: 28 layers in fp32 take minutes on the CPU
        return transformers.Qwen2Model(config).to(torch.bfloat16).eval()


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def _median_ms(fn, runs: int) -> float:
    """Median wall time of `runs` synchronised calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _visual_features(visual: int) -> torch.Tensor:
    """[1, visual, DIM] features with local redundancy: 16 neighbouring patches share a centre."""
    smooth = torch.randn(1, visual // 16, DIM, device="cuda").repeat_interleave(16, dim=1)
    return smooth + 0.5 * torch.randn_like(smooth)


def bench_visual(model: torch.nn.Module, visual: int) -> None:
    seq = TEXT_TOKENS + visual
    torch.manual_seed(visual)
    embeds = torch.randn(1, seq, DIM, device="cuda", dtype=torch.bfloat16)  # text random
    start = TEXT_TOKENS // 2
    embeds[:, start : start + visual] = _visual_features(visual).to(torch.bfloat16)
    mask = torch.zeros(1, seq, dtype=torch.bool, device="cuda")
    mask[:, start : start + visual] = True
    positions = torch.arange(seq, device="cuda").unsqueeze(0)
    full_ms = None
    for ratio in RATIOS:
        keep = kept_count(visual, ratio)
        rounds = []

        def counting_select(features, importance, keep, lambda_, rounds=rounds) -> torch.Tensor:
            picks, used = mmr_select_rounds(features, importance, keep, lambda_)
            rounds.append(used)
            return picks

        def select(keep=keep) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ops.angel.prune_tokens(embeds, mask, visual, keep, "mmr", 0.5, 1.0, 0)

        def select_torch(keep=keep) -> tuple[torch.Tensor, torch.Tensor]:
            return prune_tokens_forward(embeds, mask, visual, keep, "mmr", 0.5, 1.0, 0, mmr_select_reference)

        with torch.no_grad():
            pruned, kept = select()
            pruned_positions = positions.gather(1, kept)
            mask_2d = torch.ones_like(pruned_positions)

            def prefill(pruned=pruned, pruned_positions=pruned_positions, mask_2d=mask_2d) -> torch.Tensor:
                return model(inputs_embeds=pruned, position_ids=pruned_positions, attention_mask=mask_2d)

            prefill_ms = _bench(prefill)
            select_ms = torch_ms = 0.0
            if ratio > 0:
                select_ms = _median_ms(select, runs=10)
                torch_ms = _median_ms(select_torch, runs=3)
                prune_tokens_forward(embeds, mask, visual, keep, "mmr", 0.5, 1.0, 0, counting_select)
        full_ms = full_ms or prefill_ms
        total = prefill_ms + select_ms
        print(
            f"| {visual} | {int(ratio * 100)}% | {pruned.shape[1]} | {prefill_ms:.2f} | {select_ms:.3f} | "
            f"{rounds[0] if rounds else '-'} | {100 * select_ms / prefill_ms:.1f}% | {full_ms / total:.2f}x | "
            f"{torch_ms:.3f} |",
            flush=True,
        )


def _selection_inputs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 unit features [1, count, DIM] with the benchmark's local redundancy, and their importance."""
    torch.manual_seed(count)
    features = _visual_features(count)
    unit = torch.nn.functional.normalize(features, dim=-1).to(torch.bfloat16)
    importance = torch.nn.functional.cosine_similarity(features, torch.randn(1, 1, DIM, device="cuda"), dim=-1)
    return unit, importance


def _kernel_group(name: str) -> str:
    if "_top_keys_kernel" in name:
        return "top-C"
    if "_candidate_greedy_kernel" in name:
        return "greedy"
    if "nvjet" in name or "gemm" in name.lower():
        return "GEMM"
    return "other"


def profile_selection() -> None:
    """GPU kernel time of the selection by step (profiler; rounds launched eagerly so that each kernel shows)."""
    print("\n# selection alone, GPU kernel time per call (mean of 5, µs), by step")
    print("| tokens | keep | top-C | greedy | GEMM | other | total |")
    print("|---|---|---|---|---|---|---|")
    for count in SELECTION_ALONE[:2]:
        unit, importance = _selection_inputs(count)
        for keep in (kept_count(count, 0.75), kept_count(count, 0.9)):
            config = {"cuda_graph": False}
            mmr_select_rounds(unit, importance, keep, 0.5, config)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                for _ in range(5):
                    mmr_select_rounds(unit, importance, keep, 0.5, config)
                torch.cuda.synchronize()
            groups = dict.fromkeys(("top-C", "greedy", "GEMM", "other"), 0.0)
            for event in profile.key_averages():
                groups[_kernel_group(event.key)] += event.self_device_time_total / 5
            cells = " | ".join(f"{us:.0f}" for us in groups.values())
            print(f"| {count} | {keep} | {cells} | {sum(groups.values()):.0f} |", flush=True)


def bench_selection_alone(candidates: list[int]) -> None:
    print("\n# selection alone: mmr_select_rounds, bf16 unit features [1, N, 3584], λ=0.5, median ms")
    print("| tokens | keep | candidates per round | rounds | selection ms |")
    print("|---|---|---|---|---|")
    for count in SELECTION_ALONE:
        unit, importance = _selection_inputs(count)
        for keep in (kept_count(count, 0.75), kept_count(count, 0.9)):
            for cands in candidates:

                def run(unit=unit, importance=importance, keep=keep, cands=cands) -> tuple[torch.Tensor, int]:
                    return mmr_select_rounds(unit, importance, keep, 0.5, {"CANDIDATES": cands})

                rounds = run()[1]
                ms = _median_ms(run, runs=10)
                print(f"| {count} | {keep} | {cands} | {rounds} | {ms:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visual", type=int, nargs="+", default=[2048])
    parser.add_argument("--candidates", type=int, nargs="+", default=[128, 256], help="CANDIDATES, selection alone")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the language model")
    parser.add_argument("--profile", action="store_true", help="also the selection's GPU kernel time by step")
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"# Qwen2-VL-7B-shaped LM, {args.layers} layers, bf16, {TEXT_TOKENS} text tokens; MMR λ=0.5")
    print("# prefill: median ms")
    print(
        "| visual | pruned | seq | prefill ms | selection ms (Triton) | rounds | selection / prefill "
        "| speedup vs 0% (incl. selection) | selection ms (PyTorch greedy) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    model = _language_model(args.layers)
    for visual in args.visual:
        bench_visual(model, visual)
        torch.cuda.empty_cache()
    bench_selection_alone(args.candidates)
    if args.profile:
        profile_selection()


if __name__ == "__main__":
    main()
