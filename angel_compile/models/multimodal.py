"""Small multimodal test models (random weights, built from transformers configs) and inputs made by code.

- `build_vlm_test_case`: transformers' LLaVA (CLIP vision tower + projector + Llama) — the
  whole model, vision encoder included, is in the captured graph; the image features enter
  the text embeddings through `masked_scatter`. A 32×32 image of 4×4 patches gives 64 visual
  tokens. (Qwen2-VL's vision tower splits attention by `image_grid_thw` values, which
  torch.export cannot trace; LLaVA is the VLM here.)
- `build_audio_test_case`: a Whisper encoder + linear projector + Llama, merged the way
  Qwen2-Audio merges (`masked_scatter` at the audio placeholder tokens). A 1.5 s synthetic
  recording (tones, glides and silences) becomes 16 log band energies × 96 frames → 48 audio
  tokens; adjacent frames are redundant, as in speech.

Each case is called as `model(input_ids, <pixel_values | input_features>, position_ids,
attention_mask)` and returns logits; position ids are an input so that a pruned graph can keep
them, and the attention mask is explicit because transformers reads gaps in position ids
without a mask as boundaries of packed sequences (pruned tokens leave such gaps). The models
also expose `merged_embeddings(...)` (the embeddings the language model receives) and
`language_forward(embeds, position_ids)` (the language model alone), for hand-built references.
No pre-trained encoder is used: MiniLM's sentence space is not the language model's, so it
cannot score these models' visual tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers.models.whisper.modeling_whisper import WhisperEncoder

IMAGE_TOKEN = 250
AUDIO_TOKEN = 251
_VOCAB = 256
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=_VOCAB,
    max_position_embeddings=512,
)


@dataclass
class MultimodalTestCase:
    """A model with example inputs, the dynamic shapes to capture it with, and its modality token count."""

    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, Any]
    token_id: int
    num_tokens: int


class _MergedEmbeddingsMixin:
    """Hand-built references: what the language model receives, and the language model alone."""

    language_model: torch.nn.Module
    lm_head: torch.nn.Module

    def merged_embeddings(self, *args: Any) -> torch.Tensor:
        captured: dict[str, torch.Tensor] = {}

        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured["embeds"] = kwargs["inputs_embeds"]

        handle = self.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self(*args)
        finally:
            handle.remove()
        return captured["embeds"]

    def language_forward(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        hidden = self.language_model(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        )
        return self.lm_head(hidden.last_hidden_state)


class LlavaTestModel(_MergedEmbeddingsMixin, torch.nn.Module):
    """transformers' LlavaForConditionalGeneration, called with explicit position ids; returns logits."""

    def __init__(self, llava: transformers.LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.llava = llava

    @property
    def language_model(self) -> torch.nn.Module:
        return self.llava.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.llava.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        out = self.llava(
            input_ids=input_ids,
            pixel_values=pixel_values,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
        return out.logits


class WhisperLMTestModel(_MergedEmbeddingsMixin, torch.nn.Module):
    """Whisper encoder -> linear projector -> Llama, audio features scattered at the audio tokens."""

    def __init__(self, encoder_config: transformers.WhisperConfig, text_config: transformers.LlamaConfig) -> None:
        super().__init__()
        self.audio_tower = WhisperEncoder(encoder_config)
        self.projector = torch.nn.Linear(encoder_config.d_model, text_config.hidden_size)
        self.language_model = transformers.LlamaModel(text_config)
        self.lm_head = torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        embeds = self.language_model.embed_tokens(input_ids)
        audio = self.projector(self.audio_tower(input_features).last_hidden_state)  # [B, T, H]
        mask = (input_ids == AUDIO_TOKEN).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, audio.to(embeds.dtype))
        hidden = self.language_model(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        )
        return self.lm_head(hidden.last_hidden_state)


def _prompt(token_id: int, num_tokens: int, before: int, after: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 200, (1, before), generator=generator)
    tail = torch.randint(0, 200, (1, after), generator=generator)
    return torch.cat([head, torch.full((1, num_tokens), token_id), tail], dim=1)


def _dynamic(modality_input: str, num_tokens: int) -> dict[str, Any]:
    seq = torch.export.Dim("seq", min=num_tokens + 2, max=4096)
    return {"input_ids": {1: seq}, modality_input: None, "position_ids": {1: seq}, "attention_mask": {1: seq}}


def synthetic_image(size: int = 32) -> torch.Tensor:
    """A deterministic RGB image [1, 3, size, size] in [-1, 1]: a gradient sky, a sun, a house, grass."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([0.2 + 0.3 * y, 0.4 + 0.3 * y, 0.9 - 0.2 * y])  # sky
    sun = ((x - 0.8) ** 2 + (y - 0.2) ** 2) < 0.015
    image[:, sun] = torch.tensor([1.0, 0.9, 0.2]).unsqueeze(1)
    house = (x > 0.2) & (x < 0.55) & (y > 0.45) & (y < 0.8)
    image[:, house] = torch.tensor([0.7, 0.3, 0.2]).unsqueeze(1)
    door = (x > 0.33) & (x < 0.42) & (y > 0.6) & (y < 0.8)
    image[:, door] = torch.tensor([0.3, 0.2, 0.1]).unsqueeze(1)
    image[:, y >= 0.8] = torch.tensor([0.2, 0.7, 0.2]).unsqueeze(1)  # grass
    return (image * 2 - 1).unsqueeze(0)


def synthetic_audio_features(frames: int = 96, bands: int = 16, sample_rate: int = 1024) -> torch.Tensor:
    """Log band energies [1, bands, frames] of a deterministic recording: tones, a glide and silences."""
    hop = 16
    t = torch.arange(frames * hop) / sample_rate
    quarter = t.numel() // 4
    wave = torch.zeros_like(t)
    wave[:quarter] = torch.sin(2 * math.pi * 100 * t[:quarter])  # a steady tone
    # (second quarter: silence) then a rising glide, then two alternating tones
    glide = t[2 * quarter : 3 * quarter] - t[2 * quarter]
    wave[2 * quarter : 3 * quarter] = torch.sin(2 * math.pi * (150 * glide + 200 * glide**2))
    last = t[3 * quarter :]
    wave[3 * quarter :] = torch.where((last * 8).floor() % 2 == 0, torch.sin(2 * math.pi * 300 * last), 0.3 * last)
    wave = wave + 0.01 * torch.randn(t.numel(), generator=torch.Generator().manual_seed(0))
    spectrum = torch.stft(wave, n_fft=64, hop_length=hop, window=torch.hann_window(64), return_complex=True)
    power = spectrum.abs()[:, :frames] ** 2  # [33, frames]
    band_energy = power[1:].reshape(bands, -1, frames).sum(dim=1)  # 32 bins -> bands, linearly spaced
    return band_energy.clamp(min=1e-6).log10().unsqueeze(0)


def build_vlm_test_case(seed: int = 0, text_before: int = 5, text_after: int = 6) -> MultimodalTestCase:
    """LLaVA with a CLIP vision tower (2 layers, hidden 32) and a Llama LM (2 layers, hidden 64); 64 visual tokens."""
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
        projection_dim=32,
    )
    config = transformers.LlavaConfig(
        text_config=dict(_TEXT, model_type="llama"),
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLIP's class token: 64 patch tokens
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaTestModel(transformers.LlavaForConditionalGeneration(config)).eval()
    num_tokens = 64
    input_ids = _prompt(IMAGE_TOKEN, num_tokens, text_before, text_after, seed)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    inputs = {
        "input_ids": input_ids,
        "pixel_values": synthetic_image(),
        "position_ids": position_ids,
        "attention_mask": torch.ones_like(input_ids),
    }
    return MultimodalTestCase(model, inputs, _dynamic("pixel_values", num_tokens), IMAGE_TOKEN, num_tokens)


def build_audio_test_case(seed: int = 0, text_before: int = 5, text_after: int = 6) -> MultimodalTestCase:
    """Whisper encoder (1 layer, d 32, 48 output frames) + projector + Llama (2 layers, hidden 64); 48 audio tokens."""
    encoder = transformers.WhisperConfig(
        num_mel_bins=16,
        d_model=32,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        max_source_positions=48,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
    )
    text = transformers.LlamaConfig(**_TEXT)
    for config in (encoder, text):
        config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = WhisperLMTestModel(encoder, text).eval()
    num_tokens = 48
    input_ids = _prompt(AUDIO_TOKEN, num_tokens, text_before, text_after, seed)
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)
    features = synthetic_audio_features()
    inputs = {
        "input_ids": input_ids,
        "input_features": features,
        "position_ids": position_ids,
        "attention_mask": torch.ones_like(input_ids),
    }
    return MultimodalTestCase(model, inputs, _dynamic("input_features", num_tokens), AUDIO_TOKEN, num_tokens)
