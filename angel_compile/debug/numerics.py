"""Numerical comparison of a stage's outputs with the reference outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class NumericReport:
    """Over all floating-point output tensors together."""

    sqnr_db: float  # 10·log10(‖ref‖² / ‖out − ref‖²); inf when identical
    max_abs_error: float
    relative_error: float  # ‖out − ref‖ / ‖ref‖

    def __str__(self) -> str:
        sqnr = "inf" if math.isinf(self.sqnr_db) else f"{self.sqnr_db:.1f}"
        return f"SQNR {sqnr} dB, max|err| {self.max_abs_error:.3g}, rel {self.relative_error:.3g}"


def float_leaves(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare_outputs(outputs: Any, reference: Any) -> NumericReport:
    """Compare two output pytrees of the same structure (float leaves only, in float64)."""
    outs, refs = float_leaves(outputs), float_leaves(reference)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs, strict=True)):
        raise ValueError(
            f"outputs do not match the reference structure: {[tuple(o.shape) for o in outs]} vs "
            f"{[tuple(r.shape) for r in refs]}"
        )
    err_sq = ref_sq = 0.0
    max_abs = 0.0
    for out, ref in zip(outs, refs, strict=True):
        diff = out.detach().double() - ref.detach().double()
        err_sq += float(diff.pow(2).sum())
        ref_sq += float(ref.detach().double().pow(2).sum())
        max_abs = max(max_abs, float(diff.abs().max())) if diff.numel() else max_abs
    if math.isnan(err_sq):
        return NumericReport(sqnr_db=float("nan"), max_abs_error=float("nan"), relative_error=float("nan"))
    sqnr = float("inf") if err_sq == 0 else 10 * math.log10(ref_sq / err_sq) if ref_sq > 0 else float("-inf")
    rel = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else math.sqrt(err_sq)
    return NumericReport(sqnr_db=sqnr, max_abs_error=max_abs, relative_error=rel)
