"""The fp8 and w8a8_int8 schemes of the `quantize` pass: handlers on tiny graphs, SmoothQuant,
bad input, and the four recipes end to end on a toy Llama."""

import pytest
import torch

import angel_compile
from angel_compile.capture import capture_model
from angel_compile.errors import RecipeError
from angel_compile.passes.base import PassContext, build_pass
from angel_compile.passes.quantize.quantize import Quantize
from tests.utils import dynamic_batch_seq, outlier_layer, relative_error

FP8_STATIC = {"type": "fp8", "activation": "static", "weight": "per_tensor"}
FP8_DYNAMIC = {"type": "fp8", "activation": "dynamic", "weight": "per_channel"}
W8A8 = {"type": "w8a8_int8"}
OPS = {"fp8": "angel.fp8_linear.default", "w8a8_int8": "angel.w8a8_int8_linear.default"}


def _ops(gm) -> dict[str, int]:
    counts = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    return counts


@pytest.fixture
def captured(two_linears):
    rows = torch.export.Dim("rows", min=2, max=64)
    return capture_model(two_linears, (torch.randn(4, 32),), dynamic_shapes=({0: rows},))


@pytest.mark.parametrize("scheme", [FP8_STATIC, FP8_DYNAMIC, W8A8])
def test_handler_rewrites_parameter_linears(captured, two_linears, scheme):
    calibration = [torch.randn(16, 32) for _ in range(2)]
    result = Quantize(scheme=scheme)(captured, PassContext(calibration_data=calibration))
    gm = result.graph_module
    # up and down are rewritten; the linear with a computed weight is left with its reason.
    assert result.modified and result.stats.rewritten == 2
    assert _ops(gm)[OPS[scheme["type"]]] == 2 and _ops(gm)["aten.linear.default"] == 1
    assert "computed in the graph" in " ".join(result.stats.skipped.values())
    buffers = dict(gm.named_buffers())
    if scheme["type"] == "fp8":
        assert buffers["up.weight_fp8"].dtype == torch.float8_e4m3fn
        assert buffers["up.weight_scale"].numel() == (48 if scheme["activation"] == "dynamic" else 1)
        assert ("up.input_scale" in buffers) == (scheme["activation"] == "static")
    else:
        assert buffers["up.weight_int8"].dtype == torch.int8 and buffers["up.weight_scale"].shape == (48,)
    assert not hasattr(gm.get_submodule("up"), "weight")  # the float weight is gone
    x = torch.randn(9, 32)
    bound = 0.02 if scheme["type"] == "w8a8_int8" else 0.08
    assert 0 < relative_error(gm(x), two_linears(x)) < bound
    again = Quantize(scheme=scheme)(gm, PassContext(calibration_data=calibration))
    assert not again.modified and again.stats.rewritten == 0


def test_static_fp8_scale_comes_from_the_observer(captured):
    batches = [torch.randn(16, 32) * 3]
    gm = Quantize(scheme=FP8_STATIC)(captured, PassContext(calibration_data=batches)).graph_module
    expected = batches[0].abs().amax() / 448  # minmax observer on up's input
    assert gm.get_buffer("up.input_scale").item() == pytest.approx(expected.item(), rel=1e-6)


