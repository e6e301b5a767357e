"""onnxruntime implementation of `ai.angel::PruneTokens` (see lowering/onnx_prune_tokens.py).

Registered with onnxruntime-extensions under `ai.onnx.contrib`; `lowering/ort.py` maps the
`ai.angel` node to it (`IMPLEMENTATIONS`). float32 only, like the other implementations.
"""

from __future__ import annotations

import numpy as np
from onnxruntime_extensions import PyCustomOpDef, onnx_op

_ATTRS = {
    "num_tokens": PyCustomOpDef.dt_int64,
    "keep": PyCustomOpDef.dt_int64,
    "method": PyCustomOpDef.dt_string,
    "lambda_": PyCustomOpDef.dt_float,
    "merge_threshold": PyCustomOpDef.dt_float,
    "seed": PyCustomOpDef.dt_int64,
}


@onnx_op(
    op_type="AngelPruneTokens",
    inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_bool],
    outputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64],
    attrs=_ATTRS,
)
def _prune_tokens(embeds, token_mask, num_tokens, keep, method, lambda_, merge_threshold, seed):
    # The selection is defined once (ops/prune_tokens.py): its reference runs on the numpy buffers.
    import torch

    from angel_compile.ops.prune_tokens import prune_tokens_forward

    tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (embeds, token_mask))
    with torch.no_grad():
        pruned, positions = prune_tokens_forward(
            *tensors, int(num_tokens), int(keep), method, float(lambda_), float(merge_threshold), int(seed)
        )
    return pruned.numpy(), positions.numpy()


IMPLEMENTATIONS = {"PruneTokens": {2: "AngelPruneTokens"}}
