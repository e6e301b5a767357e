"""INT4 weight-only and W4A8 linear (angel Triton kernels) vs bf16 F.linear, Llama-8B shapes, on CUDA.

Weights: INT4 group-wise, group 128, asymmetric (zero points), bf16 scales (ops/int4.py).
Same-run medians of CUDA-graph replays (`do_bench_cudagraph`), per weight copy: each timed
call rotates over > 200 MB of weight copies, so every weight byte comes from HBM (a 29 MB int4
weight would otherwise sit in the 50 MB L2). Correctness is checked first against the float64
reference. GB/s counts the bytes each side must move (weight, scales, zeros, x, y) over its time.

    python benchmarks/bench_int4.py [--quick] [--sweep] [--variants] [--batches 1,2,4]

--sweep first times GEMV (M = 1) and small-M (M = 16) tile variants and prints them.
--variants times only M = 1: bf16, every byte-GEMV tile in GEMV_VARIANTS (`int4_gemm`) and every
K-major GEMV tile in KMAJOR_VARIANTS (`kmajor_gemm`, the layout the CUDA recipes use), and prints
one table with each variant's speedup over bf16 from the same run, and, where torchao imports,
torchao's own int4 weight-only linear (`Int4WeightOnlyConfig`, group 128, tile-packed format: the
tinygemm kernel `aten._weight_int4pack_mm`) on the same weights.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import torch.nn.functional as F
import triton
import triton.testing

from angel_compile.kernels import int4_gemm
from angel_compile.kernels.int4_gemm import int4_weight_only_linear_triton, w4a8_linear_triton
from angel_compile.kernels.kmajor_gemm import kmajor_linear_triton
from angel_compile.ops.int4 import int4_weight_only_linear_reference, quantize_int4_rtn, w4a8_linear_reference
from angel_compile.ops.kmajor import to_kmajor

# (role, N, K): out × in features. The issue writes them as K×N: 4096×14336 and 14336×4096.
SHAPES = [("gate/up", 14336, 4096), ("down", 4096, 14336)]
BATCHES = [1, 2, 4, 16, 256, 4096]  # 2 and 4: the K-major small-M GEMV
GROUP = 128
ROTATED_BYTES = 200e6  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)
MAX_REL_ERROR = 1e-2  # bf16 output rounding is ~3e-3

GEMV_SWEEP = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
    for bn, bk, w, s in [
        (8, 512, 4, 3),
        (16, 512, 4, 3),
        (16, 512, 8, 4),
        (16, 1024, 4, 3),
        (32, 512, 8, 3),
        (8, 1024, 4, 4),
    ]
]
# M = 1 tiles of the byte GEMV compared by --variants: (BLOCK_N, BLOCK_K, warps, stages). The int32-word
# kernel this list also held was slower on every tile and was removed (benchmarks/RESULTS.md).
GEMV_VARIANTS = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s}
    for bn, bk, w, s in [
        (16, 512, 4, 3),
        (16, 512, 1, 3),
        (8, 512, 1, 3),
    ]
]
SMALL_M_SWEEP = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": s, "SPLIT_K": sk}
    for bn, bk, w, s, sk in [
        (64, 128, 4, 4, 1),
        (64, 128, 4, 4, 4),
        (32, 128, 4, 4, 4),
        (64, 128, 4, 3, 8),
    ]
]
# M = 1 tiles of the K-major GEMV (kernels/kmajor_gemm.py) compared by --variants: (BLOCK_N,
# BLOCK_K, warps, k per split). The first is the default; the second was the default until
# 2026-11-25 (two word rows of 64 channels, two groups a split).
KMAJOR_VARIANTS = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": 1, "K_PER_SPLIT": kps}
    for bn, bk, w, kps in [
        (128, 8, 1, 128),
        (64, 16, 1, 256),
        (128, 16, 1, 128),
        (128, 8, 1, 256),
        (256, 8, 1, 128),
        (256, 8, 2, 128),
    ]
]
# M >= 64: the autotuned tl.dot kernel vs dequantize + cuBLAS
PREFILL_SWEEP = [{"DEQUANTIZE": False}, {"DEQUANTIZE": True}]


def _error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def _time(fn, rep: int) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def _sweep(rep: int) -> None:
    print("\n## Sweep (µs per weight copy, CUDA graphs)")
    for role, n, k in SHAPES:
        copies = math.ceil(ROTATED_BYTES / (n * k // 2))
        qs = [quantize_int4_rtn(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), GROUP) for _ in range(copies)]
        points = [(1, GEMV_SWEEP), (16, SMALL_M_SWEEP)] + [(m, PREFILL_SWEEP) for m in (64, 256, 1024)]
        for m, variants in points:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q0 = qs[0]
            expected = int4_weight_only_linear_reference(
                x.double(), q0.packed, q0.scales.double(), q0.zeros, GROUP, None
            )
            for config in variants:

                def fn(x=x, config=config, qs=qs) -> torch.Tensor:
                    for q in qs:
                        weight = (q.packed, q.scales, q.zeros, GROUP)
                        if "DEQUANTIZE" not in config:
                            y = int4_weight_only_linear_triton(x, *weight, None, config=config)
                        elif config["DEQUANTIZE"]:
                            y = F.linear(x, int4_gemm.dequantize_int4_triton(*weight, x.dtype))
                        else:
                            y = int4_gemm._launch(x, None, *weight, None, x.dtype, None)
                    return y

                error = _error(fn(qs=qs[:1]), expected)
                us = _time(fn, rep) * 1e3 / copies
                print(f"{role} M={m} {config}: {us:.2f} µs, rel. err {error:.1e}")


def _torchao_int4(weights: list[torch.Tensor]) -> list[torch.nn.Module]:
    """torchao-quantized copies of nn.Linear(weights) (raises where torchao is absent or refuses)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    config = Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d")
    linears = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        linear.weight.data.copy_(w)
        quantize_(linear, config)
        linears.append(linear)
    return linears


