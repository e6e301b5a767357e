import torch

from angel_compile.capture import capture_model
from angel_compile.models import build_toy_model
from angel_compile.passes.graph_utils import fake_mode_of
from angel_compile.passes.quantize.linear import LINEAR_TARGETS, match_linear
from angel_compile.passes.quantize.smoothing import activation_root, apply_input_scale
from angel_compile.passes.verify import verify_graph
from tests.utils import relative_error


def _groups(gm):
    groups = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            match = match_linear(gm, node)
            if not isinstance(match, str):
                groups.setdefault(activation_root(match.x), []).append(match)
    return groups


def _smooth_everything(arch: str):
    model = build_toy_model(arch)
    ids = torch.randint(0, 256, (2, 10))
    gm = capture_model(model, (), {"input_ids": ids})
    placements = []
    for matches in _groups(gm).values():
        width = matches[0].x.meta["val"].shape[-1]
        scale = torch.rand(width) * 4 + 0.25
        placements.append(apply_input_scale(gm, matches, scale, fake_mode_of(gm)))
    gm.recompile()
    verify_graph(gm)
    return model, gm, ids, placements


def test_smoothing_is_exact_in_float_and_folds_into_rms_norms():
    model, gm, ids, placements = _smooth_everything("llama")
    assert relative_error(gm(input_ids=ids).logits, model(ids).logits) < 1e-5
    folded = [p for p in placements if p.startswith("folded into")]
    # q/k/v share input_layernorm, gate/up share post_attention_layernorm, per layer; lm_head reads the final norm
    assert len(folded) == 2 * 2 + 1
    assert placements.count("multiply inserted") == 2 * 2  # o_proj and down_proj read no norm
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(model.get_parameter(norm), gm.get_parameter(norm))


def test_smoothing_folds_into_layer_norm_weight_and_bias():
    model, gm, ids, placements = _smooth_everything("gpt2")
    assert relative_error(gm(input_ids=ids).logits, model(ids).logits) < 1e-5
    assert any("ln_1.weight" in p and "ln_1.bias" in p for p in placements)
