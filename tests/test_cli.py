import pytest

from angel_compile.cli import main


def test_passes_and_recipes_are_listed(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "int8_weight_only:" in out and "exclude: tuple = ()" in out
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "int8-weight-only:" in out and "none:" in out
    assert main(["recipes", "--show", "int8-weight-only"]) == 0
    assert "name: int8_weight_only" in capsys.readouterr().out


def test_run_prints_the_pass_table_accuracy_and_checks_onnx(capsys, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    assert main(["run", "int8-weight-only", "--model", "qwen2", "--onnx", str(onnx_path)]) == 0
    captured = capsys.readouterr()
    assert "| int8_weight_only | ran | True | 15 | 15 | 0 |" in captured.out
    assert "accuracy vs the eager model" in captured.out and "top-1 agreement" in captured.out
    assert "onnxruntime vs PyTorch: SQNR" in captured.out
    assert onnx_path.exists()
    assert "[1/1] int8_weight_only" in captured.err  # progress goes to stderr


def test_errors_are_one_line_unless_verbose(capsys):
    assert main(["run", "no-such-recipe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("angel-compile: error: unknown recipe 'no-such-recipe'")
    with pytest.raises(Exception, match="unknown recipe"):
        main(["--verbose", "run", "no-such-recipe"])


def test_stop_after_an_unknown_pass_is_an_error(capsys):
    assert main(["run", "int8-weight-only", "--stop-after", "nope"]) == 2
    assert "no pass named ['nope']" in capsys.readouterr().err
