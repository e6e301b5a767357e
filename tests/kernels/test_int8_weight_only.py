"""The int8 weight-only Triton kernels vs the reference: on CPU through the Triton interpreter
(fp32 / fp16: its bf16 tl.dot is wrong), ahead-of-time compiled for sm_90, and in bf16 on a GPU."""

import re

import pytest
import torch

from angel_compile.kernels import int8_weight_only as kernels
from angel_compile.kernels.int8_weight_only import int8_weight_only_linear_triton
from angel_compile.ops.int8_weight_only import int8_weight_only_linear_reference, quantize_int8_per_channel
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process, relative_error

# Big tiles: the interpreter's cost grows with the number of programs.
GEMV = {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4}
GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4}
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}  # fp16: rounding of the output


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    x = torch.randn(m, k, dtype=dtype)
    q, scale = quantize_int8_per_channel(torch.randn(n, k))
    b = torch.randn(n, dtype=dtype) if bias else None
    b64 = None if b is None else b.double()
    return x, q, scale, b, int8_weight_only_linear_reference(x.double(), q, scale.double(), b64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n, k", [(48, 128), (40, 72)])  # the second needs masks on N and K
def test_gemv_path_matches_reference(dtype, bias, n, k):
    x, q, scale, b, expected = _case(1, n, k, dtype, bias)
    out = int8_weight_only_linear_triton(x, q, scale, b, config=GEMV)
    assert out.dtype == dtype and out.shape == (1, n)
    assert relative_error(out, expected) < BOUND[dtype]


def test_gemv_default_config_with_ragged_k():
    x, q, scale, b, expected = _case(1, 40, 520, torch.float32, True)  # K = 512 + 8: a masked tail
    out = int8_weight_only_linear_triton(x, q, scale, b)
    assert relative_error(out, expected) < BOUND[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, n, k, bias", [(3, 40, 72, True), (16, 64, 128, False), (33, 48, 64, True)])
def test_gemm_path_matches_reference(dtype, m, n, k, bias):
    # M <= 16 is the small-M path (one 16-row tile), M = 33 the tiled path with masked rows.
    x, q, scale, b, expected = _case(m, n, k, dtype, bias)
    out = int8_weight_only_linear_triton(x, q, scale, b, config=GEMM)
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, expected) < BOUND[dtype]


@pytest.mark.parametrize("w_as_a", [True, False])
def test_both_operand_orders_of_the_gemm(w_as_a):
    x, q, scale, b, expected = _case(20, 40, 72, torch.float32, True)
    config = {**GEMM, "BLOCK_M": 32, "W_AS_A": w_as_a}
    out = int8_weight_only_linear_triton(x, q, scale, b, config=config)
    assert relative_error(out, expected) < BOUND[torch.float32]


def test_int8_to_fp32_bit_trick_is_exact_for_every_value():
    values = torch.arange(-127, 128, dtype=torch.int8)  # every int8 the format uses
    q = torch.randint(-127, 128, (255, 64), dtype=torch.int8)
    q[:, 0] = values  # row n holds value n - 127 in column 0
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0  # selects column 0
    out = int8_weight_only_linear_triton(x, q, torch.ones(255), None, config=GEMV)
    assert torch.equal(out[0], values.float())


def test_leading_dimensions_are_kept():
    x = torch.randn(2, 3, 64)
    q, scale = quantize_int8_per_channel(torch.randn(32, 64))
    out = int8_weight_only_linear_triton(x, q, scale, None, config=GEMM)
    assert out.shape == (2, 3, 32)
    assert relative_error(out, int8_weight_only_linear_reference(x, q, scale, None)) < BOUND[torch.float32]


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the three paths for an H100 in bf16 (needs Triton outside interpreter mode)."""
    pointers = dict(x_ptr="*bf16", w_ptr="*i8", scale_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16")

    def compile_ptx(fn, constexprs: dict, num_warps: int, num_stages: int) -> str:
        return compile_sm90_ptx(fn, pointers, constexprs, num_warps, num_stages)

    gemm = {"HAS_BIAS": True, "EVEN_K": True, "DOT_PRECISION": "tf32", "GROUP_M": 8}
    gemv = {"HAS_BIAS": True, "EVEN_K": True, "BLOCK_N": 8, "BLOCK_K": 512}
    small_m = {**gemm, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "W_AS_A": False}
    large_m = {**gemm, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "W_AS_A": True}
    return {
        "gemv": compile_ptx(kernels._gemv_kernel, gemv, 4, 1),
        "small_m": compile_ptx(kernels._gemm_kernel, small_m, 4, 5),
        "large_m": compile_ptx(kernels._gemm_kernel, large_m, 4, 4),
    }


def test_sm90_code_has_the_intended_instructions():
    ptx = ptx_from_fresh_process(__name__)
    # GEMV: weight tiles copied 16 bytes at a time by cp.async (the pipelined loop).
    assert "cp.async.cg.shared.global" in ptx["gemv"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx["small_m"]
    assert "wgmma.mma_async" in ptx["large_m"]
    for path, text in ptx.items():
        # No I2F (cvt from a signed integer to a float) in any path: int8 is converted with bit operations.
        assert not re.search(r"cvt\.rn\.(f32|f16|bf16)(x2)?\.s(8|16|32)", text), path


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 256])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 1000)])
def test_bf16_on_gpu_matches_reference(m, n, k):
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    q, scale = quantize_int8_per_channel(torch.randn(n, k, device="cuda"))
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    out = torch.ops.angel.int8_weight_only_linear(x, q, scale, bias)  # dispatches to the Triton kernel
    expected = int8_weight_only_linear_reference(x.double(), q, scale.double(), bias.double())
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) < 1e-2  # bf16 output rounding is ~3e-3
