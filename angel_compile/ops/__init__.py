"""angel custom ops (`torch.ops.angel.*`): schema, fake impl and plain-PyTorch reference.

Importing this package registers every op. Kernels (`kernels/`) and ONNX mappings
(`lowering/`) refer to the ops defined here and never redefine them.
"""

from angel_compile.ops.fp8_linear import fp8_linear
from angel_compile.ops.int2 import int2_weight_only_linear
from angel_compile.ops.int4 import int4_weight_only_linear, w4a8_linear
from angel_compile.ops.int8_weight_only import int8_weight_only_linear
from angel_compile.ops.kmajor import int2_kmajor_linear, int4_kmajor_linear
from angel_compile.ops.prune_tokens import prune_tokens
from angel_compile.ops.sparse_attention import sparse_attention
from angel_compile.ops.ternary import ternary_3of4_linear
from angel_compile.ops.ternary_kmajor import ternary_kmajor_linear
from angel_compile.ops.w8a8_int8 import w8a8_int8_linear

ANGEL_NAMESPACE = "angel"

__all__ = [
    "ANGEL_NAMESPACE",
    "fp8_linear",
    "int2_kmajor_linear",
    "int2_weight_only_linear",
    "int4_kmajor_linear",
    "int4_weight_only_linear",
    "int8_weight_only_linear",
    "prune_tokens",
    "sparse_attention",
    "ternary_3of4_linear",
    "ternary_kmajor_linear",
    "w4a8_linear",
    "w8a8_int8_linear",
]
