"""The EAGLE-style draft head: one decoder layer over the target's features and the next token.

At sequence position t the draft reads
- g(t): the target's hidden states at `feature_layers` for position t, concatenated, normed and
  projected to the hidden size (`fuse`), or, when it drafts past what the target has seen, its
  own previous output;
- the target's (frozen) embedding of the token at t + 1;
and predicts d(t), the target's final normed hidden state at t + 1 (the input of the target's
LM head), so `target.lm_head(d(t))` scores the token at t + 2. The draft owns no embedding
and no LM head: it borrows the target's, so only ~5M parameters (hidden 576) are its own.

Weights live in one safetensors file whose metadata holds the `DraftConfig` as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from angel_compile.errors import MissingDependencyError, UnsupportedError
from angel_compile.speculative.llama import (
    LlamaShape,
    attend,
    decoder_layer,
    project_qkv,
    rope_cos_sin,
)

DRAFT_ASSET = Path(__file__).parents[1] / "models" / "assets" / "smollm2-135m-eagle-draft.safetensors"
TRAIN_COMMAND = "python examples/train_eagle_draft.py"


def default_feature_layers(layers: int) -> tuple[int, ...]:
    """A low, a middle and a high decoder layer of the target (EAGLE-3's choice), deduplicated."""
    return tuple(sorted({min(2, layers - 1), layers // 2, max(layers - 3, 0)}))


@dataclass(frozen=True)
class DraftConfig:
    """Sizes of the draft head; hidden, vocab and RoPE must match the target's."""

    hidden: int
    vocab: int
    feature_layers: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    norm_eps: float = 1e-5

    @classmethod
    def for_target(cls, target: nn.Module, feature_layers: tuple[int, ...] | None = None) -> DraftConfig:
        """A draft sized like one decoder layer of `target` (a transformers Llama causal LM)."""
        shape = LlamaShape.from_config(target.config)
        return cls(
            hidden=shape.hidden,
            vocab=shape.vocab,
            feature_layers=tuple(feature_layers) if feature_layers else default_feature_layers(shape.layers),
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            intermediate=target.config.intermediate_size,
            rope_theta=shape.rope_theta,
            norm_eps=float(target.config.rms_norm_eps),
        )

    @property
    def shape(self) -> LlamaShape:
        return LlamaShape(1, self.hidden, self.heads, self.kv_heads, self.head_dim, self.vocab, self.rope_theta)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DraftConfig:
        data = json.loads(text)
        data["feature_layers"] = tuple(data["feature_layers"])
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class DraftAttention(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        h, d = config.hidden, config.head_dim
        self.q_proj = nn.Linear(h, config.heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.heads * d, h, bias=False)


class DraftMLP(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.intermediate, bias=False)
        self.down_proj = nn.Linear(config.intermediate, config.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """A Llama decoder layer (attribute names as transformers', so `llama.decoder_layer` runs it)."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden, config.norm_eps)
        self.self_attn = DraftAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = DraftMLP(config)


class EagleDraft(nn.Module):
    """The draft head; see the module docstring. Built with random weights, or by `load_draft`."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        h, features = config.hidden, len(config.feature_layers) * config.hidden
        self.feature_norm = RMSNorm(features, config.norm_eps)
        self.fuse = nn.Linear(features, h, bias=False)
        self.embed_norm = RMSNorm(h, config.norm_eps)
        self.hidden_norm = RMSNorm(h, config.norm_eps)
        self.in_proj = nn.Linear(2 * h, h, bias=False)
        self.layer = DraftLayer(config)
        self.out_norm = RMSNorm(h, config.norm_eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def fuse_features(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., n_layers * hidden] -> g [..., hidden]."""
        return self.fuse(self.feature_norm(features))

    def layer_input(self, g: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """g and the embedding of the next token, both [B, T, hidden] -> the layer's input [B, T, hidden]."""
        return self.in_proj(torch.cat([self.embed_norm(token_embeds), self.hidden_norm(g)], dim=-1))

    def forward_cached(
        self,
        g: torch.Tensor,
        token_embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Decode-time forward: d [B, T, hidden], writing the new keys/values at `slots` [B, T].

        positions [B, T] (RoPE); mask [B, 1, T, capacity] (`llama.cache_attention_mask`);
        k_cache / v_cache [B, kv_heads, capacity, head_dim], written in place.
        """
        x = self.layer_input(g, token_embeds)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        return self.out_norm(decoder_layer(self.layer, x, cos, sin, k_cache, v_cache, slots, mask, self.config.shape))

    def forward_unrolled(self, features: torch.Tensor, token_embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training forward over whole sequences, drafting `steps` tokens ahead from every position.

        features [B, T, n_layers * hidden]: the target's features at positions 0..T-1;
        token_embeds [B, T, hidden]: embeddings of the tokens at positions 1..T.
        Out: d_s [B, T, hidden] for s = 1..steps. d_1(t) uses the target's features of t; d_s(t)
        (s > 1) uses d_{s-1}(t-1), the draft's own guess, and attends to the target-fed keys up to
        t - s + 1 and to its own chain after that, as it does at decode time (EAGLE-3's
        training-time test). Positions t < s - 1 have no such chain; leave them out of the loss.
        """
        b, t, _ = token_embeds.shape
        shape = self.config.shape
        positions = torch.arange(t, device=features.device)[None].expand(b, -1)
        cos, sin = rope_cos_sin(positions, shape.head_dim, shape.rope_theta, token_embeds.dtype)
        g = self.fuse_features(features)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        for step in range(1, steps + 1):
            x = self.layer_input(g, token_embeds)
            q, k, v = project_qkv(self.layer.self_attn, self.layer.input_layernorm(x), cos, sin, shape)
            keys.append(k)
            values.append(v)
            mask = unrolled_mask(step, t, features.device)
            x = x + attend(self.layer.self_attn, q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask, shape)
            x = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
            d = self.out_norm(x)
            outputs.append(d)
            g = torch.cat([torch.zeros_like(d[:, :1]), d[:, :-1]], dim=1)
        return outputs


def unrolled_mask(step: int, length: int, device=None) -> torch.Tensor:
    """[length, step * length] bool: which keys (steps 1..step, each over positions) query (step, t) sees.

    The chain of query (step, t) starts at o = t - step + 1: it sees step-1 keys at positions <= o
    and, for 2 <= s' <= step, the step-s' key at position o + s' - 1 (its own drafted ancestors).
    """
    t = torch.arange(length, device=device)[:, None]
    key_positions = torch.arange(length, device=device)[None, :]
    blocks = [key_positions <= t - step + 1]
    blocks += [key_positions == t - step + s for s in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


def check_draft_fits(draft: EagleDraft, target_shape: LlamaShape) -> None:
    """Raise UnsupportedError when the draft cannot run on this target (sizes named)."""
    config = draft.config
    problems = []
    if config.hidden != target_shape.hidden:
        problems.append(f"hidden size {config.hidden} != target's {target_shape.hidden}")
    if config.vocab != target_shape.vocab:
        problems.append(f"vocabulary {config.vocab} != target's {target_shape.vocab}")
    if any(not 0 <= layer < target_shape.layers for layer in config.feature_layers):
        problems.append(f"feature_layers {config.feature_layers} outside the target's 0..{target_shape.layers - 1}")
    if problems:
        raise UnsupportedError("the draft does not fit the target: " + "; ".join(problems))


def save_draft(draft: EagleDraft, path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the draft's weights (in `dtype`) and config to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in draft.state_dict().items()}
    save_file(tensors, str(path), metadata={"draft_config": draft.config.to_json()})
    return path


def load_draft(path: str | os.PathLike = DRAFT_ASSET, dtype: torch.dtype = torch.bfloat16) -> EagleDraft:
    """The draft saved at `path` (default: the trained SmolLM2-135M draft in models/assets/)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDependencyError(f"draft weights {path} are missing: train them with `{TRAIN_COMMAND}`")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "draft_config" not in metadata:
        raise UnsupportedError(f"{path} holds no draft_config metadata; it was not written by save_draft")
    draft = EagleDraft(DraftConfig.from_json(metadata["draft_config"]))
    draft.load_state_dict(load_file(str(path)))
    return draft.to(dtype).eval()
