"""INT2 and 1.25-bit 3:4 ternary linear (angel Triton kernels) vs bf16 F.linear, Llama-8B shapes, on CUDA.

Weights: INT2 group 64, asymmetric (bf16 scales, uint8 zeros); ternary 3:4, group 128 (bf16
scales). Same-run medians of CUDA-graph replays (`do_bench_cudagraph`) per weight copy: each timed
call rotates over > 200 MB of weight copies, so every weight byte comes from HBM, not L2.
Correctness is checked first against the float64 reference. Goals (issue 6, M = 1): INT2 ≥ 5×
bf16, ternary ≥ 7× bf16 and faster than INT2.

    python -m benchmarks.bench_lowbit [--quick] [--batches 1,16] [--variants | --ceiling]

--variants times only M = 1: bf16 and every GEMV tile in `int2_gemm.GEMV_VARIANTS`,
INT2_KMAJOR_VARIANTS (the K-major INT2 layout of `ops/kmajor.py`, which the int2-gptq recipe uses
on CUDA), `ternary_gemm.GEMV_VARIANTS` and TERNARY_KMAJOR_VARIANTS (the K-major ternary layout of
`ops/ternary_kmajor.py`), each checked against the reference first (one that fails to compile or
is wrong is reported as failed), and prints one table of same-run speedups over bf16.

--ceiling times only M = 1 and asks what bounds the K-major GEMVs: each default kernel with its
weights streamed from HBM (rotated copies, as above) and with one copy resident in L2 (repeated),
and the read-only streaming probe (`stream_probe.py`) reading as many bytes as the weight stores,
from HBM, next to the time each goal allows (bf16 / 5 for INT2, bf16 / 7 for ternary).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.testing

from angel_compile.kernels import int2_gemm, ternary_gemm
from angel_compile.kernels.int2_gemm import int2_weight_only_linear_triton
from angel_compile.kernels.kmajor_gemm import kmajor_linear_triton
from angel_compile.kernels.ternary_gemm import ternary_3of4_linear_triton
from angel_compile.kernels.ternary_kmajor import ternary_kmajor_linear_triton
from angel_compile.ops.int2 import int2_weight_only_linear_reference, quantize_int2_rtn
from angel_compile.ops.kmajor import kmajor_linear_reference, to_kmajor
from angel_compile.ops.ternary import quantize_ternary_3of4, ternary_3of4_linear_reference
from angel_compile.ops.ternary_kmajor import ternary_kmajor_linear_reference, to_ternary_kmajor
from benchmarks.stream_probe import probe_buffer, stream_sum_reference, stream_sum_triton

# (role, N, K): out × in features; the issue writes them as K×N: 4096×14336 and 14336×4096.
SHAPES = [("gate/up", 14336, 4096), ("down", 4096, 14336)]
INT2_GROUP, TERNARY_GROUP = 64, 128
ROTATED_BYTES = 200e6  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)
MAX_REL_ERROR = 1e-2  # bf16 output rounding
VARIANTS_REP = 30  # ms per CUDA-graph measurement in --variants: the whole table in < 3 minutes
L2_REPEATS = 16  # calls on one L2-resident copy per CUDA-graph replay in --ceiling
GOALS = {"int2 K-major": 5.0, "ternary K-major": 7.0}  # issue 6: × bf16 at M = 1
# K-major INT2 GEMV tiles (kernels/kmajor_gemm.py); {} is the default (256 channels, one word row
# = 16 k per tile, 64 k a split); "n64_k64_s256" was the default until 2026-11-25.
INT2_KMAJOR_VARIANTS = {
    "default": {},
    "n64_k64_s256": {"BLOCK_N": 64, "BLOCK_K": 64, "K_PER_SPLIT": 256},
    "n128_s128": {"BLOCK_N": 128, "K_PER_SPLIT": 128},
    "s128": {"K_PER_SPLIT": 128},
    "k32": {"BLOCK_K": 32},
}
# K-major ternary GEMV tiles (kernels/ternary_kmajor.py); {} is the default.
TERNARY_KMAJOR_VARIANTS = {
    "default": {},  # BLOCK_N 128, one span (128 k) a program, one warp
    "n256": {"BLOCK_N": 256},
    "n256_k256": {"BLOCK_N": 256, "K_PER_SPLIT": 256},
    "k256": {"K_PER_SPLIT": 256},
    "n64": {"BLOCK_N": 64},
    "n256_w2": {"BLOCK_N": 256, "num_warps": 2},
}


def _error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def _copies(nbytes: int) -> int:
    return max(2, math.ceil(ROTATED_BYTES / nbytes))


def _int2_copies(bf16: list[torch.Tensor], n: int, k: int) -> list:
    int2 = [quantize_int2_rtn(w, INT2_GROUP, clip_search=False) for w in bf16[: _copies(n * k // 4)]]
    while len(int2) < _copies(n * k // 4):  # the copies only need distinct addresses
        int2.append(quantize_int2_rtn(bf16[len(int2) % len(bf16)] * 1.01, INT2_GROUP, clip_search=False))
    return int2


def _ternary_copies(bf16: list[torch.Tensor], n: int, k: int) -> list:
    ternary = [quantize_ternary_3of4(w, TERNARY_GROUP) for w in bf16[: _copies(n * k * 5 // 32)]]
    while len(ternary) < _copies(n * k * 5 // 32):
        ternary.append(quantize_ternary_3of4(bf16[len(ternary) % len(bf16)] * 1.01, TERNARY_GROUP))
    return ternary


class KMajorCopy:
    """An Int2Weight's codes in the K-major layout (ops/kmajor.py): words, scales, zeros, nbytes()."""

    def __init__(self, q) -> None:
        self.words, self.scales, self.zeros = to_kmajor(q.packed, q.scales, q.zeros, 2)
        self._nbytes = q.nbytes()

    def nbytes(self) -> int:
        return self._nbytes


