"""Static token trees for drafting: which drafted token hangs under which, as fixed tensors.

A tree is given by its branching per depth: `(b_1, ..., b_k)` means the root (the last
accepted token) gets the draft's top-b_1 tokens as children, each of those its top-b_2, and so
on, k levels deep. A chain of k drafted tokens is `(1,) * k`. Nodes are numbered in
breadth-first order, the root being node 0, so the target verifies them in that order in one
forward, with `ancestor_mask` as its attention mask among the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from angel_compile.errors import UnsupportedError

MAX_TREE_NODES = 64  # drafted tokens verified in one target forward (the root not counted)
MAX_DEPTH = 16


@dataclass(frozen=True)
class TokenTree:
    """A static draft tree; see the module docstring.

    Tensors (built once, on CPU; `to(device)` moves them):
    parents [N+1] (root's parent is itself), depths [N+1], ancestor_mask [N+1, N+1] bool
    (node i sees node j when j is i or one of its ancestors), path_to [N+1, k+1] (the node at
    depth d on the path from the root to node i; i itself past its depth).
    """

    branching: tuple[int, ...]

    def __post_init__(self) -> None:
        branching = tuple(int(b) for b in self.branching)
        object.__setattr__(self, "branching", branching)
        if not branching:
            raise UnsupportedError("a draft tree needs at least one level: k must be >= 1")
        if len(branching) > MAX_DEPTH:
            raise UnsupportedError(f"draft depth {len(branching)} is over the limit of {MAX_DEPTH}")
        if any(b <= 0 for b in branching):
            raise UnsupportedError(f"every branching factor must be >= 1; got {branching}")
        if self.num_drafted > MAX_TREE_NODES:
            raise UnsupportedError(
                f"draft tree {branching} has {self.num_drafted} nodes; the limit is {MAX_TREE_NODES} "
                "(fewer levels or narrower branching)"
            )

    @classmethod
    def chain(cls, k: int) -> TokenTree:
        if k <= 0:
            raise UnsupportedError(f"k (drafted tokens per step) must be >= 1; got {k}")
        return cls((1,) * k)

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def level_sizes(self) -> list[int]:
        sizes, width = [], 1
        for b in self.branching:
            width *= b
            sizes.append(width)
        return sizes

    @property
    def num_drafted(self) -> int:
        return sum(self.level_sizes)

    @property
    def is_chain(self) -> bool:
        return all(b == 1 for b in self.branching)

    def level_range(self, depth: int) -> range:
        """Node indices at `depth` (0 = the root)."""
        if depth == 0:
            return range(0, 1)
        start = 1 + sum(self.level_sizes[: depth - 1])
        return range(start, start + self.level_sizes[depth - 1])

    def tensors(self, device=None) -> dict[str, torch.Tensor]:
        total = self.num_drafted + 1
        parents = [0]
        depths = [0]
        for depth in range(1, self.depth + 1):
            for parent in self.level_range(depth - 1):
                for _ in range(self.branching[depth - 1]):
                    parents.append(parent)
                    depths.append(depth)
        ancestor = torch.zeros(total, total, dtype=torch.bool)
        path_to = torch.zeros(total, self.depth + 1, dtype=torch.long)
        for node in range(total):
            walk = [node]
            while walk[-1] != 0:
                walk.append(parents[walk[-1]])
            ancestor[node, walk] = True
            path = list(reversed(walk))
            path_to[node] = torch.tensor(path + [node] * (self.depth + 1 - len(path)))
        return {
            "parents": torch.tensor(parents, device=device),
            "depths": torch.tensor(depths, device=device),
            "ancestor_mask": ancestor.to(device),
            "path_to": path_to.to(device),
        }
