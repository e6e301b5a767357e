"""Time to first token of a Llama-8B-shaped model (4 layers, random bf16 weights): dense vs sparse attention.

The model is the decoder of `benchmarks/llama_decoder.py` (hidden 4096, MLP 14336, 32 query
heads, 8 KV heads, head dim 128, vocab 128256) with its prefill attention written the way
transformers writes it: K/V repeated to 32 heads by repeat_kv, then
`scaled_dot_product_attention(..., is_causal=True)`. TTFT = one prefill forward of the whole
prompt to the logits of its last token. Every variant is the model captured by
`angel_compile.compile` (static shapes, captured per prompt length):
  - dense: recipe "none", run under the fastest SDPA backend torch offers here (cuDNN, then
    FlashAttention-2, each timed; the faster is the baseline);
  - each built-in sparse-attention recipe: the pass replaces the attention (and the K/V
    repeat) by `angel::sparse_attention` (block selection + the Triton block-sparse kernel).
Times are medians over a few runs (CUDA events) after one warm-up run (which also autotunes
the kernel for that length). Q/K/V come from random weights, so the dynamic methods' density
is not what a trained model gives (`benchmarks/sparse_attention_quality.py` measures that).
Peak memory at 128K stays far below 80 GB (activations ~1 GB per [S, 4096] bf16 tensor, MLP
intermediates ~3.7 GB each, weights ~4.2 GB).

    python -m benchmarks.bench_sparse_ttft [--seqs 65536 131072] [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import angel_compile
from benchmarks import llama_decoder

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
RECIPES = ("sparse-attention-static", "sparse-attention-stem", "sparse-attention-s2o")


def repeat_kv(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv · repeats, S, D], as transformers writes it."""
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, repeats, s, d).reshape(b, kv * repeats, s, d)


class PrefillBlock(llama_decoder.Block):
    """The decoder block without a KV cache: causal prefill over the prompt."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        d, h, kv = self.shape.head_dim, self.shape.heads, self.shape.kv_heads
        normed = self.attention_norm(x)
        q = llama_decoder.rotate(self.q_proj(normed).view(b, t, h, d).transpose(1, 2), cos, sin)
        k = llama_decoder.rotate(self.k_proj(normed).view(b, t, kv, d).transpose(1, 2), cos, sin)
        v = self.v_proj(normed).view(b, t, kv, d).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q, repeat_kv(k, h // kv), repeat_kv(v, h // kv), is_causal=True)
        x = x + self.o_proj(attended.transpose(1, 2).reshape(b, t, h * d))
        normed = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(normed)) * self.up_proj(normed))


class PrefillModel(torch.nn.Module):
    """tokens [B, S] -> logits of the last token [B, 1, vocab]."""

    def __init__(self, shape: llama_decoder.DecoderShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = torch.nn.Embedding(shape.vocab, shape.hidden)
        self.blocks = torch.nn.ModuleList(PrefillBlock(shape) for _ in range(shape.layers))
        self.norm = llama_decoder.RMSNorm(shape.hidden)
        self.lm_head = torch.nn.Linear(shape.hidden, shape.vocab, bias=False)
        inverse = 1.0 / shape.rope_theta ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
        self.register_buffer("inverse_frequency", inverse, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        angles = positions[:, None].float() * self.inverse_frequency[None, :]  # [S, d/2]
        angles = torch.cat([angles, angles], dim=-1)
        x = self.embed(tokens)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x[:, -1:]))


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up (and kernel autotuning for this length)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def compile_variants(model: PrefillModel, example: torch.Tensor) -> dict[str, angel_compile.CompiledModel]:
    """The model captured once per recipe ("none" = dense); checks every layer's attention became sparse."""
    # Static shapes, captured per prompt length: a dynamic length picks up guards from the
    # block-size arithmetic of the selection, and each length here is timed on its own anyway.
    variants = {}
    for name in ("none", *RECIPES):
        compiled = angel_compile.compile(model, example_kwargs={"tokens": example}, recipe=name)
        if name != "none":
            ops = compiled.count_ops().get("angel.sparse_attention.default", 0)
            assert ops == model.shape.layers, f"{name}: {ops} sparse attention ops for {model.shape.layers} layers"
        variants[name] = compiled
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    shape = llama_decoder.DecoderShape()  # Llama-3-8B shapes, 4 layers
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = PrefillModel(shape).to(torch.bfloat16).eval()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"# Llama-8B shapes, {shape.layers} layers, random bf16 weights, batch 1; TTFT in ms (median of {args.reps})")
    print("| prompt tokens | attention | TTFT ms | speedup vs dense | peak GB |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for seq in args.seqs:
            tokens = torch.randint(0, shape.vocab, (1, seq), device="cuda")
            variants = compile_variants(model, tokens)
            dense_ms, dense_name = float("inf"), ""
            for name, backend in BACKENDS.items():
                torch.cuda.reset_peak_memory_stats()
                try:
                    with sdpa_kernel([backend]):
                        ms = median_ms(lambda tokens=tokens, dense=variants["none"]: dense(tokens=tokens), args.reps)
                except RuntimeError as exc:
                    print(f"| {seq} | dense SDPA {name} | unavailable: {str(exc).splitlines()[0][:60]} | | |")
                    continue
                peak = torch.cuda.max_memory_allocated() / 1e9
                print(f"| {seq} | dense SDPA {name} | {ms:.1f} | | {peak:.1f} |", flush=True)
                if ms < dense_ms:
                    dense_ms, dense_name = ms, name
            for name in RECIPES:
                torch.cuda.reset_peak_memory_stats()
                ms = median_ms(lambda tokens=tokens, run=variants[name]: run(tokens=tokens), args.reps)
                peak = torch.cuda.max_memory_allocated() / 1e9
                speedup = f"{dense_ms / ms:.2f}x vs {dense_name}"
                print(f"| {seq} | {name} | {ms:.1f} | {speedup} | {peak:.1f} |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
