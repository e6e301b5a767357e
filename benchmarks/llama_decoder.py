"""A Llama-shaped decoder with an explicit KV cache, for end-to-end prefill/decode timings.

Random weights; shapes of Llama-3-8B by default (hidden 4096, MLP 14336, 32 query heads,
8 KV heads, head dim 128, vocab 128256) with few layers. Linear layers are nn.Linear, so
angel-compile's passes see them as aten.linear. The cache is passed in and the new keys and
values are returned (functional), so one captured graph serves every decode step:

    logits, new_k, new_v = model(tokens [B, T], positions [T], k_cache, v_cache)
    k_cache / v_cache: [layers, B, kv_heads, S, head_dim] (S may be 0 for prefill)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from angel_compile.speculative.draft import RMSNorm


@dataclass(frozen=True)
class DecoderShape:
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    layers: int = 4
    vocab: int = 128256
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


NORM_EPS = 1e-5  # Llama-3's rms_norm_eps
TINY = DecoderShape(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=256)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        d, h, kv = shape.head_dim, shape.heads, shape.kv_heads
        self.shape = shape
        self.attention_norm = RMSNorm(shape.hidden, NORM_EPS)
        self.q_proj = nn.Linear(shape.hidden, h * d, bias=False)
        self.k_proj = nn.Linear(shape.hidden, kv * d, bias=False)
        self.v_proj = nn.Linear(shape.hidden, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, shape.hidden, bias=False)
        self.mlp_norm = RMSNorm(shape.hidden, NORM_EPS)
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache):
        # x: [B, T, hidden]; k_cache, v_cache: [B, kv, S, d]
        b, t, _ = x.shape
        d, h, kv = self.shape.head_dim, self.shape.heads, self.shape.kv_heads
        normed = self.attention_norm(x)
        q = rotate(self.q_proj(normed).view(b, t, h, d).transpose(1, 2), cos, sin)
        k = rotate(self.k_proj(normed).view(b, t, kv, d).transpose(1, 2), cos, sin)
        v = self.v_proj(normed).view(b, t, kv, d).transpose(1, 2)
        keys = torch.cat([k_cache, k], dim=2)
        values = torch.cat([v_cache, v], dim=2)
        # Causal over the new tokens, full over the cache: the mask's offset is the cache length.
        attended = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=_causal_mask(t, keys.shape[2], x.device), enable_gqa=True
        )
        x = x + self.o_proj(attended.transpose(1, 2).reshape(b, t, h * d))
        normed = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))
        return x, k, v


def _causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(queries, device=device)[:, None] + (keys - queries)
    return torch.arange(keys, device=device)[None, :] <= rows


class LlamaDecoder(nn.Module):
    def __init__(self, shape: DecoderShape = DecoderShape()) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.hidden)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.norm = RMSNorm(shape.hidden, NORM_EPS)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)
        inverse = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
        self.register_buffer("inverse_frequency", inverse, persistent=False)

    def forward(self, tokens, positions, k_cache, v_cache):
        angles = positions[:, None].float() * self.inverse_frequency[None, :]  # [T, d/2]
        angles = torch.cat([angles, angles], dim=-1)
        x = self.embed(tokens)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        new_k, new_v = [], []
        for index, block in enumerate(self.blocks):
            x, k, v = block(x, cos, sin, k_cache[index], v_cache[index])
            new_k.append(k)
            new_v.append(v)
        return self.lm_head(self.norm(x[:, -1:])), torch.stack(new_k), torch.stack(new_v)


def random_cache(shape: DecoderShape, batch: int, length: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    size = (shape.layers, batch, shape.kv_heads, length, shape.head_dim)
    return torch.randn(size, dtype=dtype, device=device), torch.randn(size, dtype=dtype, device=device)
