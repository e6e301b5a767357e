"""Prefill with pruned visual tokens on a GPU: a Qwen2-VL-7B-shaped language model, 4 layers, bf16.

Random weights (hidden 3584, MLP 18944, 28 query / 4 KV heads, SDPA), batch 1, a prompt of
128 text tokens around 2,048 or 8,192 visual tokens. For each pruning ratio (0 / 75 / 90%):
  - prefill: the language model's forward on the (pruned) embeddings, median ms;
  - selection: `angel::prune_tokens` with MMR (λ = 0.5) on the merged embeddings — the
    Triton greedy kernel plus the gathers — ms, and its share of the pruned prefill (the goal
    is < 3%), and the total (selection + pruned prefill) vs the unpruned prefill;
  - the same greedy MMR as PyTorch ops on the GPU (`mmr_select_reference`: one batched
    GEMV + argmax per pick), for comparison.
Prefill: same-run medians of `triton.testing.do_bench`. Selection: one timed call (CUDA
events) after a warm-up on a small input, because the greedy loop is sequential in k and the
Triton kernel runs it in one program per batch row, reading all N·D features each step: at
8,192 tokens × 3,584 dims it can take minutes (see RESULTS.md). Run 2,048 first:

    python -m benchmarks.bench_token_pruning --visual 2048
    python -m benchmarks.bench_token_pruning --visual 8192
"""

from __future__ import annotations

import argparse
import datetime

import torch
import transformers
import triton.testing

import angel_compile  # noqa: F401  (registers the op and its CUDA kernel)
from angel_compile.kernels.mmr_select import mmr_select_triton
from angel_compile.ops.prune_tokens import kept_count, mmr_select_reference, prune_tokens_forward

TEXT_TOKENS = 128
RATIOS = (0.0, 0.75, 0.9)


def _language_model() -> torch.nn.Module:
    config = transformers.Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=4,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=1024,  # the embedding table is not used: the model gets inputs_embeds
        max_position_embeddings=32768,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen2Model(config).to("cuda", torch.bfloat16).eval()


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def _time_once(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def bench_visual(model: torch.nn.Module, visual: int) -> None:
    seq = TEXT_TOKENS + visual
    torch.manual_seed(visual)
    # Visual features with local redundancy (neighbouring patches alike), text random.
    embeds = torch.randn(1, seq, 3584, device="cuda", dtype=torch.bfloat16)
    start = TEXT_TOKENS // 2
    smooth = torch.randn(1, visual // 16, 3584, device="cuda").repeat_interleave(16, dim=1)
    embeds[:, start : start + visual] = (smooth + 0.5 * torch.randn_like(smooth)).to(torch.bfloat16)
    mask = torch.zeros(1, seq, dtype=torch.bool, device="cuda")
    mask[:, start : start + visual] = True
    positions = torch.arange(seq, device="cuda").unsqueeze(0)
    full_ms = None
    for ratio in RATIOS:
        keep = kept_count(visual, ratio)

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
            select_ms = _time_once(select) if ratio > 0 else 0.0
            torch_ms = _time_once(select_torch) if ratio > 0 else 0.0
        full_ms = full_ms or prefill_ms
        total = prefill_ms + select_ms
        print(
            f"| {visual} | {int(ratio * 100)}% | {pruned.shape[1]} | {prefill_ms:.2f} | {select_ms:.3f} | "
            f"{100 * select_ms / prefill_ms:.1f}% | {full_ms / total:.2f}x | {torch_ms:.3f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visual", type=int, nargs="+", default=[2048])
    args = parser.parse_args()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"# Qwen2-VL-7B-shaped LM, 4 layers, bf16, {TEXT_TOKENS} text tokens; MMR λ=0.5; prefill: median ms")
    print(
        "| visual | pruned | seq | prefill ms | selection ms (Triton) | selection / prefill "
        "| speedup vs 0% (incl. selection) | selection ms (PyTorch greedy) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    model = _language_model()
    warm = torch.nn.functional.normalize(torch.randn(1, 64, 3584, device="cuda"), dim=-1).to(torch.bfloat16)
    mmr_select_triton(warm, torch.randn(1, 64, device="cuda"), 4, 0.5)  # compile the kernel
    for visual in args.visual:
        bench_visual(model, visual)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
