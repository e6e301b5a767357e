"""K-major 3:4 ternary: layout round trip, the Triton kernels (interpreter on CPU, sm_90 PTX, GPU) vs the reference."""

import pytest
import torch

from angel_compile.kernels import ternary_kmajor
from angel_compile.kernels.ternary_kmajor import ternary_kmajor_linear_triton
from angel_compile.ops.ternary import quantize_ternary_3of4, ternary_3of4_linear_reference, unpack_codes
from angel_compile.ops.ternary_kmajor import (
    check_ternary_kmajor_format,
    ternary_kmajor_codes,
    ternary_kmajor_linear_reference,
    to_ternary_kmajor,
)
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process


def _weight(n: int, k: int, group: int, device: str = "cpu"):
    torch.manual_seed(n + k + group)
    q = quantize_ternary_3of4(torch.randn(n, k, device=device), group)
    return q, to_ternary_kmajor(q.packed, q.scales, k)


@pytest.mark.parametrize("n, k, group", [(70, 256, 128), (40, 384, 32), (33, 512, 64), (16, 256, 256)])
def test_layout_round_trip_and_reference(n, k, group):
    q, (lo, hi, scales) = _weight(n, k, group)
    assert lo.shape == (k // 32, n) and hi.shape == (k // 128, n) and scales.shape == (k // group, n)
    assert torch.equal(ternary_kmajor_codes(lo, hi), unpack_codes(q.packed)[:, : k // 4])
    check_ternary_kmajor_format(lo, hi, scales, group)
    x = torch.randn(3, k, dtype=torch.float64)
    expected = ternary_3of4_linear_reference(x, q.packed, q.scales.double(), group, None)
    assert torch.equal(ternary_kmajor_linear_reference(x, lo, hi, scales.double(), group, None), expected)


def test_bad_formats_are_named():
    q, (lo, hi, scales) = _weight(8, 256, 128)
    short = quantize_ternary_3of4(torch.randn(8, 96), 32)  # K = 96: no whole hi word
    with pytest.raises(ValueError, match="K divisible by 128"):
        to_ternary_kmajor(short.packed, short.scales, 96)
    with pytest.raises(ValueError, match="hi must be"):
        check_ternary_kmajor_format(lo, hi[:1], scales, 128)


@pytest.mark.parametrize("n, k, group, config", [
    (70, 256, 128, {"BLOCK_N": 32, "SPLIT_K": 2}),  # masked channels, two splits
    (40, 384, 32, {"BLOCK_N": 32}),  # a scale per chunk of 32
    (33, 512, 64, {"BLOCK_N": 16, "K_PER_SPLIT": 128}),
    (16, 256, 256, None),
])  # fmt: skip
@pytest.mark.parametrize("m", [1, 3, ternary_kmajor.SMALL_M_GEMV_MAX_M, ternary_kmajor.SMALL_M_GEMV_MAX_M + 1])
def test_kernel_matches_the_reference(n, k, group, config, m):
    q, (lo, hi, scales) = _weight(n, k, group)
    x, bias = torch.randn(m, k), torch.randn(n)
    expected = ternary_3of4_linear_reference(x.double(), q.packed, q.scales.double(), group, bias.double())
    out = ternary_kmajor_linear_triton(x, lo, hi, scales, group, bias, config)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_small_m_gemv_runs_one_warp():
    q, (lo, hi, scales) = _weight(16, 256, 128)
    with pytest.raises(ValueError, match="one warp"):
        ternary_kmajor_linear_triton(torch.randn(2, 256), lo, hi, scales, 128, None, {"num_warps": 2})


def ptx_for_sm90() -> dict[str, str]:
    types = {"x_ptr": "*bf16", "lo_ptr": "*i32", "hi_ptr": "*i32", "s_ptr": "*bf16", "bias_ptr": "*bf16",
             "out_ptr": "*bf16", "partial_ptr": "*fp32", "arrived_ptr": "*i32"}  # fmt: skip
    meta = {"GROUP": 128, "HAS_BIAS": True, "BLOCK_N": 128, "SPLIT_K": 8}
    return {
        "gemv": compile_sm90_ptx(ternary_kmajor._gemv_kernel, types, meta, 1, 1),
        "small_m": compile_sm90_ptx(ternary_kmajor._small_m_gemv_kernel, types, {**meta, "BLOCK_M": 4}, 1, 1),
    }


def test_sm90_code_generation():
    ptx = ptx_from_fresh_process(__name__)
    assert all(".target sm_90" in code for code in ptx.values())
    # A span is 128 blocks for each of a thread's 4 channels: every block's lookup is a warp
    # shuffle into the register table, none a load (the table is not in memory); with 4 rows,
    # one lookup per row and block.
    assert ptx["gemv"].count("shfl.sync.idx") >= 512 and ptx["gemv"].count("ld.global") < 512
    assert ptx["small_m"].count("shfl.sync.idx") >= 4 * 512 and ptx["small_m"].count("ld.global") < 512


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(14336, 4096), (4096, 14336), (1000, 384)])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
def test_on_gpu(n, k, m):
    q, (lo, hi, scales) = _weight(n, k, 128, "cuda")
    lo, hi, scales = lo, hi, scales.to(torch.bfloat16)
    x, bias = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda")
    expected = ternary_3of4_linear_reference(x.double(), q.packed, scales.t().double(), 128, bias.double())
    out = ternary_kmajor_linear_triton(x, lo, hi, scales, 128, bias.to(torch.bfloat16))
    error = ((out.double() - expected).norm() / expected.norm()).item()
    assert out.dtype == torch.bfloat16 and error < 1e-2
