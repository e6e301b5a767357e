"""Calibration: run the captured graph over user batches and collect activation statistics.

For each activation that feeds linear layers (q/k/v share one), `calibrate` gathers what the
quantization schemes ask for (`STATISTICS`):
    absmax    max |x| per input channel                     (SmoothQuant)
    mean_abs  mean |x| per input channel                    (AWQ)
    amax      one per-tensor clipping value from an observer (static FP8 activation scales)
    hessian   Σ x xᵀ over all rows, fp32 [K, K]             (GPTQ; H = 2/rows · Σ x xᵀ)
    sample    up to `sample_rows` rows of x                 (AWQ's search, MSE clipping)

The graph runs under an FX Interpreter. With `offload=True` every weight stays where it is
(CPU) and is moved to `device` only while the node that reads it runs, so a model larger than
device memory can be calibrated one layer at a time. Observers for `amax`:
    minmax          running max |x|
    moving_average  exponential moving average (momentum 0.9) of each batch's max |x|
    percentile      mean over batches of the q-th percentile of |x| (q = 99.99 by default)
    mse             the clip c = α·max|x| (α on a grid) minimising the fake-quantization MSE
                    of the sampled rows on the target grid (fp8 e4m3 or int8)
State is saved and loaded as safetensors; a file that does not fit the model is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx._pytree as fx_pytree
from torch import fx

from angel_compile.errors import CalibrationError

STATISTICS = ("absmax", "mean_abs", "amax", "hessian", "sample")
OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
FORMAT = "angel-calibration/1"
FP8_E4M3_MAX = 448.0
INT8_MAX = 127.0
_PERCENTILE_MAX_ELEMENTS = 1 << 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class ObserverConfig:
    kind: str = "minmax"
    percentile: float = 99.99
    momentum: float = 0.9
    mse_grid: str = "fp8"  # the grid the MSE observer clips for: "fp8" or "int8"

    def __post_init__(self) -> None:
        if self.kind not in OBSERVERS:
            raise CalibrationError(f"unknown observer '{self.kind}'; available: {list(OBSERVERS)}")
        if not 0 < self.percentile <= 100:
            raise CalibrationError(f"observer percentile must be in (0, 100], got {self.percentile}")
        if self.mse_grid not in ("fp8", "int8"):
            raise CalibrationError(f"mse_grid must be 'fp8' or 'int8', got '{self.mse_grid}'")


@dataclass
class ActivationStats:
    """Statistics of one activation x [..., K], accumulated over calibration batches (fp32, CPU)."""

    absmax: torch.Tensor  # [K]
    abs_sum: torch.Tensor  # [K]
    rows: int = 0
    amax: torch.Tensor | None = None  # scalar, from the observer
    hessian: torch.Tensor | None = None  # [K, K] Σ x xᵀ
    sample: torch.Tensor | None = None  # [R, K]
    observer_state: dict[str, float] = field(default_factory=dict)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    @property
    def gptq_hessian(self) -> torch.Tensor:
        """GPTQ's H = 2/n · Σ x xᵀ."""
        if self.hessian is None:
            raise CalibrationError("the Hessian was not collected for this activation")
        return self.hessian * (2.0 / max(self.rows, 1))


