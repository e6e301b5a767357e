"""The speculative step compiled by angel-compile under a recipe that holds `speculative_decoding`.

    step = compile_step(target, draft, recipe="speculative-eagle-int8")
    tokens = generate(target, draft, input_ids, 128, tree=step.tree, step=step)

The recipe's `speculative_decoding` options give the draft tree (and the draft's weights when
`draft` is None); the step is `torch.compile(SpeculativeDecoder(...), backend="angel")` with
the same recipe, so its other passes (e.g. int8 weight-only on `target.*`) rewrite the step's
graph, which dynamo captures whole (fullgraph=True).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from angel_compile.errors import RecipeError
from angel_compile.recipe import Recipe, load_recipe
from angel_compile.speculative.decode import SpeculativeDecoder
from angel_compile.speculative.draft import DRAFT_ASSET, EagleDraft, load_draft

PASS_NAME = "speculative_decoding"


def speculative_pass(recipe: str | Path | dict[str, Any] | Recipe):
    """The recipe's `speculative_decoding` pass; RecipeError when it has none."""
    resolved = load_recipe(recipe)
    for built in resolved.build_passes():
        if built.name == PASS_NAME:
            return built
    raise RecipeError(
        f"recipe '{resolved.name}' has no '{PASS_NAME}' pass; add one (options: k, tree, draft) "
        "or use the built-in 'speculative-eagle'"
    )


def compile_step(
    target: nn.Module,
    draft: EagleDraft | None = None,
    recipe: str | Path | dict[str, Any] | Recipe = "speculative-eagle",
    debug_dir: str | None = None,
    **compile_options: Any,
) -> nn.Module:
    """`torch.compile(SpeculativeDecoder(target, draft, tree), backend="angel")` under `recipe`.

    draft: None loads the recipe's `draft` path (or the built-in SmolLM2 draft) in the target's
    dtype and device. debug_dir: the backend's per-pass dump (summary.md holds this pass's
    counts). compile_options go to torch.compile (e.g. mode); fullgraph is on.
    """
    config = speculative_pass(recipe)
    if draft is None:
        parameter = next(target.parameters())
        draft = load_draft(config.draft or DRAFT_ASSET, parameter.dtype).to(parameter.device)
    decoder = SpeculativeDecoder(target, draft, config.token_tree())
    options: dict[str, Any] = {"recipe": load_recipe(recipe)}
    if debug_dir is not None:
        options["debug_dir"] = debug_dir
    return torch.compile(decoder, backend="angel", options=options, fullgraph=True, **compile_options)
