"""Speculative decoding (EAGLE draft, fused step) vs plain greedy decoding of the same target.

1. SmolLM2-135M-Instruct (bf16) with the trained draft (`models/assets/`): prompts are windows of
   the held-out splits (Shakespeare's Tempest, Lee news 250-299); for each batch size, plain
   greedy decoding and speculative decoding (chain of --k, and the --tree) generate
   --new-tokens tokens per row. Both run the same functional forward with a static KV cache,
   each step replayed as a CUDA graph (the step compiled with --backend first, if not eager),
   with the same host loop (one finished-check per step). Reported: mean accepted length
   (tokens per row per step), tokens/s, speed-up, and whether the outputs are identical.
2. A Llama-8B-shaped random-weight target (hidden 4096, 32/8 heads, vocab 128256, --big-layers
   layers) with a random draft of the same shape: acceptance means nothing there, so it reports
   the mechanism cost: one fused step vs one plain decode step (CUDA-graph replay, median), and
   the accepted length at which speculation breaks even (their ratio).

    python -m benchmarks.bench_speculative                    # on the GPU machine (~3-4 min on an H100)
    python -m benchmarks.bench_speculative --tiny --device cpu   # a CPU check of the script
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import transformers

from angel_compile.speculative import (
    DraftConfig,
    EagleDraft,
    GreedyDecoder,
    SpeculativeDecoder,
    load_draft,
    resolve_tree,
    speculative_stats,
)


class StepRunner:
    """A decoder's state with its step captured as a CUDA graph (or called eagerly on a CPU)."""

    def __init__(self, decoder, step, input_ids: torch.Tensor, new_tokens: int, device: str) -> None:
        with torch.no_grad():
            self.state = decoder.new_state(input_ids, new_tokens)
        self.initial = [t.clone() for t in self.state.tensors()]
        self.step = step
        self.graph = None
        if device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):  # compilation and lazy initialisation stay out of the capture
                    step(*self.state.tensors())
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                step(*self.state.tensors())
        self.reset()

    def reset(self) -> None:
        for tensor, initial in zip(self.state.tensors(), self.initial, strict=True):
            tensor.copy_(initial)

    def once(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self.step(*self.state.tensors())

    def decode(self) -> int:
        """From the prefilled state to every row's last token; returns the steps taken."""
        self.reset()
        steps = 0
        while not self.state.finished():
            self.once()
            steps += 1
        return steps


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_decode(runner: StepRunner, device: str, repeats: int) -> tuple[float, int]:
    """Median seconds of a whole decode, and its steps."""
    runner.decode()  # warm
    times, steps = [], 0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        steps = runner.decode()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), steps


def step_ms(runner: StepRunner, device: str) -> float:
    """Median ms of one step on a state whose rows are all finished (their lengths no longer move)."""
    runner.reset()
    while not runner.state.finished():
        runner.once()
    if device != "cuda":
        start = time.perf_counter()
        runner.once()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(runner.once, warmup=25, rep=200, return_mode="median")


def _compile(decoder, backend: str):
    if backend == "eager":
        return decoder
    return torch.compile(decoder, backend=backend, fullgraph=True)


def held_out_prompts(tokenizer, batch: int, length: int) -> torch.Tensor:
    from angel_compile.data import token_ids

    stream = torch.cat([token_ids(tokenizer, corpus, "held_out")[0] for corpus in ("shakespeare", "lee")])
    starts = torch.linspace(0, stream.numel() - length - 1, batch).long().tolist()
    return torch.stack([stream[s : s + length] for s in starts])


