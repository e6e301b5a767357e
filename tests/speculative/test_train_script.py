"""examples/train_eagle_draft.py runs on a CPU for a few steps, resumes, and writes a usable draft."""

import importlib.util
from pathlib import Path

import torch

from angel_compile.models import build_toy_model
from angel_compile.speculative import generate, greedy_generate, load_draft

SCRIPT = Path(__file__).parents[2] / "examples" / "train_eagle_draft.py"


def test_train_a_few_steps_resume_and_decode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_eagle_draft", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "draft.safetensors"
    options = ["--tiny", "--device", "cpu", "--prompts", "8", "--gen-batch", "4", "--prompt-len", "8"]
    options += ["--gen-len", "8", "--batch", "4", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    script.main([*options, "--steps", "4", "--max-minutes", "0"])
    assert "stopped by --max-minutes" in capsys.readouterr().out
    assert not out.exists()
    script.main([*options, "--steps", "4"])
    log = capsys.readouterr().out
    assert "generated 8/8 sequences" in log and "done:" in log
    script.main([*options, "--steps", "6"])
    assert "resumed at step 4" in capsys.readouterr().out
    draft = load_draft(out, torch.float32)
    assert draft.fuse.weight.dtype == torch.float32 and draft.config.hidden == 64
    target = build_toy_model("llama")
    ids = torch.randint(0, 256, (1, 6))
    assert torch.equal(generate(target, draft, ids, 8, k=2), greedy_generate(target, ids, 8))
