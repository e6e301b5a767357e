import pytest
import torch
import transformers

from angel_compile.capture import capture_model
from angel_compile.errors import UnsupportedError
from angel_compile.ops.int8_weight_only import dequantize_int8_per_channel, quantize_int8_per_channel
from angel_compile.passes.base import PassContext
from angel_compile.passes.quantize.weight_only import Int8WeightOnly
from angel_compile.passes.verify import verify_graph
from tests.utils import relative_error

aten = torch.ops.aten
INT8_LINEAR = torch.ops.angel.int8_weight_only_linear.default


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def test_rewrites_parameter_linears_and_leaves_the_computed_one(two_linears):
    x = torch.randn(4, 32)
    reference = two_linears(x)
    gm = capture_model(two_linears, (x,))
    assert count(gm, aten.linear.default) == 3
    result = Int8WeightOnly()(gm, PassContext())
    gm = result.graph_module
    assert result.modified
    assert count(gm, INT8_LINEAR) == 2
    assert count(gm, aten.linear.default) == 1  # the computed-weight one stays
    assert result.stats.rewritten == 2 and result.stats.matched == 2
    (skipped_reason,) = result.stats.skipped.values()
    assert "weight is computed in the graph" in skipped_reason
    # float weights of rewritten layers are gone; int8 weight and scale buffers took their place
    assert not hasattr(gm.up, "weight") and gm.up.weight_int8.dtype == torch.int8
    assert gm.up.weight_scale.shape == (48,)
    verify_graph(gm)
    assert 0 < relative_error(gm(x), reference) < 2e-2


def test_numerics_match_dequantized_float_weights(two_linears):
    x = torch.randn(3, 32)
    gm = capture_model(two_linears, (x,))
    up_q, up_s = quantize_int8_per_channel(two_linears.up.weight)
    down_q, down_s = quantize_int8_per_channel(two_linears.down.weight)
    with torch.no_grad():
        hidden = torch.relu(torch.nn.functional.linear(x, dequantize_int8_per_channel(up_q, up_s), two_linears.up.bias))
        hidden = torch.nn.functional.linear(hidden, dequantize_int8_per_channel(down_q, down_s))
        expected = torch.nn.functional.linear(hidden, two_linears.gate * 0.5)
    gm = Int8WeightOnly()(gm, PassContext()).graph_module
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_second_run_changes_nothing(two_linears):
    gm = capture_model(two_linears, (torch.randn(2, 32),))
    gm = Int8WeightOnly()(gm, PassContext()).graph_module
    code = gm.code
    again = Int8WeightOnly()(gm, PassContext())
    assert not again.modified and again.stats.rewritten == 0
    assert again.graph_module.code == code


def test_exclude_patterns_leave_layers_in_float(two_linears):
    gm = capture_model(two_linears, (torch.randn(2, 32),))
    result = Int8WeightOnly(exclude=("down",))(gm, PassContext())
    assert result.stats.rewritten == 1
    assert "excluded by pattern 'down'" in " ".join(result.stats.skipped.values())
    assert hasattr(result.graph_module.down, "weight")


def test_quantizer_round_trip_error_is_half_a_step():
    weight = torch.randn(64, 128)
    weight[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_int8_per_channel(weight)
    error = (dequantize_int8_per_channel(q, scale) - weight).abs()
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all(error <= scale[:, None] / 2 + 1e-7)
    assert torch.all(q[3] == 0)


def test_llama_linears_all_rewritten(toy_llama):
    ids = torch.randint(0, 256, (2, 12))
    gm = capture_model(toy_llama, (), {"input_ids": ids})
    gm = Int8WeightOnly()(gm, PassContext()).graph_module
    assert count(gm, aten.linear.default) == 0
    assert count(gm, INT8_LINEAR) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head


def test_tied_lm_head_is_quantized_and_the_embedding_keeps_the_float_weight():
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 8))
    gm = capture_model(model, (), {"input_ids": ids})
    gm = Int8WeightOnly()(gm, PassContext()).graph_module
    assert count(gm, aten.linear.default) == 0
    embedding = next(n for n in gm.graph.nodes if n.target == aten.embedding.default)
    assert embedding.args[0].op == "get_attr"
    assert isinstance(gm.get_parameter(embedding.args[0].target), torch.nn.Parameter)
    assert relative_error(gm(input_ids=ids).logits, model(ids).logits) < 5e-2


def test_gpt2_conv1d_weights_are_quantized_per_output_channel():
    from angel_compile.models import build_toy_model

    model = build_toy_model("gpt2")
    ids = torch.randint(0, 256, (2, 10))
    gm = capture_model(model, (), {"input_ids": ids})
    result = Int8WeightOnly()(gm, PassContext())
    assert result.stats.rewritten == 9  # 4 Conv1D per block x 2 + lm_head
    assert relative_error(result.graph_module(input_ids=ids).logits, model(ids).logits) < 5e-2


def test_graph_without_linear_layers_is_an_error():
    model = torch.nn.Sequential(torch.nn.ReLU())
    gm = capture_model(model, (torch.randn(2, 4),))
    with pytest.raises(UnsupportedError, match="no linear layer with a float parameter weight"):
        Int8WeightOnly()(gm, PassContext())
    # a piece of a model (torch.compile graph break) may have none: then nothing happens
    assert not Int8WeightOnly()(gm, PassContext(whole_model=False)).modified


def test_unsupported_weight_dtype_is_reported(two_linears):
    model = two_linears.double()
    gm = capture_model(model, (torch.randn(2, 32, dtype=torch.float64),))
    with pytest.raises(UnsupportedError, match="weight dtype float64 not supported"):
        Int8WeightOnly()(gm, PassContext())
