"""The INT4 Triton kernels (kernels/int4_gemm.py) vs the op references: on CPU through the
Triton interpreter (fp32 / fp16), ahead-of-time compiled for sm_90, and in bf16 on a GPU."""

import re

import pytest
import torch

from angel_compile.kernels import int4_gemm as kernels
from angel_compile.kernels.int4_gemm import int4_weight_only_linear_triton, w4a8_linear_triton
from angel_compile.kernels.split_k import split_k_for
from angel_compile.ops.int4 import (
    int4_weight_only_linear_reference,
    quantize_int4_rtn,
    w4a8_linear_reference,
)
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process, relative_error

# Big tiles: the interpreter's cost grows with the number of programs.
GEMV = {"BLOCK_N": 16, "BLOCK_K": 128}
GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}
BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}  # fp16: rounding of the output


def _case(m: int, n: int, k: int, group: int, symmetric: bool, dtype: torch.dtype, bias: bool):
    q = quantize_int4_rtn(torch.randn(n, k), group, symmetric)
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, (q.packed, q.scales, q.zeros, group), b


def _expected(x, weight, b):
    packed, scales, zeros, group = weight
    b64 = None if b is None else b.double()
    return int4_weight_only_linear_reference(x.double(), packed, scales.double(), zeros, group, b64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, k, group, symmetric, bias", [(48, 256, 32, False, True), (40, 320, 64, True, False)])
def test_gemv_path_matches_reference(dtype, n, k, group, symmetric, bias):
    # K = 320 with 128-wide K tiles: the last tile holds one valid group of 64 (masked groups).
    x, weight, b = _case(1, n, k, group, symmetric, dtype, bias)
    out = int4_weight_only_linear_triton(x, *weight, b, config=GEMV)
    assert out.dtype == dtype and out.shape == (1, n)
    assert relative_error(out, _expected(x, weight, b)) < BOUND[dtype]


def test_gemv_default_config():
    x, weight, b = _case(1, 40, 1024 + 128, 128, False, torch.float32, True)
    out = int4_weight_only_linear_triton(x, *weight, b)
    assert relative_error(out, _expected(x, weight, b)) < BOUND[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m, n, k, symmetric, bias, split_k",
    [(3, 40, 128, False, True, 1), (16, 64, 256, True, False, 2), (33, 48, 128, False, True, 1)],
)
def test_gemm_path_matches_reference(dtype, m, n, k, symmetric, bias, split_k):
    # M <= 16 is the decode-batch tile, M = 33 masks rows; split K adds fp32 partial sums.
    x, weight, b = _case(m, n, k, 64, symmetric, dtype, bias)
    out = int4_weight_only_linear_triton(x, *weight, b, config={**GEMM, "SPLIT_K": split_k})
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, _expected(x, weight, b)) < BOUND[dtype]


def test_small_m_default_config_splits_k_when_programs_are_few():
    assert split_k_for(4096, 14336, 64, 128) == 4  # 64 column tiles -> 256 programs
    assert split_k_for(14336, 4096, 64, 128) == 1
    x, weight, b = _case(4, 40, 1024, 128, False, torch.float32, True)
    out = int4_weight_only_linear_triton(x, *weight, b)
    assert relative_error(out, _expected(x, weight, b)) < BOUND[torch.float32]


@pytest.mark.parametrize(
    "m, static, symmetric, split_k", [(1, False, False, 1), (5, True, True, 2), (33, False, True, 1)]
)
def test_w4a8_matches_reference(m, static, symmetric, split_k):
    # Same fp8 x as the reference (quantized by the same function); the fp8 dot is exact per
    # group, so only fp32 summation order differs.
    x, weight, b = _case(m, 40, 256, 64, symmetric, torch.float32, True)
    input_scale = x.abs().amax() / 448 if static else None
    out = w4a8_linear_triton(x, *weight, input_scale, b, config={**GEMM, "BLOCK_K": 64, "SPLIT_K": split_k})
    expected = w4a8_linear_reference(x.double(), *weight, input_scale, b)
    assert relative_error(out, expected) < 1e-5


