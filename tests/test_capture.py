"""capture_model: the export of a dynamic sequence length that torch 2.11 cannot prove (SmolLM2's heads)."""

import torch
import transformers

from angel_compile.capture import capture_model
from tests.utils import relative_error


def _smollm2_shaped_llama() -> torch.nn.Module:
    """One SmolLM2-135M layer (hidden 576, 9 query / 3 KV heads of 64), random weights, small vocabulary."""
    config = transformers.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=256,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_dynamic_sequence_capture_of_smollm2_heads_matches_the_model_at_other_lengths():
    # On torch 2.11 the first export raises "Constraints violated (seq)" and the retry with
    # runtime asserts runs; on later torch the first export passes. Both graphs must match.
    model = _smollm2_shaped_llama()
    seq = torch.export.Dim("seq", min=2, max=2048)
    gm = capture_model(model, (), {"input_ids": torch.randint(0, 256, (1, 16))}, {"input_ids": {1: seq}})
    for length in (2, 37, 300):
        ids = torch.randint(0, 256, (1, length))
        with torch.no_grad():
            assert relative_error(gm(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5


def test_a_constraint_violation_is_retried_with_runtime_asserts(monkeypatch):
    calls = []
    export = torch.export.export

    def export_that_cannot_prove_a_guard(*args, **kwargs):
        calls.append(kwargs.get("prefer_deferred_runtime_asserts_over_guards", False))
        if len(calls) == 1:
            raise RuntimeError("Constraints violated (seq)! Not all values of seq satisfy the generated guard ...")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", export_that_cannot_prove_a_guard)
    model = torch.nn.Linear(8, 4)
    dynamic = {"input": {0: torch.export.Dim("rows", min=2, max=64)}}
    gm = capture_model(model, (torch.randn(3, 8),), dynamic_shapes=dynamic)
    assert calls == [False, True]
    x = torch.randn(5, 8)
    assert torch.equal(gm(x), model(x))
