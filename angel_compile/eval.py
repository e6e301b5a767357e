"""Accuracy harness on real weights and real text: perplexity, long-context retrieval, greedy agreement.

A "model under test" is anything callable as `fn(input_ids=ids)` with `ids: [B, S]` int64 that
returns logits `[B, S, V]`, or an object with `.logits` (a transformers output), or a tuple whose
first item is the logits: a `torch.nn.Module`, or what `angel_compile.compile` returns.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import random
import re
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from safetensors.torch import save_file
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from angel_compile.data import documents, token_ids
from angel_compile.errors import UnsupportedError
from angel_compile.models.smollm2 import load_smollm2, load_smollm2_finetuned

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
MODELS = ("smollm2", "smollm2-ft")


def as_logits_fn(model: Callable[..., Any]) -> LogitsFn:
    """Wrap a model (module or compiled callable) as `ids [B, S] -> logits [B, S, V]` (no grad)."""

    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=input_ids)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, tuple | list) else out

    return logits_fn


def perplexity(model: Callable[..., Any], ids: torch.Tensor, window: int = 1024, stride: int = 512) -> float:
    """Perplexity of `model` on token ids `[1, N]`, with strided windows.

    Each window holds up to `window` tokens and starts `stride` tokens after the previous one;
    it scores only the tokens the previous window did not, so each token after the first is
    predicted once, from at least `window - stride` tokens of context (except near the start).
    Out: exp(mean negative log-likelihood over the N - 1 predicted tokens). Raises `ValueError`
    unless 0 < stride < window.
    """
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride {stride}, window {window}")
    logits_fn = as_logits_fn(model)
    n = ids.shape[1]
    total, count, scored_to = 0.0, 0, 1  # token 0 has no prediction
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n)
        logits = logits_fn(ids[:, begin:end])  # [1, end - begin, V]
        first = scored_to - begin  # first position of this window whose token is not scored yet
        predicted = logits[0, first - 1 : end - begin - 1].float()  # predicts tokens first .. end-1
        targets = ids[0, scored_to:end].to(predicted.device)
        total += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
        count += end - scored_to
        scored_to = end
        if end == n:
            break
    return float(torch.exp(torch.tensor(total / count)))


def greedy_continuation(model: Callable[..., Any], ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The `new_tokens` greedy next tokens after prompt `ids [1, S]`, as `[1, new_tokens]`.

    Each step runs the whole sequence again: the model under test is a plain callable with no
    KV cache, and this keeps every model on the same code path.
    """
    logits_fn = as_logits_fn(model)
    sequence = ids
    for _ in range(new_tokens):
        next_token = logits_fn(sequence)[:, -1].argmax(dim=-1, keepdim=True).to(sequence.device)  # [1, 1]
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence[:, ids.shape[1] :]


