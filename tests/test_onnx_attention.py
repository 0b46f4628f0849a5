"""ONNX Attention and RotaryEmbedding (opset 23), as torch.onnx writes scaled_dot_product_attention
and HF models from opset 23: whole heads (a key/value head with the query heads it serves) prune,
and in the [B, heads, S, head size] form the head size too, matching the oracle."""
import numpy as np
import onnx
import pytest

from builder import gqa_attention
from oracle import check_exact
from spa import Options, analyze
from spa.graph import attr
from spa.runtime import random_inputs, run
from spa.selection import Target
from spa.verify import masked_original

HEAD_DIM = Options(granularity=("channels", "head-dim"))


def _attrs(model, op):
    node = next(n for n in model.graph.node if n.op_type == op)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_packed_attention_prunes_key_value_groups_exactly():
    """[B, S, heads x head size] with 4 query heads over 2 key/value heads and a rotary on the query:
    a key/value head goes with its two query heads; q_num_heads, kv_num_heads and the rotary's
    num_heads follow."""
    model = gqa_attention()
    assert [g.kind for g in analyze(model).groups if g.prunable] == ["heads"]
    result = check_exact(model, Target(ratio=0.5), batch=1)
    heads = _attrs(result.model, "Attention")
    assert (heads["q_num_heads"], heads["kv_num_heads"]) == (2, 1)
    assert _attrs(result.model, "RotaryEmbedding")["num_heads"] == 2


def test_head_size_prunes_inside_4d_attention_with_its_implicit_scale_kept():
    """[B, heads, S, head size] without a rotary and without a scale: head-dim granularity removes the
    same query/key positions of every head (contracted inside Attention) and value positions (passed
    to its output); the scale is written out as the original 1 / sqrt(head size)."""
    model = gqa_attention(packed=False, rotary=False)
    result = check_exact(model, Target(ratio=0.5), options=HEAD_DIM, batch=1)
    assert attr(next(n for n in result.model.graph.node if n.op_type == "Attention"), "scale") == pytest.approx(0.5)


def test_rotary_embedding_keeps_the_head_size_with_its_reason():
    """A rotary turns a head's positions in pairs: head-dim granularity freezes the query's positions
    and says so; whole heads still prune through it in the 4-D form."""
    model = gqa_attention(packed=False)
    reasons = {r for g in analyze(model, HEAD_DIM).groups for r in g.reasons()}
    assert any("rotates a head's positions in pairs" in r for r in reasons), reasons
    check_exact(model, Target(ratio=0.5), batch=1)


@pytest.mark.parametrize("packed", [True, False])
def test_query_heads_prune_as_slots_where_a_cache_holds_the_key_value_heads(packed):
    """past_key / past_value graph inputs and present_key / present_value graph outputs hold every
    key/value head: the j-th query head of both key/value groups goes together (q_num_heads halves,
    kv_num_heads stays), exact on an empty cache (what generated inputs feed) and on a cache of 3."""
    model = gqa_attention(cache=True, packed=packed)
    analysis = analyze(model)
    assert any("query heads prune as slots" in note for note in analysis.graph.notes)
    assert [g.kind for g in analysis.groups if g.prunable] == ["heads"]
    assert random_inputs(model)["past_key"].shape == (1, 2, 0, 4)
    result = check_exact(model, Target(ratio=0.5), batch=1)
    if packed:
        assert (_attrs(result.model, "Attention")["q_num_heads"], _attrs(result.model, "Attention")["kv_num_heads"]) \
            == (2, 2)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 5, 16)).astype(np.float32),
             **{f"past_{n}": rng.standard_normal((1, 2, 3, 4)).astype(np.float32) for n in ("key", "value")}}
    for got, expected in zip(run(result.model, feeds), run(masked_original(result.plan), feeds)):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


OPSET_23 = ("bert", "gpt2", "vit", "llama")


@pytest.mark.parametrize("name", OPSET_23)
def test_opset_23_exports_prune_heads_and_channels_exactly(name):
    """HF models exported by torch.onnx (dynamo) at opset 23, where attention is one Attention node (and
    LLaMA's rotary a RotaryEmbedding): heads and MLP channels prune against the oracle (before: every
    head frozen by 'no channel rule for Attention'). LLaMA's exported cos/sin caches have batch 1,
    which onnxruntime's RotaryEmbedding holds the input to: it is checked at batch 1."""
    pytest.importorskip("transformers")
    tz = pytest.importorskip("models.transformers")
    model = onnx.load(tz.cached_export_transformer(name, "dynamo", opset=23))
    assert any(n.op_type == "Attention" for n in model.graph.node)
    assert {"heads", "channels"} <= {g.kind for g in analyze(model).groups if g.prunable}
    check_exact(model, Target(ratio=0.5), batch=1 if name == "llama" else 2, dims={"sequence": 6, "seq": 6})


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_pruned_opset_23_export_comes_back_to_torch(name):
    """Convert, prune, re-import: an opset-23 export pruned by SPA becomes a torch module again
    (the converter computes Attention and RotaryEmbedding as ONNX's reference does) that matches
    onnxruntime on the pruned file (from_onnx verifies it; LLaMA at batch 1, see above)."""
    pytest.importorskip("transformers")
    tz = pytest.importorskip("models.transformers")
    from spa.frontends.torch import from_onnx
    from spa.pipeline import prune
    from spa.runtime import random_inputs

    model = onnx.load(tz.cached_export_transformer(name, "dynamo", opset=23))
    pruned = prune(model, Target(ratio=0.5), criterion="l1").model
    feeds = random_inputs(pruned, batch=1 if name == "llama" else 2, seed=4, dims={"sequence": 6, "seq": 6})
    from_onnx(pruned, inputs=feeds)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "4-D"])
def test_the_torch_converter_computes_grouped_query_attention_and_rotaries(packed):
    """Attention with 4 query heads over 2 key/value heads and a rotary, in both forms: the converted
    module matches onnxruntime."""
    from spa.frontends.torch import from_onnx

    from_onnx(gqa_attention(packed=packed))
