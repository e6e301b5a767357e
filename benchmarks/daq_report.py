"""DAQ vs plain scale search on a real base / fine-tuned pair: delta fidelity and perplexity.

    python -m benchmarks.daq_report [--formats int8 int4 fp8] [--tokens 1024] [--no-ppl]

Base: SmolLM2-135M-Instruct (`load_smollm2`); fine-tuned: the same with its Shakespeare adapters
merged (`load_smollm2_finetuned`). For every linear weight of the decoder layers, per format:
absmax scales (α = 1), the plain search (lowest ‖W_post − Q(W_post)‖²) and DAQ (highest sign
preservation + cosine of Q(W_post) − W_base vs ΔW), `quant/daq.py`. Reported: sign preservation
and cosine over all those weights together, the relative weight error, and (unless --no-ppl)
the perplexity of the fine-tuned model with plain vs DAQ weights (through the `daq` scheme of
the quantize pass) on the held-out Shakespeare split — the text the adapters were trained for.
"""

from __future__ import annotations

import argparse
import copy
import datetime

import torch

import angel_compile
from angel_compile.data import token_ids
from angel_compile.eval import perplexity
from angel_compile.models import load_smollm2, load_smollm2_finetuned
from angel_compile.quant.daq import FORMATS, check_weight_pair, search_scales


def _fidelity(pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
    """(sign preservation, cosine, relative error) over all (base, post, quantized) weights together."""
    agree = changed = dot = norm_q = norm_d = err = norm = 0.0
    for base, post, quant in pairs:
        delta, delta_q = (post - base).double(), (quant - base).double()
        mask = delta != 0
        agree += (torch.sign(delta_q[mask]) == torch.sign(delta[mask])).sum().item()
        changed += mask.sum().item()
        dot += (delta * delta_q).sum().item()
        norm_q += delta_q.square().sum().item()
        norm_d += delta.square().sum().item()
        err += (quant.double() - post.double()).square().sum().item()
        norm += post.double().square().sum().item()
    return agree / changed, dot / (norm_q * norm_d) ** 0.5, (err / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--group-size", type=int, default=128, help="int4 groups")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity runs")
    args = parser.parse_args()

    base_model, _ = load_smollm2()
    post_model, tokenizer = load_smollm2_finetuned()
    base = {k: v for k, v in base_model.state_dict().items() if ".layers." in k and k.endswith("proj.weight")}
    post = {k: v for k, v in post_model.state_dict().items() if ".layers." in k and k.endswith("proj.weight")}
    check_weight_pair(base, post)
    ids = None if args.no_ppl else token_ids(tokenizer, "shakespeare", "held_out", max_tokens=args.tokens)
    float_ppl = None if ids is None else perplexity(post_model, ids)
    rows = []
    for fmt in args.formats:
        for label, objective, alphas in (
            ("absmax", "mse", (1.0,)),
            ("plain search", "mse", None),
            ("DAQ", "delta", None),
        ):
            options = {} if alphas is None else {"alphas": alphas}
            triples = []
            for name in base:
                result = search_scales(post[name], base[name], fmt, objective, args.group_size, **options)
                triples.append((base[name], post[name], result.dequantized))
            sign, cosine, error = _fidelity(triples)
            ppl = None
            if ids is not None and label != "absmax":
                scheme = {"type": "daq", "format": fmt, "base_model": "smollm2", "daq": objective == "delta"}
                scheme["group_size"] = args.group_size
                recipe = {
                    "name": f"{fmt}-{label}",
                    "passes": [{"name": "quantize", "options": {"scheme": scheme, "exclude": ["lm_head"]}}],
                }
                compiled = angel_compile.compile(
                    copy.deepcopy(post_model), example_kwargs={"input_ids": ids[:, :64]}, recipe=recipe,
                    dynamic_shapes={"input_ids": {1: torch.export.Dim("seq", min=2, max=2048)}},
                )  # fmt: skip
                ppl = perplexity(compiled, ids)
            rows.append((fmt, label, sign, cosine, error, ppl))
            print(rows[-1], flush=True)
    print(
        f"\n# {datetime.datetime.now():%Y-%m-%d %H:%M}, SmolLM2-135M base vs Shakespeare fine-tune, "
        f"torch {torch.__version__}"
    )
    float_text = "-" if float_ppl is None else f"{float_ppl:.2f}"
    print(
        f"{len(base)} decoder linear weights; int4 group {args.group_size}; perplexity: Shakespeare held-out, "
        f"first {args.tokens} tokens (fine-tuned float: {float_text})\n"
    )
    print("| format | scales | sign preservation | cosine(ΔQ, ΔW) | ‖W − Q(W)‖ / ‖W‖ | ppl |")
    print("|---|---|---|---|---|---|")
    for fmt, label, sign, cosine, error, ppl in rows:
        print(f"| {fmt} | {label} | {sign:.4f} | {cosine:.4f} | {error:.2e} | {'-' if ppl is None else f'{ppl:.2f}'} |")


if __name__ == "__main__":
    main()