class TernaryKMajorCopy:
    """A Ternary3of4Weight in the K-major layout (ops/ternary_kmajor.py): lo, hi, scales, nbytes()."""

    def __init__(self, q, k: int) -> None:
        self.lo, self.hi, self.scales = to_ternary_kmajor(q.packed, q.scales, k)
        self._nbytes = q.nbytes()

    def nbytes(self) -> int:
        return self._nbytes


def _time_variant(run, expected: torch.Tensor, copies: int) -> tuple[float | None, str]:
    """(µs per weight copy, "") of `run(all_copies: bool)`, or (None, why) if it fails or is wrong."""
    try:
        error = _error(run(False), expected)
        if not error < MAX_REL_ERROR:
            return None, f"failed: rel. err {error:.1e}"
        us = triton.testing.do_bench_cudagraph(lambda: run(True), rep=VARIANTS_REP, return_mode="median")
        return us * 1e3 / copies, f"{error:.1e}"
    except Exception as e:  # a variant that does not compile is a table row, not a crash
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _variants() -> None:
    """M = 1: bf16 and each int2 / ternary GEMV variant on HBM-resident weights, one table."""
    print("\n## GEMV variants, M = 1 (µs per weight copy, CUDA graphs; speedup = bf16 µs / variant µs)")
    print("| variant | shape (N×K) | µs | speedup vs bf16 | weight GB/s | rel. err |")
    print("|---|---|---|---|---|---|")
    for role, n, k in SHAPES:
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(_copies(n * k * 2))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        shape = f"{role} {n}×{k}"

        def run_bf16(x=x, bf16=bf16) -> None:
            for w in bf16:
                F.linear(x, w)

        bf16_us = triton.testing.do_bench_cudagraph(run_bf16, rep=VARIANTS_REP, return_mode="median") * 1e3 / len(bf16)
        print(f"| bf16 F.linear | {shape} | {bf16_us:.1f} | 1.00× | {n * k * 2 / bf16_us / 1e3:,.0f} | - |", flush=True)
        families = []
        int2 = _int2_copies(bf16, n, k)
        q = int2[0]
        expected = int2_weight_only_linear_reference(x.double(), q.packed, q.scales.double(), q.zeros, INT2_GROUP, None)

        def run_int2(all_copies: bool, config: dict, int2=int2, x=x) -> torch.Tensor:
            for q in int2 if all_copies else int2[:1]:
                y = int2_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, INT2_GROUP, config=config)
            return y

        families.append(("int2", int2_gemm.GEMV_VARIANTS, run_int2, expected, int2))
        int2_kmajor = [KMajorCopy(q) for q in int2]

        def run_int2_kmajor(all_copies: bool, config: dict, copies=int2_kmajor, x=x) -> torch.Tensor:
            for q in copies if all_copies else copies[:1]:
                y = kmajor_linear_triton(x, q.words, q.scales, q.zeros, 2, INT2_GROUP, config=config)
            return y

        families.append(("int2 K-major", INT2_KMAJOR_VARIANTS, run_int2_kmajor, expected, int2_kmajor))
        ternary_variants = getattr(ternary_gemm, "GEMV_VARIANTS", {})
        if ternary_variants:
            ternary = _ternary_copies(bf16, n, k)
            q = ternary[0]
            expected = ternary_3of4_linear_reference(x.double(), q.packed, q.scales.double(), TERNARY_GROUP, None)

            def run_ternary(all_copies: bool, config: dict, ternary=ternary, x=x) -> torch.Tensor:
                for q in ternary if all_copies else ternary[:1]:
                    y = ternary_3of4_linear_triton(x, q.packed, q.scales, TERNARY_GROUP, config=config)
                return y

            families.append(("ternary", ternary_variants, run_ternary, expected, ternary))
            ternary_kmajor = [TernaryKMajorCopy(q, k) for q in ternary]

            def run_ternary_kmajor(all_copies: bool, config: dict, copies=ternary_kmajor, x=x) -> torch.Tensor:
                for q in copies if all_copies else copies[:1]:
                    y = ternary_kmajor_linear_triton(x, q.lo, q.hi, q.scales, TERNARY_GROUP, config=config)
                return y

            families.append(("ternary K-major", TERNARY_KMAJOR_VARIANTS, run_ternary_kmajor, expected, ternary_kmajor))
        for family, variants, run, expected, copies in families:
            for name, config in variants.items():
                us, note = _time_variant(functools.partial(run, config=config), expected, len(copies))
                row = f"| {family} {name} | {shape} | "
                if us is None:
                    row += f"{note} | - | - | - |"
                else:
                    row += f"{us:.1f} | {bf16_us / us:.2f}× | {copies[0].nbytes() / us / 1e3:,.0f} | {note} |"
                print(row, flush=True)
        del bf16, families
        torch.cuda.empty_cache()


