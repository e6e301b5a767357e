"""`angel::w8a8_int8_linear`: a linear layer with INT8 weights and INT8 activations (W8A8).

Format:
    weight:       int8 [N, K], values in [-127, 127], per output channel symmetric
                  (`ops.int8_weight_only.quantize_int8_per_channel`)
    weight_scale: float32 [N]: W ≈ weight · weight_scale[:, None]
    bias:         optional [N]
    input_multiplier: optional float32 [K]: x ← x · input_multiplier before quantization
                  (SmoothQuant's 1/s where it could not be folded into a norm: fused here
                  instead of a separate elementwise multiply)

Activations are quantized per token (row of x), dynamically, symmetric:
    s_x[m] = max_k |x[m, k]| / 127   (1 for an all-zero row)
    xq     = clamp(round(x / s_x), ±127)                 (round half to even)
    y      = (xq @ weightᵀ)_int32 · s_x[:, None] · weight_scale[None, :] + bias

SmoothQuant (`passes/quantize/handlers_fp8_int8.py`) happens before this op: the weight it
receives is already W·diag(s), and its input x / s (or x with input_multiplier = 1/s).

The plain-PyTorch reference below is the CPU implementation (exact int32 accumulation through
`torch._int_mm`) and the ground truth for the Triton kernel (`kernels/scaled_gemm.py`), which
`lowering/triton.py` registers for CUDA tensors.
"""

from __future__ import annotations

import torch

from angel_compile.ops.int8_weight_only import check_linear_weight

INT8_MAX = 127


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], float32 scale [M, 1]), symmetric per row."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def w8a8_int8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference semantics: x [..., K] float -> [..., N] in x's dtype (module docstring)."""
    *lead, k = x.shape
    if input_multiplier is not None:
        x = (x.float() * input_multiplier.float()).to(x.dtype)
    xq, x_scale = quantize_int8_rows(x.reshape(-1, k))  # [M, K] int8, [M, 1]
    if xq.device.type == "cpu":
        acc = torch._int_mm(xq, weight.T)  # [M, N] int32, exact
    else:
        # Off the CPU the reference is only a check for the kernel: fp64 holds every int32 sum.
        acc = xq.double() @ weight.double().T
    y = acc.float() * x_scale * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


@torch.library.custom_op("angel::w8a8_int8_linear", mutates_args=())
def w8a8_int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    return w8a8_int8_linear_reference(x, weight, weight_scale, bias, input_multiplier)


@w8a8_int8_linear.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    input_multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    check_linear_weight(x, weight, torch.int8)
    torch._check(weight_scale.numel() == weight.shape[0], lambda: "weight_scale must hold N per-channel scales")
    if input_multiplier is not None:
        torch._check(input_multiplier.numel() == x.shape[-1], lambda: "input_multiplier must hold K values")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
