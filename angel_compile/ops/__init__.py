"""angel custom ops (`torch.ops.angel.*`): schema, fake impl and plain-PyTorch reference.

Importing this package registers every op. Kernels (`kernels/`) and ONNX mappings
(`lowering/`) refer to the ops defined here and never redefine them.
"""

from angel_compile.ops.int4 import int4_weight_only_linear, w4a8_linear
from angel_compile.ops.int8_weight_only import int8_weight_only_linear
from angel_compile.ops.sparse_attention import sparse_attention

ANGEL_NAMESPACE = "angel"

__all__ = ["ANGEL_NAMESPACE", "int4_weight_only_linear", "int8_weight_only_linear", "sparse_attention", "w4a8_linear"]
