"""Models angel-compile is measured on: small config-built test models and real-weight models."""

from angel_compile.models.toy import TOY_ARCHITECTURES, build_toy_model

__all__ = ["TOY_ARCHITECTURES", "build_toy_model"]
