"""Ultra-low-bit and delta-aware schemes for the `quantize` pass: `int2_weight_only`, `ternary`, `daq`.

Matches: linear layers assigned one of these schemes; a layer whose K the format cannot take
         keeps its float weight and the stats give the reason (INT2: K % group_size; ternary:
         K % 4, or K % group_size; a K that is a multiple of 4 but not of 32 is padded inside the
         last 5-byte chunk of the 3:4 format, never in x).
Emits:
    int2_weight_only  `angel::int2_weight_only_linear(x, packed, scales, zeros, group_size, bias)`,
                      buffers `<layer>.weight_packed` uint8 [N, K/4], `.weight_scales` [N, K/g],
                      `.weight_zeros` uint8 [N, K/g] (asymmetric only); format `ops/int2.py`.
                      method rtn (with per-group clipping search) or gptq (calibration Hessian).
    ternary           packing "3of4": `angel::ternary_3of4_linear(x, packed, scales, group_size,
                      bias)`, 1.25 bits per weight (`ops/ternary.py`); packing "2bit": plain ternary
                      as symmetric INT2 through `angel::int2_weight_only_linear`. group_size null =
                      per output channel (3of4 only). activation_weighted: the zero position /
                      scale fit weighs input channel k by mean x_k² from calibration.
    daq               weights of `format` int8 (per channel, `angel::int8_weight_only_linear`),
                      int4 (symmetric per group, `angel::int4_weight_only_linear`) or fp8 (per
                      channel, `angel::fp8_linear` with dynamic per-token FP8 activations), scales
                      searched by `quant/daq.py`: with `daq: true` for the fidelity of the delta to
                      `base_model` (a safetensors path, or `smollm2`), else for the plain
                      reconstruction error. A layer whose weight has no base counterpart of the
                      same name and shape raises an error naming it.

    {type: int2_weight_only, group_size: 64, method: gptq}
    {type: ternary, packing: 3of4, group_size: 128, activation_weighted: true}
    {type: daq, format: fp8, base_model: smollm2, daq: true}
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from angel_compile.ops.int2 import Int2Weight, int2_supported, quantize_int2_gptq, quantize_int2_rtn
from angel_compile.ops.int4 import pack_int4
from angel_compile.ops.ternary import (
    SUPPORTED_GROUP_SIZES as TERNARY_GROUP_SIZES,
)
from angel_compile.ops.ternary import (
    quantize_ternary_2bit,
    quantize_ternary_3of4,
    ternary_supported,
)
from angel_compile.passes.quantize.schemes import LayerSite, Scheme, register_scheme
from angel_compile.quant.daq import FORMATS, OBJECTIVES, quantize_with_scales, search_scales

INT2_METHODS = ("rtn", "gptq")
INT2_GROUP_SIZES = (32, 64, 128)
TERNARY_PACKINGS = ("3of4", "2bit")
REGISTERED_BASE_MODELS = ("smollm2",)


@dataclass(frozen=True)
class Int2WeightOnlyScheme(Scheme):
    """INT2 group-wise weights (zero points unless `symmetric`); activations unchanged.

    group_size: 32 | 64 | 128; method: rtn | gptq (act_order, damp_percent as for int4);
    clip_search: per-group range shrinking, for both methods.
    """

    type: ClassVar[str] = "int2_weight_only"
    group_size: int = 64
    symmetric: bool = False
    method: str = "rtn"
    clip_search: bool = True
    act_order: bool = False
    damp_percent: float = 0.01

    def __post_init__(self) -> None:
        if self.group_size not in INT2_GROUP_SIZES:
            raise ValueError(f"scheme '{self.type}': group_size {self.group_size} not one of {list(INT2_GROUP_SIZES)}")
        if self.method not in INT2_METHODS:
            raise ValueError(f"scheme '{self.type}': unknown method '{self.method}'; one of {list(INT2_METHODS)}")
        if not 0 < self.damp_percent <= 1:
            raise ValueError(f"scheme '{self.type}': damp_percent must be in (0, 1], got {self.damp_percent}")

    def statistics(self) -> set[str]:
        return {"hessian"} if self.method == "gptq" else set()

    def unsupported(self, weight: torch.Tensor) -> str | None:
        return int2_supported(weight.shape[1], self.group_size)


@dataclass(frozen=True)
class TernaryScheme(Scheme):
    """Ternary weights t · scale, t ∈ {−1, 0, 1}: 3:4-sparse 1.25-bit ("3of4") or plain 2-bit ("2bit").

    group_size: 32 | 64 | 128 | 256, or null for one scale per output channel (3of4 only);
    activation_weighted: weigh the fit by mean x² per input channel (needs calibration).
    """

    type: ClassVar[str] = "ternary"
    packing: str = "3of4"
    group_size: int | None = 128
    activation_weighted: bool = False

    def __post_init__(self) -> None:
        if self.packing not in TERNARY_PACKINGS:
            raise ValueError(f"scheme '{self.type}': unknown packing '{self.packing}'; one of {list(TERNARY_PACKINGS)}")
        if self.group_size is None and self.packing == "2bit":
            raise ValueError(f"scheme '{self.type}': packing '2bit' needs a group_size, one of {TERNARY_GROUP_SIZES}")
        if self.group_size is not None and self.group_size not in TERNARY_GROUP_SIZES:
            raise ValueError(
                f"scheme '{self.type}': group_size {self.group_size} not one of {list(TERNARY_GROUP_SIZES)} or null"
            )

    def statistics(self) -> set[str]:
        return {"hessian"} if self.activation_weighted else set()

    def unsupported(self, weight: torch.Tensor) -> str | None:
        k = weight.shape[1]
        if self.packing == "2bit":
            return int2_supported(k, self.group_size)
        return ternary_supported(k, self.group_size)


@dataclass(frozen=True)
class DaqScheme(Scheme):
    """Weights in `format` (int8 | int4 | fp8) with scales searched for the fine-tuning delta.

    base_model: safetensors path or a registered name (smollm2) of the pre-trained weights;
    daq: true = delta-aware search (needs base_model), false = the plain clipping search for
    the reconstruction error; group_size: int4 groups.
    """

    type: ClassVar[str] = "daq"
    format: str = "fp8"
    base_model: str | None = None
    daq: bool = True
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"scheme '{self.type}': unknown format '{self.format}'; one of {list(FORMATS)}")
        if self.daq and not self.base_model:
            raise ValueError(
                f"scheme '{self.type}': daq: true needs base_model (a safetensors path or one of "
                f"{list(REGISTERED_BASE_MODELS)})"
            )

    @property
    def objective(self) -> str:
        return OBJECTIVES[0] if self.daq else OBJECTIVES[1]

    def unsupported(self, weight: torch.Tensor) -> str | None:
        if self.format == "int4" and weight.shape[1] % self.group_size:
            return f"K = {weight.shape[1]} is not divisible by the group size {self.group_size}"
        return None


def _int2_weight_nodes(site: LayerSite, q: Int2Weight) -> tuple:
    zeros = None if q.zeros is None else site.add_tensor("weight_zeros", q.zeros)
    return site.add_tensor("weight_packed", q.packed), site.add_tensor("weight_scales", q.scales), zeros


def _importance(site: LayerSite) -> torch.Tensor:
    return torch.diagonal(site.stats.gptq_hessian) / 2  # mean x² per input channel


@register_scheme(Int2WeightOnlyScheme)
def quantize_int2_weight_only(config: Int2WeightOnlyScheme, site: LayerSite) -> int:
    weight = site.weight()
    if config.method == "gptq":
        q = quantize_int2_gptq(
            weight,
            site.stats.gptq_hessian,
            config.group_size,
            config.symmetric,
            damp=config.damp_percent,
            act_order=config.act_order,
            scale_dtype=weight.dtype,
            clip_search=config.clip_search,
        )
    else:
        q = quantize_int2_rtn(weight, config.group_size, config.symmetric, config.clip_search, weight.dtype)
    args = (site.match.x, *_int2_weight_nodes(site, q), config.group_size, site.match.bias)
    site.swap(torch.ops.angel.int2_weight_only_linear.default, args)
    return q.nbytes()


@register_scheme(TernaryScheme)
def quantize_ternary(config: TernaryScheme, site: LayerSite) -> int:
    weight = site.weight()
    importance = _importance(site) if config.activation_weighted else None
    if config.packing == "2bit":
        q2 = quantize_ternary_2bit(weight, config.group_size, importance, weight.dtype)
        args = (site.match.x, *_int2_weight_nodes(site, q2), config.group_size, site.match.bias)
        site.swap(torch.ops.angel.int2_weight_only_linear.default, args)
        return q2.nbytes()
    q = quantize_ternary_3of4(weight, config.group_size, importance, weight.dtype)
    packed, scales = site.add_tensor("weight_packed", q.packed), site.add_tensor("weight_scales", q.scales)
    site.swap(
        torch.ops.angel.ternary_3of4_linear.default, (site.match.x, packed, scales, q.group_size, site.match.bias)
    )
    return q.nbytes()


@functools.lru_cache(maxsize=2)
def base_weights(base_model: str) -> dict[str, torch.Tensor]:
    """The base model's float32 weights by state-dict name: a registered name or a safetensors file."""
    if base_model == "smollm2":
        from angel_compile.models import load_smollm2

        model, _ = load_smollm2(torch.float32)
        return {name: t.detach() for name, t in model.state_dict().items()}
    from safetensors.torch import load_file

    try:
        return {name: t.float() for name, t in load_file(base_model).items()}
    except Exception as exc:
        raise ValueError(
            f"DAQ base_model '{base_model}' is neither one of {list(REGISTERED_BASE_MODELS)} nor a readable "
            f"safetensors file: {exc}"
        ) from exc


