"""How much of the full-sequence output survives token pruning, MMR vs the baselines (CPU).

On the multimodal test models (`angel_compile.models.multimodal`: LLaVA with 64 visual tokens,
Whisper encoder + LM with 48 audio tokens; random weights, inputs made by code), each method
prunes 50 / 75 / 90% of the modality tokens through the compiled `token_pruning` pass, and
the output is compared with the unpruned model's at the last text token:
  - hidden cos: cosine similarity of the final hidden state (the lm_head input);
  - logits rel. err: ‖logits − logits_full‖ / ‖logits_full‖;
  - top-1: whether the arg-max token agrees (averaged over prompts).
Averaged over several prompts (different text around the same image / recording). The
pruned model is run by hand (the op on the merged embeddings, then the language model on the
kept tokens with their position ids); the script first checks, once per model, that the
compiled graph gives the same output (compiling every method × ratio would take minutes).

    python -m benchmarks.token_pruning_quality
"""

from __future__ import annotations

import argparse

import torch

import angel_compile
from angel_compile.models.multimodal import build_audio_test_case, build_vlm_test_case
from angel_compile.ops.prune_tokens import kept_count

METHODS = ("mmr", "diversity", "topk", "stride", "random")
RATIOS = (0.5, 0.75, 0.9)


def _prompts(case, count: int) -> list[dict[str, torch.Tensor]]:
    ids = case.inputs["input_ids"]
    prompts = []
    for seed in range(count):
        g = torch.Generator().manual_seed(100 + seed)
        modality = ids == case.token_id
        new = torch.where(modality, ids, torch.randint(0, 200, ids.shape, generator=g))
        prompts.append({**case.inputs, "input_ids": new})
    return prompts


def _hidden_and_logits(model, embeds: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden state and logits of the last token from the language model alone."""
    captured = {}
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: captured.update(h=args[0][:, -1]))
    try:
        logits = model.language_forward(embeds, position_ids)[:, -1]
    finally:
        handle.remove()
    return captured["h"], logits


def _pruned(case, x, keep: int, method: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    merged = case.model.merged_embeddings(*x.values())
    mask = x["input_ids"] == case.token_id
    pruned, positions = torch.ops.angel.prune_tokens(merged, mask, case.num_tokens, keep, method, 0.5, threshold, 0)
    return pruned, x["position_ids"].gather(1, positions)


def _check_compiled_graph(case, modality: str, threshold: float) -> None:
    """The compiled pass gives what the hand-built path below gives (once per model: compiling is slow)."""
    recipe = {"passes": [{"name": "token_pruning", "options": {"ratio": 0.75, "modality": modality}}]}
    compiled = angel_compile.compile(case.model, (), case.inputs, recipe=recipe, dynamic_shapes=case.dynamic_shapes)
    keep = compiled.report["token_pruning"].stats.details["kept"]
    with torch.no_grad():
        expected = case.model.language_forward(*_pruned(case, case.inputs, keep, "mmr", threshold))
        if not torch.allclose(compiled(**case.inputs), expected, atol=1e-5):
            raise AssertionError("the compiled graph disagrees with the hand-built pruned model")


def run(name: str, case, modality: str, prompts: int) -> None:
    threshold = 0.9 if modality == "audio" else 1.0
    _check_compiled_graph(case, modality, threshold)
    inputs = _prompts(case, prompts)
    with torch.no_grad():
        full = [
            _hidden_and_logits(case.model, case.model.merged_embeddings(*x.values()), x["position_ids"]) for x in inputs
        ]
        for ratio in RATIOS:
            keep = kept_count(case.num_tokens, ratio)
            for method in METHODS:
                cos, err, top1 = [], [], []
                for x, (h_full, l_full) in zip(inputs, full, strict=True):
                    hidden, logits = _hidden_and_logits(case.model, *_pruned(case, x, keep, method, threshold))
                    cos.append(torch.nn.functional.cosine_similarity(hidden, h_full).item())
                    err.append(((logits - l_full).norm() / l_full.norm()).item())
                    top1.append(float(logits.argmax() == l_full.argmax()))
                n = len(inputs)
                print(
                    f"| {name} | {int(ratio * 100)}% | {keep}/{case.num_tokens} | {method} | "
                    f"{sum(cos) / n:.4f} | {sum(err) / n:.4f} | {sum(top1) / n:.2f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    print("| model | pruned | kept | method | hidden cos | logits rel. err | top-1 agree |")
    print("|---|---|---|---|---|---|---|")
    run("LLaVA (vision)", build_vlm_test_case(), "vision", args.prompts)
    run("Whisper+LM (audio)", build_audio_test_case(), "audio", args.prompts)


if __name__ == "__main__":
    main()
