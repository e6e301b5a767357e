"""The K-major Triton kernels (kernels/kmajor_gemm.py, INT4 and INT2) vs the row-major op references: on
CPU through the Triton interpreter (fp32 / fp16), ahead-of-time compiled for sm_90, and in bf16 on a GPU."""

import pytest
import torch

from angel_compile.kernels import kmajor_gemm as kernels
from angel_compile.kernels.kmajor_gemm import gemv_split, kmajor_linear_triton
from angel_compile.ops.int2 import int2_weight_only_linear_reference, quantize_int2_rtn
from angel_compile.ops.int4 import int4_weight_only_linear_reference, quantize_int4_rtn
from angel_compile.ops.kmajor import dequantize_kmajor, pack_kmajor, to_kmajor
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process, relative_error

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}  # fp16: rounding of the output
GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4}
ROW_MAJOR = {
    4: (quantize_int4_rtn, int4_weight_only_linear_reference),
    2: (lambda w, g, sym, dtype: quantize_int2_rtn(w, g, sym, scale_dtype=dtype), int2_weight_only_linear_reference),
}


def _case(bits, m, n, k, group, symmetric, dtype, bias, device="cpu"):
    """x, the K-major weight (words, scales, zeros, group), bias, and the row-major reference output."""
    quantize, reference = ROW_MAJOR[bits]
    q = quantize(torch.randn(n, k, device=device), group, symmetric, dtype)
    x = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    b64 = None if b is None else b.double()
    expected = reference(x.double(), q.packed, q.scales.double(), q.zeros, group, b64)
    return x, (*to_kmajor(q.packed, q.scales, q.zeros, bits), group), b, expected


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n, k, group, symmetric, bias, config",
    [
        (300, 256, 64, False, True, None),  # default tile: 3 (INT4) or 2 (INT2) channel blocks, the last masked
        (24, 448, 64, False, True, None),  # default split of 7 groups: 2 + 2 + 2 + 1 (INT4) or 7 × 1 (INT2)
        (48, 384, 32, True, False, {"SPLIT_K": 5}),  # 12 groups over 5 splits: uneven, GPS = 4
        (40, 256, 128, False, True, {"BLOCK_N": 16, "BLOCK_K": 128}),  # one K tile per group
        (32, 128, 16, False, False, {"SPLIT_K": 8}),  # group 16: one or two word rows per K tile
    ],
)
def test_gemv_matches_reference(bits, dtype, n, k, group, symmetric, bias, config):
    x, weight, b, expected = _case(bits, 1, n, k, group, symmetric, dtype, bias)
    words, scales, zeros, group = weight
    out = kmajor_linear_triton(x, words, scales, zeros, bits, group, b, config=config)
    assert out.dtype == dtype and out.shape == (1, n)
    assert relative_error(out, expected) < BOUND[dtype]


SMALL_M = {"SMALL_M_GEMV": True, "BLOCK_N": 32, "num_warps": 1}


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m, n, k, group, symmetric, bias, config",
    [
        (2, 80, 256, 64, False, True, None),  # the default for 1 < M <= 4: one masked block of 256 channels
        (3, 48, 384, 32, True, False, {**SMALL_M, "SPLIT_K": 5}),  # rows padded to 4; uneven splits
        (4, 40, 448, 64, False, True, None),  # 7 groups: 4 + 3
        (4, 24, 256, 128, False, False, {**SMALL_M, "K_PER_SPLIT": 512}),  # one split of 2 groups
        (2, 32, 256, 128, False, True, {**SMALL_M, "SPLIT_K": 4}),  # 2 groups over 4 splits: 2 empty
    ],
)
def test_small_m_gemv_matches_reference(bits, dtype, m, n, k, group, symmetric, bias, config):
    x, (words, scales, zeros, group), b, expected = _case(bits, m, n, k, group, symmetric, dtype, bias)
    out = kmajor_linear_triton(x, words, scales, zeros, bits, group, b, config=config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, expected) < BOUND[dtype]


def test_gemv_split_leaves_about_k_per_split():
    assert gemv_split(32, 128, 128) == 32  # INT4 gate/up 14336×4096: one group a split
    assert gemv_split(112, 128, 256) == 56  # down 4096×14336 at 256 k: 2 groups a split, no empty split
    assert gemv_split(64, 64, 256) == 16  # group 64, K = 4096: 4 groups a split
    assert gemv_split(7, 64, 256) == 2  # 4 groups, then the 3 left
    assert gemv_split(3, 512, 128) == 3 and gemv_split(1, 128, 128) == 1  # at least one group a split


def test_gemv_workspace_is_left_clean_between_calls():
    # The last split of a channel block zeroes the shared partial sums; a second call on other
    # weights must not see the first call's sums.
    for seed in range(2):
        torch.manual_seed(seed)
        x, (words, scales, zeros, group), b, expected = _case(4, 1, 64, 512, 64, False, torch.float32, True)
        out = kmajor_linear_triton(x, words, scales, zeros, 4, group, b, config={"SPLIT_K": 4})
        assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m, n, k, symmetric, bias, split_k",
    [(3, 40, 128, False, True, 1), (16, 64, 256, True, False, 2), (33, 48, 128, False, True, 1)],
)
def test_gemm_matches_reference(bits, dtype, m, n, k, symmetric, bias, split_k):
    x, (words, scales, zeros, group), b, expected = _case(bits, m, n, k, 64, symmetric, dtype, bias)
    out = kmajor_linear_triton(x, words, scales, zeros, bits, group, b, config={**GEMM, "SPLIT_K": split_k})
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, expected) < BOUND[dtype]


