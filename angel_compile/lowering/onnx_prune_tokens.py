"""op -> ONNX for `angel::prune_tokens` (a node of our domain, implemented in `lowering/ort_prune_tokens.py`).

PruneTokens(embeds: float [B, S, D], token_mask: bool [B, S], num_tokens: int64 [], keep: int64 [])
    -> (pruned: float [B, S − num_tokens + keep, D], positions: int64 [B, S − num_tokens + keep])
attributes method, lambda_, merge_threshold, seed (see ops/prune_tokens.py)

num_tokens and keep are inputs, not attributes: a graph with a dynamic image/audio dimension
computes them from the features' shape (`passes/token_pruning.py`); static counts are constants.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript import values

import angel_compile.ops  # noqa: F401  (registers the op named below)

ANGEL_ONNX_DOMAIN = "ai.angel"  # the domain of lowering/onnx.py, which imports this module
_angel = values.Opset(ANGEL_ONNX_DOMAIN, 1)


def _prune_tokens(embeds, token_mask, num_tokens, keep, method, lambda_, merge_threshold, seed):
    return _angel.PruneTokens(
        embeds,
        token_mask,
        _int64(num_tokens),
        _int64(keep),
        method=method,
        lambda_=lambda_,
        merge_threshold=merge_threshold,
        seed=seed,
        _num_outputs=2,
    )


def _int64(count):
    """A static count (a Python int) as an int64 constant; a symbolic one arrives as an int64 value."""
    return op.Constant(value_int=count) if isinstance(count, int) else count


def _schema() -> OpSchema:
    param, attr, kinds = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    return OpSchema(
        "PruneTokens",
        ANGEL_ONNX_DOMAIN,
        1,
        doc="Keep `keep` of the `num_tokens` modality tokens of each sample (angel::prune_tokens).",
        inputs=[
            param("embeds", "T"),
            param("token_mask", "tensor(bool)"),
            param("num_tokens", "tensor(int64)"),
            param("keep", "tensor(int64)"),
        ],
        outputs=[param("pruned", "T"), param("positions", "tensor(int64)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activation type")],
        attributes=[
            attr("method", kinds.STRING, "mmr, diversity, topk, stride or random"),
            attr("lambda_", kinds.FLOAT, "MMR importance weight"),
            attr("merge_threshold", kinds.FLOAT, "cosine similarity above which adjacent tokens merge (1: never)"),
            attr("seed", kinds.INT, "seed of the random method"),
        ],
    )


SCHEMAS = [_schema()]
TRANSLATIONS = {torch.ops.angel.prune_tokens.default: _prune_tokens}
