"""Small multimodal test models (random weights, built from transformers configs) and inputs made by code.

- `build_vlm_test_case`: transformers' LLaVA (CLIP vision tower + projector + Llama) — the
  whole model, vision encoder included, is in the captured graph; the image features enter
  the text embeddings through `masked_scatter`. A 32×32 image of 4×4 patches gives 64 visual
  tokens.
- `build_qwen2vl_test_case`: transformers' Qwen2-VL (`Qwen2VLForConditionalGeneration`, tiny
  config), captured from the image embeddings on: its vision tower splits attention by
  `image_grid_thw` values (`.tolist()`), which torch.export cannot trace, so the vision tower
  and `get_rope_index` (the [3, B, S] mRoPE position ids) run eagerly outside the graph
  (`model.prepare_inputs`). The captured graph is Qwen2-VL's own forward from there: embedding,
  `masked_scatter` at the image tokens, the decoder with mRoPE. A 32×32 image is a (1, 8, 8)
  patch grid, merged 2×2 into 16 visual tokens.
- `build_audio_test_case`: a Whisper encoder + linear projector + Llama, merged the way
  Qwen2-Audio merges (`masked_scatter` at the audio placeholder tokens). A 1.5 s synthetic
  recording (tones, glides and silences) becomes 16 log band energies × 96 frames → 48 audio
  tokens; adjacent frames are redundant, as in speech.

Each case is called as `model(input_ids, <pixel_values | input_features | image_embeds>,
position_ids, attention_mask)` and returns logits; position ids are an input so that a pruned
graph can keep them, and the attention mask is explicit because transformers reads gaps in
position ids without a mask as boundaries of packed sequences (pruned tokens leave such gaps).
The models also expose `merged_embeddings(...)` (the embeddings the language model receives)
and `language_forward(embeds, position_ids, attention_mask)` (the language model alone), for
hand-built references.
No pre-trained encoder is used: MiniLM's sentence space is not the language model's, so it
cannot score these models' visual tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.whisper.modeling_whisper import WhisperEncoder

IMAGE_TOKEN = 250
AUDIO_TOKEN = 251
VIDEO_TOKEN = 252
VISION_START_TOKEN = 253
VISION_END_TOKEN = 254
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


class Qwen2VLTestModel(_MergedEmbeddingsMixin, torch.nn.Module):
    """transformers' Qwen2VLForConditionalGeneration from the merge on: image embeddings come in precomputed.

    `forward(input_ids [B, S], image_embeds [B·N, D], position_ids [3, B, S], attention_mask [B, S])`
    hands the image embeddings to Qwen2-VL's own forward (`mm_encoder_outputs`), which embeds the
    ids, scatters the features at the image tokens (`get_placeholder_mask` + `masked_scatter`)
    and runs the decoder with mRoPE; returns logits. `prepare_inputs` runs what torch.export
    cannot trace, eagerly: the vision tower and `get_rope_index`.
    """

    def __init__(self, qwen: transformers.Qwen2VLForConditionalGeneration) -> None:
        super().__init__()
        self.qwen = qwen

    @property
    def language_model(self) -> torch.nn.Module:
        return self.qwen.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.qwen.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        image = BaseModelOutputWithPooling(pooler_output=(image_embeds,))
        out = self.qwen(
            input_ids=input_ids,
            mm_encoder_outputs={"image": image},
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
        return out.logits

    @torch.no_grad()
    def prepare_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The forward's inputs: image embeddings from the vision tower, mRoPE ids [3, B, S] from `get_rope_index`."""
        model = self.qwen.model
        image_embeds = torch.cat(model.get_image_features(pixel_values, image_grid_thw).pooler_output)
        token_types = (input_ids == model.config.image_token_id).int()
        position_ids, _ = model.get_rope_index(input_ids, token_types, image_grid_thw=image_grid_thw)
        return {
            "input_ids": input_ids,
            "image_embeds": image_embeds,
            "position_ids": position_ids,
            "attention_mask": torch.ones_like(input_ids),
        }


def _prompt(token_id: int, num_tokens: int, before: int, after: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 200, (1, before), generator=generator)
    tail = torch.randint(0, 200, (1, after), generator=generator)
    return torch.cat([head, torch.full((1, num_tokens), token_id), tail], dim=1)


def qwen2vl_prompt(num_tokens: int, before: int, after: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Input ids [batch, before + num_tokens + 2 + after]: text, vision start, image pads, vision end, text."""
    start, end = torch.tensor([[VISION_START_TOKEN]]), torch.tensor([[VISION_END_TOKEN]])
    rows = []
    for b in range(batch):
        head, image, tail = _prompt(IMAGE_TOKEN, num_tokens, before, after, seed + b).split(
            [before, num_tokens, after], 1
        )
        rows.append(torch.cat([head, start, image, end, tail], dim=1))
    return torch.cat(rows)


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


def qwen2vl_pixel_values(
    images: torch.Tensor, patch: int, temporal: int = 2, merge: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] -> (patches [B·T·h·w, 3·temporal·patch²], grid_thw [B, 3]) as Qwen2-VL's processor lays them.

    A still image is repeated `temporal` times; patches are ordered by merge window (merge × merge
    neighbours adjacent), the order the vision tower's patch merger expects.
    """
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    frames = images.unsqueeze(1).expand(batch, temporal, channels, height, width)
    patches = frames.reshape(batch, 1, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flat = patches.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)
    return flat, torch.tensor([[1, grid_h, grid_w]] * batch)


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


def build_qwen2vl_test_case(
    seed: int = 0, text_before: int = 5, text_after: int = 6, batch: int = 1
) -> MultimodalTestCase:
    """Qwen2-VL (vision tower: 1 block, embed 32; LM: 2 layers, hidden 64, mRoPE sections 2/3/3); 16 visual tokens.

    A 32×32 image of 4×4 patches is a (1, 8, 8) grid, merged 2×2 into 16 tokens between
    vision-start/end tokens. The vision tower and `get_rope_index` run eagerly here
    (`model.prepare_inputs`); the captured module starts at the image embeddings. The odd
    samples of a batch see the image mirrored left-right.
    """
    vision = dict(depth=1, embed_dim=32, hidden_size=_TEXT["hidden_size"], num_heads=2, patch_size=4, mlp_ratio=2)
    text = dict(
        _TEXT,
        bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    config = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START_TOKEN,
        vision_end_token_id=VISION_END_TOKEN,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLTestModel(transformers.Qwen2VLForConditionalGeneration(config)).eval()
    num_tokens = 16
    image = synthetic_image()
    images = torch.cat([image.flip(-1) if b % 2 else image for b in range(batch)])
    pixel_values, grid_thw = qwen2vl_pixel_values(images, patch=4)
    input_ids = qwen2vl_prompt(num_tokens, text_before, text_after, seed, batch)
    inputs = model.prepare_inputs(input_ids, pixel_values, grid_thw)
    seq = torch.export.Dim("seq", min=num_tokens + 4, max=4096)
    dynamic = {"input_ids": {1: seq}, "image_embeds": None, "position_ids": {2: seq}, "attention_mask": {1: seq}}
    return MultimodalTestCase(model, inputs, dynamic, IMAGE_TOKEN, num_tokens)
