"""The `angel-compile` command line.

    angel-compile run RECIPE [--model smollm2] [--onnx out.onnx] [--debug-dir DIR]
    angel-compile eval --recipe R [--recipe R2 ...] [--model smollm2-ft] [--quick]
    angel-compile passes          list passes and their options
    angel-compile recipes         list built-in recipes (--show NAME prints one as YAML)

Errors are one line on stderr (exit status 2) unless --verbose is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from angel_compile.errors import AngelCompileError

MAX_SKIP_LINES = 20


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _example_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, torch.Tensor, dict, list, torch.Tensor]:
    """(model, tokenizer or None, capture input, dynamic shapes, calibration batches, check input) for `run`.

    SmolLM2 reads real text: capture on Shakespeare calibration tokens, calibrate on the
    calibration splits, check on held-out Lee news. A toy model has random weights, so random
    tokens are as good as any text.
    """
    from angel_compile.data import token_ids
    from angel_compile.eval import MODELS, calibration_batches, load_model
    from angel_compile.models import build_toy_model

    seq_dim = torch.export.Dim("seq", min=2, max=512)
    if args.model in MODELS:
        _progress(f"loading {args.model} (SmolLM2-135M-Instruct, real weights)")
        model, tokenizer = load_model(args.model)
        seq_dim = torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
        example = token_ids(tokenizer, "shakespeare", "calibration", max_tokens=args.seq)  # [1, seq]
        calibration = calibration_batches(tokenizer, args.calibration_batches)
        check = token_ids(tokenizer, "lee", "held_out", max_tokens=args.eval_tokens)  # [1, eval_tokens]
        return model, tokenizer, example, {"input_ids": {1: seq_dim}}, calibration, check
    _progress(f"building example model '{args.model}' from its config (random weights)")
    model = build_toy_model(args.model, vocab_size=args.vocab)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    dynamic = {"input_ids": {0: torch.export.Dim("batch", min=1, max=64), 1: seq_dim}}
    calibration = [
        {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)}
        for _ in range(args.calibration_batches)
    ]
    # Another shape than the capture's, to go through the dynamic dims.
    check = torch.randint(0, args.vocab, (args.batch + 1, args.seq + 7), generator=generator)
    return model, None, example, dynamic, calibration, check


def _print_perplexity(model: torch.nn.Module, compiled: Any, tokenizer: Any, tokens: int) -> None:
    from angel_compile.data import token_ids
    from angel_compile.eval import perplexity

    print(f"\nperplexity on the first {tokens} held-out tokens (lower is better):")
    print("| corpus | reference | compiled |\n|---|---|---|")
    for corpus in ("shakespeare", "lee"):
        ids = token_ids(tokenizer, corpus, "held_out", max_tokens=tokens)
        print(f"| {corpus} | {perplexity(model, ids):.3f} | {perplexity(compiled, ids):.3f} |")


def _cmd_run(args: argparse.Namespace) -> int:
    import angel_compile
    from angel_compile.debug.numerics import compare_outputs

    recipe = angel_compile.load_recipe(args.recipe)  # a bad recipe fails here, before the model loads
    model, tokenizer, example, dynamic, calibration, check = _example_inputs(args)
    _progress("capturing with torch.export and running the recipe's passes")
    start = time.perf_counter()
    compiled = angel_compile.compile(
        model,
        (),
        {"input_ids": example},
        recipe=recipe,
        dynamic_shapes=dynamic,
        debug_dir=args.debug_dir,
        disable=args.disable,
        stop_after=args.stop_after,
        progress=_progress,
        calibration_data=calibration,
    )
    print(f"recipe '{compiled.recipe.name}' on {args.model}: compiled in {time.perf_counter() - start:.1f} s\n")
    print(compiled.report.table())
    skipped = compiled.report.skip_reasons().splitlines()
    for line in skipped[:MAX_SKIP_LINES]:
        print(f"  {line}")
    if len(skipped) > MAX_SKIP_LINES:
        print(f"  ... and {len(skipped) - MAX_SKIP_LINES} more (see --debug-dir summary.json)")
    with torch.no_grad():
        reference = model(input_ids=check).logits
    logits = compiled(input_ids=check).logits
    numerics = compare_outputs(logits, reference)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"\naccuracy vs the eager model on input {tuple(check.shape)}: {numerics}, top-1 agreement {top1:.4f}")
    if tokenizer is not None:
        _print_perplexity(model, compiled, tokenizer, args.eval_tokens)
    if args.onnx:
        _progress(f"exporting ONNX to {args.onnx}")
        path = compiled.export_onnx(args.onnx)
        session = angel_compile.ort_session(path)
        (ort_logits, *_) = session.run(None, {"input_ids": check.numpy()})
        ort_numerics = compare_outputs(torch.from_numpy(ort_logits), logits)
        print(f"ONNX written to {path}; onnxruntime vs PyTorch: {ort_numerics}")
    if args.debug_dir:
        print(f"stage dumps and summary in {args.debug_dir}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from angel_compile.passes.base import registered_passes

    for name, cls in registered_passes().items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name}: {summary}")
        for option, type_name, default in cls.option_docs():
            print(f"    {option}: {type_name} = {default}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from angel_compile.recipe import builtin_recipes, load_recipe

    if args.show:
        print(load_recipe(args.show).to_yaml(), end="")
        return 0
    for name, recipe in builtin_recipes().items():
        passes = ", ".join(spec.name for spec in recipe.passes) or "(no passes)"
        print(f"{name}: {recipe.description}\n    passes: {passes}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from angel_compile.eval import MODELS, add_eval_arguments, run_eval
    from angel_compile.models import TOY_ARCHITECTURES

    parser = argparse.ArgumentParser(prog="angel-compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="compile an example model with a recipe and check its accuracy")
    run.add_argument("recipe", help="built-in recipe name or path to a .yaml/.json recipe")
    run.add_argument(
        "--model",
        default="smollm2",
        choices=(*MODELS, *TOY_ARCHITECTURES),
        help="smollm2 / smollm2-ft: SmolLM2-135M with real weights (default) or its fine-tuned sibling; "
        "the others: small example architectures with random weights",
    )
    run.add_argument("--batch", type=int, default=2)
    run.add_argument("--seq", type=int, default=32)
    run.add_argument("--vocab", type=int, default=256, help="vocabulary of an example architecture")
    run.add_argument("--eval-tokens", type=int, default=256, help="held-out tokens to check SmolLM2 on")
    run.add_argument("--calibration-batches", type=int, default=4, help="for recipes that calibrate")
    run.add_argument("--onnx", help="also write ONNX here and check it in onnxruntime")
    run.add_argument("--debug-dir", help="write each stage's graph, diff and a summary here")
    run.add_argument("--disable", action="append", default=[], metavar="PASS", help="skip this pass")
    run.add_argument("--stop-after", metavar="PASS", help="end the pipeline after this pass")
    run.set_defaults(handler=_cmd_run)

    evaluate = commands.add_parser("eval", help="perplexity, retrieval and agreement of recipes on SmolLM2")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=run_eval)

    commands.add_parser("passes", help="list passes and their options").set_defaults(handler=_cmd_passes)

    recipes = commands.add_parser("recipes", help="list built-in recipes")
    recipes.add_argument("--show", metavar="NAME", help="print one recipe as YAML")
    recipes.set_defaults(handler=_cmd_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except AngelCompileError as exc:
        if args.verbose:
            raise
        print(f"angel-compile: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as exc:  # any other failure is still one line unless --verbose
        if args.verbose:
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"angel-compile: error: {message} (run with --verbose for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
