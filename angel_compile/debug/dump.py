"""Writing each pipeline stage to a debug folder.

Layout of `debug_dir`:
    00_captured.py            the captured graph (readable code with shapes)
    NN_<pass>.py              the graph after pass NN
    NN_<pass>.diff            unified diff against the previous stage
    summary.md, summary.json  the per-pass table (see PipelineReport)
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from torch import fx


def readable_code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=True)


class StageDumper:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._previous: str | None = None
        self._previous_name = ""

    def dump(self, index: int, name: str, gm: fx.GraphModule) -> None:
        code = readable_code(gm)
        stem = f"{index:02d}_{name}"
        (self.folder / f"{stem}.py").write_text(code)
        if self._previous is not None:
            diff = difflib.unified_diff(
                self._previous.splitlines(keepends=True),
                code.splitlines(keepends=True),
                fromfile=self._previous_name,
                tofile=f"{stem}.py",
            )
            (self.folder / f"{stem}.diff").write_text("".join(diff))
        self._previous, self._previous_name = code, f"{stem}.py"

    def write_summary(self, markdown: str, rows: list[dict]) -> None:
        (self.folder / "summary.md").write_text(markdown + "\n")
        (self.folder / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
