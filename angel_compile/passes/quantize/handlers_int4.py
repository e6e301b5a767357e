"""INT4 group-wise schemes for the `quantize` pass: `int4_weight_only` and `w4a8`.

Matches: linear layers assigned one of these schemes whose input width K is a multiple of
         `group_size` (K is never padded, see `ops/int4.py`; any other layer keeps its float
         weight and the stats say "K = ... is not divisible by the group size ...").
Emits:   `angel::int4_weight_only_linear(x, packed, scales, zeros, group_size, bias)` or
         `angel::w4a8_linear(x, packed, scales, zeros, group_size, input_scale, bias)`, with
         buffers `<layer>.weight_packed` uint8 [N, K/2], `<layer>.weight_scales` [N, K/g] in the
         weight's dtype, `<layer>.weight_zeros` uint8 [N, K/g] (asymmetric only) and, for static
         W4A8, `<layer>.input_scale` float32 [1] (format: `ops/int4.py`).

Rounding (`method`):
    rtn   round to nearest per group (`ops.int4.quantize_int4_rtn`).
    gptq  `quant.gptq.gptq_quantize` with H = 2/n Σ x xᵀ from calibration. The Hessians of all
          layers come from one calibration run of the float model ("non-sequential" GPTQ:
          a layer does not see the rounding error of the layers before it).
    awq   `quant.awq.awq_search` on calibration rows picks s [K] per input activation (layers
          reading one activation, e.g. q/k/v, search together and share s); the pass scales
          W ← W · s, folds 1/s into the preceding norm when every reader of that activation is
          smoothed with the same scheme, else inserts `x * (1/s)` (`smoothing.py`); then RTN.

    {type: int4_weight_only, group_size: 128, symmetric: false, method: gptq,
     act_order: true, damp_percent: 0.01, block_size: 128}
    {type: w4a8, group_size: 128, method: awq, awq_grid: 20, activation: dynamic}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from angel_compile.calibration import ActivationStats
from angel_compile.errors import CalibrationError
from angel_compile.ops.int4 import FP8_E4M3_MAX, SUPPORTED_GROUP_SIZES, Int4Weight, int4_supported, quantize_int4_rtn
from angel_compile.passes.quantize.linear import LinearMatch
from angel_compile.passes.quantize.rewrite import weight_nk
from angel_compile.passes.quantize.schemes import LayerSite, Scheme, register_scheme
from angel_compile.quant.awq import awq_search
from angel_compile.quant.gptq import gptq_quantize

INT4_METHODS = ("rtn", "gptq", "awq")
W4A8_ACTIVATIONS = ("dynamic", "static")


@dataclass(frozen=True)
class Int4WeightOnlyScheme(Scheme):
    """INT4 group-wise weights (zero points unless `symmetric`); activations unchanged.

    group_size: 16..256, a power of two; method: rtn | gptq | awq. GPTQ: act_order (columns by
    decreasing H_jj), damp_percent (fraction of mean(diag H) added to H's diagonal),
    block_size (lazy-update block). AWQ: awq_grid (α steps over [0, 1]). RTN and GPTQ:
    clip_search (each group's range shrunk by the best α of INT4_CLIP_GRID).
    """

    type: ClassVar[str] = "int4_weight_only"
    group_size: int = 128
    symmetric: bool = False
    method: str = "rtn"
    act_order: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    awq_grid: int = 20
    clip_search: bool = False

    def __post_init__(self) -> None:
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            supported = list(SUPPORTED_GROUP_SIZES)
            raise ValueError(f"scheme '{self.type}': group_size {self.group_size} not supported; one of {supported}")
        if self.method not in INT4_METHODS:
            raise ValueError(f"scheme '{self.type}': unknown method '{self.method}'; one of {list(INT4_METHODS)}")
        if not 0 < self.damp_percent <= 1:
            raise ValueError(f"scheme '{self.type}': damp_percent must be in (0, 1], got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"scheme '{self.type}': block_size must be >= 1, got {self.block_size}")
        if self.awq_grid < 1:
            raise ValueError(f"scheme '{self.type}': awq_grid must be >= 1, got {self.awq_grid}")
        if self.clip_search and self.method == "awq":
            raise ValueError(f"scheme '{self.type}': clip_search applies to methods rtn and gptq, not awq")

    def statistics(self) -> set[str]:
        return {"hessian"} if self.method == "gptq" else set()

    def smoothing(self) -> str | None:
        return "awq" if self.method == "awq" else None

    def input_scale(self, matches: list[LinearMatch], gm: fx.GraphModule, stats: ActivationStats) -> torch.Tensor:
        if stats.sample is None:
            layers = [m.layer for m in matches]
            raise CalibrationError(f"AWQ for layers {layers} needs sampled calibration rows; the statistics lack them")
        weight = torch.cat([weight_nk(gm, m).detach() for m in matches])  # [ΣN, K]: one s for all readers
        return awq_search(weight, stats.sample, self.group_size, self.symmetric, self.awq_grid, weight.dtype).scales

    def unsupported(self, weight: torch.Tensor) -> str | None:
        return int4_supported(weight.shape[1], self.group_size)


@dataclass(frozen=True)
class W4A8Scheme(Int4WeightOnlyScheme):
    """INT4 group-wise weights (as `int4_weight_only`) with FP8 E4M3 activations.

    activation: dynamic (one scale per token, max|x| / 448, at run time) or static (one
    per-tensor scale, the calibration observer's clip / 448). AWQ's search measures the INT4
    weight error only; the FP8 rounding of x comes on top.
    """

    type: ClassVar[str] = "w4a8"
    activation: str = "dynamic"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in W4A8_ACTIVATIONS:
            raise ValueError(
                f"scheme '{self.type}': unknown activation '{self.activation}'; one of {list(W4A8_ACTIVATIONS)}"
            )
        if self.activation == "static" and self.method == "awq":
            # The observer sees x before AWQ divides it by s: its clip would not fit x / s.
            raise ValueError(f"scheme '{self.type}': activation 'static' cannot be combined with method 'awq'")

    def statistics(self) -> set[str]:
        return super().statistics() | ({"amax"} if self.activation == "static" else set())


def quantize_int4_weight(config: Int4WeightOnlyScheme, site: LayerSite) -> Int4Weight:
    """The layer's (possibly AWQ-smoothed) weight [N, K] in the INT4 format, by `config.method`."""
    weight = site.weight()
    if config.method == "gptq":
        return gptq_quantize(
            weight,
            site.stats.gptq_hessian,
            config.group_size,
            config.symmetric,
            damp=config.damp_percent,
            act_order=config.act_order,
            block_size=config.block_size,
            scale_dtype=weight.dtype,
            clip_search=config.clip_search,
        )
    return quantize_int4_rtn(weight, config.group_size, config.symmetric, weight.dtype, config.clip_search)


def _weight_nodes(site: LayerSite, q: Int4Weight) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    zeros = None if q.zeros is None else site.add_tensor("weight_zeros", q.zeros)
    return site.add_tensor("weight_packed", q.packed), site.add_tensor("weight_scales", q.scales), zeros


@register_scheme(Int4WeightOnlyScheme)
def quantize_int4_weight_only(config: Int4WeightOnlyScheme, site: LayerSite) -> int:
    q = quantize_int4_weight(config, site)
    args = (site.match.x, *_weight_nodes(site, q), config.group_size, site.match.bias)
    site.swap(torch.ops.angel.int4_weight_only_linear.default, args)
    return q.nbytes()


@register_scheme(W4A8Scheme)
def quantize_w4a8(config: W4A8Scheme, site: LayerSite) -> int:
    q = quantize_int4_weight(config, site)
    input_scale, stored = None, q.nbytes()
    if config.activation == "static":
        amax = float(site.stats.amax)
        # An activation that was zero throughout calibration: any positive scale represents it.
        scale = torch.tensor([amax / FP8_E4M3_MAX if amax > 0 else 1.0], dtype=torch.float32)
        input_scale, stored = site.add_tensor("input_scale", scale), stored + scale.nbytes
    args = (site.match.x, *_weight_nodes(site, q), config.group_size, input_scale, site.match.bias)
    site.swap(torch.ops.angel.w4a8_linear.default, args)
    return stored
