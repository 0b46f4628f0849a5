"""com.microsoft GroupQueryAttention, the attention of onnxruntime-genai's decoders: a key/value head
goes with the query heads it serves; where the graph's inputs and outputs hold the key/value cache,
the query heads prune as slots (the same query head of every key/value group). Exact against the
oracle on a built block and on files onnxruntime-genai's own model builder writes (float32 and
4-bit MatMulNBits), which then still generate in onnxruntime-genai."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from builder import Builder, group_query_attention_block
from spa import Options, analyze
from spa.calibration import calibration_batches
from spa.calibration.shapes import user_shapes
from spa.cli import main
from spa.cost import concrete_shapes, count_macs
from spa.errors import SpaError
from spa.graph import attr, load_model
from spa.pipeline import prune
from spa.report import describe, format_analysis
from spa.runtime import imposed_sizes, random_inputs
from spa.selection import Target
from spa.verify import masked_original


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(model, batch, tokens, past, rng):
    """Inputs of a decoder step: `past` cached positions, `tokens` new ones (onnxruntime's
    GroupQueryAttention takes a prompt over a cache at batch 1 only)."""
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        if "mask" in i.name:
            feeds[i.name] = np.ones((batch, tokens + past), np.int64)
        elif i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            feeds[i.name] = rng.integers(0, 200, (batch, tokens)).astype(np.int64)
        elif "past" in i.name:
            feeds[i.name] = rng.standard_normal((batch, dims[1], past, _head_size(model))).astype(np.float32)
        else:
            feeds[i.name] = rng.standard_normal((batch, tokens, dims[2])).astype(np.float32)
    return feeds


def _head_size(model):
    past = next(i for i in model.graph.input if "past" in i.name)
    return imposed_sizes(model)[(past.name, 3)]


def _attention(model):
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def _check_exact(model, result, steps=((1, 5, 3), (2, 1, 4), (2, 6, 0))):
    """The pruned model against the original with the removed slices zeroed, on decoder steps."""
    rng = np.random.default_rng(0)
    cached = any("past" in i.name for i in model.graph.input)
    for batch, tokens, past in steps if cached else [(2, 6, 0)]:
        feeds = _feeds(model, batch, tokens, past, rng)
        for got, expected in zip(_run(result.model, feeds), _run(masked_original(result.plan), feeds)):
            np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())), rtol=1e-4)


@pytest.mark.parametrize("packed", [True, False])
def test_a_key_value_head_goes_with_the_query_heads_it_serves(packed):
    """Without a cache in the graph's inputs, a unit is a key/value head and the two query heads that
    read it (their q, k and v columns, their output channels): num_heads and kv_num_heads both follow."""
    model = group_query_attention_block(cache=False, packed=packed)
    groups = [g for g in analyze(model).groups if g.prunable]
    assert [(g.kind, len(g.atoms)) for g in groups] == [("heads", 2)]
    result = prune(model, Target(ratio=0.5), criterion="l1")
    node = _attention(result.model)[0]
    assert (attr(node, "num_heads"), attr(node, "kv_num_heads")) == (2, 1)
    _check_exact(model, result)


@pytest.mark.parametrize("options", [dict(packed=True), dict(packed=False), dict(sink=True), dict(rotary=False)])
def test_query_heads_prune_as_slots_where_the_cache_is_held(options):
    """past_key / past_value are graph inputs and present_key / present_value graph outputs: the
    key/value heads stay, and the j-th query head of both key/value groups goes together (so each
    group keeps as many); a head sink goes with its query head. Exact on a prompt over a cache, a
    decoding step and an empty cache."""
    model = group_query_attention_block(**options)
    analysis = analyze(model)
    assert any("query heads prune as slots" in note for note in analysis.graph.notes)
    slots = [g for g in analysis.groups if g.prunable]
    assert len(slots) == 1 and "slot" in slots[0].units and len(slots[0].prunable_atoms) == 2
    result = prune(model, Target(ratio=0.5), criterion="l1")
    node = _attention(result.model)[0]
    assert (attr(node, "num_heads"), attr(node, "kv_num_heads")) == (2, 2)
    _check_exact(model, result)
    unit = {g["unit"] for g in describe(analysis)["groups"] if g["prunable"]}
    assert unit == {"query-head slots and key/value heads" if options.get("packed", True) else "query-head slots"}


def test_head_dim_and_a_quantized_cache_are_frozen_with_their_reason():
    model = group_query_attention_block(cache=False)
    reasons = {r for g in analyze(model, Options(granularity=("channels", "head-dim"))).groups for r in g.reasons()}
    assert any("only whole heads" in r for r in reasons), reasons
    model = group_query_attention_block()
    node = _attention(model)[0]
    node.attribute.append(onnx.helper.make_attribute("kv_cache_bit_width", 8))
    reasons = {r for g in analyze(model).groups for r in g.reasons()}
    assert any("quantized key/value cache" in r for r in reasons), reasons


def test_generated_inputs_feed_an_empty_cache_at_the_head_size():
    """The cache's symbolic sizes are the ones its attention takes: [B, kv heads, 0, head size] (a
    prompt's first step), in verification and calibration alike, and the mask is as long as the
    tokens; so the default criterion calibrates such a model (no --input-shape) and MACs count the
    attention itself (2 x output x keys attended)."""
    model = group_query_attention_block()
    feeds = random_inputs(model, batch=2)
    assert feeds["past_key"].shape == (2, 2, 0, 16) and feeds["x"].shape[1] == feeds["attention_mask"].shape[1]
    assert feeds["attention_mask"].all()  # every position present (random 0/1 masks break a sliding window)
    assert user_shapes(model, {"past_key": (2, 2, 0, 16)}) == {"past_key": (2, 2, 0, 16)}
    with pytest.raises(SpaError, match="must be positive integers"):
        user_shapes(model, {"past_key": (0, 2, 0, 16)})
    batch = calibration_batches(model, samples=8, batch_size=4)[0]
    assert batch["past_value"].shape == (4, 2, 0, 16) and batch["attention_mask"].shape[1] == batch["x"].shape[1]
    result = prune(model, Target(ratio=0.5))
    assert result.plan.removed_atoms.size
    macs = count_macs(model, concrete_shapes(model))
    assert macs == 32 * 16 * 128 + 2 * 32 * 64 * 32 + 32 * 64 * 16


def test_a_sliding_window_cache_is_fed_at_its_capacity(tmp_path, capsys):
    """A sliding window's cache is a ring buffer that onnxruntime's GroupQueryAttention wants at its
    capacity (the window), and whose present output it leaves partly unwritten: generated inputs
    take that capacity, the allocation judge and the verification leave such an output out (it
    differs between two runs on the same inputs), and `spa prune` writes a model exact on its
    attention output."""
    model = group_query_attention_block(window=8)
    assert random_inputs(model, batch=2)["past_key"].shape == (2, 2, 8, 16)
    path, out = tmp_path / "m.onnx", tmp_path / "small.onnx"
    onnx.save(model, path)
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5"]) == 0
    assert "obspa cannot serve" not in capsys.readouterr().err
    result = prune(model, Target(ratio=0.5), criterion="l1")
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 5, 16)).astype(np.float32), "attention_mask": np.ones((1, 5), np.int64),
             **{f"past_{n}": rng.standard_normal((1, 2, 8, 16)).astype(np.float32) for n in ("key", "value")}}
    got, expected = _run(result.model, feeds)[0], _run(masked_original(result.plan), feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4 * float(np.abs(expected).max()), rtol=1e-4)


def test_a_tied_embedding_read_through_a_transpose_is_a_vocabulary():
    """onnxruntime-genai stores a tied embedding once, as its LM head's [hidden, vocab] weight, and
    gathers token rows from its Transpose: generated token ids index that vocabulary."""
    from spa.calibration.shapes import vocabulary_size

    b = Builder()
    table = b.op("Transpose", [b.weight(8, 50)], perm=[1, 0])
    b.output(b.op("Gather", [table, b.input(["N", "T"], "input_ids", onnx.TensorProto.INT64)]), ["N", "T", 8])
    assert vocabulary_size(b.model(), "input_ids") == 50


def test_an_int8_embedding_behind_a_dequantize_linear_is_a_vocabulary():
    """A statically quantized (QDQ) transformer gathers token rows from its int8 table's DequantizeLinear:
    it is still a token model (a tokenizer was refused: "the model has no token-id input")."""
    from spa.calibration.shapes import vocabulary_size

    b = Builder()
    table = b.op("DequantizeLinear", [b.const(np.ones((50, 8), np.int8)), b.const(np.float32(0.1))])
    b.output(b.op("Gather", [table, b.input(["N", "T"], "input_ids", onnx.TensorProto.INT64)]), ["N", "T", 8])
    assert vocabulary_size(b.model(), "input_ids") == 50


def test_large_generated_samples_come_in_smaller_batches(monkeypatch):
    """A sliding window's cache at its capacity makes one sample's inputs large (Gemma 2 2B: 16 MB a cache
    tensor, 26 of them): generated batches shrink so that one stays under BATCH_BYTES, announced."""
    import spa.calibration.feeds as feeds

    monkeypatch.setattr(feeds, "BATCH_BYTES", 40_000)
    said = []
    batches = calibration_batches(group_query_attention_block(window=64), samples=6, batch_size=4, progress=said.append)
    assert [b["past_key"].shape[0] for b in batches] == [2, 2, 2]
    assert any(line.startswith("calibration: batches of 2 instead of 4") for line in said), said


def test_outputs_that_two_runs_do_not_give_alike_say_nothing_of_a_plan():
    from spa.allocation import distortion, unstable

    a, b = np.arange(6.0).reshape(2, 3), np.array([[0.0, np.nan], [1.0, 2.0]])
    assert unstable([[a, b]], [[a.copy(), b + 1]]) == {1}
    assert unstable([[a, np.full(2, np.inf)]], [[a, np.full(2, np.inf)]]) == {1}
    assert distortion([[a, b]], [[a + 1, b]], skip={1}) == distortion([[a]], [[a + 1]])


# onnxruntime-genai's model builder on a tiny random LLaMA (4 query heads over 2 key/value heads of
# 32, so that a 4-bit block of 32 holds one head)
GENAI = importlib.util.find_spec("onnxruntime_genai") is not None


def _genai_build(root, family: str, precisions) -> dict:
    """{precision: folder} that onnxruntime-genai's builder writes for a small random `family` model."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    sizes = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                 intermediate_size=256, vocab_size=256, max_position_embeddings=128)
    config = {"llama": lambda: transformers.LlamaConfig(**sizes),
              "qwen3": lambda: transformers.Qwen3Config(**sizes, head_dim=32),  # q and k normed per head
              "gemma2": lambda: transformers.Gemma2Config(**sizes, head_dim=32)}[family]()  # sliding window, tied
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / family)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, bos_token="t1", eos_token="t2", unk_token="t0",
                                         pad_token="t0").save_pretrained(root / family)
    folders = {}
    for precision in precisions:
        out = root / f"{family}_{precision}"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", root / family, "-o", out,
                        "-p", precision, "-e", "cpu", "-c", root / "cache"], check=True, capture_output=True)
        folders[precision] = out
    return folders


