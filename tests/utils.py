"""Helpers shared by tests."""

import torch


def dynamic_batch_seq() -> dict:
    return {"input_ids": {0: torch.export.Dim("batch", min=1, max=16), 1: torch.export.Dim("seq", min=2, max=256)}}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
