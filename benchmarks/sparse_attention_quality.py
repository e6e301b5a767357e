"""Quality of the block-selection methods on SmolLM2-135M and real text (attention part on CPU; end to end on --device).

1. Attention inputs. Q/K/V (after RoPE, before the GQA repeat) of chosen layers of
   SmolLM2-135M-Instruct are recorded (`angel_compile.eval.record_qkv`) in one forward pass
   over the first `max(--seqs)` tokens of the Lee news held-out split. A causal model's Q/K/V
   of the first S tokens do not depend on the tokens after them, so each shorter length is a
   prefix of the same recording. Each method then selects blocks and the attention restricted
   to them is compared with dense causal attention: density = fraction of causal blocks
   computed; error = ‖out − dense‖ / ‖dense‖ (all heads of a layer), averaged over the layers.
   Stem also runs with a uniform budget (budget_decay 0) and score-only ranking (no value norm).
2. End to end. SmolLM2 compiled (`angel_compile.compile`, dynamic sequence length) with each
   built-in sparse-attention recipe, `min_seq_len` lowered to `--min-seq-len` so that sparsity
   applies below 4K too, against the dense model:
   - perplexity over the first `--ppl-tokens` tokens of Lee held-out, in one window;
   - retrieval: the needle-in-a-haystack prompts of `angel_compile.eval.retrieval_cases` (a
     5-digit key in Lee news filler, asked for at the end) at `--retrieval-length` tokens. The
     model reads prompt + key in one forward; a case is a hit when the greedy choice at every
     key token is that token (= greedy decoding would write the key first); the key's mean
     negative log-likelihood is reported beside it. One forward per case keeps 8K affordable
     on a CPU, where greedy generation would rerun the whole prompt for each new token.

    python -m benchmarks.sparse_attention_quality [--seqs 2048 4096 8192] [--layers 0 7 14 21 29]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time
from pathlib import Path

import torch

import angel_compile
from angel_compile.data import token_ids
from angel_compile.eval import perplexity, record_qkv, retrieval_cases
from angel_compile.models import load_smollm2
from angel_compile.ops.sparse_attention import block_masked_attention, dense_causal_attention
from angel_compile.recipe import Recipe
from angel_compile.sparse.selection import SparseAttentionConfig, block_density, select_blocks

RECIPES = ("sparse-attention-static", "sparse-attention-stem", "sparse-attention-s2o")
RECIPE_DIR = Path(angel_compile.__file__).parent / "recipes"
BLOCK = 128

# name -> (config, output_aware); the first of each method is its built-in recipe's parameters
VARIANTS: dict[str, tuple[SparseAttentionConfig, bool]] = {
    "static recipe (sink 1, local 15)": (SparseAttentionConfig("static", BLOCK, 0, 1, 15), True),
    "static (sink 1, local 3)": (SparseAttentionConfig("static", BLOCK, 0, 1, 3), True),
    "stem recipe (top_k 32, decay 0.5)": (SparseAttentionConfig("stem", BLOCK, 0, 1, 2, 32, 0.5), True),
    "stem (top_k 8, decay 0.5)": (SparseAttentionConfig("stem", BLOCK, 0, 1, 2, 8, 0.5), True),
    "stem uniform (top_k 6)": (SparseAttentionConfig("stem", BLOCK, 0, 1, 2, 6, 0.0), True),
    "stem score-only (top_k 8, decay 0.5)": (SparseAttentionConfig("stem", BLOCK, 0, 1, 2, 8, 0.5), False),
    "s2o recipe (threshold 0.02)": (SparseAttentionConfig("s2o", BLOCK, 0, 1, 2, threshold=0.02), True),
    "s2o (threshold 0.1)": (SparseAttentionConfig("s2o", BLOCK, 0, 1, 2, threshold=0.1), True),
}


def attention_quality(model: torch.nn.Module, ids: torch.Tensor, seqs: list[int], layers: tuple[int, ...]) -> None:
    """Print one table row per (sequence length, variant)."""
    recorded = record_qkv(model, ids[:, : max(seqs)], layers)
    scale = model.config.head_dim**-0.5 if getattr(model.config, "head_dim", None) else None
    print("| seq | method | density | rel. error vs dense |")
    print("|---|---|---|---|")
    for seq in seqs:
        inputs = []
        for layer in layers:
            q, k, v = (recorded[f"layer{layer}.{name}"][:, :, :seq].float() for name in "qkv")
            layer_scale = scale or q.shape[-1] ** -0.5
            inputs.append((q, k, v, layer_scale, dense_causal_attention(q, k, v, layer_scale)))
        for name, (config, output_aware) in VARIANTS.items():
            densities, errors = [], []
            for q, k, v, layer_scale, dense in inputs:
                mask = select_blocks(q, k, v, config, layer_scale, output_aware=output_aware)
                out = block_masked_attention(q, k, v, mask, layer_scale, BLOCK)
                densities.append(block_density(mask))
                errors.append(((out - dense).norm() / dense.norm()).item())
            print(f"| {seq} | {name} | {sum(densities) / len(densities):.3f} | {sum(errors) / len(errors):.4f} |")
            print(end="", flush=True)


def recipe_with_threshold(name: str, min_seq_len: int) -> Recipe:
    recipe = Recipe.from_file(RECIPE_DIR / f"{name}.yaml")
    (spec,) = recipe.passes
    return Recipe.from_dict(
        {"name": name, "passes": [{"name": spec.name, "options": {**spec.options, "min_seq_len": min_seq_len}}]}
    )


@torch.no_grad()
def key_retrieval(model, tokenizer, cases, device: str) -> tuple[float, float]:
    """(fraction of cases whose key is the greedy choice at every key token, mean key-token NLL)."""
    hits, nlls = 0, []
    for case in cases:
        key = tokenizer(" " + case.key, add_special_tokens=False).input_ids
        ids = torch.cat([case.input_ids, torch.tensor([key])], dim=1).to(device)
        out = model(input_ids=ids)
        logits = (out.logits if hasattr(out, "logits") else out[0])[0, -len(key) - 1 : -1].float()
        target = torch.tensor(key, device=logits.device)
        hits += bool((logits.argmax(dim=-1) == target).all())
        nlls.append(torch.nn.functional.cross_entropy(logits, target).item())
    return hits / len(cases), sum(nlls) / len(nlls)


def end_to_end(model, tokenizer, args: argparse.Namespace) -> None:
    ppl_ids = token_ids(tokenizer, "lee", "held_out", max_tokens=args.ppl_tokens).to(args.device)
    model = model.to(args.device)
    cases = retrieval_cases(tokenizer, (args.retrieval_length,), depths=tuple(args.depths))
    lengths = sorted({c.input_ids.shape[1] for c in cases})
    print(f"# perplexity: first {ppl_ids.shape[1]} tokens of Lee held-out, one window")
    print(f"# retrieval: {len(cases)} cases at depths {args.depths}, prompt lengths {lengths} tokens")
    print("| model | min_seq_len | ppl Lee | Δ ppl | retrieval hits | key NLL |")
    print("|---|---|---|---|---|---|")
    seq = torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
    reference_ppl = None
    for name in args.models:
        started = time.time()
        if name == "dense":
            candidate = model
        else:
            candidate = angel_compile.compile(
                copy.deepcopy(model),
                example_kwargs={"input_ids": ppl_ids[:, :256]},
                recipe=recipe_with_threshold(name, args.min_seq_len),
                dynamic_shapes={"input_ids": {1: seq}},
            )
        ppl = perplexity(candidate, ppl_ids, window=ppl_ids.shape[1], stride=ppl_ids.shape[1] - 1)
        reference_ppl = ppl if name == "dense" else reference_ppl
        hits, nll = key_retrieval(candidate, tokenizer, cases, args.device)
        threshold = "-" if name == "dense" else str(args.min_seq_len)
        change = "" if reference_ppl is None else f"{ppl - reference_ppl:+.3f}"
        print(f"| {name} | {threshold} | {ppl:.3f} | {change} | {hits:.2f} | {nll:.3f} |", flush=True)
        print(f"#   ({name}: {time.time() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 7, 14, 21, 29])
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--retrieval-length", type=int, default=4096)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    parser.add_argument("--min-seq-len", type=int, default=1024)
    parser.add_argument("--parts", nargs="+", choices=["attention", "end-to-end"], default=["attention", "end-to-end"])
    parser.add_argument("--models", nargs="+", choices=["dense", *RECIPES], default=["dense", *RECIPES])
    parser.add_argument("--device", default="cpu", help="device of the end-to-end part (fp32 model)")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {device}, torch {torch.__version__}, SmolLM2-135M-Instruct fp32")
    print(f"# Q/K/V of layers {args.layers} on the first {max(args.seqs)} tokens of Lee held-out; block {BLOCK}")
    if "attention" in args.parts:
        ids = token_ids(tokenizer, "lee", "held_out", max_tokens=max(args.seqs))
        attention_quality(model, ids, args.seqs, tuple(args.layers))
    if "end-to-end" in args.parts:
        end_to_end(model, tokenizer, args)


if __name__ == "__main__":
    main()
