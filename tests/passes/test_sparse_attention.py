import pytest
import torch
import transformers

from angel_compile.capture import capture_model
from angel_compile.errors import RecipeError, UnsupportedError
from angel_compile.ops.sparse_attention import dense_causal_attention
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


@pytest.fixture(scope="module")
def llama_d64() -> torch.nn.Module:
    """A 2-layer LLaMA with head dim 64 (what the kernel takes) and 2 query heads per KV head."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, use_cache=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


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
        assert node.args[1].meta["val"].shape == (1, 1, 256, 64)
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
        assert 0 < relative_error(gm(input_ids=ids).logits, llama_d64(input_ids=ids).logits) < 0.2


def test_second_run_changes_nothing(llama_d64):
    gm = _run(SparseAttention(), llama_d64, {"input_ids": _ids()}).graph_module
    code = gm.code
    again = SparseAttention()(gm, PassContext())
    assert not again.modified and again.stats.rewritten == 0 and again.graph_module.code == code


def test_layer_overrides_and_exclude(llama_d64):
    pass_ = SparseAttention(
        layer_overrides={"layers.0.*": {"method": "static", "local_blocks": 4}}, exclude=("layers.1.*",)
    )
    result = _run(pass_, llama_d64, {"input_ids": _ids()})
    (node,) = [n for n in result.graph_module.graph.nodes if n.target == SPARSE]
    assert node.args[4] == "static" and node.args[8] == 4
    assert "excluded by pattern 'layers.1.*'" in " ".join(result.stats.skipped.values())


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
        ({"layer_overrides": {"layers.0.*": {"topk": 3}}}, "unknown option(s) ['topk']"),
        ({"layer_overrides": {"layers.0.*": {"top_k": -1}}}, "layer_overrides['layers.0.*']: top_k=-1"),
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