@dataclass
class CalibrationState:
    """Per-activation statistics and which layers read each activation."""

    stats: dict[str, ActivationStats]  # key: the first (sorted) layer reading the activation
    layer_inputs: dict[str, str]  # layer path -> key in `stats`
    observer: ObserverConfig

    def for_layer(self, layer: str) -> ActivationStats:
        if layer not in self.layer_inputs:
            raise CalibrationError(f"no calibration statistics for layer '{layer}'")
        return self.stats[self.layer_inputs[layer]]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for key, s in self.stats.items():
            for name in ("absmax", "abs_sum", "amax", "hessian", "sample"):
                value = getattr(s, name)
                if value is not None:
                    tensors[f"{key}/{name}"] = value.contiguous()
        metadata = {
            "format": FORMAT,
            "layer_inputs": json.dumps(self.layer_inputs, sort_keys=True),
            "rows": json.dumps({k: s.rows for k, s in self.stats.items()}),
            "observer": json.dumps(self.observer.__dict__),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, expected_layers: Mapping[str, int] | None = None) -> CalibrationState:
        """Load a saved state; `expected_layers` (layer -> input width K) must match the file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:
            raise CalibrationError(f"calibration file '{path}' cannot be read: {exc}") from exc
        if metadata.get("format") != FORMAT:
            raise CalibrationError(f"calibration file '{path}' is not an angel calibration file ({FORMAT})")
        layer_inputs = json.loads(metadata["layer_inputs"])
        rows = json.loads(metadata["rows"])
        stats = {}
        for key in rows:
            stats[key] = ActivationStats(
                absmax=tensors[f"{key}/absmax"],
                abs_sum=tensors[f"{key}/abs_sum"],
                rows=rows[key],
                amax=tensors.get(f"{key}/amax"),
                hessian=tensors.get(f"{key}/hessian"),
                sample=tensors.get(f"{key}/sample"),
            )
        state = cls(stats, layer_inputs, ObserverConfig(**json.loads(metadata["observer"])))
        if expected_layers is not None:
            state.check_fits(expected_layers, str(path))
        return state

    def check_statistics(self, wanted: Mapping[str, set[str]], origin: str = "calibration state") -> None:
        """Raise CalibrationError unless every layer's statistics hold what `wanted` asks for."""
        lacking = {}
        for layer, needs in sorted(wanted.items()):
            stats = self.for_layer(layer)
            absent = sorted(n for n in needs if n in ("amax", "hessian", "sample") and getattr(stats, n) is None)
            if absent:
                lacking[layer] = absent
        if lacking:
            shown = "; ".join(f"{layer}: {names}" for layer, names in list(lacking.items())[:8])
            raise CalibrationError(
                f"{origin} lacks statistics these schemes need ({shown}{' ...' if len(lacking) > 8 else ''}); "
                "it was saved by a run that did not collect them: calibrate again with calibration_data"
            )

    def check_fits(self, expected_layers: Mapping[str, int], origin: str = "calibration state") -> None:
        missing = sorted(set(expected_layers) - set(self.layer_inputs))
        wrong = sorted(
            f"{layer} (K={k}, file has {self.for_layer(layer).absmax.numel()})"
            for layer, k in expected_layers.items()
            if layer in self.layer_inputs and self.for_layer(layer).absmax.numel() != k
        )
        if missing or wrong:
            raise CalibrationError(
                f"{origin} does not fit this model: layers missing from it: {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}; layers with another input width: {wrong[:8]}"
            )


Batch = Any  # a Tensor (one positional input), a tuple of inputs, a dict of keyword inputs, or (args, kwargs)


def normalize_batch(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for any accepted batch form."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], Mapping):
        return tuple(batch[0]), dict(batch[1])
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise CalibrationError(f"a calibration batch must be a Tensor, tuple, dict or (args, kwargs); got {type(batch)}")


class _Accumulator:
    def __init__(self, key: str, layers: list[str], wanted: set[str], observer: ObserverConfig, sample_rows: int):
        self.key, self.layers, self.wanted = key, layers, wanted
        self.observer, self.sample_rows = observer, sample_rows
        self.stats: ActivationStats | None = None
        self.batch_index = 0

    def update(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"non-finite activation (NaN or inf) in batch {self.batch_index} at the input of layers "
                f"{self.layers}; check the calibration data and the model's dtype"
            )
        rows = x.detach().reshape(-1, x.shape[-1]).float()  # [R, K]
        absolute = rows.abs()
        if self.stats is None:
            k = rows.shape[1]
            self.stats = ActivationStats(absmax=torch.zeros(k), abs_sum=torch.zeros(k))
        s = self.stats
        s.absmax = torch.maximum(s.absmax, absolute.amax(0).cpu())
        s.abs_sum += absolute.sum(0).cpu()
        s.rows += rows.shape[0]
        if "hessian" in self.wanted:
            product = (rows.t() @ rows).cpu()
            s.hessian = product if s.hessian is None else s.hessian + product
        if "sample" in self.wanted or self.observer.kind == "mse":
            kept = 0 if s.sample is None else s.sample.shape[0]
            if kept < self.sample_rows:
                # Evenly spaced rows of each batch, so that the sample spans positions.
                take = min(self.sample_rows - kept, rows.shape[0])
                index = torch.linspace(0, rows.shape[0] - 1, take).round().long().to(rows.device)
                new = rows.index_select(0, index).cpu()
                s.sample = new if s.sample is None else torch.cat([s.sample, new])
        if "amax" in self.wanted:
            self._observe(absolute)

    def _observe(self, absolute: torch.Tensor) -> None:
        s, kind = self.stats, self.observer.kind
        batch_max = float(absolute.max())
        if kind in ("minmax", "mse"):
            s.observer_state["max"] = max(s.observer_state.get("max", 0.0), batch_max)
        elif kind == "moving_average":
            previous = s.observer_state.get("ema")
            m = self.observer.momentum
            s.observer_state["ema"] = batch_max if previous is None else m * previous + (1 - m) * batch_max
        else:
            flat = absolute.flatten()
            if flat.numel() > _PERCENTILE_MAX_ELEMENTS:
                flat = flat[torch.randperm(flat.numel(), device=flat.device)[:_PERCENTILE_MAX_ELEMENTS]]
            value = float(torch.quantile(flat, self.observer.percentile / 100))
            s.observer_state["sum"] = s.observer_state.get("sum", 0.0) + value
            s.observer_state["count"] = s.observer_state.get("count", 0.0) + 1

    def finish(self) -> ActivationStats:
        s = self.stats
        if "amax" in self.wanted:
            state, kind = s.observer_state, self.observer.kind
            if kind == "minmax":
                amax = state["max"]
            elif kind == "moving_average":
                amax = state["ema"]
            elif kind == "percentile":
                amax = state["sum"] / state["count"]
            else:
                amax = mse_optimal_clip(s.sample, state["max"], self.observer.mse_grid)
            s.amax = torch.tensor(amax, dtype=torch.float32)
        if "sample" not in self.wanted:
            s.sample = None
        return s


def _fake_quantize(x: torch.Tensor, clip: float, grid: str) -> torch.Tensor:
    if grid == "fp8":
        scale = clip / FP8_E4M3_MAX
        return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    scale = clip / INT8_MAX
    return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX) * scale


