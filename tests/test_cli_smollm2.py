from angel_compile.cli import main


def test_run_defaults_to_smollm2_and_prints_held_out_perplexity(capsys):
    assert main(["run", "int8-weight-only", "--seq", "16", "--eval-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "recipe 'int8-weight-only' on smollm2" in out
    assert "accuracy vs the eager model on input (1, 64)" in out
    lines = out.splitlines()
    table = lines[lines.index("| corpus | reference | compiled |") + 2 :][:2]
    assert [line.split(" | ")[0] for line in table] == ["| shakespeare", "| lee"]
    for line in table:
        reference, compiled = (float(cell.strip(" |")) for cell in line.split(" | ")[1:])
        assert 1 < reference < 200 and abs(compiled - reference) < 0.05 * reference, line
