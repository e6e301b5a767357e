"""The int8 weight-only Triton kernels, run by the Triton interpreter on CPU, vs the reference."""

import pytest
import torch

from angel_compile.kernels.int8_weight_only import int8_weight_only_linear_triton
from angel_compile.ops.int8_weight_only import int8_weight_only_linear_reference, quantize_int8_per_channel
from tests.utils import relative_error

GEMV = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}
GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    x = torch.randn(m, k, dtype=dtype)
    q, scale = quantize_int8_per_channel(torch.randn(n, k))
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, q, scale, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, k", [(48, 128), (40, 72)])  # the second needs masks on N and K
def test_gemv_path_matches_reference(dtype, bias, n, k):
    x, q, scale, b = _case(1, n, k, dtype, bias)
    out = int8_weight_only_linear_triton(x, q, scale, b, config=GEMV)
    expected = int8_weight_only_linear_reference(x.float(), q, scale, None if b is None else b.float())
    assert out.dtype == dtype
    assert relative_error(out, expected) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, bias", [(3, 40, 72, True), (20, 64, 128, False), (33, 48, 64, True)])
def test_gemm_path_matches_reference(dtype, m, n, k, bias):
    x, q, scale, b = _case(m, n, k, dtype, bias)
    out = int8_weight_only_linear_triton(x, q, scale, b, config=GEMM)
    expected = int8_weight_only_linear_reference(x.float(), q, scale, None if b is None else b.float())
    assert out.shape == (m, n)
    assert relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("w_as_a", [True, False])
def test_both_operand_orders_of_the_gemm(w_as_a):
    x, q, scale, b = _case(20, 40, 72, torch.float32, True)
    out = int8_weight_only_linear_triton(x, q, scale, b, config={**GEMM, "W_AS_A": w_as_a})
    assert relative_error(out, int8_weight_only_linear_reference(x, q, scale, b)) < 1e-5


def test_int8_to_fp16_bit_trick_is_exact_for_every_value():
    values = torch.arange(-127, 128, dtype=torch.int8)  # every int8 the format uses
    q = torch.zeros(255, 64, dtype=torch.int8)
    q[:, 0] = values  # row n holds value n in column 0
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0
    out = int8_weight_only_linear_triton(x, q, torch.ones(255), None, config=GEMV)
    assert torch.equal(out[0], values.float())


def test_leading_dimensions_are_kept():
    x = torch.randn(2, 3, 64)
    q, scale = quantize_int8_per_channel(torch.randn(32, 64))
    out = int8_weight_only_linear_triton(x, q, scale, None, config=GEMM)
    assert out.shape == (2, 3, 32)
    assert relative_error(out, int8_weight_only_linear_reference(x, q, scale, None)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_bf16_on_gpu_autotuned(m, n, k):
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    q, scale = quantize_int8_per_channel(torch.randn(n, k, device="cuda"))
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.angel.int8_weight_only_linear(x, q, scale, bias)  # dispatches to the Triton kernel
    expected = int8_weight_only_linear_reference(x.double(), q, scale.double(), bias.double())
    assert relative_error(out, expected) < 1e-2
