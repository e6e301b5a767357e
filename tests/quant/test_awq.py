"""AWQ (quant/awq.py): the scale search and its gain over RTN."""

import pytest
import torch

from angel_compile.ops.int4 import quantize_int4_rtn
from angel_compile.quant.awq import awq_quantize, awq_search
from tests.utils import outlier_layer, relative_error


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_beats_rtn_on_held_out_rows(symmetric):
    w, x_cal, x_test = outlier_layer()
    expected = x_test @ w.T
    rtn = quantize_int4_rtn(w, 128, symmetric)
    q, search = awq_quantize(w, x_cal[:256], 128, symmetric, grid=10)
    assert search.scales.shape == (256,) and (search.scales > 0).all() and 0 < search.alpha <= 1
    rtn_error = relative_error(x_test @ rtn.dequantize().T, expected)
    # The pass divides x by s (folded into the previous op); the weight is W · s.
    awq_error = relative_error((x_test / search.scales) @ q.dequantize().T, expected)
    assert awq_error < 0.9 * rtn_error, (awq_error, rtn_error)


def test_alpha_zero_is_rtn_and_the_best_alpha_has_the_least_error():
    w, x_cal, _ = outlier_layer(k=128, n=16, rows=128)
    search = awq_search(w, x_cal, 64, grid=4)
    assert search.errors.shape == (5,)
    rtn = quantize_int4_rtn(w, 64).dequantize()
    rtn_error = (x_cal @ rtn.T - x_cal @ w.T).pow(2).mean()
    assert torch.allclose(search.errors[0], rtn_error)
    assert search.errors[round(search.alpha * 4)] == search.errors.min()


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="x_sample must be"):
        awq_search(torch.randn(4, 64), torch.randn(8, 32), 32)
    with pytest.raises(ValueError, match="not divisible"):
        awq_search(torch.randn(4, 96), torch.randn(8, 96), 64)