@pytest.fixture(scope="module")
def genai_models(tmp_path_factory):
    if not GENAI:
        pytest.skip("onnxruntime-genai is not installed (make install adds it)")
    return _genai_build(tmp_path_factory.mktemp("genai"), "llama", ("fp32", "int4"))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_onnxruntime_genai_decoders_prune_their_query_heads_and_mlp(genai_models, precision):
    """Every attention of the builder's decoder prunes as query-head slots (its cache is the graph's
    inputs and outputs) and every MLP as channels, exactly against the oracle. The pruned file, which
    has no value_info (the builder declares every tensor's shape), is read the same way: ONNX's shape
    inference stops at its first com.microsoft op, onnxruntime's goes on. (onnxruntime-genai 0.18's
    builder wires this tiny LLaMA's lm_head to layer 0's post-attention norm, so the rest is dead code
    that the rewrite drops: the pruned file has one layer.)"""
    model = load_model(str(genai_models[precision] / "model.onnx"))
    summary = describe(analyze(model))
    assert [g["unit"] for g in summary["groups"] if g["prunable"]] == \
        ["query-head slots and key/value heads", "channels"] * 2, format_analysis(summary)
    result = prune(model, Target(ratio=0.5), criterion="l1")
    assert [(attr(n, "num_heads"), attr(n, "kv_num_heads")) for n in _attention(result.model)] == [(2, 2)] * 2
    _check_exact(model, result)
    assert {size for (tensor, axis), size in imposed_sizes(result.model).items() if axis == 3} == {32}
    again = [(g["unit"], g["frozen_by"]) for g in describe(analyze(result.model))["groups"] if g["unit"] != "channels"]
    assert [unit for unit, _ in again] == ["heads"] * 2, again  # one query head per key/value head: no slots left
    assert all(reason[0].startswith("graph input 'past_key_values") for _, reason in again), again


