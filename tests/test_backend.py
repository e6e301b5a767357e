"""The "angel" torch.compile backend, found through its entry point."""

import subprocess
import sys
import textwrap

import torch

from angel_compile.recipe import load_recipe
from tests.utils import relative_error

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, transformers

    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert "angel_compile" not in sys.modules
    for recipe, bound in ((None, 1e-4), ("int8-weight-only", 5e-2)):
        torch._dynamo.reset()
        options = {"recipe": recipe} if recipe else None
        compiled = torch.compile(model, backend="angel", options=options)
        for shape in ((2, 16), (3, 24), (2, 40)):  # the second shape makes dynamo go dynamic
            ids = torch.randint(0, 256, shape)
            ref = model(ids).logits
            out = compiled(ids).logits
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < bound, (recipe, shape, err)
            if recipe:
                assert err > 0, "int8 weights must change the logits a little"
            print(recipe, shape, f"{err:.2e}")
    print("loaded through entry point:", "angel_compile" in sys.modules)
    """
)


def test_backend_by_name_in_a_fresh_process_without_importing_angel_compile():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded through entry point: True" in result.stdout


def test_backend_accepts_a_recipe_object_and_reports_numerics(toy_llama, tmp_path):
    torch._dynamo.reset()
    compiled = torch.compile(
        toy_llama,
        backend="angel",
        options={"recipe": load_recipe("int8-weight-only"), "debug_dir": str(tmp_path)},
    )
    ids = torch.randint(0, 256, (2, 12))
    err = relative_error(compiled(ids).logits, toy_llama(ids).logits)
    assert 0 < err < 5e-2
    summary = (tmp_path / "summary.md").read_text()
    assert "| int8_weight_only | ran | True | 15 | 15 |" in summary  # aten.mm / addmm form from aot_autograd
    assert "SQNR" in summary


def test_backend_rejects_unknown_options(toy_llama):
    torch._dynamo.reset()
    compiled = torch.compile(toy_llama, backend="angel", options={"recipee": "none"})
    try:
        compiled(torch.randint(0, 256, (1, 4)))
    except Exception as exc:  # dynamo wraps backend errors
        assert "unknown option(s) ['recipee']; accepted: ['recipe'" in str(exc)
    else:
        raise AssertionError("an unknown backend option must be an error")
