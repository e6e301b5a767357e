import copy
import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from angel_compile.cli import main
from angel_compile.data import token_ids
from angel_compile.eval import (
    agreement_prompts,
    evaluate,
    format_table,
    generation_agreement,
    greedy_continuation,
    perplexity,
    record_qkv,
    retrieval_accuracy,
    retrieval_cases,
)
from angel_compile.models import load_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


@pytest.fixture(scope="module")
def perturbed(smollm2):
    model = copy.deepcopy(smollm2[0])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.down_proj.weight
            weight += 0.5 * weight.std() * torch.randn(weight.shape, generator=generator)
    return model


def test_perplexity_with_one_window_is_the_mean_cross_entropy(toy_llama):
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = toy_llama(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).exp().item()
    assert perplexity(toy_llama, ids, window=128, stride=64) == pytest.approx(expected, rel=1e-5)
    # Strided windows score each token once: a close value, from less context.
    assert perplexity(toy_llama, ids, window=32, stride=16) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="stride"):
        perplexity(toy_llama, ids, window=32, stride=32)


def test_smollm2_perplexity_on_held_out_news(smollm2):
    model, tokenizer = smollm2
    ids = token_ids(tokenizer, "lee", "held_out", max_tokens=300)
    assert 10 < perplexity(model, ids, window=256, stride=128) < 60


def test_agreement_is_one_with_itself_and_lower_when_perturbed(smollm2, perturbed):
    model, tokenizer = smollm2
    prompts = agreement_prompts(tokenizer, 2, length=32)
    continuations = [greedy_continuation(model, p, 12) for p in prompts]
    assert [c.shape for c in continuations] == [(1, 12), (1, 12)]
    assert generation_agreement(model, prompts, continuations) == 1.0
    assert generation_agreement(perturbed, prompts, continuations) < 1.0


def test_retrieval_finds_the_key_at_a_short_length_and_misses_a_wrong_one(smollm2):
    model, tokenizer = smollm2
    cases = retrieval_cases(tokenizer, (256,), depths=(0.5,))
    assert len(cases) == 1 and cases[0].input_ids.shape[1] <= 256
    assert f"The secret number is {cases[0].key}." in tokenizer.decode(cases[0].input_ids[0])
    assert tokenizer.decode(cases[0].answer_ids[0]) == f" {cases[0].key}"
    assert retrieval_accuracy(model, cases) == {256: 1.0}
    # Teacher forcing agrees with greedy decoding: the greedy continuation starts with the key.
    greedy = greedy_continuation(model, cases[0].input_ids, cases[0].answer_ids.shape[1])
    assert torch.equal(greedy, cases[0].answer_ids)
    wrong_key = str(int(cases[0].key) % 90000 + 10001)
    wrong = dataclasses.replace(
        cases[0], answer_ids=tokenizer(f" {wrong_key}", add_special_tokens=False, return_tensors="pt").input_ids
    )
    assert retrieval_accuracy(model, [wrong]) == {256: 0.0}
    with pytest.raises(ValueError, match="longer than the filler"):
        retrieval_cases(tokenizer, (10**6,))


def test_record_qkv_returns_attention_inputs_after_rope(smollm2, tmp_path):
    model, tokenizer = smollm2
    ids = token_ids(tokenizer, "shakespeare", "held_out", max_tokens=64)
    recorded = record_qkv(model, ids, layers=(0, 29), path=str(tmp_path / "qkv.safetensors"))
    assert recorded["layer29.q"].shape == (1, 9, 64, 64) and recorded["layer29.k"].shape == (1, 3, 64, 64)
    # Layer 0 by hand: embed, norm, projections, RoPE.
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = attention.q_proj(hidden).view(1, 64, 9, 64).transpose(1, 2)
        k = attention.k_proj(hidden).view(1, 64, 3, 64).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(64).unsqueeze(0))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(recorded["layer0.q"], q)
    torch.testing.assert_close(recorded["layer0.k"], k)
    saved = load_file(tmp_path / "qkv.safetensors")
    assert torch.equal(saved["layer0.v"], recorded["layer0.v"]) and torch.equal(saved["input_ids"], ids)
    # The attention function is restored: a later forward records nothing and still works.
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_evaluate_puts_reference_and_candidates_side_by_side(smollm2, perturbed):
    model, tokenizer = smollm2
    sizes = dict(ppl_tokens=128, retrieval_lengths=(256,), prompts=2, new_tokens=8)
    rows = evaluate(model, {"perturbed": perturbed}, tokenizer, **sizes)
    assert [r.name for r in rows] == ["reference", "perturbed"]
    assert rows[0].agreement == 1.0 and rows[1].agreement < 1.0
    assert rows[1].perplexity["lee"] > rows[0].perplexity["lee"]
    table = format_table(rows).splitlines()
    assert table[0] == "| model | ppl shakespeare | ppl lee | retrieval@256 | agreement |"
    assert len(table) == 4 and table[2].startswith("| reference |")


def test_eval_command_puts_a_recipe_beside_the_reference(capsys):
    sizes = ["--quick", "--tokens", "128", "--retrieval-lengths", "256", "--prompts", "1", "--new-tokens", "4"]
    assert main(["eval", "--recipe", "int8-weight-only", *sizes]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "| model | ppl shakespeare | ppl lee | retrieval@256 | agreement |"
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out[3:5]}
    assert list(rows) == ["reference", "int8-weight-only"]
    # int8 per-channel weights barely move SmolLM2: perplexity within 5% of the reference.
    reference, int8 = (float(rows[name][1]) for name in rows)
    assert int8 == pytest.approx(reference, rel=0.05)


def test_eval_command_rejects_an_unknown_recipe_before_loading(capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("angel_compile.eval.load_model", no_load)
    assert main(["eval", "--recipe", "no-such-recipe"]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
