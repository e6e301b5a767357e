"""The FP8 / INT8 scaled-GEMM and row-quantization Triton kernels vs the references: on CPU
through the Triton interpreter, ahead-of-time compiled for sm_90, and in bf16 on a GPU.

Covered by the interpreter: INT8 row quantization (bit exact), the INT8 GEMM (int8 tl.dot,
int32 accumulate, exact), the FP8 GEMM on FP8 inputs quantized by PyTorch (fp8 tl.dot, fp32
accumulate), both scale epilogues (per tensor and per row / column), bias, ragged M, N, K.
Not covered there: FP8 row quantization's codes (the interpreter's cast to float8e4nv rounds
wrongly, ENVIRONMENT.md; its scales are checked) and bf16 outputs: those run on the GPU."""

import re

import pytest
import torch
import triton

from angel_compile.kernels import scaled_gemm as kernels
from angel_compile.kernels.scaled_gemm import (
    fp8_linear_triton,
    quantize_rows_triton,
    scaled_gemm_triton,
    w8a8_int8_linear_triton,
)
from angel_compile.ops.fp8_linear import fp8_input_scale, fp8_linear_reference, quantize_fp8_weight
from angel_compile.ops.int4 import quantize_fp8_rows
from angel_compile.ops.int8_weight_only import quantize_int8_per_channel
from angel_compile.ops.w8a8_int8 import quantize_int8_rows, w8a8_int8_linear_reference
from tests.utils import ptx_from_fresh_process, relative_error

# Big tiles: the interpreter's cost grows with the number of programs.
CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}


def test_int8_row_quantization_is_bit_exact():
    x = torch.randn(37, 200) * torch.rand(37, 1) * 10
    x[5] = 0  # an all-zero row
    x[6, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # ties round to even
    x[6, 4:] = 0
    q, scale = quantize_rows_triton(x, torch.int8)
    expected_q, expected_scale = quantize_int8_rows(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale[:, 0])


def test_long_rows_are_quantized_in_two_passes_bit_exactly():
    # K above ROW_IN_REGISTERS_MAX_K: max over K tiles, then the codes tile by tile.
    x = torch.randn(3, kernels.ROW_IN_REGISTERS_MAX_K + 100) * 5
    x[1, -1] = 1000.0  # the row maximum in the last, partial tile
    q, scale = quantize_rows_triton(x, torch.int8)
    expected_q, expected_scale = quantize_int8_rows(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale[:, 0])
    # FP8: the scales. (Its codes are not compared here: the interpreter's FP8 cast rounds values
    # just below a power of two down a binade, 31.8 -> 16; the GPU tests compare them.)
    _, fscale = quantize_rows_triton(x, torch.float8_e4m3fn)
    assert torch.equal(fscale, quantize_fp8_rows(x, None)[1][:, 0])
    multiplier = torch.rand(x.shape[1]) + 0.5  # applied as x is loaded, in both passes
    q, scale = quantize_rows_triton(x, torch.int8, multiplier=multiplier)
    expected_q, expected_scale = quantize_int8_rows(x * multiplier)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale[:, 0])


def test_fp8_row_quantization_scales():
    x = torch.randn(9, 300)
    _, scale = quantize_rows_triton(x, torch.float8_e4m3fn)
    assert torch.equal(scale, quantize_fp8_rows(x, None)[1][:, 0])
    _, static = quantize_rows_triton(x, torch.float8_e4m3fn, fp8_input_scale(torch.tensor(3.0)))
    assert static.shape == (1,) and static.item() == pytest.approx(3.0 / 448)


