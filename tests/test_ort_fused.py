"""onnxruntime's fused ops (com.microsoft Attention, QAttention, MultiHeadAttention,
EmbedLayerNormalization, SkipLayerNormalization, SkipSimplifiedLayerNormalization, BiasGelu,
FastGelu, QuickGelu, Gelu, FusedMatMul, FusedConv, FusedGemm, and SimplifiedLayerNormalization), as
its transformer optimizer, its quantizer and its saved optimized sessions write them: heads and
channels prune exactly against the oracle, the hidden size approximately."""
import numpy as np
import onnx
import pytest
from onnx import helper

from builder import Builder, fused_transformer_block, multi_head_attention_block, rotary_self_attention_block
from oracle import check_exact, compensated_and_not
from spa import Options, analyze
from spa.graph import attr, load_model
from spa.pipeline import prune
from spa.runtime import random_inputs, run
from spa.selection import Target
from spa.verify import masked_original

HIDDEN = Options(granularity=("channels", "heads", "hidden"))


def _attention(model):
    return [n for n in model.graph.node if n.op_type == "Attention"]


def test_fused_attention_prunes_whole_heads_exactly():
    """com.microsoft Attention with value heads narrower than the query/key heads and a constant
    attention bias: a head goes with its q, k and v columns, its output channels and its slice of the
    bias; num_heads and qkv_hidden_sizes follow. The MLP's channels cross FastGelu, QuickGelu, Gelu."""
    model = fused_transformer_block()
    kinds = {g.kind for g in analyze(model).groups if g.prunable}
    assert kinds == {"heads", "channels"}, kinds
    result = check_exact(model, Target(ratio=0.5))
    node = _attention(result.model)[0]
    assert attr(node, "num_heads") == 2 and list(attr(node, "qkv_hidden_sizes")) == [16, 16, 12]
    bias = {t.name: t for t in result.model.graph.initializer}[node.input[5]]
    assert list(bias.dims) == [1, 2, 5, 5]


def test_multi_head_attention_prunes_whole_heads_exactly():
    """com.microsoft MultiHeadAttention as cross-attention (keys and values from another input), with
    the packed q | k | v bias and a constant attention bias inside: a head goes with its query, key
    and value channels and its slices of both biases; num_heads follows."""
    model = multi_head_attention_block()
    assert [g.kind for g in analyze(model).groups if g.prunable] == ["heads"]
    result = check_exact(model, Target(ratio=0.5))
    node = next(n for n in result.model.graph.node if n.op_type == "MultiHeadAttention")
    assert attr(node, "num_heads") == 2


def test_a_rotary_without_num_heads_and_a_mask_tiled_over_the_heads_let_heads_prune():
    """com.microsoft RotaryEmbedding on [B, S, heads x head size] without num_heads (its head size is
    twice the cos cache's width, as onnxruntime reads it; num_heads stays unset) and a Tile repeating a
    [1, 1, S, S] mask over the heads (a broadcast: its repeats follow the head count) pass whole heads;
    both froze every head before."""
    model = rotary_self_attention_block()
    assert [g.kind for g in analyze(model).groups if g.prunable] == ["heads"]
    result = check_exact(model, Target(ratio=0.5), batch=1)
    tile = next(n for n in result.model.graph.node if n.op_type == "Tile")
    repeats = {t.name: t for t in result.model.graph.initializer}[tile.input[1]]
    assert list(onnx.numpy_helper.to_array(repeats)) == [1, 2, 1, 1]
    assert all(attr(n, "num_heads") is None for n in result.model.graph.node if n.op_type == "RotaryEmbedding")


