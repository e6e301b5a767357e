"""Shared by the GEMM kernel modules: the launchers' operand layout and the program-to-tile order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rows_and_contiguous(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """x [..., K] as contiguous rows [M, K], then each of `tensors` contiguous (None stays None)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return x2, *(None if t is None else t.contiguous() for t in tensors)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles share each
    column tile of W while it is in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * num_pid_n) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_rows), (pid % (GROUP_M * num_pid_n)) // group_rows
