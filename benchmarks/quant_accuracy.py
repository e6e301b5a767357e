"""Perplexity of SmolLM2-135M under quantization recipes vs the float model, on held-out text.

    python -m benchmarks.quant_accuracy --recipes int4-rtn int4-gptq int4-awq w4a8-fp8 [--model smollm2-ft]

Each recipe (a built-in name or a recipe file) compiles a fresh copy of the model (fp32, CPU or
--device), calibrating on `--calibration-batches` × `--calibration-length` tokens of the
calibration splits (Shakespeare: Macbeth, Twelfth Night; Lee news 200-249;
`eval.calibration_batches`). Perplexity: the first `--tokens` tokens of each corpus's held-out
split (The Tempest; Lee news 250+), windows of 1024 tokens with stride 512 (`eval.perplexity`).
Prints a Markdown table: perplexity per corpus, its change vs float, the quantize pass's
weight bytes (of the layers it quantized, before → after) and the compile time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time
from dataclasses import dataclass
from typing import Any

import torch

import angel_compile
from angel_compile.data import token_ids
from angel_compile.eval import calibration_batches, perplexity
from angel_compile.models import load_smollm2, load_smollm2_finetuned
from angel_compile.recipe import Recipe, load_recipe

CORPORA = ("shakespeare", "lee")


def _weight_bytes(compiled) -> str:
    for record in compiled.report.records:
        details = record.stats.details if record.stats else {}
        if "weight_bytes_before" in details:
            return f"{details['weight_bytes_before'] / 1e6:.1f} → {details['weight_bytes_after'] / 1e6:.1f} MB"
    return "-"


def with_group_size(recipe: str, group_size: int | None) -> Recipe:
    """The recipe, with `group_size` set in every quantize scheme that has one (None: as it is).

    SmolLM2's hidden size 576 is not a multiple of 128: at group 128 its q/k/v/o/gate/up
    layers stay in float, so group-wise recipes are compared at a group size that divides it.
    """
    resolved = load_recipe(recipe)
    if group_size is None:
        return resolved

    def regroup(scheme: Any) -> Any:
        return {**scheme, "group_size": group_size} if isinstance(scheme, dict) and "group_size" in scheme else scheme

    passes = []
    for spec in resolved.to_dict()["passes"]:
        options = dict(spec.get("options", {}))
        if spec["name"] == "quantize":
            options["scheme"] = regroup(options.get("scheme"))
            options["rules"] = [{**r, "scheme": regroup(r["scheme"])} for r in options.get("rules", [])]
        passes.append({**spec, "options": options})
    return Recipe.from_dict({**resolved.to_dict(), "name": f"{resolved.name}-g{group_size}", "passes": passes})


def add_setup_arguments(parser: argparse.ArgumentParser, model: str) -> None:
    """The options both accuracy scripts take: the model, held-out tokens, calibration and device."""
    parser.add_argument("--model", choices=("smollm2", "smollm2-ft"), default=model)
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens per corpus")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--device", default="cpu")


@dataclass
class Setup:
    """The float model, its held-out texts per corpus and its calibration batches, on `--device`."""

    model: torch.nn.Module
    texts: dict[str, torch.Tensor]
    batches: list[dict[str, torch.Tensor]]

    def perplexities(self, model: Any) -> dict[str, float]:
        return {c: perplexity(model, ids) for c, ids in self.texts.items()}

    def compile(self, recipe: Any) -> tuple[Any, float]:
        """(the float model compiled under `recipe` with a dynamic length, seconds it took)."""
        start = time.perf_counter()
        seq = torch.export.Dim("seq", min=2, max=self.model.config.max_position_embeddings)
        compiled = angel_compile.compile(
            copy.deepcopy(self.model),  # recipes rewrite weights; the reference stays as it is
            example_kwargs={"input_ids": self.batches[0]["input_ids"][:, :64]},
            recipe=recipe,
            dynamic_shapes={"input_ids": {1: seq}},
            calibration_data=self.batches,
        )
        return compiled, time.perf_counter() - start


def load_setup(args: argparse.Namespace) -> Setup:
    model, tokenizer = (load_smollm2_finetuned if args.model == "smollm2-ft" else load_smollm2)()
    model = model.to(args.device)
    texts = {c: token_ids(tokenizer, c, "held_out", max_tokens=args.tokens).to(args.device) for c in CORPORA}
    batches = [
        {k: v.to(args.device) for k, v in b.items()}
        for b in calibration_batches(tokenizer, args.calibration_batches, args.calibration_length)
    ]
    return Setup(model, texts, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", required=True, help="built-in recipe names or recipe files")
    add_setup_arguments(parser, model="smollm2")
    parser.add_argument("--group-size", type=int, help="set this group size in every group-wise scheme")
    args = parser.parse_args()
    setup = load_setup(args)

    rows = [("float (fp32)", setup.perplexities(setup.model), "-", 0.0)]
    for recipe in args.recipes:
        compiled, seconds = setup.compile(with_group_size(recipe, args.group_size))
        ppl = setup.perplexities(compiled)
        rows.append((compiled.recipe.name, ppl, _weight_bytes(compiled), seconds))
        print(f"{rows[-1][0]}: {rows[-1][1]} ({seconds:.0f} s to compile)", flush=True)

    now = f"{datetime.datetime.now():%Y-%m-%d %H:%M}"
    print(f"\n# {now}, model {args.model}, fp32 on {args.device}, torch {torch.__version__}")
    print(
        f"perplexity over the first {args.tokens} held-out tokens per corpus; calibration "
        f"{args.calibration_batches} × {args.calibration_length} tokens\n"
    )
    header = ["recipe", *[f"ppl {c}" for c in CORPORA], *[f"Δ {c}" for c in CORPORA], "weights", "compile s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    reference = rows[0][1]
    for name, ppl, weights, seconds in rows:
        cells = [name, *[f"{ppl[c]:.2f}" for c in CORPORA], *[f"{ppl[c] - reference[c]:+.2f}" for c in CORPORA]]
        print("| " + " | ".join(cells + [weights, f"{seconds:.0f}"]) + " |")


if __name__ == "__main__":
    main()
