"""Perplexity and stored size of SmolLM2-135M under ultra-low-bit schemes (issue 6) vs float.

    python -m benchmarks.lowbit_accuracy [--model smollm2-ft] [--tokens 2048] [--device cpu]

Schemes (lm_head and the tied embedding stay float): INT2 g64 RTN (clipping search), INT2 g64
GPTQ (recipe int2-gptq), 3:4 ternary g128 activation-weighted (recipe ternary-1.25), plain
ternary 2-bit g128 (activation-weighted), and both ternary formats with group 64 (SmolLM2's
K = 576 is no multiple of 128; `--only` picks a subset). Calibration and held-out text as in
`benchmarks/quant_accuracy.py`. Size: bytes of every tensor the compiled model stores (packed
weights, scales, zero points; float tensors counted as bf16) vs the bf16 model.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from benchmarks.quant_accuracy import CORPORA, add_setup_arguments, load_setup


def _recipe(name: str, scheme: dict) -> dict:
    options = {"scheme": scheme, "exclude": ["lm_head"]}
    return {"name": name, "passes": [{"name": "quantize", "options": options}]}


RECIPES = {
    "int2 g64 RTN": _recipe("int2-rtn", {"type": "int2_weight_only", "group_size": 64, "method": "rtn"}),
    "int2 g64 GPTQ (int2-gptq)": "int2-gptq",
    "ternary 3:4 1.25-bit g128 (ternary-1.25)": "ternary-1.25",
    "ternary 2-bit g128": _recipe(
        "ternary-2bit", {"type": "ternary", "packing": "2bit", "group_size": 128, "activation_weighted": True}
    ),
    # SmolLM2's hidden size 576 is no multiple of 128: group 128 leaves every layer but down_proj in float.
    "ternary 3:4 1.25-bit g64": _recipe(
        "ternary-1.25-g64", {"type": "ternary", "packing": "3of4", "group_size": 64, "activation_weighted": True}
    ),
    "ternary 2-bit g64": _recipe(
        "ternary-2bit-g64", {"type": "ternary", "packing": "2bit", "group_size": 64, "activation_weighted": True}
    ),
}


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's distinct tensors, floating-point ones counted at 2 bytes (bf16)."""
    seen, total = set(), 0
    for tensor in list(module.state_dict(keep_vars=True).values()):
        if tensor.data_ptr() in seen:
            continue  # tied weights are stored once
        seen.add(tensor.data_ptr())
        total += tensor.numel() * (
            2 if tensor.is_floating_point() and tensor.element_size() > 1 else tensor.element_size()
        )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_arguments(parser, model="smollm2-ft")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), help="run these schemes only")
    args = parser.parse_args()
    setup = load_setup(args)

    bf16_bytes = stored_bytes(setup.model)
    rows = [("float (fp32 run, bf16 size)", setup.perplexities(setup.model), bf16_bytes, 0.0)]
    for label, recipe in RECIPES.items():
        if args.only and label not in args.only:
            continue
        compiled, seconds = setup.compile(recipe)
        ppl = setup.perplexities(compiled)
        rows.append((label, ppl, stored_bytes(compiled.graph_module), seconds))
        print(f"{label}: {ppl} ({seconds:.0f} s to compile)", flush=True)

    print(
        f"\n# {datetime.datetime.now():%Y-%m-%d %H:%M}, model {args.model}, fp32 on {args.device}, "
        f"torch {torch.__version__}"
    )
    print(
        f"perplexity over the first {args.tokens} held-out tokens per corpus; calibration "
        f"{args.calibration_batches} × {args.calibration_length} tokens\n"
    )
    header = ["scheme", *[f"ppl {c}" for c in CORPORA], "stored MB", "vs bf16", "compile s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, ppl, size, seconds in rows:
        cells = [label, *[f"{ppl[c]:.2f}" for c in CORPORA], f"{size / 1e6:.1f}", f"{size / bf16_bytes:.2f}×"]
        print("| " + " | ".join(cells + [f"{seconds:.0f}"]) + " |")


if __name__ == "__main__":
    main()
