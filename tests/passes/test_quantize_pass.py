"""The `quantize` pass: scheme parsing, per-layer rules, exclusions, calibration plumbing."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from angel_compile.capture import capture_model
from angel_compile.errors import CalibrationError, RecipeError
from angel_compile.passes.base import PassContext, build_pass
from angel_compile.passes.quantize.quantize import Quantize
from angel_compile.passes.quantize.schemes import LayerSite, Scheme, register_scheme
from angel_compile.recipe import Recipe

INT8 = {"type": "int8_weight_only"}


@dataclass(frozen=True)
class RecordingScheme(Scheme):
    """Test scheme: needs the Hessian, quantizes like int8 weight-only, remembers what it saw."""

    type: ClassVar[str] = "test_recording"
    seen: ClassVar[dict] = {}

    def statistics(self) -> set[str]:
        return {"hessian", "amax"}


@register_scheme(RecordingScheme)
def _record(config: RecordingScheme, site: LayerSite) -> int:
    RecordingScheme.seen[site.layer] = site.stats
    from angel_compile.passes.quantize.handlers import quantize_int8_weight_only

    return quantize_int8_weight_only(config, site)


@pytest.fixture
def captured(two_linears):
    rows = torch.export.Dim("rows", min=2, max=64)
    return capture_model(two_linears, (torch.randn(4, 32),), dynamic_shapes=({0: rows},))


def test_rules_exclusions_and_default(captured):
    pass_ = Quantize(scheme=INT8, rules=({"pattern": "down", "scheme": None},))
    result = pass_(captured, PassContext())
    assert result.stats.rewritten == 1 and result.stats.details["schemes"] == {"int8_weight_only": 1}
    assert "kept in float by rule 'down'" in " ".join(result.stats.skipped.values())


def test_rules_alone_without_default_scheme(captured):
    result = Quantize(rules=({"pattern": "up", "scheme": INT8},))(captured, PassContext())
    assert result.stats.rewritten == 1
    assert "no rule matches and no default scheme" in " ".join(result.stats.skipped.values())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheme": {"type": "int3"}}, "unknown scheme type 'int3'; available: ["),
        ({"scheme": {"type": "int8_weight_only", "bits": 8}}, "scheme 'int8_weight_only' has no field(s) ['bits']"),
        ({"scheme": INT8, "rules": [{"pattern": "x"}]}, "rules[0] must be a mapping with keys 'pattern' and 'scheme'"),
        ({}, "no scheme: set 'scheme' or give a rule with a scheme"),
        ({"scheme": INT8, "calibration": {"observer": "max"}}, "unknown observer 'max'"),
        ({"scheme": INT8, "calibration": {"batches": 3}}, "calibration has no key(s) ['batches']"),
    ],
)
def test_bad_options_are_recipe_errors(options, message):
    with pytest.raises(RecipeError) as info:
        build_pass("quantize", options)
    assert message in str(info.value)


def test_recipe_round_trip_keeps_nested_schemes(tmp_path):
    recipe = Recipe.from_dict(
        {
            "name": "mixed",
            "passes": [
                {
                    "name": "quantize",
                    "options": {
                        "scheme": INT8,
                        "rules": [{"pattern": "lm_head", "scheme": None}],
                        "calibration": {"observer": "percentile", "percentile": 99.9},
                    },
                }
            ],
        }
    )
    recipe.save(tmp_path / "r.yaml")
    assert Recipe.from_file(tmp_path / "r.yaml").to_dict() == recipe.to_dict()


def test_schemes_needing_statistics_calibrate_and_save(captured, tmp_path):
    RecordingScheme.seen.clear()
    path = tmp_path / "calib.safetensors"
    batches = [torch.randn(8, 32) for _ in range(3)]
    pass_ = Quantize(scheme={"type": "test_recording"}, calibration={"save": str(path)})
    result = pass_(captured, PassContext(calibration_data=batches))
    assert result.stats.rewritten == 2
    assert RecordingScheme.seen["up"].rows == 24 and RecordingScheme.seen["up"].hessian.shape == (32, 32)
    assert path.exists()


def test_saved_calibration_is_reused_and_checked(two_linears, tmp_path):
    rows = torch.export.Dim("rows", min=2, max=64)
    first = capture_model(two_linears, (torch.randn(4, 32),), dynamic_shapes=({0: rows},))
    path = tmp_path / "calib.safetensors"
    Quantize(scheme={"type": "test_recording"}, calibration={"save": str(path)})(
        first, PassContext(calibration_data=[torch.randn(8, 32)])
    )
    second = capture_model(two_linears, (torch.randn(4, 32),), dynamic_shapes=({0: rows},))
    RecordingScheme.seen.clear()
    Quantize(scheme={"type": "test_recording"}, calibration={"load": str(path)})(second, PassContext())
    assert RecordingScheme.seen["up"].rows == 8

    other = capture_model(torch.nn.Linear(16, 4), (torch.randn(2, 16),))
    with pytest.raises(CalibrationError, match="does not fit this model"):
        Quantize(scheme={"type": "test_recording"}, calibration={"load": str(path)})(other, PassContext())


def test_missing_calibration_data_is_a_clear_error(captured):
    with pytest.raises(CalibrationError, match="need calibration data: pass calibration_data="):
        Quantize(scheme={"type": "test_recording"})(captured, PassContext())
