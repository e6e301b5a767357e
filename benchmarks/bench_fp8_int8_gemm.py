"""FP8 and INT8 (W8A8) GEMMs of `kernels/scaled_gemm.py` vs cuBLAS, on CUDA, same-run medians.

FP8 E4M3, M = N = K = 8192, bf16 out:
    triton per-tensor     one scale for A and one for B (fp8-static)
    triton row/col        a scale per row of A and per column of the output (fp8-dynamic)
    _scaled_mm            torch._scaled_mm (cuBLASLt) with the same scales, fast accumulation
                          off and on; rowwise where this torch/cuBLAS supports it
    bf16 mm               torch.mm on the bf16 operands
INT8 W8A8, M = 4096, (N, K) = (14336, 4096) and (4096, 14336), bf16 out:
    triton                int8 × int8 -> int32, per-token × per-channel scale epilogue
    _int_mm               torch._int_mm (int32 out, no scales: less work than ours)
    bf16 F.linear
Rows "+ quantize x" time the whole op (`fp8_linear_triton` / `w8a8_int8_linear_triton`) from
bf16 activations: the fused per-token quantization kernel plus the GEMM.
"rel err" is each output vs the fp32 product of the unquantized bf16 operands (for
_int_mm, its int32 result rescaled): the accuracy cost of each format.
Goals (issue 3): FP8 ≥ 0.9× _scaled_mm and ≥ 1.5× bf16; INT8 ≥ 1.5× bf16.

    python -m benchmarks.bench_fp8_int8_gemm [--quick]
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton
import triton.testing

from angel_compile.kernels.scaled_gemm import (
    fp8_linear_triton,
    quantize_rows_triton,
    scaled_gemm_triton,
    w8a8_int8_linear_triton,
)
from angel_compile.ops.fp8_linear import fp8_input_scale, quantize_fp8_weight
from angel_compile.ops.int4 import quantize_fp8_rows
from angel_compile.ops.int8_weight_only import quantize_int8_per_channel

FP8_SHAPE = (8192, 8192, 8192)  # M, N, K
INT8_SHAPES = [(4096, 14336, 4096), (4096, 4096, 14336)]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def _time(fn: Callable[[], torch.Tensor], rep: int) -> float:
    fn()  # autotuning and compilation happen here, outside the timing
    return triton.testing.do_bench(fn, rep=rep, return_mode="median")


def _row(name: str, flops: float, ms: float | None, error: float | None, baselines: dict[str, float]) -> list[str]:
    if ms is None:
        return [name, "n/a", "n/a", *["n/a"] * len(baselines), "n/a"]
    ratios = [f"{base / ms:.2f}×" for base in baselines.values()]
    return [name, f"{ms * 1e3:.0f}", f"{flops / ms / 1e9:.0f}", *ratios, f"{error:.1e}"]


def _print_table(title: str, baselines: dict[str, float], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    header = ["kernel", "µs", "TFLOP/s", *[f"vs {b}" for b in baselines], "rel err"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def bench_fp8(rep: int) -> None:
    m, n, k = FP8_SHAPE
    flops = 2.0 * m * n * k
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ref = x.float() @ w.float().T
    input_scale = fp8_input_scale(x.float().abs().amax())
    x_tensor, xs_tensor = quantize_fp8_rows(x, input_scale)  # [M, K], [M, 1] (the same scale)
    xs_tensor = xs_tensor[:1, 0].contiguous()  # [1]
    x_rows, xs_rows = quantize_fp8_rows(x, None)  # [M, K], [M, 1]
    w_tensor, ws_tensor = quantize_fp8_weight(w, per_channel=False)
    w_rows, ws_rows = quantize_fp8_weight(w, per_channel=True)

    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "bf16 mm": lambda: torch.mm(x, w.T),
        "triton per-tensor": lambda: scaled_gemm_triton(x_tensor, w_tensor, xs_tensor, ws_tensor, None, torch.bfloat16),
        "triton row/col": lambda: scaled_gemm_triton(x_rows, w_rows, xs_rows[:, 0], ws_rows, None, torch.bfloat16),
        "triton per-tensor + quantize x": lambda: fp8_linear_triton(x, w_tensor, ws_tensor, input_scale),
        "triton row/col + quantize x": lambda: fp8_linear_triton(x, w_rows, ws_rows, None),
    }
    for fast in (False, True):
        suffix = ", fast accum" if fast else ""
        candidates[f"_scaled_mm per-tensor{suffix}"] = lambda fast=fast: torch._scaled_mm(
            x_tensor, w_tensor.T, xs_tensor, ws_tensor, out_dtype=torch.bfloat16, use_fast_accum=fast
        )
        candidates[f"_scaled_mm rowwise{suffix}"] = lambda fast=fast: torch._scaled_mm(
            x_rows, w_rows.T, xs_rows, ws_rows[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast
        )
    times, errors = {}, {}
    for name, fn in candidates.items():
        try:
            errors[name] = _relative_error(fn(), ref)
            times[name] = _time(fn, rep)
        except RuntimeError as exc:  # e.g. rowwise scaling unsupported by this cuBLAS
            print(f"{name}: not run ({str(exc).splitlines()[0]})")
            times[name] = errors[name] = None
    baselines = {b: times[b] for b in ("_scaled_mm per-tensor", "_scaled_mm rowwise", "bf16 mm") if times[b]}
    rows = [_row(name, flops, times[name], errors[name], baselines) for name in candidates]
    _print_table(f"FP8 E4M3 GEMM, M = N = K = {m}, bf16 out", baselines, rows)


def bench_int8(rep: int) -> None:
    for m, n, k in INT8_SHAPES:
        flops = 2.0 * m * n * k
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ref = x.float() @ w.float().T
        xq, xs = quantize_rows_triton(x, torch.int8)  # [M, K], [M]
        wq, ws = quantize_int8_per_channel(w)
        w_kn = wq.T  # [K, N] column-major, as _int_mm wants its second operand
        candidates: dict[str, Callable[[], torch.Tensor]] = {
            "bf16 F.linear": lambda x=x, w=w: F.linear(x, w),
            "triton": lambda xq=xq, wq=wq, xs=xs, ws=ws: scaled_gemm_triton(xq, wq, xs, ws, None, torch.bfloat16),
            "triton + quantize x": lambda x=x, wq=wq, ws=ws: w8a8_int8_linear_triton(x, wq, ws),
            "_int_mm (int32 out)": lambda xq=xq, w_kn=w_kn: torch._int_mm(xq, w_kn),
        }
        times, errors = {}, {}
        for name, fn in candidates.items():
            out = fn()
            if out.dtype == torch.int32:
                out = out.float() * xs[:, None] * ws[None, :]
            errors[name] = _relative_error(out, ref)
            times[name] = _time(fn, rep)
        baselines = {"bf16 F.linear": times["bf16 F.linear"], "_int_mm (int32 out)": times["_int_mm (int32 out)"]}
        rows = [_row(name, flops, times[name], errors[name], baselines) for name in candidates]
        _print_table(f"INT8 W8A8 GEMM, M = {m}, N = {n}, K = {k}, bf16 out (TOP/s for int8)", baselines, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    rep = 100 if args.quick else 500
    print(
        f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}, triton {triton.__version__}; do_bench medians"
    )
    bench_fp8(rep)
    bench_int8(rep)


if __name__ == "__main__":
    main()
