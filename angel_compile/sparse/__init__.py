"""Block selection for sparse prefill attention: which key blocks each query block attends to.

`selection.py` holds the methods (static, stem, s2o) with their formulas, the parameter
set they share (`SparseAttentionConfig`) and the conversion of a block mask into the
per-(batch, head, query-block) index lists the block-sparse kernel reads. The op
`angel::sparse_attention` (`ops/sparse_attention.py`) calls them; so do the benchmarks.
"""

from angel_compile.sparse.selection import (
    METHODS,
    SparseAttentionConfig,
    block_density,
    block_mask_to_index,
    causal_block_mask,
    select_blocks,
)

__all__ = [
    "METHODS",
    "SparseAttentionConfig",
    "block_density",
    "block_mask_to_index",
    "causal_block_mask",
    "select_blocks",
]
