"""Speculative decoding in a recipe (pass `speculative_decoding`).

The fusion itself is built in Python, not found in a graph: `speculative.compile_step` reads
this pass's options from the recipe, builds the fused `SpeculativeDecoder` step (draft tree +
one target verify forward + acceptance + cache update) and compiles it with
`torch.compile(..., backend="angel")` and the same recipe. The recipe's other passes then see
the whole step, target and draft: put quantization passes before this one, with
`exclude: ["draft.*"]` to keep the draft in its own dtype (bf16), or without it to quantize both.

Matches: the weights of the compiled step, by owner (`target.*` / `draft.*`).
Emits:   nothing; the graph is left as it is (modified=False). It records the draft tree and,
         per owner, how many 2-D weights (linear weights, embeddings) are float and how many
         quantized, and the attention calls per step, so the report shows what the earlier passes did to each.
Errors:  on a whole-model graph that is not a speculative step (no `draft.*` weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from angel_compile.errors import UnsupportedError
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, get_attr_value, register_pass

_ATTENTION_TARGETS = ("scaled_dot_product", "attention")


def _owner(target: str) -> str | None:
    parts = target.split(".")
    for owner in ("draft", "target"):
        if owner in parts[:2]:  # "draft.fuse.weight" or "_frozen.draft.fuse.weight"
            return owner
    return None


@register_pass
@dataclass(frozen=True)
class SpeculativeDecoding(Pass):
    """The fused EAGLE decode step's configuration; see the module docstring.

    k: drafted tokens per step, as a chain (used when `tree` is empty).
    tree: branching per depth of a draft token tree, e.g. [2, 2, 1] (overrides k).
    draft: path of the draft weights; empty for the built-in SmolLM2-135M draft.
    """

    name: ClassVar[str] = "speculative_decoding"
    k: int = 4
    tree: tuple[int, ...] = ()
    draft: str = ""

    def __post_init__(self) -> None:
        self.token_tree()  # k <= 0 or an oversized tree fail when the recipe loads

    def token_tree(self):
        from angel_compile.speculative.decode import resolve_tree

        return resolve_tree(None, self.tree) if self.tree else resolve_tree(self.k)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        tree = self.token_tree()
        stats = PassStats()
        counts = {f"{owner}_{kind}": 0 for owner in ("target", "draft") for kind in ("float_weights", "quantized")}
        weights = sorted({node.target for node in gm.graph.nodes if node.op == "get_attr" and node.users})
        for name in weights:
            owner = _owner(name)
            value = get_attr_value(gm, name)
            if owner is None or not isinstance(value, torch.Tensor) or value.dim() != 2:
                continue
            stats.matched += 1
            if value.dtype.is_floating_point:
                counts[f"{owner}_float_weights"] += 1
            else:
                counts[f"{owner}_quantized"] += 1
        attention = sum(
            1
            for node in gm.graph.nodes
            if node.op == "call_function" and any(word in str(node.target) for word in _ATTENTION_TARGETS)
        )
        is_step = counts["draft_float_weights"] + counts["draft_quantized"] > 0
        if not is_step and ctx.whole_model:
            raise UnsupportedError(
                "pass 'speculative_decoding' needs the graph of a speculative decode step (weights under "
                "'draft.' and 'target.'); build it with angel_compile.speculative.compile_step(target, draft, recipe)"
            )
        stats.details.update(
            counts,
            speculative_step=is_step,
            tree=list(tree.branching),
            verified_tokens_per_step=tree.num_drafted + 1,
            attention_calls=attention,
        )
        return PassResult(gm, False, stats)