def _torchao_row(role: str, n: int, k: int, x: torch.Tensor, weights: list[torch.Tensor], bf16_us: float, rep: int):
    try:
        linears = _torchao_int4(weights)
        with torch.no_grad():
            error = _error(linears[0](x), F.linear(x.double(), weights[0].double()))

            def run(x=x, linears=linears) -> None:
                for linear in linears:
                    linear(x)

            us = _time(run, rep) * 1e3 / len(linears)
    except Exception as exc:  # torchao missing or incompatible on this machine: say so
        print(f"| {role} {n}×{k} | torchao int4 | unavailable: {type(exc).__name__}: {str(exc)[:80]} | | | |")
        return
    print(
        f"| {role} {n}×{k} | torchao int4 (tinygemm), no bias | {us:.2f} | {bf16_us / us:.2f}× | - | "
        f"{error:.1e} vs bf16 W |"
    )


def _variants(rep: int) -> None:
    """M = 1: bf16 and each GEMV variant on HBM-resident weights, one table of same-run ratios."""
    print("\n## GEMV variants, M = 1 (µs per weight copy, CUDA graphs; speedup = bf16 / variant)")
    print("| shape (N×K) | variant | µs | speedup vs bf16 | int4 GB/s | rel. err |")
    print("|---|---|---|---|---|---|")
    for role, n, k in SHAPES:
        copies = math.ceil(ROTATED_BYTES / (n * k * 2))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [quantize_int4_rtn(w, GROUP) for w in weights]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)

        def bf16(x=x, weights=weights, bias=bias) -> None:
            for w in weights:
                F.linear(x, w, bias)

        bf16_us = _time(bf16, rep) * 1e3 / copies
        print(f"| {role} {n}×{k} | bf16 F.linear | {bf16_us:.2f} | 1.00× | - | - |", flush=True)
        expected = int4_weight_only_linear_reference(
            x.double(), qs[0].packed, qs[0].scales.double(), qs[0].zeros, GROUP, bias.double()
        )
        int4_bytes = n * k // 2 + 3 * n * (k // GROUP) + (k + 2 * n) * 2
        _torchao_row(role, n, k, x, weights, bf16_us, rep)
        for config in GEMV_VARIANTS:
            name = " ".join(f"{key}={value}" for key, value in config.items())

            def int4(x=x, qs=qs, config=config, bias=bias) -> torch.Tensor:
                for q in qs:
                    y = int4_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, GROUP, bias, config=config)
                return y

            _variant_row(role, n, k, f"bytes {name}", int4, qs, expected, bf16_us, int4_bytes, copies, rep)
        kmajor = [to_kmajor(q.packed, q.scales, q.zeros, 4) for q in qs]
        for config in KMAJOR_VARIANTS:
            name = " ".join(f"{key}={value}" for key, value in config.items())

            def int4_kmajor(x=x, qs=kmajor, config=config, bias=bias) -> torch.Tensor:
                for words, scales, zeros in qs:
                    y = kmajor_linear_triton(x, words, scales, zeros, 4, GROUP, bias, config=config)
                return y

            _variant_row(role, n, k, f"K-major {name}", int4_kmajor, kmajor, expected, bf16_us, int4_bytes, copies, rep)


