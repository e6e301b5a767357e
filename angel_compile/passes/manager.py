"""PassManager: runs passes in order, verifies after each, dumps, times and checks numerics.

Between passes one hook does everything debugging needs:
- verify (`passes/verify.py`), so a broken graph is blamed on the pass that made it;
- time the pass and count nodes before/after;
- with `debug_dir` (or the ANGEL_DEBUG_DIR environment variable): write each stage's code,
  a diff against the previous stage and a summary table (`debug/dump.py`);
- with real example inputs and `check_numerics` (on by default with a debug dir): run the
  stage and compare its outputs with the captured graph's (`debug/numerics.py`).
`disable` skips named passes; `stop_after` ends the pipeline after a named pass.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from angel_compile.debug.dump import StageDumper
from angel_compile.debug.numerics import NumericReport, compare_outputs
from angel_compile.errors import PassError, RecipeError
from angel_compile.passes.base import Pass, PassContext, PassStats, count_nodes
from angel_compile.passes.verify import GraphVerificationError, verify_graph

DEBUG_DIR_ENV = "ANGEL_DEBUG_DIR"


@dataclass
class PassRecord:
    name: str
    status: str  # "ran" | "disabled" | "not reached" (after stop_after)
    modified: bool = False
    stats: PassStats | None = None
    nodes_before: int = 0
    nodes_after: int = 0
    ms: float = 0.0
    numerics: NumericReport | None = None

    def row(self) -> dict[str, Any]:
        stats = self.stats or PassStats()
        return {
            "pass": self.name,
            "status": self.status,
            "modified": self.modified,
            "matched": stats.matched,
            "rewritten": stats.rewritten,
            "skipped": len(stats.skipped),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "ms": round(self.ms, 1),
            "numerics": str(self.numerics) if self.numerics else "",
            "skip_reasons": dict(stats.skipped),
            "details": dict(stats.details),
        }


@dataclass
class PipelineReport:
    """Per-pass records of one pipeline run, in order."""

    records: list[PassRecord]

    def ran(self) -> list[str]:
        return [r.name for r in self.records if r.status == "ran"]

    def __getitem__(self, name: str) -> PassRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no pass '{name}' in this pipeline; passes: {[r.name for r in self.records]}")

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.records]

    def table(self) -> str:
        """Markdown table: pass, status, modified, matched, rewritten, skipped, nodes, ms, numerics."""
        header = "| pass | status | modified | matched | rewritten | skipped | nodes before→after | ms | vs reference |"
        lines = [header, "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows():
            lines.append(
                f"| {r['pass']} | {r['status']} | {r['modified']} | {r['matched']} | {r['rewritten']} | "
                f"{r['skipped']} | {r['nodes_before']}→{r['nodes_after']} | {r['ms']} | {r['numerics'] or '-'} |"
            )
        if not self.records:
            lines.append("| (no passes) | | | | | | | | |")
        return "\n".join(lines)

    def skip_reasons(self) -> str:
        """One line per node a pass left alone, with the reason."""
        lines = []
        for record in self.records:
            for node, reason in (record.stats.skipped if record.stats else {}).items():
                lines.append(f"{record.name}: left {node} unchanged: {reason}")
        return "\n".join(lines)


class PassManager:
    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        debug_dir: str | Path | None = None,
        disable: Sequence[str] = (),
        stop_after: str | None = None,
        check_numerics: bool | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        names = [p.name for p in passes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RecipeError(f"pass(es) {duplicates} appear more than once in the pipeline; a pass may appear once")
        for option, wanted in (("disable", list(disable)), ("stop_after", [stop_after] if stop_after else [])):
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise RecipeError(f"{option}: no pass named {unknown} in this pipeline; its passes: {names}")
        self.passes = list(passes)
        self.verify = verify
        env_dir = os.environ.get(DEBUG_DIR_ENV)
        self.debug_dir = Path(debug_dir) if debug_dir else Path(env_dir) if env_dir else None
        self.disable = set(disable)
        self.stop_after = stop_after
        self.check_numerics = self.debug_dir is not None if check_numerics is None else check_numerics
        self.progress = progress

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PipelineReport]:
        """Run the pipeline on gm (rewritten in place) and return it with the report."""
        dumper = StageDumper(self.debug_dir) if self.debug_dir else None
        self._verify(gm, "the captured graph", [])
        if dumper:
            dumper.dump(0, "captured", gm)
        reference = self._run_graph(gm, ctx) if self._can_check(ctx) else None
        records: list[PassRecord] = []
        stopped = False
        for index, pass_ in enumerate(self.passes, start=1):
            if stopped:
                records.append(PassRecord(pass_.name, "not reached"))
                continue
            if pass_.name in self.disable:
                records.append(PassRecord(pass_.name, "disabled"))
                continue
            before = [r.name for r in records if r.status == "ran"]
            if self.progress:
                self.progress(f"[{index}/{len(self.passes)}] {pass_.name} ...")
            record = PassRecord(pass_.name, "ran", nodes_before=count_nodes(gm))
            start = time.perf_counter()
            try:
                result = pass_(gm, ctx)
            except Exception as exc:
                raise PassError(
                    f"pass '{pass_.name}' failed (passes before it: {before or 'none'}): {type(exc).__name__}: {exc}"
                ) from exc
            record.ms = (time.perf_counter() - start) * 1e3
            gm = result.graph_module
            record.modified, record.stats, record.nodes_after = result.modified, result.stats, count_nodes(gm)
            self._verify(gm, f"pass '{pass_.name}'", before)
            if reference is not None:
                record.numerics = compare_outputs(self._run_graph(gm, ctx), reference)
            if dumper:
                dumper.dump(index, pass_.name, gm)
            records.append(record)
            stopped = pass_.name == self.stop_after
        report = PipelineReport(records)
        if dumper:
            dumper.write_summary(report.table(), report.rows())
        return gm, report

    def _verify(self, gm: fx.GraphModule, what: str, before: list[str]) -> None:
        if not self.verify:
            return
        try:
            verify_graph(gm)
        except GraphVerificationError as exc:
            raise PassError(f"{what} left an invalid graph (passes before it: {before or 'none'}): {exc}") from exc

    def _can_check(self, ctx: PassContext) -> bool:
        return self.check_numerics and (ctx.example_args is not None or ctx.example_kwargs is not None)

    @staticmethod
    def _run_graph(gm: fx.GraphModule, ctx: PassContext) -> Any:
        # Inputs are copied so that a graph mutating them cannot skew the next stage.
        args = copy.deepcopy(ctx.example_args or ())
        kwargs = copy.deepcopy(ctx.example_kwargs or {})
        with torch.no_grad():
            return gm(*args, **kwargs)
