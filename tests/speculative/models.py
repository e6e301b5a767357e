"""Tiny targets and drafts for speculative-decoding tests (random weights, no downloads)."""

import torch
import transformers

from angel_compile.models import build_toy_model
from angel_compile.speculative import DraftConfig, EagleDraft


def predictable_target(layer_scale: float = 3.0, seed: int = 0) -> torch.nn.Module:
    """A toy Llama (float64) whose greedy next token is mostly a fixed permutation of the current one.

    The LM head is the embedding with its rows permuted, so with weak layers the greedy choice
    after token x is perm^-1(x); `layer_scale` scales the layers' output projections: 0 makes
    the map exact, 3 makes context change it now and then (partial acceptance), 30 often.
    """
    target = build_toy_model("llama", seed=seed).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        permutation = torch.randperm(target.config.vocab_size, generator=generator)
        target.lm_head.weight.copy_(target.model.embed_tokens.weight[permutation])
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.mul_(layer_scale)
            layer.mlp.down_proj.weight.mul_(layer_scale)
    return target


def oracle_draft(target: torch.nn.Module) -> EagleDraft:
    """A draft that predicts the permutation map: its output is the normed embedding of its input token."""
    draft = EagleDraft(DraftConfig.for_target(target)).to(next(target.parameters()))
    hidden = draft.config.hidden
    with torch.no_grad():
        draft.in_proj.weight.zero_()
        draft.in_proj.weight[:, :hidden] = torch.eye(hidden)
        draft.layer.self_attn.o_proj.weight.zero_()
        draft.layer.mlp.down_proj.weight.zero_()
    return draft


def random_draft(target: torch.nn.Module, seed: int = 1) -> EagleDraft:
    torch.manual_seed(seed)
    return EagleDraft(DraftConfig.for_target(target)).to(next(target.parameters()))


def tiny_vocab_target(vocab: int = 8, logit_scale: float = 20.0, seed: int = 0) -> torch.nn.Module:
    """A very small Llama (float64, hidden 16, 2 layers) over `vocab` tokens.

    Its LM head is scaled by `logit_scale` so that next-token distributions are peaked enough
    for a few thousand samples to tell them apart.
    """
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        use_cache=False,
    )
    torch.manual_seed(seed)
    target = transformers.LlamaForCausalLM(config).eval().double()
    with torch.no_grad():
        target.lm_head.weight.mul_(logit_scale)
    return target
