"""The streaming probe of bench_lowbit --ceiling (interpreter on CPU) against its PyTorch sum."""

import pytest
import torch

from benchmarks.stream_probe import BLOCK_N, ROWS, probe_buffer, stream_sum_reference, stream_sum_triton


def test_probe_sums_every_tile():
    torch.manual_seed(0)
    words = probe_buffer(3 * ROWS * 2 * BLOCK_N * 4 - 100, 2 * BLOCK_N, "cpu")  # rounds up to 3 row tiles
    assert words.shape == (3 * ROWS, 2 * BLOCK_N)
    assert torch.equal(stream_sum_triton(words), stream_sum_reference(words))


def test_probe_rejects_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match=f"divisible by {BLOCK_N}"):
        probe_buffer(1024, BLOCK_N + 1, "cpu")
    with pytest.raises(ValueError, match=f"R % {ROWS} == 0"):
        stream_sum_triton(torch.zeros(ROWS + 1, BLOCK_N, dtype=torch.int32))
