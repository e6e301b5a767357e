"""A functional Llama forward over a transformers `LlamaForCausalLM`'s modules, with a static KV cache.

The decode loops of `speculative/` run the target through this forward rather than through
`model(...)`, so that one decode step is one graph with static shapes (torch.compile, CUDA
graphs) on every transformers version: the model's linear, norm and MLP modules are called
as they are (so quantization passes see the same `aten.linear`s), and attention, RoPE and
the cache are written here.

The cache is a pair of fixed-size buffers `[layers, B, kv_heads, capacity, head_dim]`, and
each batch row has its own length (`lengths [B]`, int64): tokens at slots `>= lengths[b]`
are invisible. A forward over T new tokens writes their keys/values at slots
`lengths[b] + slot_offsets[t]` and lets query t see the cache plus the new tokens that
`new_token_mask[t, t']` allows (causal for a chain, ancestors for a token tree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from angel_compile.errors import UnsupportedError


@dataclass(frozen=True)
class LlamaShape:
    """The sizes the functional forward needs, read from a transformers Llama config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        rope = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        legacy_scaling = getattr(config, "rope_scaling", None)
        if rope_type != "default" or (legacy_scaling and legacy_scaling.get("rope_type", "default") != "default"):
            raise UnsupportedError(
                f"speculative decoding supports Llama RoPE of type 'default' only; this config has "
                f"{rope or legacy_scaling}"
            )
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            rope_theta=float(theta),
        )


def check_llama(model: nn.Module) -> LlamaShape:
    """The shape of a transformers Llama-family causal LM; raises UnsupportedError naming what is missing."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm")
    if inner is None or not all(hasattr(inner, name) for name in needed) or not hasattr(model, "lm_head"):
        raise UnsupportedError(
            f"speculative decoding needs a Llama-family causal LM (model.model.{{embed_tokens, layers, norm}} "
            f"and model.lm_head); got {type(model).__name__}"
        )
    attention = inner.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attention, name):
            raise UnsupportedError(f"speculative decoding needs separate q/k/v/o projections; layer 0 has no {name}")
    return LlamaShape.from_config(model.config)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] for integer positions [B, T] (Llama's half-split rotation)."""
    inverse = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inverse  # [B, T, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def cache_attention_mask(lengths: torch.Tensor, new_token_mask: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which cache slots each new query sees: [B, 1, T, capacity] bool.

    lengths [B]: slots below it hold earlier tokens (all visible). new_token_mask [T, W] bool:
    new query t sees slot lengths + w when new_token_mask[t, w]. Slots past that window are
    invisible, so stale keys left there by rejected drafts never matter.
    """
    count = new_token_mask.shape[1]
    slots = torch.arange(capacity, device=lengths.device)
    relative = slots[None, :] - lengths[:, None]  # [B, capacity]
    is_new = (relative >= 0) & (relative < count)
    new_visible = new_token_mask[:, relative.clamp(0, count - 1)]  # [T, B, capacity]
    visible = (relative < 0)[:, None, :] | (is_new[:, None, :] & new_visible.transpose(0, 1))  # [B, T, capacity]
    return visible[:, None]


def write_cache(cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
    """cache [B, kv, capacity, d] <- new [B, kv, T, d] at per-row slots [B, T], in place."""
    index = slots[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
    cache.scatter_(2, index, new)


def project_qkv(
    attention: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape: LlamaShape
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, d], k and v [B, KV, T, d] of x [B, T, hidden], RoPE applied to q and k."""
    b, t, _ = x.shape
    d = shape.head_dim
    q = apply_rope(attention.q_proj(x).view(b, t, shape.heads, d).transpose(1, 2), cos, sin)
    k = apply_rope(attention.k_proj(x).view(b, t, shape.kv_heads, d).transpose(1, 2), cos, sin)
    v = attention.v_proj(x).view(b, t, shape.kv_heads, d).transpose(1, 2)
    return q, k, v


def attend(
    attention: nn.Module,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    shape: LlamaShape,
) -> torch.Tensor:
    """o_proj(softmax(q k^T / sqrt(d) + mask) v): q [B, H, T, d], keys/values [B, KV, S, d] -> [B, T, hidden]."""
    b, _, t, _ = q.shape
    if shape.kv_heads != shape.heads:
        # Expanded here (not enable_gqa) so every SDPA backend and the ONNX exporter take it.
        repeat = shape.heads // shape.kv_heads
        keys = keys.repeat_interleave(repeat, dim=1)
        values = values.repeat_interleave(repeat, dim=1)
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, T, d]
    return attention.o_proj(attended.transpose(1, 2).reshape(b, t, shape.heads * shape.head_dim))


def attention_layer(
    attention: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    shape: LlamaShape,
) -> torch.Tensor:
    """One Llama self-attention over x [B, T, hidden] and its cache; writes the new keys/values at `slots` [B, T]."""
    q, k, v = project_qkv(attention, x, cos, sin, shape)
    write_cache(k_cache, k, slots)
    write_cache(v_cache, v, slots)
    return attend(attention, q, k_cache, v_cache, mask, shape)


def decoder_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor,
    shape: LlamaShape,
) -> torch.Tensor:
    """A pre-norm Llama decoder layer (input_layernorm, self_attn, post_attention_layernorm, mlp)."""
    x = x + attention_layer(layer.self_attn, layer.input_layernorm(x), cos, sin, k_cache, v_cache, slots, mask, shape)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def target_forward(
    model: nn.Module,
    shape: LlamaShape,
    tokens: torch.Tensor,
    depths: torch.Tensor,
    new_token_mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    feature_layers: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target over T new tokens per row, attending to its cache.

    tokens [B, T]; depths [T]: position of token t is lengths + depths[t] (0..T-1 for a chain,
    the tree depth for a token tree); the keys/values of token t go to slot lengths + t.
    k_cache / v_cache [layers, B, kv_heads, capacity, head_dim] are written in place; lengths
    is not changed (the caller decides which new tokens to keep).
    Out: logits [B, T, vocab]; the final normed hidden state [B, T, hidden] (the LM head's
    input); the outputs of `feature_layers` concatenated [B, T, len(feature_layers) * hidden].
    """
    count = tokens.shape[1]
    inner = model.model
    x = inner.embed_tokens(tokens)
    positions = lengths[:, None] + depths[None, :]
    cos, sin = rope_cos_sin(positions, shape.head_dim, shape.rope_theta, x.dtype)
    slots = lengths[:, None] + torch.arange(count, device=tokens.device)[None, :]
    mask = cache_attention_mask(lengths, new_token_mask, k_cache.shape[3])
    features = []
    for index, layer in enumerate(inner.layers):
        x = decoder_layer(layer, x, cos, sin, k_cache[index], v_cache[index], slots, mask, shape)
        if index in feature_layers:
            features.append(x)
    normed = inner.norm(x)
    joined = torch.cat(features, dim=-1) if features else normed[..., :0]
    return model.lm_head(normed), normed, joined


def empty_cache(
    layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    size = (layers, batch, kv_heads, capacity, head_dim)
    return torch.zeros(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device)


def causal_mask(count: int, device=None) -> torch.Tensor:
    """[count, count] bool lower-triangular: token t sees new tokens 0..t."""
    return torch.ones(count, count, dtype=torch.bool, device=device).tril()
