import pytest
import torch

from angel_compile.ops.int8_weight_only import (
    dequantize_int8_per_channel,
    int8_weight_only_linear_reference,
    quantize_int8_per_channel,
)

OP = torch.ops.angel.int8_weight_only_linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_linear_with_dequantized_weight(bias, dtype):
    x = torch.randn(2, 5, 64, dtype=dtype)
    q, scale = quantize_int8_per_channel(torch.randn(24, 64))
    b = torch.randn(24, dtype=dtype) if bias else None
    weight = dequantize_int8_per_channel(q, scale).double()
    expected = torch.nn.functional.linear(x.double(), weight, b.double() if bias else None)
    out = OP(x, q, scale, b)
    assert out.dtype == dtype and out.shape == (2, 5, 24)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.double() - expected).norm() / expected.norm()).item() < tolerance


def test_op_passes_torch_library_checks():
    x = torch.randn(3, 32)
    q, scale = quantize_int8_per_channel(torch.randn(16, 32))
    torch.library.opcheck(OP, (x, q, scale, torch.randn(16)))
    torch.library.opcheck(OP, (x, q, scale, None))


def test_fake_impl_rejects_a_float_weight():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w, s = torch.empty(2, 8), torch.empty(4, 8), torch.empty(4)
        with pytest.raises(RuntimeError, match="weight must be int8"):
            OP(x, w, s, None)


def test_reference_is_what_the_op_runs_on_cpu():
    x = torch.randn(4, 16)
    q, scale = quantize_int8_per_channel(torch.randn(8, 16))
    assert torch.equal(OP(x, q, scale, None), int8_weight_only_linear_reference(x, q, scale, None))
