"""Speculative decoding: an EAGLE-style draft head fused with its target into one decode step.

    draft = load_draft()                      # or EagleDraft(DraftConfig.for_target(target))
    tokens = generate(target, draft, input_ids, max_new_tokens=128, k=4)          # a chain
    tokens = generate(target, draft, input_ids, max_new_tokens=128, tree=(2, 2, 1))
    tokens = generate(target, draft, input_ids, max_new_tokens=128, k=4, temperature=0.8)  # sampling

Greedy output equals the target's own greedy decoding; sampled output (temperature > 0,
rejection sampling) is distributed as sampling the target. See `decode.py` for the step,
`draft.py` for the head, `tree.py` for draft trees, `examples/train_eagle_draft.py` for training.
"""

from angel_compile.speculative.compiled import compile_step
from angel_compile.speculative.decode import (
    DecodeState,
    GenerateStats,
    GreedyDecoder,
    SpeculativeDecoder,
    generate,
    greedy_generate,
    resolve_tree,
    run_to_end,
    speculative_stats,
)
from angel_compile.speculative.draft import DraftConfig, EagleDraft, load_draft, save_draft
from angel_compile.speculative.tree import MAX_TREE_NODES, TokenTree

__all__ = [
    "MAX_TREE_NODES",
    "DecodeState",
    "DraftConfig",
    "EagleDraft",
    "GenerateStats",
    "GreedyDecoder",
    "SpeculativeDecoder",
    "TokenTree",
    "compile_step",
    "generate",
    "greedy_generate",
    "load_draft",
    "resolve_tree",
    "run_to_end",
    "save_draft",
    "speculative_stats",
]
