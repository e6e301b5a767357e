"""The lazy greedy MMR (Triton kernels + GEMMs) vs the reference: in the Triton interpreter on CPU,
compiled for sm_90, and on a GPU. The picks must be identical, in pick order (on the GPU up to a
float tie of two MMR scores at the first difference: `assert_same_or_float_tie`)."""

import pytest
import torch
import torch.nn.functional as F
import triton

from angel_compile.kernels.mmr_select import mmr_select_rounds, mmr_select_triton, unit_features_triton
from angel_compile.ops.prune_tokens import mmr_select_reference, prune_tokens_forward, unit_features_reference
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


@pytest.mark.parametrize("count, cands, closed", [(37, 8, 0), (300, 64, 100), (300, 64, 280), (128, 128, 3)])
def test_top_keys_kernel_takes_the_largest_keys(count, cands, closed):
    """The C largest keys of each row in no order, with their tokens; CLOSED keys fill up when fewer are open."""
    from angel_compile.kernels.mmr_select import _top_keys_kernel

    generator = torch.Generator().manual_seed(count + closed)
    # keys as the update kernel writes them: score bits (here with many ties) over N - 1 - token
    scores = torch.randint(-40, 40, (2, count), generator=generator) * 2**25
    keys = (scores << 32) | ((count - 1 - torch.arange(count)) << 16)
    keys[:, torch.randperm(count, generator=generator)[:closed]] = -(2**63)  # CLOSED: picked tokens
    top = torch.empty(2, cands, dtype=torch.int64)
    tokens = torch.empty_like(top)
    strides = (keys.stride(0), top.stride(0), tokens.stride(0))
    _top_keys_kernel[(2,)](keys, top, tokens, count, cands, *strides, BLOCK_N=triton.next_power_of_2(count))
    assert torch.equal(top.sort(dim=1).values, keys.topk(cands, dim=1).values.sort(dim=1).values)
    assert torch.equal(keys.gather(1, tokens), top)
    assert all(len(set(row.tolist())) == cands for row in tokens)  # distinct tokens, also among CLOSED ones


def ptx_for_sm90() -> dict[str, str]:
    """PTX of the kernels for an H100 (needs Triton outside interpreter mode)."""
    from angel_compile.kernels import mmr_select

    types = {
        "sims_ptr": "*fp32",
        "cand_sims_ptr": "*fp32",
        "x_ptr": "*bf16",
        "context_ptr": "*fp32",
        "unit_ptr": "*bf16",
        "top_ptr": "*i64",
        "cand_ptr": "*i64",
        "imp_ptr": "*fp32",
        "max_sim_ptr": "*fp32",
        "picked_ptr": "*i8",
        "accepted_ptr": "*i8",
        "out_ptr": "*i64",
        "done_ptr": "*i32",
        "keys_ptr": "*i64",
        "tokens_ptr": "*i64",
        "lam": "fp32",
        "rest": "fp32",
    }
    kernels = {
        "greedy": (mmr_select._candidate_greedy_kernel, {"HAS_THRESHOLD": True, "BLOCK_C": 128}, 1),
        "candidate sims": (mmr_select._candidate_sims_kernel, {"BLOCK_R": 16, "BLOCK_C": 128}, 4),
        "unit rows": (mmr_select._unit_rows_kernel, {"BLOCK_D": 1024}, 4),
        "update": (mmr_select._update_kernel, {"BLOCK_N": 64, "BLOCK_C": 128}, 4),
        "top keys": (mmr_select._top_keys_kernel, {"BLOCK_N": 8192}, 8),
    }
    return {
        name: compile_sm90_ptx(fn, types, constexprs, warps, 3, aligned=lambda *_: False, enable_fp_fusion=False)
        for name, (fn, constexprs, warps) in kernels.items()
    }


def test_sm90_code_generation():
    ptx = ptx_from_fresh_process(__name__)
    assert all(".target sm_90" in code for code in ptx.values())
    for name in ("greedy", "update"):
        # The scores are rounded as the reference rounds them: no fused multiply-add.
        assert "fma.rn.f32" not in ptx[name]
    # F.normalize's rounding: IEEE square root and division.
    assert "sqrt.rn.f32" in ptx["unit rows"] and "div.rn.f32" in ptx["unit rows"]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_features_kernel_matches_the_reference(dtype):
    torch.manual_seed(0)
    features = (3 * torch.randn(2, 7, 1100)).to(dtype)  # D: two row tiles, the second masked
    features[0, 3] = 0  # a zero row: divided by the 1e-12 floor, as F.normalize does
    context = torch.randn(2, 1100)
    unit, importance = unit_features_triton(features, context)
    unit_ref, importance_ref = unit_features_reference(features, context)
    assert unit.dtype == dtype
    # Only the norm's summation order differs: unit rows within an ulp of the dtype.
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(unit.float(), unit_ref.float(), rtol=ulp, atol=0)
    torch.testing.assert_close(importance, importance_ref, rtol=1e-5, atol=1e-6)


def test_the_triton_steps_prune_as_the_reference_steps():
    """prune_tokens_forward with both Triton steps (the CUDA fallback path) vs the reference steps."""
    torch.manual_seed(3)
    centres = torch.randn(2, 12, 48).repeat_interleave(8, dim=1)
    embeds = torch.cat([torch.randn(2, 5, 48), centres + 0.3 * torch.randn_like(centres)], dim=1)  # 5 text + 96
    mask = torch.zeros(2, 101, dtype=torch.bool)
    mask[:, 5:] = True
    args = (embeds, mask, 96, 30, "mmr", 0.5, 1.0, 0)
    triton_select = lambda *a: mmr_select_triton(*a, config=SMALL)  # noqa: E731
    pruned, positions = prune_tokens_forward(*args, triton_select, unit_features_triton)
    expected, expected_positions = prune_tokens_forward(*args)
    assert torch.equal(positions, expected_positions) and torch.equal(pruned, expected)


def test_fewer_than_two_candidates_are_rejected():
    with pytest.raises(ValueError, match="CANDIDATES=1"):
        mmr_select_triton(torch.randn(1, 8, 4), torch.randn(1, 8), 4, 0.5, config={"CANDIDATES": 1})


@pytest.mark.gpu
def test_graph_replays_serve_new_inputs_of_a_cached_shape():
    """The second call of a shape replays the first call's round graph on new features."""
    for seed in (1, 2):
        torch.manual_seed(seed)
        x = F.normalize(torch.randn(2, 1024, 256, device="cuda"), dim=-1).to(torch.bfloat16)
        importance = torch.randn(2, 1024, device="cuda")
        graphed = mmr_select_triton(x, importance, 300, 0.5, {"CANDIDATES": 64})
        eager = mmr_select_triton(x, importance, 300, 0.5, {"CANDIDATES": 64, "cuda_graph": False})
        assert torch.equal(graphed, eager)
        for row, expected in enumerate(mmr_select_reference(x.float(), importance, 300, 0.5)):
            assert_same_or_float_tie(x[row].double(), importance[row].double(), 0.5, graphed[row], expected)
