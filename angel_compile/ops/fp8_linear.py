"""`angel::fp8_linear`: a linear layer with FP8 E4M3 weights and FP8 E4M3 activations.

Format:
    weight:       float8_e4m3fn [N, K]
    weight_scale: float32 [1] (per tensor) or [N] (per output channel): W ≈ weight · weight_scale
    input_scale:  float32 [1], a static per-tensor activation scale from calibration, or None:
                  per token (row of x), dynamic, s_x[m] = max_k |x[m, k]| / 448
    bias:         optional [N]

    xq = fp8(clamp(x / s_x, ±448))                    (round to nearest even)
    y  = (xq @ weightᵀ) · s_x[:, None] · weight_scale[None, :] + bias     (fp32 arithmetic)

The two schemes built on it (`passes/quantize/handlers_fp8_int8.py`): `fp8-static` (per-tensor
weight scale, static input scale) and `fp8-dynamic` (per-channel weight scale, per-token
input scales). A weight scale of all-zero rows is 1 (any positive scale represents zeros).

The plain-PyTorch reference below is the CPU implementation (it emulates FP8 by rounding to
float8_e4m3fn and multiplying the decoded values in fp32) and the ground truth for the Triton
kernel (`kernels/scaled_gemm.py`), which `lowering/triton.py` registers for CUDA tensors.
"""

from __future__ import annotations

import torch

from angel_compile.ops.int4 import FP8_E4M3_MAX, quantize_fp8_rows
from angel_compile.ops.int8_weight_only import check_linear_weight


def _positive(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax, torch.ones_like(amax))


def quantize_fp8_weight(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (float8_e4m3fn [N, K], float32 scale [N] or [1])."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = _positive(amax) / FP8_E4M3_MAX
    q = (w / (scale[:, None] if per_channel else scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def fp8_input_scale(amax: torch.Tensor) -> torch.Tensor:
    """The static per-tensor activation scale [1] for a calibrated clipping value max |x|."""
    return (_positive(amax.float().reshape(1)) / FP8_E4M3_MAX).contiguous()


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (module docstring)."""
    *lead, k = x.shape
    xq, x_scale = quantize_fp8_rows(x.reshape(-1, k), input_scale)  # [M, K] fp8, [M, 1] fp32
    y = (xq.float() @ weight.float().T) * x_scale * weight_scale.float()  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


@torch.library.custom_op("angel::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return fp8_linear_reference(x, weight, weight_scale, input_scale, bias)


@fp8_linear.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    check_linear_weight(x, weight, torch.float8_e4m3fn)
    torch._check(
        weight_scale.numel() in (1, weight.shape[0]), lambda: "weight_scale must hold 1 or N (per channel) scales"
    )
    if input_scale is not None:
        torch._check(input_scale.numel() == 1, lambda: "input_scale must hold one per-tensor scale")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