def smollm2_table(args, trees: list[tuple[str, tuple[int, ...]]]) -> list[str]:
    if args.tiny:
        from angel_compile.models import build_toy_model

        target = build_toy_model("llama").to(args.device, args.dtype)
        draft = EagleDraft(DraftConfig.for_target(target)).to(args.device, args.dtype)
        tokenizer = None
    else:
        from angel_compile.models import load_smollm2

        target, tokenizer = load_smollm2(args.dtype)
        target = target.to(args.device)
        draft = load_draft(args.draft, args.dtype) if args.draft else load_draft(dtype=args.dtype)
        draft = draft.to(args.device)
    lines = [
        f"\n## SmolLM2-135M-Instruct + trained EAGLE draft ({args.dtype}, {args.backend} + "
        f"{'CUDA graphs' if args.device == 'cuda' else 'eager CPU'}), {args.new_tokens} new tokens per row, "
        f"prompt {args.prompt_len} tokens of held-out text\n",
        "| batch | decoding | accepted length | tokens/s | × plain | steps | output = plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in args.batches:
        if tokenizer is None:
            ids = torch.randint(0, target.config.vocab_size, (batch, args.prompt_len))
        else:
            ids = held_out_prompts(tokenizer, batch, args.prompt_len)
        ids = ids.to(args.device)
        torch._dynamo.reset()
        plain = GreedyDecoder(target)
        runner = StepRunner(plain, _compile(plain, args.backend), ids, args.new_tokens, args.device)
        seconds, steps = timed_decode(runner, args.device, args.repeats)
        plain_tps = batch * args.new_tokens / seconds
        reference = runner.state.output[:, : args.new_tokens].clone()
        lines.append(f"| {batch} | plain greedy | 1.00 | {plain_tps:,.0f} | 1.00 | {steps} | - |")
        print(lines[-1], flush=True)
        del runner
        for label, branching in trees:
            torch._dynamo.reset()
            decoder = SpeculativeDecoder(target, draft, resolve_tree(None, branching))
            runner = StepRunner(decoder, _compile(decoder, args.backend), ids, args.new_tokens, args.device)
            seconds, steps = timed_decode(runner, args.device, args.repeats)
            stats = speculative_stats(runner.state, steps)
            tps = batch * args.new_tokens / seconds
            same = (runner.state.output[:, : args.new_tokens] == reference).all(dim=1).float().mean().item()
            lines.append(
                f"| {batch} | {label} | {stats.mean_accepted_length:.2f} | {tps:,.0f} | {tps / plain_tps:.2f} | "
                f"{steps} | {same:.0%} of rows |"
            )
            print(lines[-1], flush=True)
            del runner
    return lines


def big_table(args, trees: list[tuple[str, tuple[int, ...]]]) -> list[str]:
    if args.tiny:
        sizes = dict(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
        )
    else:
        sizes = dict(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
        )
    config = transformers.LlamaConfig(
        num_hidden_layers=args.big_layers, rope_theta=500000.0, max_position_embeddings=8192, use_cache=False, **sizes
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        target = transformers.LlamaForCausalLM(config).to(args.dtype).eval()
        for parameter in target.parameters():
            if parameter.dim() == 2:
                parameter.data.normal_(0, 0.02)
        draft = EagleDraft(DraftConfig.for_target(target)).to(args.dtype)
    ids = torch.randint(0, config.vocab_size, (1, args.big_context), device=args.device)
    plain = GreedyDecoder(target)
    plain_ms = step_ms(StepRunner(plain, _compile(plain, args.backend), ids, 2, args.device), args.device)
    lines = [
        f"\n## Llama-8B-shaped random target ({args.big_layers} layers) + random draft of its shape: "
        f"cost of one step, batch 1, {args.big_context}-token context\n",
        "| step | verified tokens | ms per step | × plain step = break-even accepted length |",
        "|---|---|---|---|",
        f"| plain decode | 1 | {plain_ms:.3f} | 1.00 |",
    ]
    print(lines[-1], flush=True)
    for label, branching in trees:
        torch._dynamo.reset()
        decoder = SpeculativeDecoder(target, draft, resolve_tree(None, branching))
        fused_ms = step_ms(StepRunner(decoder, _compile(decoder, args.backend), ids, 2, args.device), args.device)
        lines.append(f"| {label} | {decoder.tree.num_drafted + 1} | {fused_ms:.3f} | {fused_ms / plain_ms:.2f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--draft", default="", help="draft weights (default: the built-in SmolLM2 draft)")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tree", default="2,2,1,1", help="branching per depth; empty to skip the tree")
    parser.add_argument("--backend", default="eager", help="eager, or a torch.compile backend such as angel")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-layers", type=int, default=4)
    parser.add_argument("--big-context", type=int, default=1024)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy target and random draft (CPU check of the script)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on cuda")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    # float32 shows whether outputs that differ from plain decoding in bf16 are rounding near-ties.
    args.dtype = getattr(torch, args.dtype)
    if args.tiny:
        args.new_tokens, args.prompt_len, args.big_context, args.repeats = 12, 8, 16, 1
    trees = [(f"chain k={args.k}", (1,) * args.k)]
    if args.tree:
        branching = tuple(int(b) for b in args.tree.split(","))
        trees.append((f"tree {branching}", branching))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {datetime.date.today()} {device_name}, torch {torch.__version__}")
    lines = smollm2_table(args, trees)
    if not args.skip_big:
        lines += big_table(args, trees)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
