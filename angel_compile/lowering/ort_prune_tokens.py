"""onnxruntime implementation of `ai.angel::PruneTokens` (see lowering/onnx_prune_tokens.py).

Registered with onnxruntime-extensions under `ai.onnx.contrib`; `lowering/ort.py` maps the
`ai.angel` node to it (`IMPLEMENTATIONS`). float32 only, like the other implementations.
"""

from __future__ import annotations

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, onnx_op

_ATTRS = {
    "method": PyCustomOpDef.dt_string,
    "lambda_": PyCustomOpDef.dt_float,
    "merge_threshold": PyCustomOpDef.dt_float,
    "seed": PyCustomOpDef.dt_int64,
}


@onnx_op(
    op_type="AngelPruneTokens",
    inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_bool, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int64],
    outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
    attrs=_ATTRS,
)
def _prune_tokens(embeds, token_mask, num_tokens, keep, method, lambda_, merge_threshold, seed):
    # num_tokens and keep are int64 inputs (scalars, or one-element vectors from shape arithmetic).
    # The selection is defined once (ops/prune_tokens.py): its reference runs on the numpy buffers.
    import torch

    from angel_compile.ops.prune_tokens import prune_tokens_forward

    tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (embeds, token_mask))
    with torch.no_grad():
        pruned, positions = prune_tokens_forward(
            *tensors, _count(num_tokens), _count(keep), method, float(lambda_), float(merge_threshold), int(seed)
        )
    return pruned.numpy(), positions.numpy()


def _count(value: np.ndarray) -> int:
    return int(np.asarray(value).reshape(-1)[0])


IMPLEMENTATIONS = {"PruneTokens": {4: "AngelPruneTokens"}}
