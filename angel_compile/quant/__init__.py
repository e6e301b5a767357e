"""Quantization algorithms: pure functions on weights and calibration statistics.

`gptq.gptq_quantize` (Hessian-aware rounding with error feedback) and `awq.awq_search`
(activation-aware input-channel scales) produce the INT4 group-wise format of `ops/int4.py`;
round-to-nearest is `ops.int4.quantize_int4_rtn`. Nothing here touches a graph: the quantize
pass calls these on each layer's weight and statistics.
"""
