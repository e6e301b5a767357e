"""Lowering of angel custom ops: to Triton kernels (CUDA) and to ONNX / onnxruntime."""
