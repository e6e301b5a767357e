"""The K-major INT4 layout (ops/int4_kmajor.py): bit-exact round trips and the op's checks."""

import pytest
import torch

from angel_compile.ops.int4 import dequantize_int4, quantize_int4_rtn, unpack_int4
from angel_compile.ops.int4_kmajor import (
    dequantize_int4_kmajor,
    pack_int4_kmajor,
    to_kmajor,
    unpack_int4_kmajor,
)


def test_pack_unpack_round_trip_with_the_sign_bit_set():
    codes = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    codes[0, 7] = 15  # nibble 7 of the first word: bit 31, a negative int32
    words = pack_int4_kmajor(codes)
    assert words.dtype == torch.int32 and words.shape == (8, 24) and words[0, 0] < 0
    assert torch.equal(unpack_int4_kmajor(words), codes)
    # nibble i of words[r, n] is codes[n, 8r + i]
    assert int(words[1, 2]) & 0xF == codes[2, 8] and (int(words[1, 2]) >> 4) & 0xF == codes[2, 9]


@pytest.mark.parametrize("symmetric", [False, True])
def test_to_kmajor_keeps_the_weight_exactly(symmetric):
    q = quantize_int4_rtn(torch.randn(40, 256), 64, symmetric)
    words, scales, zeros = to_kmajor(q.packed, q.scales, q.zeros)
    assert scales.shape == (4, 40) and (zeros is None) == symmetric
    assert torch.equal(unpack_int4_kmajor(words), unpack_int4(q.packed))
    expected = dequantize_int4(q.packed, q.scales, q.zeros, 64)
    assert torch.equal(dequantize_int4_kmajor(words, scales, zeros, 64), expected)


def test_op_rejects_a_mismatched_layout():
    q = quantize_int4_rtn(torch.randn(40, 256), 64)
    words, scales, zeros = to_kmajor(q.packed, q.scales, q.zeros)
    x = torch.randn(2, 256)
    y = torch.ops.angel.int4_kmajor_linear(x, words, scales, zeros, 64)
    assert y.shape == (2, 40)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match="scales must be"):
            torch.ops.angel.int4_kmajor_linear(x, words, scales.t(), zeros, 64)
        with pytest.raises(RuntimeError, match="words must be int32"):
            torch.ops.angel.int4_kmajor_linear(x, words.to(torch.int64), scales, zeros, 64)
