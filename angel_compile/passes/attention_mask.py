"""Proving that an attention mask is causal from the nodes that build it.

transformers hands `scaled_dot_product_attention` an explicit mask built from index
arithmetic (arange, unsqueeze / expand, index, diff / cumsum for packed sequences,
comparisons, and), not `is_causal=True`. `prove_causal` evaluates that subgraph over an
abstract domain in which every value is exact:

- an integer tensor is an affine function of its coordinates,
      x[i_0, ..., i_{r-1}] = c + Σ_d a_d · i_d          (`Affine`; a_d = 0 on size-1 dims)
- a boolean tensor is a conjunction of affine constraints,
      m[i] = ∧_j (f_j(i) >= 0)  ∧  ∧_j (g_j(i) == 0)       (`Conjunction`; ∅ = all true)

Each supported op maps these exactly (index.Tensor substitutes affine indices into an
affine source; diff of an affine x along d is the constant a_d when the prepended value
continues x; cumsum of a constant c is c · (i_d + 1); a comparison of two affine values
is one constraint, decided outright when it does not depend on the coordinates). The mask
of a [..., S, S] attention is causal iff its conjunction is exactly { i_key <= i_query }.
A float mask `where(m, 0, -inf or a large negative)` is causal iff m is. Anything else —
a graph input (padding mask, arbitrary additive mask), an op outside the domain, a
constraint other than k <= q — is not proven, and the reason says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from angel_compile import meta

aten = torch.ops.aten


@dataclass(frozen=True)
class Affine:
    """x[i] = const + Σ_d coeffs[d] · i[d] (integer tensor of rank len(coeffs))."""

    coeffs: tuple[int, ...]
    const: int

    def shifted(self, other: Affine, sign: int) -> Affine:
        a, b = _align(self.coeffs, other.coeffs)
        return Affine(tuple(x + sign * y for x, y in zip(a, b, strict=True)), self.const + sign * other.const)


@dataclass(frozen=True)
class Conjunction:
    """m[i] = ∧ (f(i) >= 0) for f in ge ∧ (g(i) == 0) for g in eq; false=True: all false."""

    rank: int
    ge: frozenset[Affine] = frozenset()
    eq: frozenset[Affine] = frozenset()
    false: bool = False


class NotProven(Exception):
    """The subgraph falls outside the abstract domain; the message says where."""


def _align(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rank = max(len(a), len(b))
    return (0,) * (rank - len(a)) + a, (0,) * (rank - len(b)) + b


def _pad(f: Affine, rank: int) -> Affine:
    return Affine((0,) * (rank - len(f.coeffs)) + f.coeffs, f.const)


def _constraint(kind: str, f: Affine, rank: int) -> Conjunction:
    if not any(f.coeffs):  # decided outright
        holds = f.const >= 0 if kind == "ge" else f.const == 0
        return Conjunction(rank, false=not holds)
    return Conjunction(rank, **{kind: frozenset({_pad(f, rank)})})


def _and(a: Conjunction, b: Conjunction) -> Conjunction:
    rank = max(a.rank, b.rank)
    if a.false or b.false:
        return Conjunction(rank, false=True)
    return Conjunction(
        rank,
        frozenset(_pad(f, rank) for f in a.ge | b.ge),
        frozenset(_pad(f, rank) for f in a.eq | b.eq),
    )


def _insert_dim(value: Affine | Conjunction, dim: int) -> Affine | Conjunction:
    if isinstance(value, Affine):
        coeffs = list(value.coeffs)
        coeffs.insert(dim, 0)
        return Affine(tuple(coeffs), value.const)
    return Conjunction(
        value.rank + 1,
        frozenset(_insert_dim(f, dim) for f in value.ge),
        frozenset(_insert_dim(f, dim) for f in value.eq),
        value.false,
    )


def _shape(node: fx.Node) -> tuple:
    val = node.meta.get(meta.VAL)
    if not isinstance(val, torch.Tensor):
        raise NotProven(f"node '{node.name}' has no tensor metadata")
    return tuple(val.shape)


def _normalized(value: Affine, node: fx.Node) -> Affine:
    # A size-1 dimension only ever has coordinate 0, so its coefficient does not matter;
    # zeroing it keeps equal values equal (and expand then needs no special case).
    shape = _shape(node)
    coeffs = tuple(0 if isinstance(s, int) and s == 1 else a for a, s in zip(value.coeffs, shape, strict=True))
    return Affine(coeffs, value.const)


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotProven(f"{what} is not a constant integer ({value!r})")
    return value


class _Evaluator:
    def __init__(self) -> None:
        self.memo: dict[fx.Node, Affine | Conjunction] = {}

    def value(self, arg: object, rank_hint: int = 0) -> Affine | Conjunction:
        if isinstance(arg, fx.Node):
            if arg not in self.memo:
                self.memo[arg] = self.evaluate(arg)
            return self.memo[arg]
        if isinstance(arg, bool):
            return Conjunction(rank_hint, false=not arg)
        if isinstance(arg, int):
            return Affine((0,) * rank_hint, arg)
        raise NotProven(f"operand {arg!r} is not an integer or boolean constant")

    def affine(self, arg: object, rank_hint: int = 0) -> Affine:
        value = self.value(arg, rank_hint)
        if isinstance(value, Conjunction):
            # A decided boolean is the integer 0 / 1 (cumsum of a comparison, say).
            if value.ge or value.eq:
                raise NotProven("a coordinate-dependent boolean is used as an integer")
            return Affine((0,) * value.rank, 0 if value.false else 1)
        return value

    def conjunction(self, arg: object, rank_hint: int = 0) -> Conjunction:
        value = self.value(arg, rank_hint)
        if isinstance(value, Affine):
            raise NotProven("an integer tensor is used as a mask")
        return value

    def evaluate(self, node: fx.Node) -> Affine | Conjunction:
        if node.op == "placeholder":
            raise NotProven(f"it depends on the graph input '{node.target}' (padding or an arbitrary mask)")
        if node.op == "get_attr":
            raise NotProven(f"it depends on the stored tensor '{node.target}'")
        if node.op != "call_function":
            raise NotProven(f"it depends on '{node.name}' ({node.op})")
        result = self.apply(node, node.target, node.args, node.kwargs)
        return _normalized(result, node) if isinstance(result, Affine) else result

    def apply(self, node: fx.Node, target: object, args: tuple, kwargs: dict) -> Affine | Conjunction:
        rank = len(_shape(node))
        if target == aten.arange.default:
            return Affine((1,), 0)
        if target == aten.arange.start:
            return Affine((1,), _int(args[0], "arange start"))
        if target == aten.arange.start_step:
            return Affine((_int(args[2], "arange step"),), _int(args[0], "arange start"))
        if target in (aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default):
            return self.value(args[0])
        if target == aten._to_copy.default:
            value = self.value(args[0])
            if isinstance(value, Conjunction) and kwargs.get("dtype", torch.bool) != torch.bool:
                raise NotProven("a mask is converted to a number type")
            return value
        if target in (aten.add.Tensor, aten.sub.Tensor):
            if kwargs.get("alpha", 1) != 1:
                raise NotProven("add/sub with alpha")
            sign = 1 if target == aten.add.Tensor else -1
            return self.affine(args[0], rank).shifted(self.affine(args[1], rank), sign)
        if target == aten.unsqueeze.default:
            dim = _int(args[1], "unsqueeze dim")
            return _insert_dim(self.value(args[0]), dim if dim >= 0 else dim + rank)
        if target == aten.expand.default:
            value = self.value(args[0])
            source_rank = len(value.coeffs) if isinstance(value, Affine) else value.rank
            for _ in range(rank - source_rank):  # expand only adds leading dims
                value = _insert_dim(value, 0)
            return value
        if target == aten.slice.Tensor:
            return self.slice(args)
        if target == aten.index.Tensor:
            return self.index(args)
        if target == aten.diff.default:
            return self.diff(args, kwargs)
        if target == aten.cumsum.default:
            source = self.affine(args[0])
            dim = _int(args[1], "cumsum dim") % len(source.coeffs)
            if any(source.coeffs):
                raise NotProven("cumsum of a coordinate-dependent tensor")
            coeffs = [0] * len(source.coeffs)
            coeffs[dim] = source.const  # Σ_{t <= i} c = c · (i + 1)
            return Affine(tuple(coeffs), source.const)
        if target in _COMPARISONS:
            return self.compare(_COMPARISONS[target], args, rank)
        if target in (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default):
            return _and(self.conjunction(args[0], rank), self.conjunction(args[1], rank))
        if target in (aten.new_ones.default, aten.ones.default, aten.full.default, aten.new_full.default):
            fill = 1
            if target == aten.full.default:
                fill = args[1]
            elif target == aten.new_full.default:
                fill = args[2]
            if kwargs.get("dtype") == torch.bool:
                return Conjunction(rank, false=not fill)
            return Affine((0,) * rank, _int(fill, "fill value"))
        raise NotProven(f"it is built with {target}, which the causal-mask proof does not model")

    def slice(self, args: tuple) -> Affine:
        source = self.affine(args[0])
        dim = _int(args[1] if len(args) > 1 else 0, "slice dim") % len(source.coeffs)
        start = _int(args[2] if len(args) > 2 and args[2] is not None else 0, "slice start")
        step = _int(args[4] if len(args) > 4 else 1, "slice step")
        if start < 0:
            raise NotProven("slice from the end")
        coeffs = list(source.coeffs)
        const = source.const + coeffs[dim] * start
        coeffs[dim] *= step
        return Affine(tuple(coeffs), const)

    def index(self, args: tuple) -> Affine:
        source = self.affine(args[0])
        indices = args[1]
        if any(i is None for i in indices):
            raise NotProven("index with None (mixed basic / advanced indexing)")
        index_values = [self.affine(i) for i in indices]
        nb = max(len(i.coeffs) for i in index_values)
        coeffs = [0] * nb
        const = source.const
        for a, idx in zip(source.coeffs, index_values, strict=False):
            idx = _pad(idx, nb)
            coeffs = [c + a * x for c, x in zip(coeffs, idx.coeffs, strict=True)]
            const += a * idx.const
        return Affine(tuple(coeffs) + source.coeffs[len(indices) :], const)

    def diff(self, args: tuple, kwargs: dict) -> Affine:
        source = self.affine(args[0])
        dim = _int(args[2] if len(args) > 2 else kwargs.get("dim", -1), "diff dim") % len(source.coeffs)
        n = args[1] if len(args) > 1 else kwargs.get("n", 1)
        prepend = args[3] if len(args) > 3 else kwargs.get("prepend")
        append = args[4] if len(args) > 4 else kwargs.get("append")
        if n != 1 or append is not None:
            raise NotProven("diff with n != 1 or append")
        step = source.coeffs[dim]
        if prepend is not None:
            # The first difference is x[0] - prepend: it equals the step iff prepend = x[-1].
            before = self.affine(prepend)
            expected = Affine(tuple(0 if d == dim else a for d, a in enumerate(source.coeffs)), source.const - step)
            if _pad(before, len(source.coeffs)) != expected:
                raise NotProven("diff's prepended value does not continue the sequence")
        return Affine((0,) * len(source.coeffs), step)

    def compare(self, kind: str, args: tuple, rank: int) -> Conjunction:
        a, b = self.affine(args[0], rank), self.affine(args[1], rank)
        if kind == "ne":
            difference = a.shifted(b, -1)
            if any(difference.coeffs):
                raise NotProven("a coordinate-dependent '!='")
            return Conjunction(rank, false=difference.const == 0)
        # integers: a < b  <=>  b - a - 1 >= 0
        forms = {
            "le": ("ge", b.shifted(a, -1)),
            "ge": ("ge", a.shifted(b, -1)),
            "lt": ("ge", b.shifted(a, -1).shifted(Affine((), 1), -1)),
            "gt": ("ge", a.shifted(b, -1).shifted(Affine((), 1), -1)),
            "eq": ("eq", a.shifted(b, -1)),
        }
        constraint_kind, f = forms[kind]
        return _constraint(constraint_kind, f, rank)


_COMPARISONS = {
    **{getattr(aten, op).Tensor: op for op in ("le", "lt", "ge", "gt", "eq", "ne")},
    **{getattr(aten, op).Scalar: op for op in ("le", "lt", "ge", "gt", "eq", "ne")},
}


def _is_causal(mask: Conjunction) -> bool:
    """{ i_key <= i_query } on the last two dims (SDPA broadcasts the rest), up to a positive factor."""
    if mask.false or mask.eq or len(mask.ge) != 1 or mask.rank < 2:
        return False
    (f,) = mask.ge
    *lead, q, k = f.coeffs
    return not any(lead) and q > 0 and k == -q and f.const == 0


def _boolean_mask_node(mask: fx.Node) -> fx.Node:
    """The boolean mask m behind a float mask where(m, 0, -inf or large negative); m itself if boolean."""
    val = mask.meta.get(meta.VAL)
    if mask.op in ("placeholder", "get_attr") or (isinstance(val, torch.Tensor) and val.dtype == torch.bool):
        return mask  # the evaluator says why an input is not proven
    wheres = (aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar, aten.where.self)
    if mask.op == "call_function" and mask.target in wheres:
        cond, keep, drop = mask.args[:3]
        if _scalar(keep) == 0.0 and _scalar(drop) <= -1e4:
            return cond
    raise NotProven("the float mask is not where(m, 0, -inf)")


def _scalar(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target == aten.scalar_tensor.default:
        return float(value.args[0])
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target == aten.full.default:
        return float(value.args[1])
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target == aten.zeros.default:
        return 0.0
    return math.nan


def prove_causal(mask: fx.Node) -> str | None:
    """None if the mask is provably the causal mask k <= q, else why it is not (one line)."""
    try:
        value = _Evaluator().conjunction(_boolean_mask_node(mask))
    except NotProven as exc:
        return f"mask not proven causal: {exc}"
    if _is_causal(value):
        return None
    return "mask is not causal (its constraints are not exactly key <= query)"