@pytest.mark.parametrize("bits", [4, 2])
def test_every_field_position_and_zero_point_converts_exactly(bits):
    # Every code at every field position of a word, every zero point: exact in the GEMV (each x
    # row selects one k) and in the GEMM.
    levels = 1 << bits
    codes = (torch.arange(16)[:, None] + torch.arange(32)[None, :]) % levels  # [N = 16, K = 32]
    zeros = (torch.arange(16) % levels).to(torch.uint8)[:, None]  # row n: zero point n mod levels
    words = pack_kmajor(codes.to(torch.uint8), bits)
    scales, zeros_t = torch.ones(1, 16), zeros.T.contiguous()
    x = torch.eye(32)
    expected = codes.float().T - zeros.float().T  # out[k, n] = codes[n, k] - zero[n]
    out = kmajor_linear_triton(x, words, scales, zeros_t, bits, 32, None, config=GEMM)
    assert torch.equal(out, expected)
    for row in range(32):
        out = kmajor_linear_triton(x[row : row + 1], words, scales, zeros_t, bits, 32, None)
        assert torch.equal(out, expected[row : row + 1]), row


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_kernel_writes_the_transposed_weight(bits, symmetric):
    # The prefill path (M >= DEQUANTIZE_MIN_M) writes Wᵀ with this kernel, then cuBLAS multiplies.
    _, (words, scales, zeros, group), _, _ = _case(bits, 1, 72, 256, 64, symmetric, torch.float32, False)
    out = kernels.dequantize_kmajor_triton(words, scales, zeros, bits, group, torch.float32)
    assert torch.equal(out, dequantize_kmajor(words, scales, zeros, bits, group).T)


def _tile(config: dict) -> dict:
    return {key: config[key] for key in ("BLOCK_N", "BLOCK_K")}


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the bf16 GEMV (default tile, split K) and small-M GEMM for an H100 (no interpreter)."""
    types = dict(
        x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", bias_ptr="*bf16", out_ptr="*bf16",
        partial_ptr="*fp32", arrived_ptr="*i32",
    )  # fmt: skip

    def compile_ptx(fn, constexprs: dict, num_warps: int, num_stages: int) -> str:
        return compile_sm90_ptx(fn, types, constexprs, num_warps, num_stages)

    common = {"HAS_ZEROS": True, "HAS_BIAS": True, "GROUP": 128}
    gemv = {**common, "SPLIT_K": 32, "GPS": 1, "STAGES": 1}
    gemm = {**common, "DOT_PRECISION": "tf32", "GROUP_M": 8, "SPLIT_K": 1, "BLOCK_M": 16, "BLOCK_N": 64}
    return {
        f"gemv{bits}": compile_ptx(
            kernels._gemv_kernel, {**gemv, **_tile(kernels.GEMV_CONFIG[bits]), "BITS": bits}, 1, 1
        )
        for bits in (4, 2)
    } | {
        "small_m": compile_ptx(kernels._gemm_kernel, {**gemm, "BITS": 4, "BLOCK_K": 128}, 4, 4),
        "small_m_gemv": compile_ptx(
            kernels._small_m_gemv_kernel,
            {**common, "BITS": 4, "BLOCK_M": 4, "BLOCK_N": 128, "SPLIT_K": 16, "GPS": 2},
            1,
            1,
        ),
    }


def test_sm90_code_has_the_intended_instructions():
    ptx = ptx_from_fresh_process(__name__)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx["small_m"]
    for bits in (4, 2):
        gemv = ptx[f"gemv{bits}"]
        # Subnormal decoding needs FFMA without flush-to-zero. In the loop a bf16 x is scaled by
        # an integer multiply-add on its bits, never converted by cvt: the cvts left are a thread's
        # share of the Σx tile (128 k) and of the bf16 scales (twice) and bias (BLOCK_N channels).
        # No tile goes through shared memory; words load 16 bytes at a time.
        channels = kernels.GEMV_CONFIG[bits]["BLOCK_N"] // 32
        assert ".ftz" not in gemv, bits
        assert gemv.count("cvt.f32.bf16") <= 128 // 32 + 3 * channels, bits
        assert "ld.shared" not in gemv and "st.shared" not in gemv, bits
        assert "evict_first.L2::cache_hint.v4.b32" in gemv, bits
        # One FFMA per weight: the group's 128 k × BLOCK_N channels over the warp's 32 threads.
        assert gemv.count("fma.rn.f32") >= 128 * channels, bits
    # The small-M GEMV keeps its [1, N] weight and [M, 1] x tiles in the accumulator's layout:
    # no conversion through shared memory in the loop.
    assert "st.shared" not in ptx["small_m_gemv"] and ".ftz" not in ptx["small_m_gemv"]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 256])
@pytest.mark.parametrize("n, k", [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 1024)])
def test_bf16_on_gpu_matches_reference(bits, m, n, k):
    x, weight, bias, expected = _case(bits, m, n, k, 128 if bits == 4 else 64, False, torch.bfloat16, True, "cuda")
    op = torch.ops.angel.int4_kmajor_linear if bits == 4 else torch.ops.angel.int2_kmajor_linear
    out = op(x, *weight, bias)  # dispatches to the Triton kernel
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) < 1e-2  # bf16 rounding, ~3e-3
