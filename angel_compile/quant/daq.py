"""DAQ (delta-aware quantization): scales chosen for the fine-tuning delta, not the weight.

A fine-tuned weight W_post = W_base + ΔW. Plain PTQ picks scales that minimise ‖W_post − Q(W_post)‖;
the rounding error is often as large as ΔW and can wipe it out. DAQ is data-free and uses both
weight sets: it picks the scale that maximises the fidelity of the quantized delta
    ΔQ = Q(W_post) − W_base
to ΔW, measured by
    sign preservation  mean over entries with ΔW ≠ 0 of [sign(ΔQ) = sign(ΔW)]
    cosine             ⟨ΔQ, ΔW⟩ / (‖ΔQ‖ ‖ΔW‖)
Search: every scale unit (a row for per-channel int8 / fp8, a group of `group_size` weights for
int4) tries scale = α · absmax-scale for α on `ALPHAS` and keeps the α with the highest
cosine + sign preservation of its entries (objective "delta"), or the lowest squared error of
W_post (objective "mse", the plain clipping search DAQ is compared with). α = 1 is plain
absmax scaling.

Formats (fake quantization, then the stored tensors of the ops the `quantize` pass emits):
    int8  symmetric per output channel, q = clamp(round(w / s), ±127)      (ops/int8_weight_only.py)
    int4  symmetric per group, q = clamp(round(w / s) + 8, 0, 15)          (ops/int4.py, zero point 8)
    fp8   E4M3 per output channel, q = fp8(clamp(w / s, ±448))           (ops/fp8_linear.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4", "fp8")
OBJECTIVES = ("delta", "mse")
ALPHAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))  # 0.5 .. 1.5
_LEVELS = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def check_weight_pair(base: Mapping[str, torch.Tensor], post: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError listing every name missing from either set and every shape mismatch."""
    only_base = sorted(set(base) - set(post))
    only_post = sorted(set(post) - set(base))
    shapes = sorted(
        f"{name}: base {tuple(base[name].shape)} vs fine-tuned {tuple(post[name].shape)}"
        for name in set(base) & set(post)
        if base[name].shape != post[name].shape
    )
    if only_base or only_post or shapes:
        raise ValueError(
            "base and fine-tuned weights do not pair up: "
            f"only in base: {only_base or 'none'}; only in fine-tuned: {only_post or 'none'}; "
            f"different shapes: {shapes or 'none'}"
        )


def delta_fidelity(w_base: torch.Tensor, w_post: torch.Tensor, w_quant: torch.Tensor) -> tuple[float, float]:
    """(sign preservation rate, cosine) of ΔQ = w_quant − w_base against ΔW = w_post − w_base."""
    delta = (w_post.double() - w_base.double()).flatten()
    delta_q = (w_quant.double() - w_base.double()).flatten()
    changed = delta != 0
    sign_rate = (torch.sign(delta_q[changed]) == torch.sign(delta[changed])).double().mean().item()
    cosine = torch.nn.functional.cosine_similarity(delta_q, delta, dim=0).item()
    return sign_rate, cosine


def _units(w: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """w [N, K] as [N, U, u]: the entries sharing one scale (a row, or a group for int4)."""
    w = w.float()
    return w.unflatten(-1, (-1, group_size)) if fmt == "int4" else w.unsqueeze(1)


def fake_quantize(units: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Dequantized values of units [N, U, u] with scale [N, U]."""
    s = scale[..., None]
    if fmt == "fp8":
        return (units / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s
    low = -8.0 if fmt == "int4" else -127.0
    return torch.round(units / s).clamp(low, _LEVELS[fmt]) * s


def _absmax_scale(units: torch.Tensor, fmt: str) -> torch.Tensor:
    amax = units.abs().amax(-1)
    return torch.where(amax > 0, amax / _LEVELS[fmt], torch.ones_like(amax))  # [N, U]


def _delta_score(units_q: torch.Tensor, units_base: torch.Tensor, units_delta: torch.Tensor) -> torch.Tensor:
    """cosine + sign preservation per unit [N, U]."""
    delta_q = units_q - units_base
    cosine = torch.nn.functional.cosine_similarity(delta_q, units_delta, dim=-1, eps=1e-30)
    changed = units_delta != 0
    agree = ((torch.sign(delta_q) == torch.sign(units_delta)) & changed).sum(-1)
    sign_rate = agree / changed.sum(-1).clamp_min(1)
    return cosine + sign_rate


@dataclass(frozen=True)
class ScaleSearch:
    """Result of `search_scales`: the chosen scale per unit and the dequantized weight."""

    scale: torch.Tensor  # [N, U] float32 (U = 1 per channel, K / group_size for int4)
    alpha: torch.Tensor  # [N, U] the multiplier of the absmax scale that won
    dequantized: torch.Tensor  # [N, K] float32


def search_scales(
    w_post: torch.Tensor,
    w_base: torch.Tensor | None,
    fmt: str,
    objective: str = "delta",
    group_size: int = 128,
    alphas: tuple[float, ...] = ALPHAS,
) -> ScaleSearch:
    """Per-unit scale search for W_post [N, K] (module docstring); w_base is needed for "delta"."""
    if fmt not in FORMATS:
        raise ValueError(f"DAQ format '{fmt}' is not supported; one of {list(FORMATS)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"DAQ objective '{objective}' is not supported; one of {list(OBJECTIVES)}")
    if objective == "delta" and w_base is None:
        raise ValueError("the DAQ objective 'delta' needs the base weight")
    if w_base is not None and w_base.shape != w_post.shape:
        raise ValueError(f"base weight {tuple(w_base.shape)} and fine-tuned {tuple(w_post.shape)} differ in shape")
    if fmt == "int4" and w_post.shape[1] % group_size:
        raise ValueError(f"K = {w_post.shape[1]} is not divisible by the group size {group_size}")
    units = _units(w_post, fmt, group_size)  # [N, U, u]
    base_units = None if w_base is None else _units(w_base, fmt, group_size)
    delta_units = None if base_units is None else units - base_units
    absmax = _absmax_scale(units, fmt)
    best_scale, best_alpha = absmax, torch.ones_like(absmax)
    best_score = torch.full_like(absmax, -torch.inf)
    for alpha in alphas:
        scale = absmax * alpha
        q = fake_quantize(units, scale, fmt)
        if objective == "delta":
            score = _delta_score(q, base_units, delta_units)
        else:
            score = -(q - units).square().sum(-1)
        better = score > best_score
        best_scale = torch.where(better, scale, best_scale)
        best_alpha = torch.where(better, torch.full_like(scale, alpha), best_alpha)
        best_score = torch.where(better, score, best_score)
    dequantized = fake_quantize(units, best_scale, fmt).flatten(-2)
    return ScaleSearch(best_scale, best_alpha, dequantized)


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor, fmt: str, group_size: int = 128) -> torch.Tensor:
    """The stored codes of w [N, K] for chosen scales [N, U]: int8 [N, K], uint8 int4 codes 0..15, or fp8."""
    units = _units(w, fmt, group_size)
    s = scale[..., None]
    if fmt == "fp8":
        return (units / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).flatten(-2)
    if fmt == "int4":
        return (torch.round(units / s).clamp(-8, 7) + 8).to(torch.uint8).flatten(-2)
    return torch.round(units / s).clamp(-127, 127).to(torch.int8).flatten(-2)