def agreement_prompts(tokenizer, count: int, length: int = 48, root: str | None = None) -> list[torch.Tensor]:
    """`count` fixed prompts of `length` tokens each (`[1, length]`), from held-out text.

    Even-numbered prompts are the openings of Lee held-out articles 250, 251, ...; odd-numbered
    ones are windows of The Tempest starting every 1000 tokens.
    """
    news = documents("lee", "held_out", root)
    tempest = token_ids(tokenizer, "shakespeare", "held_out", root=root)[0]
    prompts = []
    for i in range(count):
        if i % 2 == 0:
            ids = tokenizer(news[i // 2].text, add_special_tokens=False).input_ids[:length]
            prompts.append(torch.tensor([ids], dtype=torch.long))
        else:
            start = 1000 * (i // 2)
            prompts.append(tempest[start : start + length].unsqueeze(0))
    return prompts


def generation_agreement(
    model: Callable[..., Any], prompts: list[torch.Tensor], continuations: list[torch.Tensor]
) -> float:
    """Token match rate of `model` with a reference's greedy continuations, teacher-forced.

    In: prompts `[1, S]` and the reference's greedy continuations `[1, T]` of them
    (`greedy_continuation`). The model reads prompt + reference continuation in one forward;
    at each of the T positions its greedy choice is compared with the reference's token, so a
    divergence is counted once, not carried into the tokens after it. Out: matches / (N * T).
    """
    logits_fn = as_logits_fn(model)
    matches, total = 0, 0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        sequence = torch.cat([prompt, continuation], dim=1)
        logits = logits_fn(sequence)  # [1, S + T, V]
        choices = logits[0, prompt.shape[1] - 1 : -1].argmax(dim=-1).to(continuation.device)  # [T]
        matches += int((choices == continuation[0]).sum())
        total += continuation.shape[1]
    return matches / total


@dataclasses.dataclass(frozen=True)
class RetrievalCase:
    """One retrieval prompt: a key planted at `depth` (0 = start, 1 = end) of `length` tokens of news."""

    length: int
    depth: float
    key: str
    input_ids: torch.Tensor  # [1, <= length]: the prompt, ending with "The secret number is"
    answer_ids: torch.Tensor  # [1, T]: the tokens of " <key>" that must follow it


_QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
_ANSWER_PREFIX = "The secret number is"


def _retrieval_prompt(tokenizer, sentences: list[str], needle_at: int, key: str) -> list[int]:
    needle = f"The secret number is {key}. Remember it."
    text = " ".join([*sentences[:needle_at], needle, *sentences[needle_at:]])
    messages = [{"role": "user", "content": f"{text}\n\n{_QUESTION}"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(chat + _ANSWER_PREFIX, add_special_tokens=False).input_ids


def retrieval_cases(
    tokenizer,
    lengths: tuple[int, ...],
    depths: tuple[float, ...] = (0.1, 0.5, 0.9),
    seed: int = 0,
    root: str | None = None,
) -> list[RetrievalCase]:
    """Fixed retrieval prompts: for each length and depth, a random 5-digit key in Lee news filler.

    The filler is the sentences of the Lee train split in order, as many as fit in `length`
    tokens with the needle ("The secret number is NNNNN. Remember it."), the question and the
    chat template around them; the needle goes between sentences at the given depth. The
    prompt ends with the start of the answer, "The secret number is". Keys come from
    `random.Random(seed)`, so the cases are the same on every run. Raises `ValueError` when a
    length is longer than the filler text allows (about 25K tokens).
    """
    rng = random.Random(seed)
    text = " ".join(d.text for d in documents("lee", "train", root))
    sentences = re.split(r"(?<=[.!?])\s+", text)
    total = len(_retrieval_prompt(tokenizer, sentences, len(sentences), "00000"))
    cases = []
    for length in lengths:
        if length > total:
            raise ValueError(f"retrieval length {length} is longer than the filler text ({total} tokens)")
        # Sentence count that fills `length` tokens, found once per length with the needle at the end.
        count = max(1, int(len(sentences) * length / total))
        while count > 1 and len(_retrieval_prompt(tokenizer, sentences[:count], count, "00000")) > length:
            count -= max(1, count // 50)
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            ids = _retrieval_prompt(tokenizer, sentences[:count], round(depth * count), key)
            answer = tokenizer(f" {key}", add_special_tokens=False).input_ids
            as_tensor = functools.partial(torch.tensor, dtype=torch.long)
            cases.append(RetrievalCase(length, depth, key, as_tensor([ids]), as_tensor([answer])))
    return cases


def retrieval_accuracy(model: Callable[..., Any], cases: list[RetrievalCase]) -> dict[int, float]:
    """Fraction of cases, by length, whose greedy continuation begins with the key.

    Teacher-forced: one forward over prompt + " <key>" checks that the greedy choice at every
    answer position is the key's next token, which holds exactly when greedy decoding would
    write the key first. One forward per case instead of one per answer token keeps 8K-token
    cases affordable on a CPU.
    """
    logits_fn = as_logits_fn(model)
    hits: dict[int, list[bool]] = {}
    for case in cases:
        sequence = torch.cat([case.input_ids, case.answer_ids], dim=1)  # [1, S + T]
        answer_length = case.answer_ids.shape[1]
        logits = logits_fn(sequence)[0, -answer_length - 1 : -1]  # [T, V]: predicts the answer tokens
        found = bool((logits.argmax(dim=-1).to(case.answer_ids.device) == case.answer_ids[0]).all())
        hits.setdefault(case.length, []).append(found)
    return {length: sum(found) / len(found) for length, found in hits.items()}


@contextmanager
def _record_attention_inputs(model: torch.nn.Module, layers: tuple[int, ...], store: dict[str, torch.Tensor]):
    """Inside: every SDPA attention call of `model`'s layers in `layers` stores its q, k, v in `store`."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        raise UnsupportedError("record_qkv needs a transformers model with attn_implementation='sdpa'")
    modules = {id(m): m.layer_idx for m in model.modules() if getattr(m, "layer_idx", None) in layers}
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording_sdpa(module, query, key, value, *args, **kwargs):
        layer = modules.get(id(module))
        if layer is not None:
            store.update({f"layer{layer}.q": query, f"layer{layer}.k": key, f"layer{layer}.v": value})
        return sdpa(module, query, key, value, *args, **kwargs)

    # transformers looks the attention function up by name at each call: swap it for the duration.
    ALL_ATTENTION_FUNCTIONS["sdpa"] = recording_sdpa
    try:
        yield
    finally:
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous


@torch.no_grad()
def record_qkv(
    model: torch.nn.Module, ids: torch.Tensor, layers: tuple[int, ...], path: str | None = None
) -> dict[str, torch.Tensor]:
    """Real attention inputs of chosen layers of a transformers decoder on token ids `[B, S]`.

    Recorded where the attention kernel reads them: after the q/k/v projections and RoPE, before
    the grouped-query expansion of K and V. Out: `{"layer{i}.q": [B, Hq, S, D], "layer{i}.k":
    [B, Hkv, S, D], "layer{i}.v": [B, Hkv, S, D]}` on the CPU, in the model's dtype; also written
    to `path` (safetensors, with the token ids under "input_ids") when given. The attention is
    causal with no padding. Raises `UnsupportedError` unless the model uses SDPA attention.
    """
    store: dict[str, torch.Tensor] = {}
    with _record_attention_inputs(model, layers, store):
        model(input_ids=ids)
    missing = [i for i in layers if f"layer{i}.q" not in store]
    if missing:
        raise UnsupportedError(f"no attention call recorded for layers {missing}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in store.items()}
    if path is not None:
        save_file({**tensors, "input_ids": ids.to("cpu").contiguous()}, path)
    return tensors


@dataclasses.dataclass
class EvalRow:
    """One model's results: perplexity by corpus, retrieval accuracy by length, greedy agreement."""

    name: str
    perplexity: dict[str, float]
    retrieval: dict[int, float]
    agreement: float


def evaluate(
    reference: Callable[..., Any],
    candidates: dict[str, Callable[..., Any]],
    tokenizer,
    *,
    ppl_corpora: tuple[str, ...] = ("shakespeare", "lee"),
    ppl_tokens: int = 4096,
    retrieval_lengths: tuple[int, ...] = (512, 1024, 2048),
    prompts: int = 16,
    new_tokens: int = 32,
    progress: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> list[EvalRow]:
    """The reference and each candidate measured on the same held-out text.

    In: models as described in the module docstring (the reference first, named "reference"),
    all on `device`; the tokenizer; perplexity over the first `ppl_tokens` tokens of each
    corpus's held-out split; retrieval at `retrieval_lengths` (3 depths each); agreement with
    the reference's greedy continuations (`new_tokens` tokens) of `prompts` fixed prompts.
    Out: one row per model, reference first; the reference's agreement is with itself (1.0
    unless it is nondeterministic).
    """
    report = progress or (lambda message: None)
    texts = {c: token_ids(tokenizer, c, "held_out", max_tokens=ppl_tokens).to(device) for c in ppl_corpora}
    cases = [
        dataclasses.replace(case, input_ids=case.input_ids.to(device), answer_ids=case.answer_ids.to(device))
        for case in retrieval_cases(tokenizer, retrieval_lengths)
    ]
    prompt_ids = [p.to(device) for p in agreement_prompts(tokenizer, prompts)]
    report(f"reference continuations of {prompts} prompts")
    continuations = [greedy_continuation(reference, p, new_tokens) for p in prompt_ids]
    rows = []
    for name, model in {"reference": reference, **candidates}.items():
        began = time.perf_counter()
        report(f"{name}: perplexity")
        ppl = {corpus: perplexity(model, ids) for corpus, ids in texts.items()}
        report(f"{name}: retrieval")
        retrieval = retrieval_accuracy(model, cases)
        report(f"{name}: agreement")
        rows.append(EvalRow(name, ppl, retrieval, generation_agreement(model, prompt_ids, continuations)))
        report(f"{name}: done in {time.perf_counter() - began:.0f} s")
    return rows


def format_table(rows: list[EvalRow]) -> str:
    """A Markdown table of `rows`: one line per model, a column per corpus, length and agreement."""
    corpora = list(rows[0].perplexity)
    lengths = list(rows[0].retrieval)
    header = ["model", *[f"ppl {c}" for c in corpora], *[f"retrieval@{n}" for n in lengths], "agreement"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.name, *[f"{row.perplexity[c]:.2f}" for c in corpora]]
        cells += [f"{row.retrieval[n]:.2f}" for n in lengths] + [f"{row.agreement:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_batches(tokenizer, count: int = 4, length: int = 256) -> list[dict[str, torch.Tensor]]:
    """`count` model inputs `{"input_ids": [1, length]}` for recipes that calibrate.

    They alternate between the calibration splits of Shakespeare (Macbeth, Twelfth Night) and
    Lee news (articles 200-249).
    """
    tokens = length * count
    sources = [token_ids(tokenizer, c, "calibration", max_tokens=tokens) for c in ("shakespeare", "lee")]
    return [{"input_ids": sources[i % 2][:, (i // 2) * length : (i // 2 + 1) * length]} for i in range(count)]


def load_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """`(model, tokenizer)` of a model in `MODELS`: "smollm2" (base) or "smollm2-ft" (fine-tuned sibling)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {MODELS}")
    return (load_smollm2_finetuned if name == "smollm2-ft" else load_smollm2)(dtype)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SIZES = {"tokens": 4096, "retrieval_lengths": "1024,2048,4096,8192", "prompts": 16, "new_tokens": 32}
QUICK_SIZES = {"tokens": 256, "retrieval_lengths": "256", "prompts": 4, "new_tokens": 16}


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `angel-compile eval` to `parser` (see `run_eval`)."""
    default, quick = DEFAULT_SIZES, QUICK_SIZES
    parser.add_argument("--recipe", action="append", default=[], help="recipe to compare (repeatable)")
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="base or fine-tuned SmolLM2-135M")
    parser.add_argument(
        "--tokens",
        type=int,
        help=f"perplexity tokens per corpus (default {default['tokens']}, quick {quick['tokens']})",
    )
    parser.add_argument(
        "--retrieval-lengths",
        help=f"comma-separated context lengths (default {default['retrieval_lengths']}; "
        f"quick {quick['retrieval_lengths']})",
    )
    parser.add_argument(
        "--prompts", type=int, help=f"greedy-agreement prompts (default {default['prompts']}, quick {quick['prompts']})"
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        help=f"greedy tokens per prompt (default {default['new_tokens']}, quick {quick['new_tokens']})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute per model on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the model's weights")


def run_eval(args: argparse.Namespace) -> int:
    """`angel-compile eval`: compile the model with each recipe, evaluate all, print the table.

    In: the options of `add_eval_arguments`. Out: exit status 0; the table goes to stdout and
    progress to stderr. Raises `MissingDependencyError` when the model or corpora are missing.
    """
    # The compiler is imported only here: the harness itself needs none of it.
    import angel_compile

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    tokens = args.tokens or sizes["tokens"]
    lengths = tuple(int(n) for n in (args.retrieval_lengths or sizes["retrieval_lengths"]).split(","))
    prompts = args.prompts or sizes["prompts"]
    new_tokens = args.new_tokens or sizes["new_tokens"]
    device = torch.device(args.device)
    recipes = [angel_compile.load_recipe(recipe) for recipe in args.recipe]  # bad names fail before the model loads
    model, tokenizer = load_model(args.model, DTYPES[args.dtype])
    model.to(device)
    ids = token_ids(tokenizer, "shakespeare", "calibration", max_tokens=64).to(device)
    seq = torch.export.Dim("seq", min=2, max=model.config.max_position_embeddings)
    calibration = [{"input_ids": batch["input_ids"].to(device)} for batch in calibration_batches(tokenizer)]
    candidates = {}
    for name, recipe in zip(args.recipe, recipes, strict=True):
        progress(f"compiling with {name}")
        candidates[name] = angel_compile.compile(
            copy.deepcopy(model),  # a recipe may rewrite weights; the reference must stay as it is
            example_kwargs={"input_ids": ids},
            recipe=recipe,
            dynamic_shapes={"input_ids": {1: seq}},
            calibration_data=calibration,
        )
    rows = evaluate(
        model,
        candidates,
        tokenizer,
        ppl_tokens=tokens,
        retrieval_lengths=lengths,
        prompts=prompts,
        new_tokens=new_tokens,
        progress=progress,
        device=device,
    )
    print(
        f"{args.model} ({args.dtype}, {device.type}): perplexity over {tokens} held-out tokens per corpus; "
        f"retrieval of a 5-digit key at 3 depths per context length; greedy agreement with the reference "
        f"over {prompts} prompts x {new_tokens} tokens"
    )
    print(format_table(rows))
    return 0