def test_a_pruned_genai_decoder_still_generates_in_onnxruntime_genai(genai_models, tmp_path, capsys):
    """`spa prune` with no flags but the ratio (the default criterion calibrates on an empty cache)
    writes a model that onnxruntime-genai loads and generates with, from the builder's folder; it
    warns that the folder's genai_config.json states the original head count."""
    import onnxruntime_genai as og

    folder = tmp_path / "pruned"
    shutil.copytree(genai_models["int4"], folder)
    os.remove(folder / "model.onnx.data")
    assert main(["prune", str(genai_models["int4"] / "model.onnx"), "-o", str(folder / "model.onnx"),
                 "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "query-head slots" in err and "obspa cannot serve" not in err, err
    assert "genai_config.json states the original head counts (num_attention_heads 4 -> 2 in the pruned" in err
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_attention_heads"] == 4
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[1, 5, 9, 13]], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 12


@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai is not installed (make install adds it)")
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_other_genai_families_prune_with_the_default_criterion(family, tmp_path, capsys):
    """Qwen3 (q and k normed per head: Reshape, SimplifiedLayerNormalization, Reshape between the
    packed projection and the attention) and Gemma 2 (alternate layers with a sliding window and its
    ring-buffer cache, a soft cap, the embedding tied to the LM head through a Transpose) as the builder
    writes them: `spa prune --ratio 0.5` calibrates on the tokenizer beside them and writes; the
    logits are exact against the oracle on an empty cache (the window's at its capacity)."""
    folder = _genai_build(tmp_path, family, ("fp32",))["fp32"]
    model = load_model(str(folder / "model.onnx"))
    units = [g["unit"] for g in describe(analyze(model))["groups"] if g["prunable"]]
    assert units.count("query-head slots and key/value heads") == 2 and units.count("channels") == 2, units
    assert main(["prune", str(folder / "model.onnx"), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "obspa cannot serve" not in err and "generated as zeros" not in err, err
    result = prune(model, Target(ratio=0.5), criterion="l1")
    feeds = random_inputs(model, batch=2)
    got, expected = _run(result.model, feeds)[0], _run(masked_original(result.plan), feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4 * float(np.abs(expected).max()), rtol=1e-4)


@pytest.mark.skipif(not GENAI, reason="onnxruntime-genai is not installed (make install adds it)")
def test_the_genai_float16_cpu_decoder_prunes_its_query_heads_as_slots(tmp_path, capsys):
    """The builder's float16 CPU decoder unrolls its attention: com.microsoft RotaryEmbedding without
    num_heads, the key/value heads repeated by an Expand to torch's expand(-1) target (Where(Equal(v, -1),
    1, v)) and merged by a Reshape whose kv x r is Mul(Shape(present)[1], r), MultiHeadAttention with a
    mask tiled over the heads, and its cache as past -> Concat -> present. The cache is fed empty, so it
    verifies (before: "the original model does not run on the verification inputs"); the query heads
    prune as slots, r rewritten in the repeat's Expand target and its merging Mul; exact against the
    oracle on an empty cache."""
    folder = _genai_build(tmp_path, "llama", ("fp16",))["fp16"]
    path = str(folder / "model.onnx")
    model = load_model(path)
    assert "query-head slots" in {g["unit"] for g in describe(analyze(model))["groups"] if g["prunable"]}
    assert main(["prune", path, "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "obspa cannot serve" not in err and "query-head slot" in err, err
    result = prune(model, Target(ratio=0.5), criterion="l1")
    feeds = random_inputs(model, batch=2)
    for got, expected in zip(_run(result.model, feeds), _run(masked_original(result.plan), feeds)):
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=1e-3, rtol=1e-3)
