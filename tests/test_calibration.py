import pytest
import torch

from angel_compile.calibration import CalibrationState, ObserverConfig, calibrate, mse_optimal_clip
from angel_compile.capture import capture_model
from angel_compile.errors import CalibrationError
from angel_compile.passes.quantize.linear import LINEAR_TARGETS, match_linear
from angel_compile.passes.quantize.smoothing import activation_root


def _layer_inputs(gm):
    inputs = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            match = match_linear(gm, node)
            if not isinstance(match, str):
                inputs[match.layer] = activation_root(match.x)
    return inputs


@pytest.fixture
def captured(two_linears):
    rows = torch.export.Dim("rows", min=2, max=1024)
    return capture_model(two_linears, (torch.randn(4, 32),), dynamic_shapes=({0: rows},))


def test_statistics_equal_direct_computation(captured, two_linears):
    batches = [torch.randn(5, 32) * (i + 1) for i in range(3)]
    wanted = {"up": {"absmax", "hessian", "sample", "amax"}, "down": {"absmax"}}
    state = calibrate(captured, _layer_inputs(captured), batches, wanted, sample_rows=4, progress=False)
    x = torch.cat(batches)
    up = state.for_layer("up")
    torch.testing.assert_close(up.absmax, x.abs().amax(0))
    torch.testing.assert_close(up.mean_abs, x.abs().mean(0))
    torch.testing.assert_close(up.hessian, x.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(up.gptq_hessian, 2 * x.t() @ x / 15, rtol=1e-5, atol=1e-4)
    assert up.sample.shape == (4, 32) and up.rows == 15
    assert float(up.amax) == pytest.approx(float(x.abs().max()))
    with torch.no_grad():
        hidden = torch.relu(two_linears.up(x))
    torch.testing.assert_close(state.for_layer("down").absmax, hidden.abs().amax(0))
    assert state.for_layer("down").hessian is None  # only what was asked for


def test_observers(captured):
    batches = [torch.randn(64, 32) for _ in range(4)]
    batches[2][0, 0] = 50.0  # one outlier in one batch
    results = {}
    for kind in ("minmax", "moving_average", "percentile", "mse"):
        state = calibrate(
            captured,
            _layer_inputs(captured),
            batches,
            {"up": {"amax"}},
            ObserverConfig(kind=kind, percentile=99.0),
            progress=False,
        )
        results[kind] = float(state.for_layer("up").amax)
    assert results["minmax"] == pytest.approx(50.0)
    assert results["moving_average"] < results["minmax"]
    assert results["percentile"] < 5 and results["mse"] <= results["minmax"]


def test_mse_clip_beats_max_on_heavy_tails():
    sample = torch.randn(4096, 16)
    sample[0, 0] = 40.0
    clip = mse_optimal_clip(sample, 40.0, "int8")
    assert clip < 40.0


def test_offloaded_run_matches(captured):
    batches = [torch.randn(6, 32) for _ in range(2)]
    wanted = {"up": {"absmax", "hessian"}}
    plain = calibrate(captured, _layer_inputs(captured), batches, wanted, progress=False)
    offloaded = calibrate(
        captured, _layer_inputs(captured), batches, wanted, device="cpu", offload=True, progress=False
    )
    torch.testing.assert_close(plain.for_layer("up").hessian, offloaded.for_layer("up").hessian)


def test_no_batches_and_non_finite_activations_are_errors(captured):
    with pytest.raises(CalibrationError, match="got no batches"):
        calibrate(captured, _layer_inputs(captured), [], {"up": {"absmax"}}, progress=False)
    bad = torch.randn(3, 32)
    bad[1, 2] = float("nan")
    with pytest.raises(CalibrationError, match=r"non-finite activation .* in batch 1 at the input of layers \['up'\]"):
        calibrate(captured, _layer_inputs(captured), [torch.randn(3, 32), bad], {"up": {"absmax"}}, progress=False)


def test_save_load_round_trip_and_mismatch(captured, tmp_path):
    batches = [torch.randn(6, 32)]
    state = calibrate(captured, _layer_inputs(captured), batches, {"up": {"absmax", "hessian", "amax"}}, progress=False)
    path = tmp_path / "calib.safetensors"
    state.save(path)
    loaded = CalibrationState.load(path, expected_layers={"up": 32})
    torch.testing.assert_close(loaded.for_layer("up").hessian, state.for_layer("up").hessian)
    assert loaded.for_layer("up").rows == 6 and loaded.observer == state.observer
    with pytest.raises(CalibrationError, match=r"layers missing from it: \['other'\]"):
        CalibrationState.load(path, expected_layers={"up": 32, "other": 8})
    with pytest.raises(CalibrationError, match=r"another input width: \['up \(K=16, file has 32\)'\]"):
        CalibrationState.load(path, expected_layers={"up": 16})
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CalibrationError, match="cannot be read"):
        CalibrationState.load(tmp_path / "junk.safetensors")


def test_unknown_observer_is_rejected():
    with pytest.raises(CalibrationError, match="unknown observer 'max'; available"):
        ObserverConfig(kind="max")


def test_a_batch_that_does_not_fit_the_graph_is_named(two_linears):
    gm = capture_model(two_linears, (torch.randn(4, 32),))  # static shapes
    with pytest.raises(CalibrationError, match="calibration batch 0 does not fit the captured graph"):
        calibrate(gm, _layer_inputs(gm), [torch.randn(5, 32)], {"up": {"absmax"}}, progress=False)
