"""Quantization of linear layers by scheme (pass `quantize`).

Matches: every linear layer whose weight is a float parameter (`quantize/linear.py`).
Assigns: a scheme per layer — the first `rules` entry whose pattern matches the layer path
         (a rule with `scheme: null` keeps the layer in float), else `scheme`; layers matching
         `exclude` stay in float.
Calibrates: when an assigned scheme needs activation statistics (static FP8 scales, GPTQ
         Hessians, SmoothQuant / AWQ channel statistics), over `PassContext.calibration_data`,
         or loads them from `calibration.load`; `calibration.save` writes them.
Smooths: layers whose scheme rescales input channels (SmoothQuant, AWQ) share one scale per
         input activation, folded into the preceding norm where possible (`smoothing.py`).
Emits:   what each scheme's handler emits (`handlers.py`); a layer a scheme cannot take keeps
         its float weight and is listed in the stats with the reason.

    passes:
      - name: quantize
        options:
          scheme: {type: int4_weight_only, group_size: 128, method: gptq}
          rules: [{pattern: "lm_head", scheme: {type: int8_weight_only}}]
          exclude: ["layers.0.*"]
          calibration: {observer: minmax, sample_rows: 512, offload: false, save: calib.safetensors}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import fx

from angel_compile import meta
from angel_compile.calibration import CalibrationState, ObserverConfig, calibrate
from angel_compile.errors import CalibrationError, UnsupportedError
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, register_pass
from angel_compile.passes.graph_utils import fake_mode_of
from angel_compile.passes.quantize.linear import LINEAR_TARGETS, LinearMatch, layer_matches, match_linear
from angel_compile.passes.quantize.rewrite import weight_nk
from angel_compile.passes.quantize.schemes import LayerSite, Scheme, handler_for, parse_scheme
from angel_compile.passes.quantize.smoothing import activation_root, apply_input_scale

CALIBRATION_KEYS = (
    "observer",
    "percentile",
    "momentum",
    "mse_grid",
    "sample_rows",
    "offload",
    "device",
    "load",
    "save",
)

# layer path -> (scheme, None) or (None, why the layer stays in float)
Assignment = Callable[[str], tuple[Scheme | None, str | None]]


@dataclass(frozen=True)
class CalibrationOptions:
    observer: ObserverConfig = ObserverConfig()
    sample_rows: int = 512
    offload: bool = False
    device: str | None = None
    load: str | None = None
    save: str | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> CalibrationOptions:
        unknown = sorted(set(data) - set(CALIBRATION_KEYS))
        if unknown:
            raise ValueError(f"calibration has no key(s) {unknown}; accepted: {list(CALIBRATION_KEYS)}")
        observer_keys = ("percentile", "momentum", "mse_grid")
        observer = ObserverConfig(
            kind=data.get("observer", "minmax"), **{k: data[k] for k in observer_keys if k in data}
        )
        rest = {k: data[k] for k in ("sample_rows", "offload", "device", "load", "save") if k in data}
        return cls(observer=observer, **rest)


def quantize_layers(
    gm: fx.GraphModule,
    ctx: PassContext,
    pass_name: str,
    assign: Assignment,
    calibration: CalibrationOptions = CalibrationOptions(),
) -> PassResult:
    """The engine behind the quantization passes: match, assign, calibrate, smooth, rewrite."""
    stats = PassStats()
    fake_mode = fake_mode_of(gm)
    planned: list[tuple[LinearMatch, Scheme]] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        match = match_linear(gm, node)
        if isinstance(match, str):
            stats.skip(node, match)
            continue
        stats.matched += 1
        scheme, reason = assign(match.layer)
        reason = reason or scheme.unsupported(weight_nk(gm, match))
        if reason:
            stats.skip(node, f"layer '{match.layer}': {reason}")
            continue
        planned.append((match, scheme))
    if stats.matched == 0 and ctx.whole_model and not _has_nodes_from(gm, pass_name):
        seen = "; ".join(f"{node}: {why}" for node, why in stats.skipped.items()) or "none found"
        raise UnsupportedError(
            f"{pass_name}: the graph has no linear layer with a float parameter weight (looked for "
            f"{', '.join(str(t) for t in LINEAR_TARGETS)}); linear-like nodes seen: {seen}"
        )
    state = _calibration_state(gm, ctx, planned, calibration, pass_name)
    smoothed = _smooth(gm, planned, state, fake_mode)
    float_bytes = stored_bytes = 0
    counts: dict[str, int] = {}
    for match, scheme in planned:
        # Smoothing may have given the layer a new input or weight node; the layer keeps its name.
        match = dataclasses.replace(match_linear(gm, match.node), layer=match.layer)
        weight = weight_nk(gm, match)
        float_bytes += weight.numel() * weight.element_size()
        # Layers whose scheme needs no statistics (int8 beside GPTQ layers) have none.
        layer_stats = state.for_layer(match.layer) if state and match.layer in state.layer_inputs else None
        site = LayerSite(gm, match, fake_mode, pass_name, layer_stats)
        stored_bytes += handler_for(scheme)(scheme, site)
        counts[scheme.type] = counts.get(scheme.type, 0) + 1
        stats.rewritten += 1
    if stats.rewritten:
        gm.graph.lint()
        gm.recompile()
    stats.details = {
        "schemes": counts,
        "weight_bytes_before": float_bytes,
        "weight_bytes_after": stored_bytes,
        "smoothing": smoothed,
    }
    return PassResult(gm, modified=stats.rewritten > 0, stats=stats)


def _has_nodes_from(gm: fx.GraphModule, pass_name: str) -> bool:
    return any(n.meta.get(meta.PROVENANCE, {}).get("pass") == pass_name for n in gm.graph.nodes)


def _calibration_state(
    gm: fx.GraphModule,
    ctx: PassContext,
    planned: list[tuple[LinearMatch, Scheme]],
    options: CalibrationOptions,
    pass_name: str,
) -> CalibrationState | None:
    wanted = {}
    for match, scheme in planned:
        needs = scheme.statistics() | ({"absmax", "sample"} if scheme.smoothing() else set())
        if needs:
            wanted[match.layer] = needs
    if not wanted:
        return None
    widths = {match.layer: weight_nk(gm, match).shape[1] for match, _ in planned if match.layer in wanted}
    if options.load:
        state = CalibrationState.load(options.load, expected_layers=widths)
        state.check_statistics(wanted, f"calibration file '{options.load}'")
        return state
    if not ctx.calibration_data:
        layers = sorted(wanted)
        raise CalibrationError(
            f"{pass_name}: layers {layers[:4]}{' ...' if len(layers) > 4 else ''} use schemes that need "
            "calibration data: pass calibration_data=[batch, ...] to compile(), or a saved state "
            "with the recipe option calibration.load"
        )
    inputs = {match.layer: activation_root(match.x) for match, _ in planned if match.layer in wanted}
    state = calibrate(
        gm,
        inputs,
        ctx.calibration_data,
        wanted,
        observer=options.observer,
        sample_rows=options.sample_rows,
        device=options.device,
        offload=options.offload,
    )
    if options.save:
        state.save(options.save)
    return state


def _smooth(
    gm: fx.GraphModule, planned: list[tuple[LinearMatch, Scheme]], state: CalibrationState | None, fake_mode
) -> dict[str, str]:
    """Apply SmoothQuant / AWQ input scaling per shared input; returns layer group -> where 1/s went."""
    groups: dict[fx.Node, list[tuple[LinearMatch, Scheme]]] = {}
    for match, scheme in planned:
        if scheme.smoothing():
            groups.setdefault(activation_root(match.x), []).append((match, scheme))
    where = {}
    for members in groups.values():
        # One scale per activation; each distinct scheme config computes it the same way for its layers.
        schemes = {scheme for _, scheme in members}
        if len(schemes) > 1:
            for match, scheme in members:
                scale = scheme.input_scale([match], gm, state.for_layer(match.layer))
                where[match.layer] = apply_input_scale(gm, [match], scale, fake_mode)
            continue
        (scheme,) = schemes
        matches = [match for match, _ in members]
        scale = scheme.input_scale(matches, gm, state.for_layer(matches[0].layer))
        where[",".join(m.layer for m in matches)] = apply_input_scale(gm, matches, scale, fake_mode)
    return where


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize linear layers by scheme, with per-layer rules, exclusions and calibration.

    scheme: the default scheme ({type: ..., fields}); rules: [{pattern, scheme}] checked in
    order (scheme null = float); exclude: layer path patterns kept in float; calibration:
    {observer, percentile, momentum, mse_grid, sample_rows, offload, device, load, save}.
    """

    name: ClassVar[str] = "quantize"
    scheme: Any = None
    rules: tuple[Any, ...] = ()
    exclude: tuple[str, ...] = ()
    calibration: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Parse now so that a bad recipe fails when it is loaded, naming the culprit.
        self._parsed()

    def _parsed(self) -> tuple[Scheme | None, list[tuple[str, Scheme | None]], CalibrationOptions]:
        default = parse_scheme(self.scheme)
        rules = []
        for index, rule in enumerate(self.rules):
            if not isinstance(rule, Mapping) or set(rule) != {"pattern", "scheme"}:
                raise ValueError(f"rules[{index}] must be a mapping with keys 'pattern' and 'scheme', got {rule!r}")
            rules.append((str(rule["pattern"]), parse_scheme(rule["scheme"])))
        if default is None and not any(scheme for _, scheme in rules):
            raise ValueError("no scheme: set 'scheme' or give a rule with a scheme")
        return default, rules, CalibrationOptions.parse(self.calibration or {})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        default, rules, calibration = self._parsed()

        def assign(layer: str) -> tuple[Scheme | None, str | None]:
            pattern = layer_matches(layer, self.exclude)
            if pattern is not None:
                return None, f"excluded by pattern '{pattern}'"
            for rule_pattern, scheme in rules:
                if layer_matches(layer, (rule_pattern,)):
                    return (scheme, None) if scheme else (None, f"kept in float by rule '{rule_pattern}'")
            return (default, None) if default else (None, "no rule matches and no default scheme")

        return quantize_layers(gm, ctx, self.name, assign, calibration)
