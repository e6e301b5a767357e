"""op -> Triton kernel: registers each angel op's CUDA implementation.

The ops' CPU implementation is their plain-PyTorch reference (`ops/`); on CUDA tensors the
dispatcher calls the Triton kernel registered here. Triton is imported on first CUDA call.
"""

from __future__ import annotations

import torch

from angel_compile.ops.int8_weight_only import int8_weight_only_linear


@int8_weight_only_linear.register_kernel("cuda")
def _int8_weight_only_linear_cuda(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    from angel_compile.kernels.int8_weight_only import int8_weight_only_linear_triton

    return int8_weight_only_linear_triton(x, weight, scale, bias)
