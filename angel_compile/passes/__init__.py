"""Graph passes. Importing this package registers every built-in pass."""

from angel_compile.passes import (
    sparse_attention,  # noqa: F401  (registers the pass)
    speculative,  # noqa: F401  (registers the pass)
    token_pruning,  # noqa: F401  (registers the pass)
)
from angel_compile.passes.base import Pass, PassContext, PassResult, PassStats, register_pass
from angel_compile.passes.manager import PassManager, PipelineReport
from angel_compile.passes.quantize import kmajor_layout, quantize, weight_only  # noqa: F401  (registers the passes)

__all__ = ["Pass", "PassContext", "PassManager", "PassResult", "PassStats", "PipelineReport", "register_pass"]
