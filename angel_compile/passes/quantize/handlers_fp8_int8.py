"""FP8 E4M3 and INT8 W8A8 schemes (weights and activations quantized): configs and handlers.

    {type: fp8, activation: static, weight: per_tensor}      recipe fp8-static
        weight: one scale; activation: one static scale max|x| / 448 from calibration
        (the observer's clipping value, `calibration.observer`).
    {type: fp8, activation: dynamic, weight: per_channel}    recipe fp8-dynamic
        weight: a scale per output channel; activation: a scale per token, at run time.
    {type: w8a8_int8}                                        recipe w8a8-int8
    {type: w8a8_int8, smoothquant_alpha: 0.5}                recipe w8a8-int8-smoothquant
        weight: int8 per output channel; activation: int8 per token, at run time. With
        SmoothQuant, s_j = max|X_j|^α / max|W_j|^(1−α) per input channel j (max over the
        calibration rows and over every layer reading the same activation); W ← W·diag(s)
        and x ← x / s, folded into the preceding norm where the graph allows (`smoothing.py`);
        elsewhere (o_proj, down_proj) the multiply by 1/s that `smoothing.py` inserted is
        fused into the op (`input_multiplier`, applied by the activation quantization kernel).

Each layer becomes `angel::fp8_linear` (ops/fp8_linear.py) or `angel::w8a8_int8_linear`
(ops/w8a8_int8.py). A layer whose K or N is not a multiple of 16 stays in float with the
reason in the stats: FP8 and INT8 tensor-core GEMMs step K by 16 or more, and neither the
layers of the models we target (K, N multiples of 64) nor `torch._scaled_mm` need padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from angel_compile.calibration import ActivationStats
from angel_compile.ops.fp8_linear import fp8_input_scale, quantize_fp8_weight
from angel_compile.ops.int8_weight_only import quantize_int8_per_channel
from angel_compile.passes.base import get_attr_value
from angel_compile.passes.graph_utils import erase_if_unused
from angel_compile.passes.quantize.linear import LinearMatch
from angel_compile.passes.quantize.rewrite import weight_nk
from angel_compile.passes.quantize.schemes import LayerSite, Scheme, register_scheme

GEMM_MULTIPLE = 16
FP8_ACTIVATIONS = ("static", "dynamic")
FP8_WEIGHTS = ("per_tensor", "per_channel")
SMOOTHING_INVERSE_SUFFIX = ".input_inverse_scale"  # the buffer smoothing.py's inserted multiply reads
_SMOOTHING_FLOOR = 1e-5  # as SmoothQuant's reference code: no zero or huge scales


def _gemm_shape_unsupported(weight: torch.Tensor) -> str | None:
    n, k = weight.shape
    bad = [f"{name} = {size}" for name, size in (("K", k), ("N", n)) if size % GEMM_MULTIPLE]
    if bad:
        return f"{' and '.join(bad)} not a multiple of {GEMM_MULTIPLE} (FP8 / INT8 GEMM tiles)"
    return None


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class Fp8Scheme(Scheme):
    """FP8 E4M3 weights and activations; `activation` static (calibrated) or dynamic (per token)."""

    type: ClassVar[str] = "fp8"
    activation: str = "dynamic"
    weight: str = "per_channel"

    def __post_init__(self) -> None:
        if self.activation not in FP8_ACTIVATIONS:
            raise ValueError(f"fp8 activation must be one of {list(FP8_ACTIVATIONS)}, got {self.activation!r}")
        if self.weight not in FP8_WEIGHTS:
            raise ValueError(f"fp8 weight must be one of {list(FP8_WEIGHTS)}, got {self.weight!r}")

    def statistics(self) -> set[str]:
        return {"amax"} if self.activation == "static" else set()

    def unsupported(self, weight: torch.Tensor) -> str | None:
        return _gemm_shape_unsupported(weight)


@register_scheme(Fp8Scheme)
def quantize_fp8(config: Fp8Scheme, site: LayerSite) -> int:
    q, weight_scale = quantize_fp8_weight(site.weight(), per_channel=config.weight == "per_channel")
    input_scale = fp8_input_scale(site.stats.amax) if config.activation == "static" else None
    args = (
        site.match.x,
        site.add_tensor("weight_fp8", q),
        site.add_tensor("weight_scale", weight_scale),
        None if input_scale is None else site.add_tensor("input_scale", input_scale),
        site.match.bias,
    )
    site.swap(torch.ops.angel.fp8_linear.default, args)
    return _bytes(q, weight_scale, input_scale)


@dataclass(frozen=True)
class W8A8Int8Scheme(Scheme):
    """INT8 per-channel weights, INT8 per-token dynamic activations, optional SmoothQuant."""

    type: ClassVar[str] = "w8a8_int8"
    smoothquant_alpha: float | None = None

    def __post_init__(self) -> None:
        alpha = self.smoothquant_alpha
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise ValueError(f"w8a8_int8 smoothquant_alpha must be a number in [0, 1] or null, got {alpha!r}")

    def smoothing(self) -> str | None:
        return None if self.smoothquant_alpha is None else "smoothquant"

    def input_scale(self, matches: list[LinearMatch], gm: fx.GraphModule, stats: ActivationStats) -> torch.Tensor:
        """SmoothQuant's s [K] = max|X|^α / max|W|^(1−α), W being every layer that reads X."""
        alpha = float(self.smoothquant_alpha)
        w_absmax = torch.stack([weight_nk(gm, m).detach().float().abs().amax(dim=0) for m in matches]).amax(dim=0)
        x_absmax = stats.absmax.float().clamp(min=_SMOOTHING_FLOOR)
        scale = x_absmax.pow(alpha) / w_absmax.clamp(min=_SMOOTHING_FLOOR).pow(1 - alpha)
        return scale.clamp(min=_SMOOTHING_FLOOR)

    def unsupported(self, weight: torch.Tensor) -> str | None:
        return _gemm_shape_unsupported(weight)


def _smoothing_multiply(gm: fx.GraphModule, x: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(input, 1/s node) when x is the `x · (1/s)` multiply that smoothing.py inserted, else None."""
    if x.op != "call_function" or x.target != torch.ops.aten.mul.Tensor or len(x.users) != 1:
        return None
    source, inverse = x.args
    is_inverse = isinstance(inverse, fx.Node) and inverse.op == "get_attr"
    if not (is_inverse and inverse.target.endswith(SMOOTHING_INVERSE_SUFFIX)):
        return None
    return (source, inverse) if get_attr_value(gm, inverse.target).dim() == 1 else None


@register_scheme(W8A8Int8Scheme)
def quantize_w8a8_int8(config: W8A8Int8Scheme, site: LayerSite) -> int:
    q, weight_scale = quantize_int8_per_channel(site.weight())
    x, multiplier = site.match.x, None
    fused = _smoothing_multiply(site.gm, x)
    if fused is not None:
        x, multiplier = fused
    args = (x, site.add_tensor("weight_int8", q), site.add_tensor("weight_scale", weight_scale), site.match.bias)
    site.swap(torch.ops.angel.w8a8_int8_linear.default, (*args, multiplier))
    if fused is not None:
        erase_if_unused(site.gm, [site.match.x])
    return _bytes(q, weight_scale)
