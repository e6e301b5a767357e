"""INT2 and ternary formats (ops/int2.py, ops/ternary.py): packing round trips, quantizer quality, ops."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from angel_compile.ops.int2 import pack_int2, quantize_int2_gptq, quantize_int2_rtn, unpack_int2
from angel_compile.ops.ternary import (
    TERNARY_CODE_TABLE,
    TERNARY_CODE_TO_2BIT,
    encode_blocks,
    pack_ternary_3of4,
    packed_width,
    quantize_ternary_2bit,
    quantize_ternary_3of4,
    ternary_supported,
    unpack_ternary_3of4,
)
from tests.utils import relative_error


def _random_3of4(rows: int, blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.where(torch.rand(rows, blocks, 4, generator=g) < 0.5, -1, 1).to(torch.int8)
    zero_at = torch.randint(0, 4, (rows, blocks, 1), generator=g)
    return t.scatter(-1, zero_at, 0).flatten(-2)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), blocks=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_ternary_3of4_pack_unpack_round_trips(rows, blocks, seed):
    t = _random_3of4(rows, blocks, seed)
    packed = pack_ternary_3of4(t)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_width(4 * blocks))
    assert torch.equal(unpack_ternary_3of4(packed, 4 * blocks), t)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), quads=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_int2_pack_unpack_round_trips(rows, quads, seed):
    codes = torch.randint(0, 4, (rows, 4 * quads), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert torch.equal(unpack_int2(pack_int2(codes)), codes)


def test_ternary_bits_are_as_documented():
    # (+1, 0, −1, −1): z = 1, signs (+, −, −) -> s = 0b110, code 14; a chunk of 8 such blocks is
    # V = Σ 14 << 5i, stored little-endian in 5 bytes.
    assert encode_blocks(torch.tensor([[1, 0, -1, -1]])).item() == 14
    packed = pack_ternary_3of4(torch.tensor([[1, 0, -1, -1] * 8]))
    value = sum(14 << (5 * i) for i in range(8))
    assert packed[0].tolist() == [(value >> (8 * j)) & 0xFF for j in range(5)]
    # 32 distinct blocks, each with one zero; the lookup byte holds t + 1 in 2-bit fields.
    assert len({tuple(row.tolist()) for row in TERNARY_CODE_TABLE}) == 32
    assert ((TERNARY_CODE_TABLE == 0).sum(-1) == 1).all()
    fields = torch.stack([(TERNARY_CODE_TO_2BIT >> (2 * p)) & 3 for p in range(4)], -1).to(torch.int8) - 1
    assert torch.equal(fields, TERNARY_CODE_TABLE)


def test_a_block_without_exactly_one_zero_is_refused():
    with pytest.raises(ValueError, match="exactly one zero"):
        pack_ternary_3of4(torch.tensor([[1, 1, -1, 1]]))


def test_ternary_quantizer_is_3of4_and_beats_naive_choices():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = quantize_ternary_3of4(w, 128)
    t = unpack_ternary_3of4(q.packed, 256).reshape(64, 64, 4)
    assert ((t == 0).sum(-1) == 1).all()
    error = relative_error(q.dequantize(), w)
    # Naive: zero the first weight of every block, scale = mean |w|.
    naive_t = torch.sign(w).reshape(64, 64, 4).clone()
    naive_t[..., 0] = 0
    naive = naive_t.reshape(64, 256) * w.abs().mean()
    assert error < 0.9 * relative_error(naive, w)
    assert q.nbytes() == 64 * 256 * 5 // 32 + q.scales.numel() * 4


def test_activation_weighting_lowers_the_weighted_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    h = torch.ones(128)
    h[:16] = 100.0  # a few input channels carry most of the activation energy

    def weighted_error(q) -> float:
        return float((h * (q.dequantize() - w).square()).sum())

    plain, weighted = quantize_ternary_3of4(w, 128), quantize_ternary_3of4(w, 128, importance=h)
    assert weighted_error(weighted) < 0.97 * weighted_error(plain)  # 6% lower with this seed


def test_plain_ternary_and_int2_clip_search():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    q = quantize_ternary_2bit(w, 128)
    assert q.zeros is None and set(unpack_int2(q.packed).unique().tolist()) <= {1, 2, 3}
    assert relative_error(q.dequantize(), w) < 0.6
    clipped, plain = quantize_int2_rtn(w, 64), quantize_int2_rtn(w, 64, clip_search=False)
    assert relative_error(clipped.dequantize(), w) < 0.9 * relative_error(plain.dequantize(), w)


@pytest.mark.parametrize("clip_search", [True, False])
def test_int2_gptq_with_a_diagonal_hessian_is_rtn_with_the_same_range_search(clip_search):
    # A diagonal H gives GPTQ no cross-column error feedback: each group's range comes from the
    # unchanged weights, so GPTQ must reproduce RTN, clipped search included.
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    w[3, 5] = 12.0  # an outlier the clipped range gives up
    gptq = quantize_int2_gptq(w, torch.eye(128), 64, act_order=True, clip_search=clip_search)
    rtn = quantize_int2_rtn(w, 64, clip_search=clip_search)
    assert torch.equal(gptq.packed, rtn.packed)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)


def test_unsupported_shapes_say_why():
    assert ternary_supported(30, 128) == "K = 30 is not divisible by 4 (the 3:4 block)"
    assert ternary_supported(96, 128) == "K = 96 is not divisible by the group size 128"
    assert ternary_supported(36, None) is None  # per channel; padded inside the last chunk
    with pytest.raises(ValueError, match="not divisible by 4"):
        quantize_ternary_3of4(torch.randn(4, 30), None)


@pytest.mark.parametrize("k, group", [(36, None), (256, 64)])
def test_ternary_op_matches_dequantized_linear(k, group):
    torch.manual_seed(0)
    w, x, b = torch.randn(8, k), torch.randn(3, k), torch.randn(8)
    q = quantize_ternary_3of4(w, group)
    out = torch.ops.angel.ternary_3of4_linear(x, q.packed, q.scales, q.group_size, b)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, q.dequantize(), b))
    q2 = quantize_int2_rtn(torch.randn(8, 256), 64)
    out = torch.ops.angel.int2_weight_only_linear(x[:, :1].expand(3, 256), q2.packed, q2.scales, q2.zeros, 64, b)
    torch.testing.assert_close(out, torch.nn.functional.linear(x[:, :1].expand(3, 256), q2.dequantize(), b))


def test_int2_op_checks_its_format_when_traced():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = quantize_int2_rtn(torch.randn(8, 256), 64)
        x = torch.randn(2, 256)
        with pytest.raises(RuntimeError, match="zeros must be uint8"):
            torch.ops.angel.int2_weight_only_linear(x, q.packed, q.scales, q.zeros.float(), 64, None)
        with pytest.raises(RuntimeError, match="4 × packed"):
            torch.ops.angel.int2_weight_only_linear(torch.randn(2, 128), q.packed, q.scales, q.zeros, 64, None)