def test_fused_norms_prune_the_hidden_size_approximately():
    """SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization freeze the hidden size with
    their reason, and prune it only with --granularity hidden (the statistics change): bounded error."""
    model = fused_transformer_block()
    reasons = {r for g in analyze(model).groups for r in g.reasons()}
    assert any(r.startswith("SkipSimplifiedLayerNormalization") and "--granularity hidden" in r for r in reasons)
    assert "hidden" in {g.kind for g in analyze(model, HIDDEN).groups if g.prunable}
    result = prune(model, Target(ratio=0.25), options=HIDDEN, criterion="l1")
    feeds = random_inputs(model, batch=2, seed=3)
    expected, got = run(masked_original(result.plan), feeds)[0], run(result.model, feeds)[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.5


def test_head_dim_granularity_is_refused_inside_fused_attention():
    """Only whole heads go inside a packed Attention: head-dim granularity freezes them, saying why."""
    reasons = {r for g in analyze(fused_transformer_block(), Options(granularity=("channels", "head-dim"))).groups
               for r in g.reasons()}
    assert any("head-dim granularity is not supported" in r for r in reasons), reasons


# name in models.transformers, the optimizer's model_type, the fused ops it must write
OPTIMIZED = {
    "bert_eager": ("bert", {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"}),
    "gpt2": ("gpt2", {"SkipLayerNormalization", "FastGelu"}),
    "t5_encoder": ("t5", {"SkipSimplifiedLayerNormalization", "FastGelu"}),
}


def _optimized(name, tmp_path):
    pytest.importorskip("transformers")
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    tz = pytest.importorskip("models.transformers")
    source = tz.cached_export_transformer(name, "torchscript")
    model_type, fused = OPTIMIZED[name]
    path = str(tmp_path / f"{name}_optimized.onnx")
    optimizer.optimize_model(source, model_type=model_type, num_heads=tz.HEADS, hidden_size=tz.HIDDEN,
                             opt_level=0).save_model_to_file(path)
    optimized = load_model(path)  # what `spa prune` reads: ONNX-domain ops of onnxruntime's pass
    assert fused <= {n.op_type for n in optimized.graph.node if n.domain == "com.microsoft"}
    return optimized


@pytest.mark.parametrize("name", OPTIMIZED)
def test_files_from_onnxruntimes_transformer_optimizer_prune_exactly(name, tmp_path):
    """Exports of HF models run through onnxruntime's transformer optimizer (what optimum's O2-O4
    write): every op it fused had frozen everything; now MLP channels (and the fused Attention's heads)
    prune, matching the oracle."""
    model = _optimized(name, tmp_path)
    kinds = {g.kind for g in analyze(model).groups if g.prunable}
    assert "channels" in kinds and ("heads" in kinds or not _attention(model)), kinds
    check_exact(model, Target(ratio=0.5), dims={"seq": 5, "sequence": 5})


def _saved_session(path, tmp_path):
    """The model at `path` as an onnxruntime session saves it optimized (optimized_model_filepath)."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "saved.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def test_a_graph_onnxruntime_saved_optimized_prunes_exactly(tmp_path):
    """onnxruntime's own session optimisations, saved (optimized_model_filepath): Q K^T becomes a
    FusedMatMul (transposed B, scale folded in) and the MLP a BiasGelu; heads and channels prune."""
    tz = pytest.importorskip("models.transformers")
    model = _saved_session(tz.cached_export_transformer("bert_eager", "torchscript"), tmp_path)
    assert {"FusedMatMul", "BiasGelu"} <= {n.op_type for n in model.graph.node}
    assert {"heads", "channels"} <= {g.kind for g in analyze(model).groups if g.prunable}
    check_exact(model, Target(ratio=0.5), dims={"seq": 5, "sequence": 5})


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-column"])
def test_an_optimized_then_dynamically_quantized_bert_prunes_exactly(per_channel, tmp_path):
    """onnxruntime's recipe for a fast CPU BERT, optimize then quantize_dynamic: Attention becomes
    QAttention (integer packed weight, per-tensor or per-column scales and zero points) and the
    embeddings QEmbedLayerNormalization. Heads and MLP channels prune, bit-exactly against the
    oracle (removed weight slices at their zero point)."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    optimized, quantized = str(tmp_path / "bert_eager_optimized.onnx"), str(tmp_path / "quantized.onnx")
    onnx.save(_optimized("bert_eager", tmp_path), optimized)
    quantization.quantize_dynamic(optimized, quantized, weight_type=quantization.QuantType.QInt8,
                                  per_channel=per_channel, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    model = load_model(quantized)
    assert {"QAttention", "QEmbedLayerNormalization"} <= {n.op_type for n in model.graph.node}
    assert {"heads", "channels"} <= {g.kind for g in analyze(model).groups if g.prunable}
    check_exact(model, Target(ratio=0.5), dims={"seq": 5, "sequence": 5}, fused=False)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_cnns_saved_from_an_optimized_session_prune_and_compensate(name, tmp_path):
    """A CNN saved from an optimized onnxruntime session has its Conv + activation pairs as
    com.microsoft FusedConv: everything they touched froze (MobileNetV2: 0 of 3 groups prunable, now
    7 of 8). They prune exactly against the oracle, and OBSPA finds them as layers: its compensation
    lowers the output error."""
    zoo = pytest.importorskip("models.zoo")
    model = _saved_session(zoo.cached_export(name), tmp_path)
    assert "FusedConv" in {n.op_type for n in model.graph.node}
    check_exact(model, Target(ratio=0.5))
    _, _, errors = compensated_and_not(model, ratio=0.3)
    assert errors["obs"] < errors["none"], errors


def test_fused_conv_with_a_sum_input_and_fused_gemm_prune_exactly():
    """FusedConv's optional Z (a residual added before the activation) is sliced with the output
    channels; FusedGemm prunes as Gemm."""
    b = Builder(seed=1)
    ms = dict(domain="com.microsoft")
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8], "x"), 3, 16)])
    y = b.op("FusedConv", [x, b.weight(16, 16, 3, 3), b.weight(16), x], pads=[1] * 4, activation="Relu", **ms)
    y = b.op("FusedConv", [y, b.weight(24, 16, 1, 1), b.weight(24)], activation="LeakyRelu",
             activation_params=[0.1], **ms)
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    hidden = b.op("FusedGemm", [flat, b.weight(24, 32), b.weight(32)], activation="Relu", **ms)
    b.output(b.gemm(hidden, 32, 5), ["N", 5])
    graph = helper.make_graph(b.nodes, "fused_cnn", b.inputs, b.outputs, b.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    assert [g.prunable for g in analyze(model).groups] == [True, True, True, False]
    check_exact(model, Target(ratio=0.5))
