"""INT2 and 3:4 ternary Triton kernels vs the op references, on CPU through the Triton interpreter
(fp32 / fp16), and ahead-of-time compiled for sm_90."""

import pytest
import torch

from angel_compile.kernels import int2_gemm, ternary_gemm
from angel_compile.kernels.int2_gemm import dequantize_int2_triton, int2_weight_only_linear_triton
from angel_compile.kernels.split_k import split_k_for
from angel_compile.kernels.ternary_gemm import dequantize_ternary_3of4_triton, ternary_3of4_linear_triton
from angel_compile.ops.int2 import int2_weight_only_linear_reference, quantize_int2_rtn
from angel_compile.ops.ternary import quantize_ternary_3of4, ternary_3of4_linear_reference
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process, relative_error

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3}
GEMV = {"BLOCK_N": 16, "BLOCK_K": 128}
GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "m, symmetric, config",
    [
        (1, False, GEMV),
        (1, True, {**GEMV, "BLOCK_K": 64, "SPLIT_K": 2}),
        (5, False, {**GEMM, "SPLIT_K": 2}),
        (20, True, GEMM),
    ],
)
def test_int2_kernels_match_reference(dtype, m, symmetric, config):
    # K = 320: the GEMV's last 128-wide tile holds one valid group of 64 (masked groups).
    torch.manual_seed(0)
    q = quantize_int2_rtn(torch.randn(40, 320), 64, symmetric)
    x, b = torch.randn(m, 320, dtype=dtype), torch.randn(40, dtype=dtype)
    out = int2_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, 64, b, config=config)
    expected = int2_weight_only_linear_reference(x.double(), q.packed, q.scales.double(), q.zeros, 64, b.double())
    assert out.dtype == dtype and out.shape == (m, 40)
    assert relative_error(out, expected) < BOUND[dtype]


@pytest.mark.parametrize("variant", sorted(int2_gemm.GEMV_VARIANTS))
@pytest.mark.parametrize(
    "group, symmetric, bias, dtype, split_k",
    [(32, True, True, torch.float16, None), (64, False, False, torch.float32, 2), (128, False, True, torch.float32, 3)],
)
def test_int2_gemv_variants_match_reference(variant, group, symmetric, bias, dtype, split_k):
    # N = 40 is no multiple of BLOCK_N; K = 640 leaves the last K tile of every BLOCK_K partly
    # masked, and split K 3 leaves some splits without a tile.
    torch.manual_seed(0)
    q = quantize_int2_rtn(torch.randn(40, 640), group, symmetric)
    x, b = torch.randn(1, 640, dtype=dtype), torch.randn(40, dtype=dtype) if bias else None
    config = int2_gemm.GEMV_VARIANTS[variant]
    config = config if split_k is None else {**config, "SPLIT_K": split_k}
    out = int2_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, group, b, config=config)
    expected = int2_weight_only_linear_reference(
        x.double(), q.packed, q.scales.double(), q.zeros, group, None if b is None else b.double()
    )
    assert out.dtype == dtype and out.shape == (1, 40)
    assert relative_error(out, expected) < BOUND[dtype]


def test_int2_gemv_is_exact_for_large_and_tiny_x():
    # Products are formed as subnormal weight × x · 2^(85 − p): fine from 1e-12 to 1e9 (|x| < 2^43).
    torch.manual_seed(0)
    q = quantize_int2_rtn(torch.randn(40, 256), 64)
    for magnitude in (1e-12, 1e9):
        x = torch.randn(1, 256) * magnitude
        out = int2_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, 64, config=GEMV)
        expected = int2_weight_only_linear_reference(x.double(), q.packed, q.scales.double(), q.zeros, 64, None)
        assert relative_error(out, expected) < BOUND[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "k, group, m, config",
    [
        (576, None, 1, None),  # per channel, K % 128 != 0: the M == 1 case runs the tl.dot kernel
        (576, None, 3, {**GEMM, "SPLIT_K": 2}),
        (256, 32, 20, GEMM),
    ],
)
def test_ternary_kernels_match_reference(dtype, k, group, m, config):
    torch.manual_seed(0)
    q = quantize_ternary_3of4(torch.randn(40, k), group)
    x, b = torch.randn(m, k, dtype=dtype), torch.randn(40, dtype=dtype)
    out = ternary_3of4_linear_triton(x, q.packed, q.scales, q.group_size, b, config=config)
    expected = ternary_3of4_linear_reference(x.double(), q.packed, q.scales.double(), q.group_size, b.double())
    assert out.dtype == dtype and out.shape == (m, 40)
    assert relative_error(out, expected) < BOUND[dtype]


