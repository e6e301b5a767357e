"""int8 weight-only linear (angel Triton kernel) vs bf16 F.linear, Llama-8B layer shapes, on CUDA.

Same-run medians. Decode-sized problems take a few microseconds, where Python launch cost
would dominate, so both sides are timed as CUDA-graph replays (`do_bench_cudagraph`), as a
decoder runs them; plain `do_bench` numbers are printed too. A 4096×4096 bf16 weight (34 MB)
fits in the H100's 50 MB L2, so each timed call runs over several weight copies (> 200 MB in
all, like a decoder's successive layers) and the time per copy is reported: every weight
byte comes from HBM. Correctness is checked first. GB/s counts the bytes each side must move
(weight, scale, x, y) over its time.

    python benchmarks/bench_weight_only.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import torch.nn.functional as F
import triton
import triton.testing

from angel_compile.kernels.int8_weight_only import int8_weight_only_linear_triton
from angel_compile.ops.int8_weight_only import int8_weight_only_linear_reference, quantize_int8_per_channel

# (role, N, K): out × in features. The issue writes them as K×N: 4096×4096, 4096×14336, 14336×4096.
SHAPES = [("q/o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
BATCHES = [1, 16, 256]
ROTATED_BYTES = 200e6  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)
MAX_REL_ERROR = 1e-2  # bf16 output rounding is ~3e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    rep = 50 if args.quick else 300
    print(
        f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    rows = []
    for role, n, k in SHAPES:
        copies = math.ceil(ROTATED_BYTES / (n * k * 2))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quantized = [quantize_int8_per_channel(w) for w in weights]
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for q, scale in quantized[:2]:
                out = int8_weight_only_linear_triton(x, q, scale, None)
                expected = int8_weight_only_linear_reference(x.double(), q, scale.double(), None)
                error = ((out.double() - expected).norm() / expected.norm()).item()
                assert error < MAX_REL_ERROR, (role, m, error)

            def bf16(x=x, weights=weights) -> None:
                for w in weights:
                    F.linear(x, w)

            def int8(x=x, quantized=quantized) -> None:
                for q, scale in quantized:
                    int8_weight_only_linear_triton(x, q, scale, None)

            times = {}
            for name, fn in (("bf16", bf16), ("int8", int8)):
                graph = triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
                eager = triton.testing.do_bench(fn, rep=rep, return_mode="median")
                times[name], times[name + "_eager"] = graph * 1e3 / copies, eager * 1e3 / copies
            activations = (m * k + m * n) * 2
            gbps = {"bf16": (n * k * 2 + activations) / times["bf16"] / 1e3}
            gbps["int8"] = (n * k + n * 4 + activations) / times["int8"] / 1e3
            rows.append((role, n, k, m, times, gbps, error))
    print("\nCUDA graph medians (per weight copy); eager = plain do_bench, launch overhead included.")
    columns = ["shape (N×K)", "M", "bf16 µs", "int8 µs", "speedup", "bf16 GB/s", "int8 GB/s"]
    columns += ["bf16 µs eager", "int8 µs eager", "rel. err"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for role, n, k, m, t, gbps, error in rows:
        print(
            f"| {role} {n}×{k} | {m} | {t['bf16']:.1f} | {t['int8']:.1f} | {t['bf16'] / t['int8']:.2f}× | "
            f"{gbps['bf16']:,.0f} | {gbps['int8']:,.0f} | "
            f"{t['bf16_eager']:.1f} | {t['int8_eager']:.1f} | {error:.1e} |"
        )


if __name__ == "__main__":
    main()
