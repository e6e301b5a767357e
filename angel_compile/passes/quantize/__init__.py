"""Quantization passes, one module per scheme family."""
