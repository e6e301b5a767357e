"""Fine-tune SmolLM2-135M-Instruct on Shakespeare with low-rank adapters, so its weights leave the Q4_1 grid.

The base weights are dequantized Q4_1 (4-bit, groups of 32), so 4-bit group-32 quantization of
them is nearly lossless by construction. This script trains rank-8 adapters (A: [r, in],
B: [out, r], merged as W + (alpha / r) * B @ A) on all 210 linear layers of the 30 decoder layers,
on random 512-token windows of the Shakespeare train split (`angel_compile.data`), and stores
them in bf16 as `angel_compile/models/assets/smollm2-135m-shakespeare-lora.safetensors` (~5 MB),
which `angel_compile.models.load_smollm2_finetuned()` merges at load. It then reports perplexity
of base and fine-tuned models on held-out Shakespeare (The Tempest) and Lee news, and how far
the merged weights are from a 4-bit group-32 grid.

    PYTHONPATH=. python examples/finetune_smollm2.py --device cuda --max-minutes 8   # bf16 autocast
    PYTHONPATH=. python examples/finetune_smollm2.py --device cpu --steps 3 --batch 1 --seq-len 64 \
        --eval-tokens 256 --out /tmp/lora.safetensors                                # a CPU smoke test

Training state is saved every `--save-every` steps to `--checkpoint`; a run stopped (by
`--max-minutes`, to fit a time-limited call, or otherwise) resumes from it when started again
with the same options. Windows are drawn from a seeded generator, so a rerun with the same
options on the same device reproduces the adapters up to floating-point reduction order.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from angel_compile.cache import cache_root
from angel_compile.data import token_ids
from angel_compile.eval import perplexity
from angel_compile.models.smollm2 import (
    ADAPTED_LINEARS,
    ADAPTER_PATH,
    grid_error_q4,
    load_smollm2,
    load_smollm2_finetuned,
)


class LoRALinear(torch.nn.Module):
    """A frozen linear plus a trainable low-rank update: y = x W^T + scale * (x A^T) B^T."""

    def __init__(self, base: torch.nn.Linear, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        # B starts at zero so training starts from the base model; A gets a small random start.
        a = torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features)
        self.lora_A = torch.nn.Parameter(a.to(base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T  # [..., out]
        return self.base(x) + (self.scale * low_rank).to(x.dtype)


def add_adapters(model: torch.nn.Module, rank: int, scale: float, seed: int) -> dict[str, LoRALinear]:
    """Replace every adapted linear of the decoder layers by a LoRALinear; returns them by module name."""
    generator = torch.Generator().manual_seed(seed)
    adapted = {}
    for name, module in list(model.named_modules()):
        for child_name in ADAPTED_LINEARS:
            child = getattr(module, child_name, None)
            if isinstance(child, torch.nn.Linear):
                wrapper = LoRALinear(child, rank, scale, generator)
                setattr(module, child_name, wrapper)
                adapted[f"{name}.{child_name}"] = wrapper
    return adapted


def adapter_tensors(adapted: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """The adapters as `{"<linear>.lora_A": [r, in], "<linear>.lora_B": [out, r]}`, bf16, on the CPU."""
    tensors = {}
    for name, module in adapted.items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().to("cpu", torch.bfloat16).contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().to("cpu", torch.bfloat16).contiguous()
    return tensors


def train(args: argparse.Namespace) -> None:
    """Train (or resume) the adapters and write them to `args.out`."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, tokenizer = load_smollm2(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device).requires_grad_(False)
    adapted = add_adapters(model, args.rank, args.alpha / args.rank, args.seed)
    params = [p for module in adapted.values() for p in (module.lora_A, module.lora_B)]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_factor(step: int) -> float:
        # Linear warm-up, then cosine decay to a tenth of the peak.
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data = token_ids(tokenizer, "shakespeare", "train")[0]
    generator = torch.Generator().manual_seed(args.seed)
    start = 0
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_file():
        # On the CPU: the generator state must stay a CPU tensor; copy_ and the optimizer move the rest.
        state = torch.load(checkpoint, map_location="cpu")
        for module, (a, b) in zip(adapted.values(), state["adapters"], strict=True):
            module.lora_A.data.copy_(a)
            module.lora_B.data.copy_(b)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start = state["step"]
        print(f"resumed from {checkpoint} at step {start}")

    def save(step: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        adapters = [(m.lora_A.data, m.lora_B.data) for m in adapted.values()]
        state = dict(adapters=adapters, optimizer=optimizer.state_dict(), schedule=schedule.state_dict())
        torch.save(dict(state, generator=generator.get_state(), step=step), checkpoint)

    model.train()
    began = time.monotonic()
    for step in range(start, args.steps):
        offsets = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch,), generator=generator)
        batch = torch.stack([data[o : o + args.seq_len + 1] for o in offsets.tolist()]).to(device)  # [B, S+1]
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {schedule.get_last_lr()[0]:.2e}", flush=True)
        done = step + 1
        out_of_time = args.max_minutes is not None and time.monotonic() - began > 60 * args.max_minutes
        if done % args.save_every == 0 or done == args.steps or out_of_time:
            save(done)
        if out_of_time and done < args.steps:
            print(f"stopped after {args.max_minutes} min at step {done}; run again to resume", flush=True)
            raise SystemExit(3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The options that shaped the adapters, so that a stored file says how to rebuild it.
    options = {"rank": args.rank, "steps": args.steps, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr}
    metadata = {"scale": str(args.alpha / args.rank), **{key: str(value) for key, value in options.items()}}
    save_file(adapter_tensors(adapted), out, metadata={**metadata, "seed": str(args.seed)})
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    # The adapters are out: a later run starts afresh instead of resuming a finished one.
    checkpoint.unlink()


def report(args: argparse.Namespace) -> None:
    """Print perplexity of base and fine-tuned models on held-out text, and their distance to the Q4 grid."""
    device = torch.device(args.device)
    base, tokenizer = load_smollm2()
    tuned, _ = load_smollm2_finetuned(adapter_path=args.out)
    base.to(device), tuned.to(device)
    print(f"perplexity over {args.eval_tokens} tokens (1024-token windows, stride 512), fp32 on {device.type}:")
    labels = {"shakespeare": "Shakespeare held-out (The Tempest)", "lee": "Lee news held-out"}
    for corpus, label in labels.items():
        ids = token_ids(tokenizer, corpus, "held_out", max_tokens=args.eval_tokens).to(device)
        print(f"  {label:36s} base {perplexity(base, ids):7.2f}   fine-tuned {perplexity(tuned, ids):7.2f}")
    names = [n for n, m in tuned.named_modules() if n.rsplit(".", 1)[-1] in ADAPTED_LINEARS]
    base_modules, tuned_modules = dict(base.named_modules()), dict(tuned.named_modules())
    base_err = torch.tensor([grid_error_q4(base_modules[n].weight) for n in names])
    tuned_err = torch.tensor([grid_error_q4(tuned_modules[n].weight) for n in names])
    print(f"relative error of 4-bit group-32 round-to-nearest over {len(names)} linear weights:")
    print(f"  base        max {base_err.max():.2e}  median {base_err.median():.2e}")
    low, middle, high = tuned_err.min(), tuned_err.median(), tuned_err.max()
    print(f"  fine-tuned  min {low:.2e}  median {middle:.2e}  max {high:.2e}")


def main() -> None:
    """Parse the options, train (unless `--report-only`), then report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (resumable) after this long")
    parser.add_argument("--checkpoint", default=str(cache_root() / "finetune-smollm2" / "checkpoint.pt"))
    parser.add_argument("--out", default=str(ADAPTER_PATH))
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--report-only", action="store_true", help="skip training; report on --out")
    args = parser.parse_args()
    if not args.report_only:
        train(args)
    report(args)


if __name__ == "__main__":
    main()
