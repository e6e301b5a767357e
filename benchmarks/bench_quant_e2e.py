"""End to end: a Llama-8B-shaped decoder (random weights, 4 layers) under each recipe.

Prefill of --prefill tokens and batch-1 decode with a --context-token KV cache, bf16, timed in
the same run for every recipe (decode replayed as a CUDA graph, so Python dispatch is not
timed). Prints tokens/s and the ratio to bf16 ("none"). Recipes that calibrate do it once, on
prefill-shaped batches (the captured graphs have static shapes), and the decode graph loads the
saved state (`calibration.load`), so both graphs carry the same quantized weights.

    python -m benchmarks.bench_quant_e2e                      # on the GPU machine, from the repo root
    python -m benchmarks.bench_quant_e2e --tiny --device cpu  # a shape check on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
from pathlib import Path

import torch

import angel_compile
from angel_compile.recipe import Recipe, load_recipe
from benchmarks.llama_decoder import TINY, DecoderShape, LlamaDecoder, random_cache

CALIBRATION_BATCHES = 2


def _inputs(shape: DecoderShape, tokens: int, cached: int, device, dtype):
    ids = torch.randint(0, shape.vocab, (1, tokens), device=device)
    positions = torch.arange(cached, cached + tokens, device=device)
    k, v = random_cache(shape, 1, cached, dtype, device)
    return ids, positions, k, v


def _with_calibration_file(recipe: Recipe, option: str, path: Path) -> Recipe:
    """The recipe with `calibration: {option: path}` added to its quantize passes."""
    data = recipe.to_dict()
    for spec in data["passes"]:
        if spec["name"] == "quantize":
            options = spec.setdefault("options", {})
            options["calibration"] = {**options.get("calibration", {}), option: str(path)}
    return Recipe.from_dict(data)


def _time(fn, device: str, graph: bool) -> float:
    """Median milliseconds."""
    if device == "cpu":
        import time

        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    for _ in range(3):
        fn()  # autotuning and lazy initialisation stay out of the capture and the timing
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="none,fp8-dynamic,int4-gptq")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check of the script)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = TINY if args.tiny else DecoderShape(layers=args.layers)
    prefill = 16 if args.tiny else args.prefill
    context = 8 if args.tiny else args.context
    torch.manual_seed(0)
    model = LlamaDecoder(shape).to(device=args.device, dtype=dtype).eval()
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.02)  # default init has huge embeddings; keep activations sane
    prefill_inputs = _inputs(shape, prefill, 0, args.device, dtype)
    decode_inputs = _inputs(shape, 1, context, args.device, dtype)
    calibration = [_inputs(shape, prefill, 0, args.device, dtype) for _ in range(CALIBRATION_BATCHES)]
    state_dir = Path(tempfile.mkdtemp(prefix="angel_bench_calibration_"))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {datetime.date.today()} {device_name}; {shape}; prefill {prefill}, decode context {context}, batch 1")
    rows = []
    for recipe in args.recipes.split(","):
        resolved = load_recipe(recipe)
        state = state_dir / f"{recipe}.safetensors"
        compiled = {
            "prefill": angel_compile.compile(
                model, prefill_inputs, recipe=_with_calibration_file(resolved, "save", state),
                calibration_data=calibration,
            ),
        }  # fmt: skip
        decode_recipe = _with_calibration_file(resolved, "load", state) if state.exists() else resolved
        compiled["decode"] = angel_compile.compile(model, decode_inputs, recipe=decode_recipe)
        with torch.no_grad():
            reference = model(*decode_inputs)[0].float()
        out = compiled["decode"](*decode_inputs)[0].float()
        error = ((out - reference).norm() / reference.norm()).item()
        prefill_ms = _time(lambda c=compiled["prefill"]: c(*prefill_inputs), args.device, graph=False)
        decode_ms = _time(lambda c=compiled["decode"]: c(*decode_inputs), args.device, graph=True)
        rows.append((recipe, prefill / prefill_ms * 1e3, 1 / decode_ms * 1e3, prefill_ms, decode_ms, error))
        print(f"  {recipe}: prefill {prefill_ms:.2f} ms, decode {decode_ms:.3f} ms, logit rel. error {error:.3g}")
    base_prefill, base_decode = rows[0][1], rows[0][2]
    print("\n| recipe | prefill tok/s | × | decode tok/s (batch 1) | × | decode logits rel. error vs bf16 |")
    print("|---|---|---|---|---|---|")
    for recipe, prefill_tps, decode_tps, _, _, error in rows:
        print(
            f"| {recipe} | {prefill_tps:,.0f} | {prefill_tps / base_prefill:.2f} | {decode_tps:,.1f} | "
            f"{decode_tps / base_decode:.2f} | {error:.3g} |"
        )


if __name__ == "__main__":
    main()
