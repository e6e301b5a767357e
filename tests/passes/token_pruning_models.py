"""A tiny model with the shape of a VLM's language side, for fast token-pruning graph tests."""

import torch

TOKEN = 9


class TinyMergeModel(torch.nn.Module):
    """Embeddings, modality features scattered at TOKEN, then a causal attention layer with rotary-free positions.

    Uses the sequence length downstream (view, arange for the causal mask) the way transformers does.
    """

    def __init__(self, dim: int = 32, feature_dim: int = 12) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, dim)
        self.project = torch.nn.Linear(feature_dim, dim)
        self.position = torch.nn.Embedding(64, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, 16)

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.merged(input_ids, features)
        return self.language(embeds, position_ids)

    def merged(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        embeds = self.embed(input_ids)
        mask = (input_ids == TOKEN).unsqueeze(-1)
        return embeds.masked_scatter(mask, self.project(features))

    def language(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.language_with_cache(embeds, position_ids)[0]

    def language_with_cache(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        """(logits, keys, values): the key/value cache [B, heads, S, head dim] too, as decoders' prefills return."""
        batch, seq, dim = embeds.shape
        hidden = embeds + self.position(position_ids)
        q, k, v = self.qkv(hidden).view(batch, seq, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
        causal = torch.arange(seq)[:, None] >= torch.arange(seq)[None, :]
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return self.out(attended.transpose(1, 2).reshape(batch, seq, dim)), k, v


def tiny_inputs(batch: int = 1, before: int = 3, tokens: int = 20, after: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.randint(0, 8, (batch, before), generator=generator),
            torch.full((batch, tokens), TOKEN),
            torch.randint(0, 8, (batch, after), generator=generator),
        ],
        dim=1,
    )
    # Features with runs of near-duplicates, as image patches and audio frames have.
    base = torch.randn(batch, tokens // 4, 12, generator=generator).repeat_interleave(4, dim=1)
    features = (base + 0.05 * torch.randn(batch, tokens, 12, generator=generator)).reshape(batch * tokens, 12)
    positions = torch.arange(ids.shape[1]).expand(batch, -1).contiguous()
    return {"input_ids": ids, "features": features, "position_ids": positions}


def tiny_dynamic_shapes(tokens: int = 20, dynamic_tokens: bool = False) -> dict:
    """A dynamic sequence; with dynamic_tokens also a dynamic modality token count (features [B·N, 12])."""
    if dynamic_tokens:
        seq, features = torch.export.Dim("seq", min=4, max=60), torch.export.Dim("features", min=2, max=120)
        return {"input_ids": {1: seq}, "features": {0: features}, "position_ids": {1: seq}}
    seq = torch.export.Dim("seq", min=tokens + 2, max=60)
    return {"input_ids": {1: seq}, "features": None, "position_ids": {1: seq}}


class TinyPrefixModel(TinyMergeModel):
    """BLIP-2-style: the projected features [B, N, D] are concatenated before the text embeddings.

    Position ids are made from the merged length (arange), as models without position inputs do.
    """

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        embeds = self.merged(input_ids, features)
        batch, seq, _ = embeds.shape
        return self.language(embeds, torch.arange(seq).expand(batch, seq))

    def merged(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.project(features), self.embed(input_ids)], dim=1)


def prefix_inputs(batch: int = 1, tokens: int = 20, text: int = 7, seed: int = 0) -> dict:
    """Text ids [B, text] and features [B, tokens, 12] with runs of near-duplicates."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, tokens // 4, 12, generator=generator).repeat_interleave(4, dim=1)
    features = base + 0.05 * torch.randn(batch, tokens, 12, generator=generator)
    return {"input_ids": torch.randint(0, 8, (batch, text), generator=generator), "features": features}


def prefix_dynamic_shapes() -> dict:
    """Dynamic text length and token count."""
    return {
        "input_ids": {1: torch.export.Dim("text", min=2, max=30)},
        "features": {1: torch.export.Dim("tokens", min=2, max=30)},
    }


class TinyCacheModel(TinyMergeModel):
    """A prefill that also returns its key/value cache, as decoders do with use_cache."""

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, position_ids: torch.Tensor) -> tuple:
        return self.language_with_cache(self.merged(input_ids, features), position_ids)