def _bench_calls(calls: list, rep: int) -> float:
    """µs per call: the CUDA-graph median of running every zero-argument call in `calls` once."""
    return (
        triton.testing.do_bench_cudagraph(lambda: [c() for c in calls], rep=rep, return_mode="median")
        * 1e3
        / len(calls)
    )


def _ceiling_row(role: str, n: int, k: int, name: str, copies: list, run, expected, bf16_us: float, rep: int) -> str:
    """One --ceiling row: `run(copy)` (checked against `expected` first) on rotated copies (HBM) and
    on one copy (L2), and the probe."""
    error = _error(run(copies[0]), expected)
    assert error < MAX_REL_ERROR, (role, name, error)
    nbytes = copies[0].nbytes()
    probes = [probe_buffer(nbytes, n, "cuda") for _ in range(_copies(nbytes))]
    assert torch.equal(stream_sum_triton(probes[0]).cpu(), stream_sum_reference(probes[0].cpu()))
    hbm = _bench_calls([functools.partial(run, q) for q in copies], rep)
    l2 = _bench_calls([functools.partial(run, copies[0])] * L2_REPEATS, rep)
    probe = _bench_calls([functools.partial(stream_sum_triton, b) for b in probes], rep)
    return (
        f"| {role} {n}×{k} | {name} | {nbytes / 1e6:.1f} | {bf16_us:.1f} | {bf16_us / GOALS[name]:.1f} | "
        f"{hbm:.1f} | {bf16_us / hbm:.2f}× | {l2:.1f} | {probe:.1f} | {bf16_us / probe:.2f}× |"
    )


