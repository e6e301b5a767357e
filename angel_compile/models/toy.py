"""Small transformers decoder-only models built from a config with random weights (no downloads).

These are the embedded default of the CLI and the models of the end-to-end tests: each
architecture family angel-compile must handle, at a size that runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
import transformers

from angel_compile.errors import UnsupportedError

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _config(arch: str, vocab_size: int, max_positions: int) -> transformers.PretrainedConfig:
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=max_positions, use_cache=False
        )
    common = dict(_SMALL, vocab_size=vocab_size, max_position_embeddings=max_positions, use_cache=False)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "phi3":
        return transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common)
    raise UnsupportedError(f"unknown example architecture '{arch}'; available: {list(TOY_ARCHITECTURES)}")


TOY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "phi3")


def build_toy_model(
    arch: str = "llama",
    vocab_size: int = 256,
    max_positions: int = 512,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A small randomly initialised causal LM of the given family, in eval mode, fp32.

    attn_implementation: transformers' attention ("sdpa": one SDPA node; "eager": matmul,
    softmax, matmul).
    """
    config = _config(arch, vocab_size, max_positions)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()
