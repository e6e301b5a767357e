"""op -> ONNX for `angel::prune_tokens` (a node of our domain, implemented in `lowering/ort_prune_tokens.py`).

PruneTokens(embeds: float [B, S, D], token_mask: bool [B, S])
    -> (pruned: float [B, S − num_tokens + keep, D], positions: int64 [B, S − num_tokens + keep])
attributes num_tokens, keep, method, lambda_, merge_threshold, seed (see ops/prune_tokens.py)
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript import values

import angel_compile.ops  # noqa: F401  (registers the op named below)

ANGEL_ONNX_DOMAIN = "ai.angel"  # the domain of lowering/onnx.py, which imports this module
_angel = values.Opset(ANGEL_ONNX_DOMAIN, 1)


def _prune_tokens(embeds, token_mask, num_tokens, keep, method, lambda_, merge_threshold, seed):
    return _angel.PruneTokens(
        embeds,
        token_mask,
        num_tokens=num_tokens,
        keep=keep,
        method=method,
        lambda_=lambda_,
        merge_threshold=merge_threshold,
        seed=seed,
        _num_outputs=2,
    )


def _schema() -> OpSchema:
    param, attr, kinds = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType
    return OpSchema(
        "PruneTokens",
        ANGEL_ONNX_DOMAIN,
        1,
        doc="Keep `keep` of the `num_tokens` modality tokens of each sample (angel::prune_tokens).",
        inputs=[param("embeds", "T"), param("token_mask", "tensor(bool)")],
        outputs=[param("pruned", "T"), param("positions", "tensor(int64)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activation type")],
        attributes=[
            attr("num_tokens", kinds.INT, "modality tokens per sample"),
            attr("keep", kinds.INT, "modality tokens kept per sample"),
            attr("method", kinds.STRING, "mmr, diversity, topk, stride or random"),
            attr("lambda_", kinds.FLOAT, "MMR importance weight"),
            attr("merge_threshold", kinds.FLOAT, "cosine similarity above which adjacent tokens merge (1: never)"),
            attr("seed", kinds.INT, "seed of the random method"),
        ],
    )


SCHEMAS = [_schema()]
TRANSLATIONS = {torch.ops.angel.prune_tokens.default: _prune_tokens}
