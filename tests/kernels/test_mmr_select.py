"""The lazy greedy MMR (Triton kernels + GEMMs) vs the reference: in the Triton interpreter on CPU,
compiled for sm_90, and on a GPU. The picks must be identical, in pick order (on the GPU up to a
float tie of two MMR scores at the first difference: `assert_same_or_float_tie`)."""

import pytest
import torch
import torch.nn.functional as F

from angel_compile.kernels.mmr_select import mmr_select_rounds, mmr_select_triton
from angel_compile.ops.prune_tokens import mmr_select_reference
from tests.utils import compile_sm90_ptx, ptx_from_fresh_process

SMALL = {"CANDIDATES": 16, "BLOCK_N": 32, "num_warps": 4}  # fewer candidates than picks, masked N tiles


def exact_features(batch: int, groups: int, copies: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors of ±1/√dim (dim a power of 4): every dot product is exact in fp32, in any order.

    Each of `groups` random sign patterns appears `copies` times (exact duplicates), and every
    third token has a few signs flipped (near duplicates); tokens are shuffled per row.
    """
    signs = torch.randint(0, 2, (batch, groups, dim), generator=generator) * 2.0 - 1.0
    x = signs.repeat_interleave(copies, dim=1)
    flips = torch.rand(x.shape, generator=generator) < 0.1
    x[:, ::3] = torch.where(flips[:, ::3], -x[:, ::3], x[:, ::3])
    order = torch.stack([torch.randperm(x.shape[1], generator=generator) for _ in range(batch)])
    return x.gather(1, order.unsqueeze(-1).expand_as(x)) / dim**0.5


@pytest.mark.parametrize("lambda_", [0.5, 0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep", [1, 8, 40, 90])
def test_kernel_picks_what_the_reference_picks(lambda_, dtype, keep):
    torch.manual_seed(0)
    x = F.normalize(torch.randn(2, 90, 40), dim=-1).to(dtype)  # N = 90: masked tiles; rows differ
    importance = torch.randn(2, 90)
    out = mmr_select_triton(x, importance, keep, lambda_, config=SMALL)
    assert torch.equal(out, mmr_select_reference(x.float(), importance, keep, lambda_))


@pytest.mark.parametrize("lambda_", [0.5, 0.0, 1.0, 0.3])
@pytest.mark.parametrize("keep, candidates", [(40, 4), (96, 16), (30, 128)])
def test_ties_between_duplicates_go_to_the_lower_index(lambda_, keep, candidates):
    generator = torch.Generator().manual_seed(keep)
    x = exact_features(2, 24, 4, 64, generator)  # [2, 96, 64]
    importance = torch.randint(-4, 5, (2, 96), generator=generator) / 4.0  # many equal importances
    out = mmr_select_triton(x, importance, keep, lambda_, config={**SMALL, "CANDIDATES": candidates})
    assert torch.equal(out, mmr_select_reference(x, importance, keep, lambda_))


def test_clustered_tokens_need_several_rounds():
    torch.manual_seed(1)
    centres = torch.randn(2, 16, 64).repeat_interleave(16, dim=1)  # 256 tokens in clusters of 16
    x = F.normalize(centres + 0.5 * torch.randn_like(centres), dim=-1)
    importance = F.cosine_similarity(x, torch.randn(2, 1, 64), dim=-1)
    out, rounds = mmr_select_rounds(x, importance, 64, 0.5, config=SMALL)
    assert torch.equal(out, mmr_select_reference(x, importance, 64, 0.5))
    assert rounds >= 4  # 63 picks after the first, at most 16 a round


def test_limits_are_checked():
    x = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="keep=9"):
        mmr_select_triton(x, torch.randn(1, 8), 9, 0.5)
    with pytest.raises(ValueError, match="16384"):
        mmr_select_triton(torch.randn(1, 16385, 1), torch.randn(1, 16385), 4, 0.5)


def ptx_for_sm90() -> dict[str, str]:
    """PTX of both kernels for an H100 (needs Triton outside interpreter mode)."""
    from angel_compile.kernels import mmr_select

    types = {
        "sims_ptr": "*fp32",
        "top_ptr": "*i64",
        "cand_ptr": "*i64",
        "imp_ptr": "*fp32",
        "max_sim_ptr": "*fp32",
        "picked_ptr": "*i8",
        "accepted_ptr": "*i8",
        "out_ptr": "*i64",
        "done_ptr": "*i32",
        "keys_ptr": "*i64",
        "lam": "fp32",
        "rest": "fp32",
    }
    kernels = {
        "greedy": (mmr_select._candidate_greedy_kernel, {"HAS_THRESHOLD": True, "BLOCK_C": 128}, 1),
        "update": (mmr_select._update_kernel, {"BLOCK_N": 64, "BLOCK_C": 128}, 4),
    }
    return {
        name: compile_sm90_ptx(fn, types, constexprs, warps, 3, aligned=lambda *_: False, enable_fp_fusion=False)
        for name, (fn, constexprs, warps) in kernels.items()
    }


def test_sm90_code_generation():
    ptx = ptx_from_fresh_process(__name__)
    for code in ptx.values():
        # The scores are rounded as the reference rounds them: no fused multiply-add.
        assert ".target sm_90" in code and "fma.rn.f32" not in code


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count, keep", [(2048, 512), (8192, 2048), (16384, 1024)])
def test_on_gpu_matches_reference(dtype, count, keep):
    torch.manual_seed(0)
    x = F.normalize(torch.randn(2, count, 3584, device="cuda"), dim=-1).to(dtype)
    importance = torch.randn(2, count, device="cuda")
    out = mmr_select_triton(x, importance, keep, 0.5)
    for row, expected in enumerate(mmr_select_reference(x.float(), importance, keep, 0.5)):
        assert_same_or_float_tie(x[row].double(), importance[row].double(), 0.5, out[row], expected)


def assert_same_or_float_tie(x, importance, lambda_, picks, expected, tolerance=1e-5):
    """Equal picks, or at the first difference two MMR scores (float64, same earlier picks) within `tolerance`.

    The GPU's fp32 GEMMs sum in another order than the reference's, so two scores 1e-7 apart
    can come out in either order; after such a tie the sequences legitimately diverge.
    """
    differ = (picks != expected).nonzero()
    if len(differ) == 0:
        return
    step = int(differ[0])
    assert step > 0, "the first pick is argmax importance: no float tie possible"
    max_sim = (x @ x[picks[:step]].T).max(dim=1).values
    score = lambda_ * importance - (1 - lambda_) * max_sim
    gap = abs(score[picks[step]] - score[expected[step]]).item()
    assert gap <= tolerance, f"pick {step} differs: {picks[step]} vs {expected[step]}, MMR score gap {gap:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("lambda_", [0.5, 0.0, 1.0])
def test_ties_on_gpu(lambda_):
    generator = torch.Generator().manual_seed(0)
    x = exact_features(2, 256, 8, 256, generator).cuda()  # [2, 2048, 256]
    importance = (torch.randint(-4, 5, (2, 2048), generator=generator) / 4.0).cuda()
    out = mmr_select_triton(x, importance, 512, lambda_)
    assert torch.equal(out, mmr_select_reference(x, importance, 512, lambda_))