def base_weight_for(base_model: str, layer: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base weight [N, K] of `layer`; raises ValueError when it is missing or of another shape."""
    weights = base_weights(base_model)
    name = f"{layer}.weight"
    if name not in weights:
        near = sorted(n for n in weights if n.endswith(".weight"))[:5]
        raise ValueError(
            f"DAQ: layer '{layer}' has no weight '{name}' in base model '{base_model}' (it has {near} ...)"
        )
    if tuple(weights[name].shape) != tuple(shape):
        raise ValueError(
            f"DAQ: layer '{layer}' is {tuple(shape)} but '{name}' in base model '{base_model}' is "
            f"{tuple(weights[name].shape)}"
        )
    return weights[name]


@register_scheme(DaqScheme)
def quantize_daq(config: DaqScheme, site: LayerSite) -> int:
    weight = site.weight().detach()
    base = base_weight_for(config.base_model, site.layer, tuple(weight.shape)) if config.base_model else None
    result = search_scales(weight, base, config.format, config.objective, config.group_size)
    codes = quantize_with_scales(weight, result.scale, config.format, config.group_size)
    bias = site.match.bias
    if config.format == "int4":
        packed, scales = pack_int4(codes), result.scale.to(weight.dtype)
        args = (site.match.x, site.add_tensor("weight_packed", packed), site.add_tensor("weight_scales", scales))
        site.swap(torch.ops.angel.int4_weight_only_linear.default, (*args, None, config.group_size, bias))
        return packed.nbytes + scales.nbytes
    scale = result.scale[:, 0].contiguous()  # [N] float32
    if config.format == "int8":
        args = (site.match.x, site.add_tensor("weight_int8", codes), site.add_tensor("weight_scale", scale), bias)
        site.swap(torch.ops.angel.int8_weight_only_linear.default, args)
    else:
        args = (site.match.x, site.add_tensor("weight_fp8", codes), site.add_tensor("weight_scale", scale))
        site.swap(torch.ops.angel.fp8_linear.default, (*args, None, bias))
    return codes.nbytes + scale.nbytes
