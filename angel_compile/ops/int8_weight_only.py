"""`angel::int8_weight_only_linear`: a linear layer whose weight is stored as int8.

Format (per-output-channel symmetric):
    weight: int8 [N, K], values in [-127, 127]
    scale:  float32 [N], so that W ≈ weight * scale[:, None]
    bias:   optional [N], in the activation dtype

    y[..., n] = (sum_k x[..., k] * weight[n, k]) * scale[n] + bias[n]

The plain-PyTorch reference below is the CPU implementation and the ground truth for the
Triton kernel (`angel_compile.kernels.int8_weight_only`), which `lowering/triton.py`
registers for CUDA tensors.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float [N, K] weight to (int8 [N, K], float32 scale [N]), symmetric per row."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    # An all-zero row would give scale 0 and 0/0 below; any positive scale represents it.
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] weight that the int8 format represents."""
    return q.float() * scale[:, None]


def int8_weight_only_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference semantics: x [..., K] (float), weight int8 [N, K], scale [N] -> [..., N]."""
    # int8 values are exact in every float dtype, so the matmul runs in x's dtype and the
    # per-channel scale is applied to the output (N multiplies instead of N*K).
    y = torch.nn.functional.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def check_linear_weight(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """torch._check a quantized linear's weight: `dtype`, 2-D [N, K], K equal to x's last dim."""
    name = str(dtype).removeprefix("torch.")
    torch._check(weight.dtype == dtype, lambda: f"weight must be {name}, got {weight.dtype}")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [N, K], got {tuple(weight.shape)}")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "x's last dim must equal weight's K")


@torch.library.custom_op("angel::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return int8_weight_only_linear_reference(x, weight, scale, bias)


@int8_weight_only_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_linear_weight(x, weight, torch.int8)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
