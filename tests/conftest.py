import os

import pytest
import torch

# Without a GPU, Triton runs only as its interpreter, which it reads when imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from angel_compile.models import build_toy_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class TwoLinears(torch.nn.Module):
    """x -> up (with bias) -> relu -> down (no bias), plus a linear whose weight is computed."""

    def __init__(self, k: int = 32, n: int = 48) -> None:
        super().__init__()
        self.up = torch.nn.Linear(k, n)
        self.down = torch.nn.Linear(n, k, bias=False)
        self.gate = torch.nn.Parameter(torch.randn(k, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.down(torch.relu(self.up(x)))
        # The weight here is computed in the graph: the pass must leave this linear alone.
        return torch.nn.functional.linear(hidden, self.gate * 0.5)


@pytest.fixture
def two_linears() -> TwoLinears:
    torch.manual_seed(0)
    return TwoLinears().eval()


@pytest.fixture(scope="session")
def toy_llama() -> torch.nn.Module:
    return build_toy_model("llama")
