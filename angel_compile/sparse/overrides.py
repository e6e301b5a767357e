"""Per-layer and per-head parameters of sparse attention: the recipe's `overrides` list.

    overrides:
      - {layers: "0-1", method: dense}                  # layers 0 and 1 stay dense
      - {layers: "*", heads: [0, 1], local_blocks: 8}   # heads 0 and 1 of every layer: wider window
      - {layers: [4, 9], heads: "8-15", method: static, local_blocks: 15}

Each entry picks layers and query heads and sets any of the parameters of
`SparseAttentionConfig` (method, block_size, min_seq_len, sink_blocks, local_blocks, top_k,
budget_decay, threshold) for them; `method` may also be "dense" (exact causal attention).
Entries apply in list order on top of the pass's own options, so where two entries pick the
same head the later one wins key by key.

`layers` and `heads` take "*" (every index; the default), an index, a list of indices, or a
string of indices and inclusive ranges such as "0-3,7". A layer's index is the first integer
in its attention module's path ("model.layers.3.self_attn" -> 3); an entry naming layers does
not pick an attention module whose path has no integer. Heads are query-head indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from angel_compile.sparse.selection import METHODS, SparseAttentionConfig

DENSE = "dense"
PARAMETERS = tuple(f.name for f in dataclasses.fields(SparseAttentionConfig))
SELECTORS = ("layers", "heads")


@dataclass(frozen=True)
class Override:
    """One entry: the layers and heads it picks (None: all) and the parameter values it sets."""

    layers: frozenset[int] | None
    heads: frozenset[int] | None
    values: Mapping[str, Any]

    def picks_layer(self, layer: int | None) -> bool:
        return self.layers is None or (layer is not None and layer in self.layers)


def parse_indices(spec: Any, what: str) -> frozenset[int] | None:
    """ "*" -> None (all); an int, a list of ints, or "0-3,7" -> the set of indices. ValueError otherwise."""
    if spec == "*":
        return None
    if isinstance(spec, bool):
        raise ValueError(f"{what}={spec!r} is not an index")
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        indices: list[int] = []
        for part in spec.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            if not low.isdigit() or (dash and not high.isdigit()):
                raise ValueError(f"{what}={spec!r}: '{part}' is not an index or a range 'a-b' (use '*' for all)")
            if dash and int(high) < int(low):
                raise ValueError(f"{what}={spec!r}: range '{part}' is empty")
            indices += range(int(low), int(high if dash else low) + 1)
        return frozenset(indices)
    if isinstance(spec, Sequence) and spec and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        if min(spec) < 0:
            raise ValueError(f"{what}={list(spec)} has a negative index")
        return frozenset(spec)
    raise ValueError(f"{what}={spec!r} must be '*', an index, a non-empty list of indices or a string like '0-3,7'")


def parse_overrides(entries: Sequence[Mapping[str, Any]], base: Mapping[str, Any]) -> tuple[Override, ...]:
    """Validate the recipe's entries against the pass options `base`; ValueError naming the entry and key."""
    overrides = []
    for position, entry in enumerate(entries):
        where = f"overrides[{position}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must map keys to values, got {entry!r}")
        unknown = sorted(set(entry) - set(SELECTORS) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; accepted: {[*SELECTORS, *PARAMETERS]}")
        values = {key: value for key, value in entry.items() if key in PARAMETERS}
        if not values:
            raise ValueError(f"{where} sets no parameter; give a method or one of {list(PARAMETERS)}")
        if values.get("method", base.get("method")) not in (*METHODS, DENSE):
            raise ValueError(f"{where}: method={values['method']!r} is unknown (methods: {[*METHODS, DENSE]})")
        try:
            layers = parse_indices(entry.get("layers", "*"), "layers")
            heads = parse_indices(entry.get("heads", "*"), "heads")
            config_of({**base, **values})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        overrides.append(Override(layers, heads, values))
    return tuple(overrides)


def config_of(values: Mapping[str, Any]) -> SparseAttentionConfig | None:
    """The config the parameter values describe; None for method "dense" (other values still validated)."""
    if values.get("method") == DENSE:
        SparseAttentionConfig(**{**values, "method": METHODS[0]})  # validates the other values
        return None
    return SparseAttentionConfig(**values)


def head_values(
    overrides: Sequence[Override], base: Mapping[str, Any], layer: int | None, heads: int
) -> list[dict[str, Any]]:
    """The parameter values of each of a layer's `heads` query heads: `base`, then each entry that picks it.

    Raises ValueError when an entry that picks this layer names a head the layer does not have.
    """
    per_head = [dict(base) for _ in range(heads)]
    for position, override in enumerate(overrides):
        if not override.picks_layer(layer):
            continue
        if override.heads is not None and max(override.heads) >= heads:
            raise ValueError(
                f"overrides[{position}]: heads {sorted(override.heads)} out of range for layer {layer}, "
                f"which has {heads} query heads"
            )
        for head in range(heads) if override.heads is None else sorted(override.heads):
            per_head[head].update(override.values)
    return per_head


def layer_index(module_path: str) -> int | None:
    """The first integer component of a dotted module path, or None."""
    return next((int(part) for part in module_path.split(".") if part.isdigit()), None)
