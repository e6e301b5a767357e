"""The Python API end to end: compile a transformers model with a recipe, inspect each pass,
run it, export ONNX and run that in onnxruntime.

    .venv/bin/python examples/compile_int8_weight_only.py
"""

import tempfile
from pathlib import Path

import torch

import angel_compile
from angel_compile.models import build_toy_model


def main() -> None:
    model = build_toy_model("llama")
    ids = torch.randint(0, 256, (2, 32))
    dynamic = {"input_ids": {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=512)}}
    with tempfile.TemporaryDirectory() as folder:
        compiled = angel_compile.compile(
            model,
            (),
            {"input_ids": ids},
            recipe="int8-weight-only",
            dynamic_shapes=dynamic,
            debug_dir=Path(folder) / "debug",  # each stage's graph, diffs and summary.md
        )
        print(compiled.report.table())
        int8_linears = compiled.count_ops().get("angel.int8_weight_only_linear.default")
        print("int8 linears after the pipeline:", int8_linears)

        check = torch.randint(0, 256, (3, 40))
        logits = compiled(input_ids=check).logits
        with torch.no_grad():
            reference = model(input_ids=check).logits
        print("relative logit error:", ((logits - reference).norm() / reference.norm()).item())

        path = compiled.export_onnx(Path(folder) / "model.onnx")
        (ort_logits,) = angel_compile.ort_session(path).run(None, {"input_ids": check.numpy()})
        print("onnxruntime max |diff| vs PyTorch:", (torch.from_numpy(ort_logits) - logits).abs().max().item())


if __name__ == "__main__":
    main()
