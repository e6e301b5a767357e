"""The INT4 group-wise format (ops/int4.py): packing, RTN, and the two ops' references."""

import pytest
import torch

from angel_compile.ops.int4 import (
    FP8_E4M3_MAX,
    dequantize_int4,
    int4_supported,
    int4_weight_only_linear_reference,
    pack_int4,
    quantize_fp8_rows,
    quantize_int4_rtn,
    unpack_int4,
    w4a8_linear_reference,
)
from tests.utils import relative_error

INT4 = torch.ops.angel.int4_weight_only_linear
W4A8 = torch.ops.angel.w4a8_linear


@pytest.mark.parametrize("shape", [(1, 2), (3, 6), (7, 34), (2, 5, 130)])
def test_pack_unpack_round_trip_is_exact(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_packing_is_low_nibble_even_k():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F]]
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_error_is_at_most_half_a_step(symmetric, group_size, dtype):
    w = (torch.randn(12, 256) * torch.rand(12, 1) * 3).to(dtype)
    w[0, :group_size] = 0  # an all-zero group
    w[1, :group_size] = w[1, :group_size].abs()  # a group of one sign
    q = quantize_int4_rtn(w, group_size, symmetric)
    assert q.scales.dtype == dtype and q.scales.shape == (12, 256 // group_size)
    assert (q.zeros is None) == symmetric and q.shape == (12, 256)
    error = (q.dequantize() - w.float()).abs().unflatten(-1, (-1, group_size))  # [N, G, g]
    assert (error <= q.scales.float()[..., None] * (0.5 + 1e-6)).all()
    assert torch.equal(q.dequantize()[0, :group_size], torch.zeros(group_size))
    if not symmetric:
        assert int(q.zeros.max()) <= 15


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_raises_a_groups_error_and_clips_an_outlier(symmetric):
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    w[2, 7] = 9.0  # stretches its group's min/max range
    plain = quantize_int4_rtn(w, 64, symmetric)
    clipped = quantize_int4_rtn(w, 64, symmetric, clip_search=True)

    def group_errors(q):
        return (q.dequantize() - w).pow(2).unflatten(-1, (-1, 64)).sum(-1)  # [N, G]

    # α = 1 (min/max) is the grid's first candidate: no group gets worse.
    assert (group_errors(clipped) <= group_errors(plain) * (1 + 1e-6)).all()
    if not symmetric:  # the outlier's group: a shrunk range wins (symmetric: within 1% here)
        assert group_errors(clipped)[2, 0] < 0.9 * group_errors(plain)[2, 0]
        assert clipped.scales[2, 0] < plain.scales[2, 0]


def test_symmetric_codes_are_offset_binary():
    w = torch.tensor([[-7.5, -1.0, 0.0, 7.5] * 8])  # one group of 32: s = amax / 7.5 = 1
    q = quantize_int4_rtn(w, 32, symmetric=True)
    assert q.scales.item() == 1.0
    # clamp(round(w / s) + 8, 0, 15); round(-7.5) = -8 (half to even), 7.5 + 8 clamps to 15
    assert q.codes()[0, :4].tolist() == [0, 7, 8, 15]


def test_unsupported_shapes_say_why():
    assert int4_supported(4096, 128) is None
    assert "not divisible" in int4_supported(4100, 128)
    assert "group size" in int4_supported(4096, 100)
    with pytest.raises(ValueError, match="not divisible"):
        quantize_int4_rtn(torch.randn(4, 96), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric, bias", [(True, False), (False, True)])
def test_op_equals_linear_with_the_dequantized_weight(dtype, symmetric, bias):
    q = quantize_int4_rtn(torch.randn(24, 128), 64, symmetric)
    x = torch.randn(2, 5, 128, dtype=dtype)
    b = torch.randn(24, dtype=dtype) if bias else None
    expected = torch.nn.functional.linear(x.double(), q.dequantize(torch.float64), None if b is None else b.double())
    out = INT4(x, q.packed, q.scales, q.zeros, 64, b)
    assert out.dtype == dtype and out.shape == (2, 5, 24)
    assert relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(out, int4_weight_only_linear_reference(x, q.packed, q.scales, q.zeros, 64, b))


def test_fp8_rows_per_token_and_static():
    x = torch.randn(4, 64) * torch.tensor([[1.0], [10.0], [0.01], [0.0]])
    xq, scale = quantize_fp8_rows(x, None)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert torch.allclose(xq.float().abs().amax(-1)[:3], torch.full((3,), FP8_E4M3_MAX))
    assert relative_error(xq.float() * scale, x) < 0.05  # E4M3: 3 mantissa bits
    assert torch.equal(xq[3].float(), torch.zeros(64))
    xq, scale = quantize_fp8_rows(x, torch.tensor(0.01))  # row 1 saturates at ±448 · 0.01
    assert (scale == 0.01).all() and xq.float().abs().max() == FP8_E4M3_MAX


@pytest.mark.parametrize("static", [False, True])
def test_w4a8_is_close_to_the_int4_op(static):
    q = quantize_int4_rtn(torch.randn(32, 256), 128)
    x, b = torch.randn(3, 256), torch.randn(32)
    input_scale = x.abs().amax() / FP8_E4M3_MAX if static else None
    out = W4A8(x, q.packed, q.scales, q.zeros, 128, input_scale, b)
    assert torch.equal(out, w4a8_linear_reference(x, q.packed, q.scales, q.zeros, 128, input_scale, b))
    assert relative_error(out, INT4(x, q.packed, q.scales, q.zeros, 128, b)) < 0.06  # FP8 x


def test_ops_pass_torch_library_checks():
    q = quantize_int4_rtn(torch.randn(16, 64), 32)
    s = quantize_int4_rtn(torch.randn(16, 64), 32, symmetric=True)
    x, b = torch.randn(3, 64), torch.randn(16)
    for zeros, scales in ((q.zeros, q.scales), (None, s.scales)):
        torch.library.opcheck(INT4, (x, q.packed, scales, zeros, 32, b))
        torch.library.opcheck(INT4, (x, q.packed, scales, zeros, 32, None))
        torch.library.opcheck(W4A8, (x, q.packed, scales, zeros, 32, None, b))
        torch.library.opcheck(W4A8, (x, q.packed, scales, zeros, 32, torch.tensor(0.02), None))


def test_fake_impl_rejects_bad_formats():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, scales = torch.empty(2, 64), torch.empty(4, 2)
        with pytest.raises(RuntimeError, match="packed must be uint8"):
            INT4(x, torch.empty(4, 32), scales, None, 32, None)
        with pytest.raises(RuntimeError, match="scales must be"):
            INT4(x, torch.empty(4, 32, dtype=torch.uint8), torch.empty(4, 4), None, 32, None)
        with pytest.raises(RuntimeError, match="not divisible"):
            INT4(torch.empty(2, 96), torch.empty(4, 48, dtype=torch.uint8), scales, None, 64, None)


def test_dequantize_matches_the_documented_formula():
    q = quantize_int4_rtn(torch.randn(4, 64), 32)
    codes = unpack_int4(q.packed).float()
    zero = q.zeros.float().repeat_interleave(32, dim=1)
    scale = q.scales.float().repeat_interleave(32, dim=1)
    assert torch.equal(dequantize_int4(q.packed, q.scales, q.zeros, 32), (codes - zero) * scale)