def mse_optimal_clip(sample: torch.Tensor, amax: float, grid: str, steps: int = 40) -> float:
    """The clip value c = α·amax, α in (0.5, 1], with the lowest fake-quantization MSE on `sample`."""
    if amax == 0:
        return 0.0
    best, best_error = amax, float("inf")
    for alpha in torch.linspace(0.5, 1.0, steps).tolist():
        clip = alpha * amax
        error = float((_fake_quantize(sample, clip, grid) - sample).pow(2).mean())
        if error < best_error:
            best, best_error = clip, error
    return best


class _CalibrationInterpreter(fx.Interpreter):
    """Runs the graph, feeding watched activations to their accumulators.

    With a device, weights are moved there on use: kept there (resident) unless offloading,
    in which case each is dropped after its last use and the CPU copy stays the only one.
    """

    def __init__(
        self, gm: fx.GraphModule, watched: dict[str, _Accumulator], device: torch.device | None, offload: bool
    ):
        super().__init__(gm)
        self.watched, self.device, self.offload = watched, device, offload
        self.resident: dict[str, torch.Tensor] = {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        accumulator = self.watched.get(node.name)
        if accumulator is not None:
            accumulator.update(result)
        return result

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if self.device is None or not isinstance(value, torch.Tensor):
            return value
        if self.offload:
            return value.to(self.device, non_blocking=True)
        if target not in self.resident:
            self.resident[target] = value.to(self.device)
        return self.resident[target]


def calibrate(
    gm: fx.GraphModule,
    layer_inputs: Mapping[str, fx.Node],
    batches: Iterable[Batch],
    wanted: Mapping[str, set[str]],
    observer: ObserverConfig = ObserverConfig(),
    sample_rows: int = 512,
    device: str | torch.device | None = None,
    offload: bool = False,
    progress: bool = True,
) -> CalibrationState:
    """Run `gm` over `batches` and collect statistics of the activations feeding the given layers.

    layer_inputs: layer path -> the node producing its input activation.
    wanted: layer path -> statistics it needs (subset of STATISTICS).
    device / offload: run on `device`; with offload, weights move there one node at a time.
    """
    unknown = sorted({w for needs in wanted.values() for w in needs} - set(STATISTICS))
    if unknown:
        raise CalibrationError(f"unknown statistic(s) {unknown}; available: {list(STATISTICS)}")
    by_node: dict[str, list[str]] = {}
    for layer, node in layer_inputs.items():
        by_node.setdefault(node.name, []).append(layer)
    accumulators = {}
    for node_name, layers in by_node.items():
        layers = sorted(layers)
        needs = set().union(*(wanted.get(layer, set()) for layer in layers))
        accumulators[node_name] = _Accumulator(layers[0], layers, needs, observer, sample_rows)
    target = torch.device(device) if device is not None else None
    interpreter = _CalibrationInterpreter(gm, accumulators, target, offload)
    count = 0
    with torch.no_grad():
        for batch in _progress(batches, progress):
            args, kwargs = normalize_batch(batch)
            flat = _flat_inputs(gm, args, kwargs)
            if target is not None:
                flat = [t.to(target) if isinstance(t, torch.Tensor) else t for t in flat]
            for accumulator in accumulators.values():
                accumulator.batch_index = count
            try:
                interpreter.run(*flat)
            except CalibrationError:
                raise
            except Exception as exc:
                raise CalibrationError(
                    f"calibration batch {count} does not fit the captured graph ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); batches must match the example "
                    "inputs' structure, and their shapes the dynamic_shapes given at capture"
                ) from exc
            count += 1
    if count == 0:
        raise CalibrationError("calibration got no batches; pass at least one batch of model inputs")
    stats = {a.key: a.finish() for a in accumulators.values()}
    layer_keys = {layer: a.key for a in accumulators.values() for layer in a.layers}
    return CalibrationState(stats, layer_keys, observer)


def _flat_inputs(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is None:
        return list(args)
    return fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), in_spec)


def _progress(batches: Iterable[Batch], enabled: bool) -> Iterable[Batch]:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc="calibrating", unit="batch", leave=False)
