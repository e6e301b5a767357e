"""Models angel-compile is measured on: small config-built test models and real-weight models."""

from angel_compile.models.smollm2 import load_smollm2, load_smollm2_finetuned
from angel_compile.models.toy import TOY_ARCHITECTURES, build_toy_model

__all__ = ["TOY_ARCHITECTURES", "build_toy_model", "load_smollm2", "load_smollm2_finetuned"]