def _ceiling(rep: int) -> None:
    """M = 1: each K-major default GEMV from HBM and from L2, and the streaming probe on its bytes."""
    print("\n## What bounds the K-major GEMVs, M = 1 (µs per call, CUDA-graph medians)")
    print("HBM: rotated weight copies; L2: one copy, repeated; probe: a read-only kernel over as many bytes, from HBM.")
    columns = ["shape (N×K)", "weight", "MB", "bf16 µs", "goal µs", "kernel µs, HBM", "× bf16", "kernel µs, L2"]
    columns += ["probe µs", "probe × bf16"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for role, n, k in SHAPES:
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(_copies(n * k * 2))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bf16_us = _bench_calls([functools.partial(F.linear, x, w) for w in bf16], rep)
        int2 = [KMajorCopy(q) for q in _int2_copies(bf16, n, k)]
        ternary = [TernaryKMajorCopy(q, k) for q in _ternary_copies(bf16, n, k)]
        del bf16

        def run_int2(q: KMajorCopy, x=x) -> torch.Tensor:
            return kmajor_linear_triton(x, q.words, q.scales, q.zeros, 2, INT2_GROUP)

        def run_ternary(q: TernaryKMajorCopy, x=x) -> torch.Tensor:
            return ternary_kmajor_linear_triton(x, q.lo, q.hi, q.scales, TERNARY_GROUP)

        q, t = int2[0], ternary[0]
        expected = kmajor_linear_reference(x.double(), q.words, q.scales.double(), q.zeros, 2, INT2_GROUP, None)
        print(_ceiling_row(role, n, k, "int2 K-major", int2, run_int2, expected, bf16_us, rep), flush=True)
        expected = ternary_kmajor_linear_reference(x.double(), t.lo, t.hi, t.scales.double(), TERNARY_GROUP, None)
        print(_ceiling_row(role, n, k, "ternary K-major", ternary, run_ternary, expected, bf16_us, rep), flush=True)
        del int2, ternary
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--batches", default="1,16", help="comma-separated M values")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--variants", action="store_true", help="only M = 1: every GEMV variant vs bf16")
    group.add_argument("--ceiling", action="store_true", help="only M = 1: HBM vs L2-resident vs streaming probe")
    args = parser.parse_args()
    rep = 50 if args.quick else 300
    batches = [int(m) for m in args.batches.split(",")]
    print(
        f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    if args.variants:
        _variants()
        return
    if args.ceiling:
        _ceiling(rep)
        return
    rows = []
    for role, n, k in SHAPES:
        bf16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(_copies(n * k * 2))]
        int2, ternary = _int2_copies(bf16, n, k), _ternary_copies(bf16, n, k)
        int2_kmajor = [KMajorCopy(q) for q in int2]
        ternary_kmajor = [TernaryKMajorCopy(q, k) for q in ternary]
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q2, qk, qt, qtk = int2[0], int2_kmajor[0], ternary[0], ternary_kmajor[0]
            expected_ternary = ternary_3of4_linear_reference(
                x.double(), qt.packed, qt.scales.double(), TERNARY_GROUP, None
            )
            expected_int2 = int2_weight_only_linear_reference(
                x.double(), q2.packed, q2.scales.double(), q2.zeros, INT2_GROUP, None
            )
            errors = {
                "int2": _error(
                    int2_weight_only_linear_triton(x, q2.packed, q2.scales, q2.zeros, INT2_GROUP), expected_int2
                ),
                "int2k": _error(kmajor_linear_triton(x, qk.words, qk.scales, qk.zeros, 2, INT2_GROUP), expected_int2),
                "ternary": _error(ternary_3of4_linear_triton(x, qt.packed, qt.scales, TERNARY_GROUP), expected_ternary),
                "ternaryk": _error(
                    ternary_kmajor_linear_triton(x, qtk.lo, qtk.hi, qtk.scales, TERNARY_GROUP), expected_ternary
                ),
            }
            assert max(errors.values()) < MAX_REL_ERROR, (role, m, errors)

            def run_bf16(x=x, bf16=bf16) -> None:
                for w in bf16:
                    F.linear(x, w)

            def run_int2(x=x, int2=int2) -> None:
                for q in int2:
                    int2_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, INT2_GROUP)

            def run_int2_kmajor(x=x, copies=int2_kmajor) -> None:
                for q in copies:
                    kmajor_linear_triton(x, q.words, q.scales, q.zeros, 2, INT2_GROUP)

            def run_ternary(x=x, ternary=ternary) -> None:
                for q in ternary:
                    ternary_3of4_linear_triton(x, q.packed, q.scales, TERNARY_GROUP)

            def run_ternary_kmajor(x=x, copies=ternary_kmajor) -> None:
                for q in copies:
                    ternary_kmajor_linear_triton(x, q.lo, q.hi, q.scales, TERNARY_GROUP)

            times = {
                "bf16": triton.testing.do_bench_cudagraph(run_bf16, rep=rep, return_mode="median") * 1e3 / len(bf16),
                "int2": triton.testing.do_bench_cudagraph(run_int2, rep=rep, return_mode="median") * 1e3 / len(int2),
                "int2k": triton.testing.do_bench_cudagraph(run_int2_kmajor, rep=rep, return_mode="median")
                * 1e3
                / len(int2),
                "ternary": triton.testing.do_bench_cudagraph(run_ternary, rep=rep, return_mode="median")
                * 1e3
                / len(ternary),
                "ternaryk": triton.testing.do_bench_cudagraph(run_ternary_kmajor, rep=rep, return_mode="median")
                * 1e3
                / len(ternary),
            }
            weight_bytes = {"bf16": n * k * 2, "int2": int2[0].nbytes(), "ternary": ternary[0].nbytes()}
            weight_bytes["int2k"], weight_bytes["ternaryk"] = weight_bytes["int2"], weight_bytes["ternary"]
            rows.append((role, n, k, m, times, weight_bytes, errors))
    print("\nCUDA-graph medians per weight copy (µs); speedup = bf16 time / time; GB/s = weight bytes / time.")
    print("Row-major bytes (ops/int2.py, ops/ternary.py) and the K-major layouts the CUDA recipes use")
    print("(ops/kmajor.py, ops/ternary_kmajor.py); ternary K-major vs int2 K-major = int2 K-major time / ternary's.")
    columns = ["shape (N×K)", "M", "bf16 µs", "int2 µs", "×", "int2 K-major µs", "×", "ternary µs", "×"]
    columns += ["ternary K-major µs", "×", "ternary K-major vs int2 K-major", "int2 K-major GB/s"]
    columns += ["ternary K-major GB/s", "rel. err int2 / int2 K-major / ternary / ternary K-major"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for role, n, k, m, t, b, e in rows:
        gbps = {name: b[name] / t[name] / 1e3 for name in t}
        print(
            f"| {role} {n}×{k} | {m} | {t['bf16']:.1f} | {t['int2']:.1f} | {t['bf16'] / t['int2']:.2f}× | "
            f"{t['int2k']:.1f} | {t['bf16'] / t['int2k']:.2f}× | "
            f"{t['ternary']:.1f} | {t['bf16'] / t['ternary']:.2f}× | "
            f"{t['ternaryk']:.1f} | {t['bf16'] / t['ternaryk']:.2f}× | {t['int2k'] / t['ternaryk']:.2f}× | "
            f"{gbps['int2k']:,.0f} | {gbps['ternaryk']:,.0f} | "
            f"{e['int2']:.1e} / {e['int2k']:.1e} / {e['ternary']:.1e} / {e['ternaryk']:.1e} |"
        )


if __name__ == "__main__":
    main()
