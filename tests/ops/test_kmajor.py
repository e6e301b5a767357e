"""The K-major INT4 / INT2 layout (ops/kmajor.py): bit-exact round trips and the ops' checks."""

import pytest
import torch

from angel_compile.ops.int2 import dequantize_int2, quantize_int2_rtn, unpack_int2
from angel_compile.ops.int4 import dequantize_int4, quantize_int4_rtn, unpack_int4
from angel_compile.ops.kmajor import dequantize_kmajor, pack_kmajor, to_kmajor, unpack_kmajor

ROW_MAJOR = {4: (quantize_int4_rtn, unpack_int4, dequantize_int4), 2: (quantize_int2_rtn, unpack_int2, dequantize_int2)}


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_round_trip_with_the_sign_bit_set(bits):
    fields = 32 // bits
    codes = torch.randint(0, 1 << bits, (24, 4 * fields), dtype=torch.uint8)
    codes[0, fields - 1] = (1 << bits) - 1  # the last field of the first word: bit 31, a negative int32
    words = pack_kmajor(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (4, 24) and words[0, 0] < 0
    assert torch.equal(unpack_kmajor(words, bits), codes)
    # field f of words[r, n] is codes[n, F·r + f]
    mask = (1 << bits) - 1
    assert int(words[1, 2]) & mask == codes[2, fields] and (int(words[1, 2]) >> bits) & mask == codes[2, fields + 1]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_to_kmajor_keeps_the_weight_exactly(bits, symmetric):
    quantize, unpack, dequantize = ROW_MAJOR[bits]
    q = quantize(torch.randn(40, 256), 64, symmetric)
    words, scales, zeros = to_kmajor(q.packed, q.scales, q.zeros, bits)
    assert scales.shape == (4, 40) and (zeros is None) == symmetric
    assert torch.equal(unpack_kmajor(words, bits), unpack(q.packed))
    expected = dequantize(q.packed, q.scales, q.zeros, 64)
    assert torch.equal(dequantize_kmajor(words, scales, zeros, bits, 64), expected)


def test_ops_reject_a_mismatched_layout():
    q = quantize_int4_rtn(torch.randn(40, 256), 64)
    words, scales, zeros = to_kmajor(q.packed, q.scales, q.zeros, 4)
    x = torch.randn(2, 256)
    assert torch.ops.angel.int4_kmajor_linear(x, words, scales, zeros, 64).shape == (2, 40)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match="scales must be"):
            torch.ops.angel.int4_kmajor_linear(x, words, scales.t(), zeros, 64)
        with pytest.raises(RuntimeError, match="words must be int32"):
            torch.ops.angel.int4_kmajor_linear(x, words.to(torch.int64), scales, zeros, 64)
        with pytest.raises(RuntimeError, match="must be 16 × words"):  # INT4 words read as INT2
            torch.ops.angel.int2_kmajor_linear(x, words, scales, zeros, 64)
    with pytest.raises(ValueError, match="holds \\[4, 2\\]-bit codes, not 3-bit"):
        pack_kmajor(torch.zeros(4, 32, dtype=torch.uint8), 3)