@pytest.mark.parametrize("m, n, k, bias", [(37, 48, 200, True), (64, 64, 128, False), (1, 80, 64, True)])
def test_int8_gemm_is_exact(m, n, k, bias):
    x = torch.randn(m, k)
    wq, ws = quantize_int8_per_channel(torch.randn(n, k))
    b = torch.randn(n) if bias else None
    out = w8a8_int8_linear_triton(x, wq, ws, b, config=CONFIG)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert torch.allclose(out, w8a8_int8_linear_reference(x, wq, ws, b), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("per_channel_weight", [True, False])
@pytest.mark.parametrize("static_input", [True, False])
@pytest.mark.parametrize("m, n, k", [(37, 48, 200), (32, 64, 128)])
def test_fp8_gemm_scale_epilogues(per_channel_weight, static_input, m, n, k):
    x, b = torch.randn(m, k), torch.randn(n)
    wq, ws = quantize_fp8_weight(torch.randn(n, k), per_channel_weight)
    input_scale = fp8_input_scale(x.abs().amax() * 0.8) if static_input else None  # some values clip
    xq, xs = quantize_fp8_rows(x, input_scale)  # fp8 codes from PyTorch (module docstring)
    a_scale = input_scale if static_input else xs[:, 0]
    out = scaled_gemm_triton(xq, wq, a_scale, ws, b, torch.float32, config=CONFIG)
    expected = fp8_linear_reference(x.double(), wq, ws.double(), input_scale, b.double())
    assert relative_error(out, expected) < 1e-6


def test_fp8_linear_launcher_on_values_the_interpreter_casts_exactly():
    # x already on the FP8 grid with a static scale of 1: every cast is exact, so the
    # interpreter's FP8 rounding does not enter and the whole launcher path is compared.
    x = (torch.randn(2, 9, 128) * 50).to(torch.float8_e4m3fn).float()
    wq, ws = quantize_fp8_weight(torch.randn(40, 128), per_channel=True)
    unit = fp8_input_scale(torch.tensor(448.0))
    out = fp8_linear_triton(x, wq, ws, unit, None, config=CONFIG)
    assert out.shape == (2, 9, 40)
    assert relative_error(out, fp8_linear_reference(x.double(), wq, ws.double(), unit, None)) < 1e-6


def test_int8_input_multiplier_is_fused_exactly():
    x, multiplier = torch.randn(20, 128), torch.rand(128) + 0.5
    wq, ws = quantize_int8_per_channel(torch.randn(48, 128))
    out = w8a8_int8_linear_triton(x, wq, ws, None, multiplier, config=CONFIG)
    assert torch.allclose(out, w8a8_int8_linear_reference(x * multiplier, wq, ws, None), rtol=1e-6, atol=1e-5)


def test_fp16_output_and_leading_dimensions():
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    wq, ws = quantize_int8_per_channel(torch.randn(32, 64))
    out = w8a8_int8_linear_triton(x, wq, ws, None, config=CONFIG)
    assert out.shape == (2, 3, 32) and out.dtype == torch.float16
    assert relative_error(out, w8a8_int8_linear_reference(x.double(), wq, ws.double(), None)) < 2e-3


def test_bad_operands_are_rejected():
    a = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="operands must both be float8_e4m3fn or int8"):
        scaled_gemm_triton(a, a.to(torch.float8_e4m3fn), torch.ones(4), torch.ones(4), None, torch.float32)
    with pytest.raises(ValueError, match="dtype must be float8_e4m3fn or int8"):
        quantize_rows_triton(torch.randn(4, 64), torch.float16)


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the GEMM (FP8 and INT8) and of the row quantization for an H100, bf16 in and out."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = ["M", "N", "K", "stride_am", "stride_bn", "stride_om", "stride_as", "stride_bs", "M_BUCKET"]
    ints += ["stride_xm", "stride_qm"]

    def compile_ptx(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int) -> str:
        signature = {a: pointers.get(a, "i32" if a in ints else "constexpr") for a in fn.arg_names}
        aligned = [i for i, a in enumerate(fn.arg_names) if signature[a] != "constexpr" and "stride_a" not in a]
        aligned = [i for i in aligned if fn.arg_names[i] not in ("stride_as", "stride_bs")]
        src = ASTSource(
            fn=fn, signature=signature, constexprs=constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in aligned}
        )
        options = {"num_warps": num_warps, "num_stages": num_stages}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

    scales = dict(a_scale_ptr="*fp32", b_scale_ptr="*fp32", bias_ptr="*bf16", out_ptr="*bf16")
    gemm = {"HAS_BIAS": True, "EVEN_K": True, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}
    quantize = {"QMAX": 448.0, "TO_INT": False, "STATIC": False, "BLOCK_K": 1024, "ONE_TILE": False}
    rows = dict(x_ptr="*bf16", q_ptr="*fp8e4nv", scale_ptr="*fp32", static_scale_ptr="*fp32")
    return {
        "fp8": compile_ptx(
            kernels._scaled_gemm_kernel,
            {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", **scales},
            {**gemm, "ACC_INT": False},
            8,
            3,
        ),
        "int8": compile_ptx(
            kernels._scaled_gemm_kernel, {"a_ptr": "*i8", "b_ptr": "*i8", **scales}, {**gemm, "ACC_INT": True}, 8, 3
        ),
        "quantize_fp8": compile_ptx(kernels._quantize_rows_kernel, rows, quantize, 4, 1),
        "quantize_int8": compile_ptx(
            kernels._quantize_rows_kernel,
            {**rows, "q_ptr": "*i8"},
            {**quantize, "QMAX": 127.0, "TO_INT": True, "BLOCK_K": 4096, "ONE_TILE": True},
            4,
            1,
        ),
    }


def test_sm90_code_has_the_intended_instructions():
    ptx = ptx_from_fresh_process(__name__)
    assert "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3" in ptx["fp8"]
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8", ptx["int8"])
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx["quantize_fp8"]  # round to nearest even, saturating
    # The 1.5·2^23 rounding trick survived compilation (no fast-math reassociation removed it).
    assert re.search(r"add\.f32\s+%r\d+, %r\d+, 0f4B400000", ptx["quantize_int8"])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300, 4096])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)])
def test_bf16_on_gpu_matches_reference(m, n, k):
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    wq, ws = quantize_int8_per_channel(torch.randn(n, k, device="cuda"))
    out = torch.ops.angel.w8a8_int8_linear(x, wq, ws, bias)  # dispatches to the Triton kernel
    assert out.dtype == torch.bfloat16
    assert relative_error(out, w8a8_int8_linear_reference(x.double(), wq, ws.double(), bias.double())) < 1e-2
    for per_channel, static in [(True, False), (False, True)]:
        fq, fs = quantize_fp8_weight(torch.randn(n, k, device="cuda"), per_channel)
        input_scale = fp8_input_scale(x.float().abs().amax()) if static else None
        out = torch.ops.angel.fp8_linear(x, fq, fs, input_scale, bias)
        expected = fp8_linear_reference(x.float(), fq, fs, input_scale, bias.float())
        # bf16 output rounding (~3e-3) plus rare one-ulp FP8 code differences at ties.
        assert relative_error(out, expected) < 1e-2


def test_autotune_configs_fit_h100_shared_memory():
    # 1-byte operands: stages · (BLOCK_M + BLOCK_N) · BLOCK_K bytes must fit 227 KB.
    for config in kernels.GEMM_CONFIGS:
        kw = config.kwargs
        assert config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] <= 227 * 1024
