import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import fx

from angel_compile.capture import capture_model
from angel_compile.errors import PassError, RecipeError
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats
from angel_compile.passes.manager import PassManager
from angel_compile.passes.quantize.weight_only import Int8WeightOnly


@dataclass(frozen=True)
class Record(Pass):
    """Appends its name to a shared log and changes nothing."""

    name: ClassVar[str] = "record"
    log: list = None
    label: str = "a"

    def __call__(self, gm, ctx):
        self.log.append(self.label)
        return PassResult(gm, modified=False, stats=PassStats())


def _named(label: str, log: list) -> Pass:
    cls = type(f"Record_{label}", (Record,), {"name": label, "__annotations__": {}})
    return dataclass(frozen=True)(cls)(log=log, label=label)


@dataclass(frozen=True)
class DropsMeta(Pass):
    """Inserts a node without meta['val'] (a broken pass)."""

    name: ClassVar[str] = "drops_meta"

    def __call__(self, gm, ctx):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            gm.graph.call_function(torch.ops.aten.neg.default, (output.args[0][0],))
        gm.recompile()
        return PassResult(gm, modified=True, stats=PassStats())


@dataclass(frozen=True)
class Raises(Pass):
    name: ClassVar[str] = "raises"

    def __call__(self, gm, ctx):
        raise ValueError("boom")


@pytest.fixture
def graph(two_linears):
    x = torch.randn(2, 32)
    return capture_model(two_linears, (x,)), x


def test_passes_run_in_order(graph):
    gm, x = graph
    log = []
    gm, report = PassManager([_named("p1", log), _named("p2", log), _named("p3", log)]).run(gm, PassContext())
    assert log == ["p1", "p2", "p3"]
    assert report.ran() == ["p1", "p2", "p3"]


def test_disable_and_stop_after(graph):
    gm, _ = graph
    log = []
    passes = [_named("p1", log), _named("p2", log), _named("p3", log)]
    _, report = PassManager(passes, disable=["p1"], stop_after="p2").run(gm, PassContext())
    assert log == ["p2"]
    assert [(r.name, r.status) for r in report.records] == [("p1", "disabled"), ("p2", "ran"), ("p3", "not reached")]


def test_unknown_disable_or_stop_after_and_duplicates_are_rejected():
    log = []
    with pytest.raises(RecipeError, match=r"disable: no pass named \['nope'\].*\['p1'\]"):
        PassManager([_named("p1", log)], disable=["nope"])
    with pytest.raises(RecipeError, match=r"stop_after: no pass named \['nope'\]"):
        PassManager([_named("p1", log)], stop_after="nope")
    with pytest.raises(RecipeError, match="appear more than once"):
        PassManager([_named("p1", log), _named("p1", log)])


def test_a_pass_that_breaks_the_graph_is_named_with_the_passes_before_it(graph):
    gm, _ = graph
    log = []
    with pytest.raises(PassError) as info:
        PassManager([_named("p1", log), DropsMeta()]).run(gm, PassContext())
    message = str(info.value)
    assert "pass 'drops_meta' left an invalid graph" in message
    assert "passes before it: ['p1']" in message
    assert "has no meta['val']" in message


def test_a_pass_that_raises_is_named(graph):
    gm, _ = graph
    with pytest.raises(PassError, match=r"pass 'raises' failed \(passes before it: none\): ValueError: boom"):
        PassManager([Raises()]).run(gm, PassContext())


def test_verify_checks_custom_op_meta_against_its_fake_impl(graph):
    gm, x = graph
    gm, _ = PassManager([Int8WeightOnly()]).run(gm, PassContext())
    node = next(n for n in gm.graph.nodes if n.target == torch.ops.angel.int8_weight_only_linear.default)
    node.meta["val"] = node.meta["val"].new_empty((3, 3))
    from angel_compile.passes.verify import GraphVerificationError, verify_graph

    with pytest.raises(GraphVerificationError, match=f"node '{node.name}'.*disagrees with"):
        verify_graph(gm)


def test_debug_dir_writes_stages_diffs_and_summary(graph, tmp_path):
    gm, x = graph
    gm, report = PassManager([Int8WeightOnly()], debug_dir=tmp_path).run(gm, PassContext(example_args=(x,)))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00_captured.py",
        "01_int8_weight_only.diff",
        "01_int8_weight_only.py",
        "summary.json",
        "summary.md",
    ]
    diff = (tmp_path / "01_int8_weight_only.diff").read_text()
    assert "-" in diff and "angel.int8_weight_only_linear" in diff
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert rows[0]["pass"] == "int8_weight_only" and rows[0]["rewritten"] == 2
    # numerics are on with a debug dir: int8 weights stay close to the float model
    assert report["int8_weight_only"].numerics.sqnr_db > 30
    assert "SQNR" in (tmp_path / "summary.md").read_text()


def test_debug_dir_from_environment(graph, tmp_path, monkeypatch):
    gm, x = graph
    monkeypatch.setenv("ANGEL_DEBUG_DIR", str(tmp_path / "env"))
    PassManager([Int8WeightOnly()]).run(gm, PassContext(example_args=(x,)))
    assert (tmp_path / "env" / "summary.md").exists()


def test_report_table_lists_every_pass(graph):
    gm, _ = graph
    _, report = PassManager([Int8WeightOnly()]).run(gm, PassContext())
    table = report.table()
    assert "| int8_weight_only | ran | True | 2 | 2 | 1 |" in table
    assert "weight is computed in the graph" in report.skip_reasons()
    assert isinstance(gm, fx.GraphModule)