@pytest.mark.parametrize("variant", sorted(ternary_gemm.GEMV_VARIANTS))
@pytest.mark.parametrize(
    "k, group, has_bias, dtype, split",
    [
        (512, 128, True, torch.float32, None),  # N = 200: a partial row block
        (384, None, False, torch.float16, None),  # per channel; the last 256-wide tile is half masked
        (256, 64, True, torch.float32, 3),  # two scale groups per super-chunk; split K, an idle split
        (512, 256, False, torch.float16, 2),
    ],
)
def test_ternary_gemv_variants_match_reference(variant, k, group, has_bias, dtype, split):
    torch.manual_seed(0)
    n = 200
    q = quantize_ternary_3of4(torch.randn(n, k), group)
    x = torch.randn(1, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if has_bias else None
    config = {**ternary_gemm.GEMV_VARIANTS[variant]}
    if split is not None:
        config["SPLIT_K"] = split
    expected = ternary_3of4_linear_reference(
        x.double(), q.packed, q.scales.double(), q.group_size, None if b is None else b.double()
    )
    for _ in range(2):  # the split-K workspace must be left at zero for the next call
        out = ternary_3of4_linear_triton(x, q.packed, q.scales, q.group_size, b, config=config)
        assert out.dtype == dtype and out.shape == (1, n)
        assert relative_error(out, expected) < BOUND[dtype]


def test_dequantize_kernels_and_split_k_choice():
    torch.manual_seed(0)
    q2 = quantize_int2_rtn(torch.randn(40, 256), 64)
    assert torch.equal(dequantize_int2_triton(q2.packed, q2.scales, q2.zeros, 64, torch.float32), q2.dequantize())
    qt = quantize_ternary_3of4(torch.randn(40, 256), 128)
    assert torch.equal(dequantize_ternary_3of4_triton(qt.packed, qt.scales, 128, 256, torch.float32), qt.dequantize())
    assert split_k_for(4096, 14336, 16, 512) == 1  # 256 programs already
    assert split_k_for(1024, 4096, 64, 128) == 8


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the INT2 and ternary GEMV and small-M GEMM in bf16 for an H100 (no interpreter)."""

    def pointers_only(name: str, type_: str) -> bool:
        return type_.startswith("*")

    def compile_ptx(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int) -> str:
        return compile_sm90_ptx(fn, types, constexprs, num_warps, num_stages, aligned=pointers_only)

    ptrs = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*u8", "lut_ptr": "*u8"}
    ptrs |= {"bias_ptr": "*bf16", "out_ptr": "*bf16"}
    gemv = {"HAS_BIAS": True, "GROUP": 128, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 1, "STAGES": 3}
    gemm = {"HAS_BIAS": True, "GROUP": 128, "DOT_PRECISION": "tf32", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}
    gemm["SPLIT_K"] = 1
    workspace = {"partial_ptr": "*fp32", "arrived_ptr": "*i32"}
    return {
        "int2_gemv": compile_ptx(
            int2_gemm._gemv_kernel, {**ptrs, **workspace, "w_ptr": "*i32"}, {**gemv, "HAS_ZEROS": True}, 4, 3
        ),
        "int2_gemm": compile_ptx(int2_gemm._gemm_kernel, ptrs, {**gemm, "HAS_ZEROS": True}, 4, 4),
        "ternary_gemv": compile_ptx(
            ternary_gemm._gemv_kernel,
            {**ptrs, **workspace, "w_ptr": "*i32", "t_ptr": "*fp32"},
            {**gemv, "BLOCK_N": 256, "BLOCK_K": 128, "SPLIT_K": 8},
            1,
            3,
        ),
        "ternary_gemm": compile_ptx(ternary_gemm._gemm_kernel, ptrs, gemm, 4, 4),
    }


def test_sm90_code_compiles_with_tensor_cores_for_the_gemm():
    ptx = ptx_from_fresh_process(__name__)
    for name in ("int2_gemm", "ternary_gemm"):
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx[name], name
    for name in ("int2_gemv",):
        # 16 × 512 weights over 128 threads: 64 FMAs a thread per tile; int->float conversions only
        # per group (zero points), none per weight.
        fma = ptx[name].count("fma.rn.f32")
        assert fma >= 64 and ptx[name].count("cvt.rn.f32.u") * 16 <= fma, name
    # The INT2 GEMV multiplies subnormal weights: flush-to-zero would zero them.
    assert ".ftz" not in ptx["int2_gemv"]
    # Ternary LUT-GEMV: one warp shuffle per block of 4 weights (8 rows × 32 codes a lane per tile).
    assert ptx["ternary_gemv"].count("shfl.sync.idx") >= 256


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 300])
def test_bf16_on_the_gpu(m):
    # bf16 tl.dot is wrong under the interpreter: this checks the real kernels, all three paths.
    torch.manual_seed(0)
    n, k = 512, 1024
    q2 = quantize_int2_rtn(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 64)
    qt = quantize_ternary_3of4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 128)
    x, b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = int2_weight_only_linear_triton(x, q2.packed, q2.scales, q2.zeros, 64, b)
    ref = int2_weight_only_linear_reference(x.double(), q2.packed, q2.scales.double(), q2.zeros, 64, b.double())
    assert relative_error(out, ref) < 1e-2
    out = ternary_3of4_linear_triton(x, qt.packed, qt.scales, 128, b)
    ref = ternary_3of4_linear_reference(x.double(), qt.packed, qt.scales.double(), 128, b.double())
    assert relative_error(out, ref) < 1e-2
