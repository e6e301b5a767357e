"""`angel::fp8_linear` and `angel::w8a8_int8_linear`: formats, reference semantics, fake impls."""

import pytest
import torch

from angel_compile.ops.fp8_linear import fp8_input_scale, fp8_linear_reference, quantize_fp8_weight
from angel_compile.ops.int4 import quantize_fp8_rows
from angel_compile.ops.int8_weight_only import quantize_int8_per_channel
from angel_compile.ops.w8a8_int8 import quantize_int8_rows, w8a8_int8_linear_reference
from tests.utils import relative_error


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_weight_round_trip(per_channel):
    w = torch.randn(24, 64) * torch.rand(24, 1)  # rows of different ranges
    w[3] = 0  # an all-zero row gets a positive scale
    q, scale = quantize_fp8_weight(w, per_channel)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == ((24,) if per_channel else (1,))
    assert torch.all(scale > 0)
    dequantized = q.float() * (scale[:, None] if per_channel else scale)
    assert q.float().abs().max() == 448  # the largest value maps to the top of the grid
    assert relative_error(dequantized, w) < 0.04  # E4M3 keeps 3 mantissa bits: ≤ 2^-4 per value


def test_int8_rows_round_half_to_even_and_zero_rows():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_int8_rows(x)
    assert scale.flatten().tolist() == [1.0, 1.0]
    assert q.tolist() == [[127, 0, 2, -2], [0, 0, 0, 0]]


def test_references_are_close_to_float_linear():
    x, w, b = torch.randn(2, 5, 128), torch.randn(40, 128) * 0.05, torch.randn(40)
    expected = torch.nn.functional.linear(x, w, b)
    wq, ws = quantize_int8_per_channel(w)
    assert relative_error(w8a8_int8_linear_reference(x, wq, ws, b), expected) < 0.02
    fq, fs = quantize_fp8_weight(w, per_channel=True)
    assert relative_error(fp8_linear_reference(x, fq, fs, None, b), expected) < 0.06
    fq, fs = quantize_fp8_weight(w, per_channel=False)
    static = fp8_linear_reference(x, fq, fs, fp8_input_scale(x.abs().amax()), b)
    assert static.shape == (2, 5, 40) and relative_error(static, expected) < 0.06


def test_int8_reference_accumulates_exactly():
    x = torch.randn(7, 4096) * 3
    wq = torch.full((16, 4096), 127, dtype=torch.int8)  # sums up to 127·127·4096 > 2^24
    xq, xs = quantize_int8_rows(x)
    exact = (xq.double() @ wq.double().T) * xs.double()
    out = w8a8_int8_linear_reference(x, wq, torch.ones(16), None)
    assert relative_error(out, exact) < 1e-7


def test_static_fp8_activation_scale_saturates():
    x = torch.tensor([[1.0, -1.0, 8.0]])
    xq, scale = quantize_fp8_rows(x, fp8_input_scale(torch.tensor(2.0)))  # calibrated max |x| = 2
    assert xq.float().tolist() == [[224.0, -224.0, 448.0]] and scale.item() == pytest.approx(2.0 / 448)


def test_ops_dispatch_and_fake_checks():
    x = torch.randn(3, 64)
    wq, ws = quantize_int8_per_channel(torch.randn(16, 64))
    assert torch.equal(torch.ops.angel.w8a8_int8_linear(x, wq, ws), w8a8_int8_linear_reference(x, wq, ws, None))
    fq, fs = quantize_fp8_weight(torch.randn(16, 64), per_channel=True)
    assert torch.ops.angel.fp8_linear(x, fq, fs).shape == (3, 16)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(RuntimeError, match="weight must be float8_e4m3fn"):
            torch.ops.angel.fp8_linear(torch.empty(3, 64), torch.empty(16, 64), torch.empty(16))
        with pytest.raises(RuntimeError, match="weight must be int8"):
            torch.ops.angel.w8a8_int8_linear(torch.empty(3, 64), torch.empty(16, 64), torch.empty(16))
        with pytest.raises(RuntimeError, match="x's last dim must equal weight's K"):
            torch.ops.angel.w8a8_int8_linear(torch.empty(3, 32), torch.empty(16, 64, dtype=torch.int8), torch.empty(16))
