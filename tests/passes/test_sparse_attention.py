import pytest
import torch
import transformers

from angel_compile.capture import capture_model
from angel_compile.errors import RecipeError, UnsupportedError
from angel_compile.models import build_toy_model
from angel_compile.ops.sparse_attention import block_masked_attention, dense_causal_attention
from angel_compile.passes.base import PassContext, build_pass
from angel_compile.passes.sparse_attention import SparseAttention
from angel_compile.passes.verify import verify_graph
from angel_compile.recipe import load_recipe
from tests.utils import relative_error

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SPARSE = torch.ops.angel.sparse_attention.default
F = torch.nn.functional


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _llama_d64(attn_implementation: str) -> torch.nn.Module:
    """A 2-layer LLaMA with head dim 64 (what the kernel takes), 4 query heads and 2 KV heads."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, use_cache=False,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def llama_d64() -> torch.nn.Module:
    return _llama_d64("sdpa")


@pytest.fixture(scope="module")
def llama_d64_eager() -> torch.nn.Module:
    return _llama_d64("eager")


def _ids(seq: int = 256) -> torch.Tensor:
    return torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(1))


def _run(pass_, model, kwargs, ctx=None):
    gm = capture_model(model, (), kwargs)
    return pass_(gm, ctx or PassContext())


def test_rewrites_both_layers_and_drops_the_kv_repeat_and_mask(llama_d64):
    ids = _ids()
    gm = capture_model(llama_d64, (), {"input_ids": ids})
    assert count(gm, SDPA) == 2 and count(gm, aten.expand.default) >= 3
    result = SparseAttention(min_seq_len=10**6)(gm, PassContext())
    gm = result.graph_module
    assert result.modified and result.stats.matched == result.stats.rewritten == 2
    assert count(gm, SDPA) == 0 and count(gm, SPARSE) == 2
    # K/V enter unrepeated ([B, 1, S, D]); repeat_kv and the causal mask are gone
    for node in (n for n in gm.graph.nodes if n.target == SPARSE):
        assert node.args[1].meta["val"].shape == (1, 2, 256, 64)
    assert count(gm, aten.expand.default) == 0 and count(gm, aten.le.Tensor) == 0
    verify_graph(gm)
    with torch.no_grad():
        assert torch.equal(gm(input_ids=ids).logits, llama_d64(input_ids=ids).logits)


def test_dense_equivalent_budget_equals_dense(llama_d64):
    ids = _ids()
    everything = SparseAttention(min_seq_len=0, block_size=64, method="stem", top_k=4, budget_decay=0.0)
    gm = _run(everything, llama_d64, {"input_ids": ids}).graph_module
    with torch.no_grad():
        assert relative_error(gm(input_ids=ids).logits, llama_d64(input_ids=ids).logits) < 1e-5


def test_sparse_budget_changes_the_output_a_little(llama_d64):
    ids = _ids(512)
    sparse = SparseAttention(min_seq_len=0, block_size=64, method="static", sink_blocks=1, local_blocks=2)
    gm = _run(sparse, llama_d64, {"input_ids": ids}).graph_module
    with torch.no_grad():
        assert 0 < relative_error(gm(input_ids=ids).logits, llama_d64(input_ids=ids).logits) < 0.4


def test_second_run_changes_nothing(llama_d64):
    gm = _run(SparseAttention(), llama_d64, {"input_ids": _ids()}).graph_module
    code = gm.code
    again = SparseAttention()(gm, PassContext())
    assert not again.modified and again.stats.rewritten == 0 and again.graph_module.code == code


def test_layer_overrides_and_exclude(llama_d64):
    pass_ = SparseAttention(overrides=({"layers": 0, "method": "static", "local_blocks": 4},), exclude=("layers.1.*",))
    result = _run(pass_, llama_d64, {"input_ids": _ids()})
    (node,) = [n for n in result.graph_module.graph.nodes if n.target == SPARSE]
    assert node.args[4] == "static" and node.args[8] == 4
    assert "excluded by pattern 'layers.1.*'" in " ".join(result.stats.skipped.values())


def test_dense_layers_and_per_head_overrides(llama_d64):
    ids = _ids(256)
    overrides = (
        {"layers": "0", "method": "dense"},
        {"layers": "*", "heads": [0], "local_blocks": 1},  # splits GQA group 0 (heads 0, 1)
        {"layers": "1", "heads": "2-3", "method": "dense"},  # a whole group
    )
    pass_ = SparseAttention(method="static", block_size=64, min_seq_len=0, local_blocks=2, overrides=overrides)
    result = _run(pass_, llama_d64, {"input_ids": ids})
    gm = result.graph_module
    assert result.stats.rewritten == 1 and "every head is dense" in " ".join(result.stats.skipped.values())
    assert count(gm, SDPA) == 1
    ops = [n for n in gm.graph.nodes if n.target == SPARSE]
    # layer 1: head 0 (local 1), head 1 (local 2), heads 2-3 dense
    assert [(n.args[0].meta["val"].shape[1], n.args[8], n.args[6]) for n in ops] == [
        (1, 1, 0), (1, 2, 0), (2, 2, 2**31 - 1)
    ]  # fmt: skip
    assert result.stats.details["heads_by_method"] == {"static": 2, "dense": 2}
    verify_graph(gm)
    # the same heads computed one by one: a reference built from the per-head masks
    with torch.no_grad():
        out = gm(input_ids=ids).logits
        reference = _per_head_reference(llama_d64, ids, {0: 1, 1: 2})
    assert relative_error(out, reference) < 1e-5
    assert relative_error(out, llama_d64(input_ids=ids).logits) > 1e-4  # the sparse heads changed something


def _per_head_reference(model, ids, local_blocks_by_head):
    """Logits with layer 1's heads in local_blocks_by_head computing static attention (block 64, sink 1)."""
    from angel_compile.sparse.selection import forced_block_mask

    sdpa = F.scaled_dot_product_attention
    calls = []

    def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(1)
        out = sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if len(calls) != 2:
            return out
        n = -(-q.shape[2] // 64)
        out = out.clone()
        group = q.shape[1] // k.shape[1]
        for head, local in local_blocks_by_head.items():
            mask = forced_block_mask(n, 1, local)[None, None]
            kv = slice(head // group, head // group + 1)
            sparse = block_masked_attention(q[:, head : head + 1], k[:, kv], v[:, kv], mask, scale or 0.125, 64)
            out[:, head] = sparse[:, 0]
        return out

    F.scaled_dot_product_attention = patched
    try:
        return model(input_ids=ids).logits
    finally:
        F.scaled_dot_product_attention = sdpa


@pytest.mark.parametrize(
    "overrides, named",
    [
        (({"layer": 0, "method": "dense"},), "overrides[0] has unknown key(s) ['layer']"),
        (({"layers": "0-x", "method": "dense"},), "overrides[0]: layers='0-x'"),
        (({"layers": 0},), "overrides[0] sets no parameter"),
        (({"heads": [0], "method": "sparse"},), "overrides[0]: method='sparse' is unknown"),
        (({"heads": [0], "top_k": 0},), "overrides[0]: top_k=0 must be > 0"),
        (({"heads": "1", "top_k": 2}, {"layers": "*", "block_size": 100}), "overrides[1]: block_size=100"),
        (({"heads": "3-1", "top_k": 2},), "range '3-1' is empty"),
    ],
)
def test_override_errors_name_the_entry_and_key(overrides, named):
    with pytest.raises(RecipeError) as info:
        build_pass("sparse_attention", {"overrides": list(overrides)})
    assert named in str(info.value)


def test_override_of_a_head_the_layer_lacks_is_an_error(llama_d64):
    with pytest.raises(UnsupportedError, match=r"heads \[7\] out of range for layer 0, which has 4 query heads"):
        _run(SparseAttention(overrides=({"heads": [7], "top_k": 2},)), llama_d64, {"input_ids": _ids()})


def test_eager_attention_is_rewritten_like_sdpa(llama_d64_eager):
    ids = _ids(256)
    gm = capture_model(llama_d64_eager, (), {"input_ids": ids})
    assert count(gm, SDPA) == 0 and count(gm, aten.softmax.int) == 2
    pass_ = SparseAttention(method="stem", block_size=64, min_seq_len=0, local_blocks=1, top_k=1)
    result = pass_(gm, PassContext())
    gm = result.graph_module
    assert result.stats.matched == result.stats.rewritten == 2, result.stats.skipped
    assert count(gm, SPARSE) == 2 and count(gm, aten.softmax.int) == 0 and count(gm, aten.matmul.default) == 0
    assert count(gm, aten.expand.default) == 0  # repeat_kv and the mask are gone
    for node in (n for n in gm.graph.nodes if n.target == SPARSE):
        assert node.args[1].meta["val"].shape == (1, 2, 256, 64) and node.args[3] == 0.125
    verify_graph(gm)
    # the same substitution on the SDPA form of the same model gives the same logits
    sdpa_model = _llama_d64("sdpa")
    sdpa_gm = _run(pass_, sdpa_model, {"input_ids": ids}).graph_module
    with torch.no_grad():
        eager_out, sdpa_out = gm(input_ids=ids).logits, sdpa_gm(input_ids=ids).logits
        dense = llama_d64_eager(input_ids=ids).logits
    assert relative_error(eager_out, sdpa_out) < 1e-5
    assert 0 < relative_error(eager_out, dense) < 0.2
    assert not pass_(gm, PassContext()).modified


def test_eager_toy_model_is_matched_and_its_head_dim_reported():
    model = build_toy_model("llama", attn_implementation="eager")
    result = _run(SparseAttention(), model, {"input_ids": _ids(16)}, PassContext(whole_model=False))
    assert not result.modified and len(result.stats.skipped) == 2
    assert all("head dim 16" in why for why in result.stats.skipped.values())


def test_eager_attention_with_a_padding_mask_stays_dense(llama_d64_eager):
    ids = _ids()
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = _run(SparseAttention(), llama_d64_eager, kwargs, PassContext(whole_model=False))
    assert not result.modified and count(result.graph_module, aten.softmax.int) == 2
    assert all("graph input 'attention_mask'" in why for why in result.stats.skipped.values())


class EagerAttention(torch.nn.Module):
    """Hand-written eager attention: division by sqrt(d), an optional mask, optional softmax reuse."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2])
        scores = q @ k.transpose(-2, -1) / 8.0
        if self.kind != "no_mask":
            scores = scores + torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
        weights = scores.softmax(dim=-1)
        out = weights @ v
        return (out, weights) if self.kind == "weights_returned" else out


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("causal", None),
        ("no_mask", "not causal (no mask added to the scores)"),
        ("weights_returned", "its weights are used elsewhere"),
    ],
)
def test_hand_written_eager_attention(kind, reason):
    q, k, v = _qkv()
    result = _run(
        SparseAttention(min_seq_len=0, block_size=64), EagerAttention(kind), {"q": q, "k": k, "v": v},
        PassContext(whole_model=False),
    )  # fmt: skip
    if reason is None:
        assert result.stats.rewritten == 1 and result.graph_module.graph.find_nodes(op="call_function", target=SPARSE)[
            0
        ].args[3] == pytest.approx(0.125)
        out = result.graph_module(q=q, k=k, v=v)
        assert relative_error(out, dense_causal_attention(q, k, v, 0.125)) < 1e-6  # 2 blocks: all kept
    else:
        assert not result.modified and reason in " ".join(result.stats.skipped.values())


def test_padding_mask_input_stays_dense(llama_d64):
    ids = _ids()
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = _run(SparseAttention(), llama_d64, kwargs, PassContext(whole_model=False))
    assert not result.modified and count(result.graph_module, SDPA) == 2
    assert all("graph input 'attention_mask'" in why for why in result.stats.skipped.values())


def test_unsupported_head_dim_stays_dense_and_a_whole_model_with_nothing_to_do_is_an_error(toy_llama):
    ids = _ids(16)
    result = _run(SparseAttention(), toy_llama, {"input_ids": ids}, PassContext(whole_model=False))
    assert not result.modified
    assert all("head dim 16" in why for why in result.stats.skipped.values())
    with pytest.raises(UnsupportedError, match="head dim 16"):
        _run(SparseAttention(), toy_llama, {"input_ids": ids})


class Attention(torch.nn.Module):
    """One SDPA call whose causality comes in a given form."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask=None):
        i = torch.arange(q.shape[2])
        if self.kind == "is_causal_gqa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if self.kind == "float_causal":
            mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf"))
        elif self.kind == "anti_causal":
            mask = i[None, :] >= i[:, None]
        elif self.kind == "shifted_causal":
            mask = i[None, :] <= i[:, None] + 1
        elif self.kind == "bidirectional":
            mask = None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _qkv(seq=128, kv_heads=4):
    torch.manual_seed(0)
    return torch.randn(1, 4, seq, 64), torch.randn(1, kv_heads, seq, 64), torch.randn(1, kv_heads, seq, 64)


@pytest.mark.parametrize("kind, kv_heads", [("is_causal_gqa", 2), ("float_causal", 4)])
def test_other_causal_forms_are_rewritten(kind, kv_heads):
    q, k, v = _qkv(kv_heads=kv_heads)
    result = _run(SparseAttention(min_seq_len=0, block_size=64, top_k=2), Attention(kind), {"q": q, "k": k, "v": v})
    assert result.stats.rewritten == 1, result.stats.skipped
    assert relative_error(result.graph_module(q=q, k=k, v=v), dense_causal_attention(q, k, v, 0.125)) < 1e-6


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("anti_causal", "mask is not causal"),
        ("shifted_causal", "mask is not causal"),
        ("bidirectional", "not causal (no mask and is_causal=False)"),
        ("additive", "depends on the graph input 'mask'"),
    ],
)
def test_non_causal_and_arbitrary_masks_stay_dense(kind, reason):
    q, k, v = _qkv()
    kwargs = {"q": q, "k": k, "v": v} | ({"mask": torch.randn(128, 128)} if kind == "additive" else {})
    result = _run(SparseAttention(), Attention(kind), kwargs, PassContext(whole_model=False))
    assert not result.modified
    (why,) = result.stats.skipped.values()
    assert reason in why