def _variant_row(role, n, k, name, fn, qs, expected, bf16_us, int4_bytes, copies, rep) -> None:
    try:
        error = _error(fn(qs=qs[:1]), expected)
        us = _time(fn, rep) * 1e3 / copies
    except Exception as exc:  # a tile that does not compile or fit: report it, time the rest
        print(f"| {role} {n}×{k} | {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | |")
        return
    gbps = int4_bytes / us / 1e3
    print(f"| {role} {n}×{k} | {name} | {us:.2f} | {bf16_us / us:.2f}× | {gbps:,.0f} | {error:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--sweep", action="store_true", help="time tile variants first")
    parser.add_argument("--variants", action="store_true", help="only M = 1: bf16 vs every GEMV kernel variant")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated M values")
    args = parser.parse_args()
    rep = 50 if args.quick else 300
    print(
        f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"GEMV_CONFIG {int4_gemm.GEMV_CONFIG}, SMALL_M_CONFIG {int4_gemm.SMALL_M_CONFIG}")
    if args.variants:
        _variants(rep)
        return
    if args.sweep:
        _sweep(50)
    rows = []
    for role, n, k in SHAPES:
        copies = math.ceil(ROTATED_BYTES / (n * k * 2))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quantized = [quantize_int4_rtn(w, GROUP) for w in weights]
        kmajor = [to_kmajor(q.packed, q.scales, q.zeros, 4) for q in quantized]
        for m in (int(b) for b in args.batches.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            errors = {}
            for q, (words, scales, zeros) in zip(quantized[:2], kmajor, strict=False):
                weight = (q.packed, q.scales, q.zeros, GROUP)
                expected = int4_weight_only_linear_reference(
                    x.double(), q.packed, q.scales.double(), q.zeros, GROUP, None
                )
                errors["int4"] = _error(int4_weight_only_linear_triton(x, *weight, None), expected)
                errors["kmajor"] = _error(kmajor_linear_triton(x, words, scales, zeros, 4, GROUP, None), expected)
                expected = w4a8_linear_reference(x.float(), *weight, None, None)
                errors["w4a8"] = _error(w4a8_linear_triton(x, *weight, None, None), expected)
                assert max(errors.values()) < MAX_REL_ERROR, (role, m, errors)

            def bf16(x=x, weights=weights) -> None:
                for w in weights:
                    F.linear(x, w)

            def int4(x=x, quantized=quantized) -> None:
                for q in quantized:
                    int4_weight_only_linear_triton(x, q.packed, q.scales, q.zeros, GROUP, None)

            def w4a8(x=x, quantized=quantized) -> None:
                for q in quantized:
                    w4a8_linear_triton(x, q.packed, q.scales, q.zeros, GROUP, None, None)

            def int4_kmajor(x=x, kmajor=kmajor) -> None:
                for words, scales, zeros in kmajor:
                    kmajor_linear_triton(x, words, scales, zeros, 4, GROUP, None)

            fns = (("bf16", bf16), ("int4", int4), ("kmajor", int4_kmajor), ("w4a8", w4a8))
            times = {name: _time(fn, rep) * 1e3 / copies for name, fn in fns}
            activations = (m * k + m * n) * 2
            int4_bytes = n * k // 2 + 3 * n * (k // GROUP) + activations  # bf16 scales + uint8 zeros
            bf16_bytes = n * k * 2 + activations
            gbps = {"bf16": bf16_bytes / times["bf16"] / 1e3, "kmajor": int4_bytes / times["kmajor"] / 1e3}
            rows.append((role, n, k, m, times, gbps, errors))
    print("\nCUDA-graph medians per weight copy (µs); speedup = bf16 time / int4 time.")
    print("int4: row-major bytes (ops/int4.py); K-major: the words of ops/kmajor.py (CUDA default).")
    columns = ["shape (N×K)", "M", "bf16 µs", "int4 µs", "int4 speedup", "K-major µs", "K-major speedup"]
    columns += ["w4a8 µs", "w4a8 speedup", "bf16 GB/s", "K-major GB/s", "rel. err int4 / K-major / w4a8"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for role, n, k, m, t, gbps, errors in rows:
        print(
            f"| {role} {n}×{k} | {m} | {t['bf16']:.1f} | {t['int4']:.1f} | {t['bf16'] / t['int4']:.2f}× | "
            f"{t['kmajor']:.1f} | {t['bf16'] / t['kmajor']:.2f}× | {t['w4a8']:.1f} | {t['bf16'] / t['w4a8']:.2f}× | "
            f"{gbps['bf16']:,.0f} | {gbps['kmajor']:,.0f} | "
            f"{errors['int4']:.1e} / {errors['kmajor']:.1e} / {errors['w4a8']:.1e} |"
        )


if __name__ == "__main__":
    main()
