"""GPTQ (quant/gptq.py): the INT4 format it produces, its special cases, and its gain over RTN."""

import pytest
import torch

from angel_compile.ops.int4 import quantize_int4_rtn
from angel_compile.quant.gptq import gptq_groupwise, gptq_quantize
from tests.utils import outlier_layer, relative_error


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_held_out_rows(symmetric, act_order):
    w, x_cal, x_test = outlier_layer()
    expected = x_test @ w.T
    rtn = quantize_int4_rtn(w, 128, symmetric)
    gptq = gptq_quantize(w, _hessian(x_cal), 128, symmetric, act_order=act_order, block_size=64)
    assert gptq.scales.shape == rtn.scales.shape and (gptq.zeros is None) == symmetric
    rtn_error = relative_error(x_test @ rtn.dequantize().T, expected)
    gptq_error = relative_error(x_test @ gptq.dequantize().T, expected)
    assert gptq_error < 0.5 * rtn_error, (gptq_error, rtn_error)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_with_a_diagonal_hessian_gptq_is_rtn(act_order, clip_search):
    # Uncorrelated inputs: the inverse Hessian is diagonal, so no error moves to other columns
    # and each group's range (min/max or searched) comes from its unchanged weights.
    w = torch.randn(16, 128)
    w[3, 5] = 8.0  # an outlier the searched range clips
    h = torch.diag(torch.rand(128) + 0.5)
    gptq = gptq_quantize(w, h, 64, act_order=act_order, clip_search=clip_search)
    rtn = quantize_int4_rtn(w, 64, clip_search=clip_search)
    assert torch.equal(gptq.packed, rtn.packed) and torch.equal(gptq.zeros, rtn.zeros)
    assert torch.allclose(gptq.scales, rtn.scales)


def test_dead_inputs_get_a_zero_weight_and_no_nan():
    w, x_cal, _ = outlier_layer(k=128, n=16, rows=256)
    x_cal[:, 40:48] = 0  # channels never active in calibration
    q = gptq_quantize(w, _hessian(x_cal), 32)
    weight = q.dequantize()
    assert torch.isfinite(weight).all() and torch.isfinite(q.scales).all()
    assert weight[:, 40:48].abs().max() == 0


def test_scales_follow_the_requested_dtype_and_bits_are_generic():
    w, x_cal, _ = outlier_layer(k=128, n=8, rows=256)
    q = gptq_quantize(w.bfloat16(), _hessian(x_cal), 64)
    assert q.scales.dtype == torch.bfloat16
    codes, scale, zero = gptq_groupwise(w, _hessian(x_cal), 64, bits=2)  # INT2 (issue 6)
    assert codes.shape == (8, 128) and scale.shape == zero.shape == (8, 2)
    assert codes.min() >= 0 and codes.max() <= 3


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="Hessian must be"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), 32)
    with pytest.raises(ValueError, match="not divisible"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), 64)