def test_every_nibble_and_zero_point_converts_exactly():
    codes = torch.arange(16, dtype=torch.uint8).repeat(16, 2)  # row n: codes 0..15 twice
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    zeros = torch.arange(16, dtype=torch.uint8)[:, None]  # row n: zero point n
    scales = torch.ones(16, 1)
    x = torch.eye(32)[:16]  # row i selects k = i
    out = int4_weight_only_linear_triton(x, packed, scales, zeros, 32, None, config=GEMM)
    expected = codes.float()[:, :16].T - zeros.float().T  # out[i, n] = codes[n, i] - zero[n]
    assert torch.equal(out, expected)
    for row in range(8):  # the GEMV (M = 1): low and high nibbles of bytes in every position
        out = int4_weight_only_linear_triton(x[row : row + 1], packed, scales, zeros, 32, None, config={"BLOCK_N": 16})
        assert torch.equal(out, expected[row : row + 1]), row


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the GEMV, the small-M GEMM and the W4A8 GEMM in bf16 for an H100 (no interpreter)."""

    def pointers(x: str) -> dict:
        return dict(
            x_ptr=f"*{x}", w_ptr="*u8", s_ptr="*bf16", z_ptr="*u8", xs_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16"
        )

    common = {"HAS_ZEROS": True, "HAS_BIAS": True, "GROUP": 128}
    gemv = {**common, "EVEN_K": True, "BLOCK_N": 16, "BLOCK_K": 512, "STAGES": 3}
    gemm = {**common, "DOT_PRECISION": "tf32", "GROUP_M": 8, "SPLIT_K": 1}
    small_m = {**gemm, "W4A8": False, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}
    w4a8 = {**gemm, "W4A8": True, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
    return {
        "gemv": compile_sm90_ptx(kernels._gemv_kernel, pointers("bf16"), gemv, 4, 1),
        "small_m": compile_sm90_ptx(kernels._gemm_kernel, pointers("bf16"), small_m, 4, 4),
        "w4a8": compile_sm90_ptx(kernels._gemm_kernel, pointers("fp8e4nv"), w4a8, 8, 3),
    }


def test_sm90_code_has_the_intended_instructions():
    ptx = ptx_from_fresh_process(__name__)
    assert "cp.async" in ptx["gemv"]  # the pipelined weight stream
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx["small_m"]
    assert "wgmma.mma_async" in ptx["w4a8"] and "e4m3" in ptx["w4a8"]  # FP8 tensor cores
    for path, text in ptx.items():
        # Nibbles become floats by bit operations (OR with 0x4B000000 = 1258291200); the only
        # integer-to-float cvts left are the zero points', two per thread.
        assert len(re.findall(r"or\.b32\s+%r\d+, %r\d+, 1258291200", text)) >= 32, path
        assert text.count("cvt.rn.f32.u") <= 2, path


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 256])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 1024)])
def test_bf16_on_gpu_matches_reference(m, n, k):
    q = quantize_int4_rtn(torch.randn(n, k, device="cuda"), 128, scale_dtype=torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    weight = (q.packed, q.scales, q.zeros, 128)
    out = torch.ops.angel.int4_weight_only_linear(x, *weight, bias)  # dispatches to the Triton kernel
    assert out.dtype == torch.bfloat16
    assert relative_error(out, _expected(x, weight, bias)) < 1e-2  # bf16 rounding, ~3e-3
    out = torch.ops.angel.w4a8_linear(x, *weight, None, bias)
    assert relative_error(out, w4a8_linear_reference(x.float(), *weight, None, bias.float())) < 1e-2


@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_kernel_matches_the_format(symmetric):
    # The prefill path (M >= DEQUANTIZE_MIN_M) writes W with this kernel, then cuBLAS multiplies.
    q = quantize_int4_rtn(torch.randn(40, 256), 64, symmetric)
    assert torch.equal(kernels.dequantize_int4_triton(q.packed, q.scales, q.zeros, 64, torch.float32), q.dequantize())
