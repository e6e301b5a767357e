"""int8 weight-only linear (angel Triton kernel) vs bf16 F.linear, Llama-8B layer shapes.

Same-run medians. Decode-sized problems take a few microseconds, where Python launch cost
would dominate, so both sides are timed as CUDA-graph replays (`do_bench_cudagraph`), as a
decoder runs them; plain `do_bench` numbers are printed too. A 4096×4096 bf16 weight (34 MB)
fits in the H100's 50 MB L2, so each timed call runs over several weight copies (> 200 MB in
all, like a decoder's successive layers) and the time per copy is reported: every weight
byte comes from HBM. Correctness is checked first.

    python -m benchmarks.bench_weight_only [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch
import torch.nn.functional as F
import triton.testing

import angel_compile  # noqa: F401  (registers the op and its CUDA kernel)
from angel_compile.ops.int8_weight_only import int8_weight_only_linear_reference, quantize_int8_per_channel

# (N, K): out x in features of q/o (4096x4096), gate/up (14336x4096), down (4096x14336)
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
BATCHES = [1, 16, 256]
ROTATED_BYTES = 200e6  # > 4x the L2 of an H100 (50 MB) or H200 (60 MB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    rep = 100 if args.quick else 500
    op = torch.ops.angel.int8_weight_only_linear
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for n, k in SHAPES:
        copies = math.ceil(ROTATED_BYTES / (n * k * 2))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        quantized = [quantize_int8_per_channel(w) for w in weights]
        q, scale = quantized[0]
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = op(x, q, scale, None)
            expected = int8_weight_only_linear_reference(x.double(), q, scale.double(), None)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (n, k, m, error)
            times = {}

            def bf16(x=x, weights=weights) -> None:
                for w in weights:
                    F.linear(x, w)

            def int8(x=x, quantized=quantized) -> None:
                for q_copy, scale_copy in quantized:
                    op(x, q_copy, scale_copy, None)

            for name, fn in (("bf16", bf16), ("int8", int8)):
                graph = triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
                eager = triton.testing.do_bench(fn, rep=rep, return_mode="median")
                times[name], times[name + "_eager"] = graph * 1e3 / copies, eager * 1e3 / copies
            int8_bytes = q.numel() + scale.numel() * 4 + x.numel() * 2 + m * n * 2
            rows.append((n, k, m, times, int8_bytes / times["int8"] / 1e3, error))
    print("\n| N×K | M | bf16 µs | int8 µs | speedup | int8 GB/s | bf16 µs (eager) | int8 µs (eager) | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k, m, t, bandwidth, error in rows:
        print(
            f"| {n}×{k} | {m} | {t['bf16']:.1f} | {t['int8']:.1f} | {t['bf16'] / t['int8']:.2f}× | "
            f"{bandwidth:,.0f} | {t['bf16_eager']:.1f} | {t['int8_eager']:.1f} | {error:.1e} |"
        )


if __name__ == "__main__":
    main()