def test_decode_stays_dense():
    q = torch.randn(1, 4, 1, 64)
    k = v = torch.randn(1, 4, 1, 64)
    result = _run(
        SparseAttention(), Attention("is_causal_gqa"), {"q": q, "k": k, "v": v}, PassContext(whole_model=False)
    )
    assert "decode" in " ".join(result.stats.skipped.values())


@pytest.mark.parametrize(
    "options, named",
    [
        ({"top_k": 0}, "top_k=0"),
        ({"block_size": 96}, "block_size=96"),
        ({"block_size": 32}, "block_size=32 must be one of"),
        ({"method": "h2o"}, "method='h2o'"),
        ({"overrides": [{"layers": 0, "topk": 3}]}, "unknown key(s) ['topk']"),
        ({"overrides": [{"layers": 0, "top_k": -1}]}, "overrides[0]: top_k=-1"),
        ({"overrides": {"layers": 0}}, "overrides[0] must map keys to values"),
    ],
)
def test_option_errors_name_the_parameter(options, named):
    with pytest.raises(RecipeError) as info:
        build_pass("sparse_attention", options)
    assert named in str(info.value)


@pytest.mark.parametrize("name", ["sparse-attention-static", "sparse-attention-stem", "sparse-attention-s2o"])
def test_recipes_build(name):
    (pass_,) = load_recipe(name).build_passes()
    assert isinstance(pass_, SparseAttention) and pass_.method == name.rsplit("-", 1)[1]