class NormThenLinears(torch.nn.Module):
    """RMSNorm-like scaling feeding two linears (as q/k/v), and a linear reading a plain input."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.ones(weight.shape[1]))
        self.a = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.b = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.a.weight.data, self.b.weight.data = weight.clone(), weight.flip(0).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.norm_weight
        return torch.cat([self.a(h), self.b(h)], dim=-1)


def _w8a8_error(alpha: float | None) -> tuple[float, dict]:
    weight, x_calibration, x_held_out = outlier_layer()
    model = NormThenLinears(weight).eval()
    rows = torch.export.Dim("rows", min=2, max=2048)
    gm = capture_model(model, (x_calibration[:8],), dynamic_shapes=({0: rows},))
    scheme = {"type": "w8a8_int8", "smoothquant_alpha": alpha}
    result = Quantize(scheme=scheme)(gm, PassContext(calibration_data=[x_calibration]))
    with torch.no_grad():
        return relative_error(result.graph_module(x_held_out), model(x_held_out)), result.stats.details


def test_smoothquant_folds_into_the_norm_and_beats_plain_w8a8():
    plain, _ = _w8a8_error(None)
    smoothed, details = _w8a8_error(0.5)
    assert list(details["smoothing"].values()) == ["folded into norm_weight"]
    # Outlier channels 20× larger: per-token int8 of x loses the small channels without smoothing.
    assert smoothed < 0.5 * plain, (smoothed, plain)


def test_smoothquant_alpha_is_a_recipe_option(toy_llama):
    ids = torch.randint(0, 256, (2, 16))
    calibration = [{"input_ids": torch.randint(0, 256, (2, 16))}]
    recipe = {
        "name": "sq-0.8",
        "passes": [{"name": "quantize", "options": {"scheme": {"type": "w8a8_int8", "smoothquant_alpha": 0.8}}}],
    }
    compiled = angel_compile.compile(toy_llama, (), {"input_ids": ids}, recipe=recipe, calibration_data=calibration)
    placements = compiled.report["quantize"].stats.details["smoothing"]
    assert sum(p.startswith("folded into") for p in placements.values()) == 2 * 2 + 1  # + the final norm (lm_head)
    assert sum(p == "multiply inserted" for p in placements.values()) == 2 * 2  # o_proj, down_proj
    # ... and each such multiply is fused into its op as the input multiplier.
    gm = compiled.graph_module
    ops = [n for n in gm.graph.nodes if n.target == torch.ops.angel.w8a8_int8_linear.default]
    fused = [n for n in ops if len(n.args) > 4 and n.args[4] is not None]
    assert len(ops) == 2 * 7 + 1 and len(fused) == 2 * 2
    assert all(n.args[4].target.endswith("input_inverse_scale") for n in fused)
    assert not any(u.target == torch.ops.aten.mul.Tensor for n in fused for u in n.args[4].users)
    with torch.no_grad():
        assert relative_error(compiled(input_ids=ids).logits, toy_llama(ids).logits) < 0.02


@pytest.mark.parametrize(
    "scheme, message",
    [
        ({"type": "fp8", "activation": "per_row"}, "fp8 activation must be one of ['static', 'dynamic']"),
        ({"type": "fp8", "weight": "per_group"}, "fp8 weight must be one of ['per_tensor', 'per_channel']"),
        ({"type": "w8a8_int8", "smoothquant_alpha": 1.5}, "smoothquant_alpha must be a number in [0, 1]"),
        ({"type": "w8a8_int8", "group_size": 64}, "scheme 'w8a8_int8' has no field(s) ['group_size']"),
    ],
)
def test_bad_scheme_options_are_recipe_errors(scheme, message):
    with pytest.raises(RecipeError) as info:
        build_pass("quantize", {"scheme": scheme})
    assert message in str(info.value)


class Unaligned(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ok = torch.nn.Linear(32, 48)
        self.ragged = torch.nn.Linear(48, 40)  # N = 40: not a multiple of 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ragged(self.ok(x))


@pytest.mark.parametrize("scheme", [FP8_DYNAMIC, W8A8])
def test_unaligned_shapes_and_unsupported_dtypes_stay_in_float(scheme):
    gm = capture_model(Unaligned().eval(), (torch.randn(4, 32),))
    result = Quantize(scheme=scheme)(gm, PassContext())
    assert result.stats.rewritten == 1
    assert "layer 'ragged': N = 40 not a multiple of 16" in " ".join(result.stats.skipped.values())

    gm = capture_model(Unaligned().double().eval(), (torch.randn(4, 32, dtype=torch.float64),))
    with pytest.raises(angel_compile.errors.UnsupportedError, match="weight dtype float64 not supported"):
        Quantize(scheme=scheme)(gm, PassContext())


@pytest.mark.parametrize(
    "recipe, bound",
    [("fp8-static", 0.08), ("fp8-dynamic", 0.06), ("w8a8-int8", 0.02), ("w8a8-int8-smoothquant", 0.02)],
)
def test_recipes_end_to_end(toy_llama, recipe, bound):
    ids = torch.randint(0, 256, (2, 16))
    calibration = [{"input_ids": torch.randint(0, 256, (2, 16))} for _ in range(2)]
    compiled = angel_compile.compile(
        toy_llama,
        (),
        {"input_ids": ids},
        recipe=recipe,
        dynamic_shapes=dynamic_batch_seq(),
        calibration_data=calibration,
    )
    stats = compiled.report["quantize"].stats
    op = OPS["fp8" if recipe.startswith("fp8") else "w8a8_int8"]
    assert compiled.count_ops()[op] == stats.rewritten == 2 * 7  # lm_head excluded
    assert "excluded by pattern 'lm_head'" in " ".join(stats.skipped.values())
    check = torch.randint(0, 256, (3, 21))
    with torch.no_grad():
        assert 0 < relative_error(compiled(input_ids=check).logits, toy_llama(check).logits) < bound
