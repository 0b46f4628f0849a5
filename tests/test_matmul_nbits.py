"""com.microsoft MatMulNBits (onnxruntime-genai's and MatMulNBitsQuantizer's 2-, 4- and 8-bit block
weights): output channels are sliced row by row, input channels go in whole blocks, and the pruned
model matches the oracle (the original with the removed input slices zeroed); OBSPA scores the
dequantized blocks and compensates them on their own grid."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder import nbits_mlp
from oracle import check_exact, compensated_and_not
from spa import analyze
from spa.cost import count_params
from spa.graph import Graph, attr
from spa.pipeline import prune
from spa.quant import nbits_weight
from spa.report import describe, format_analysis, removed_by_kind
from spa.runtime import random_inputs, run
from spa.selection import Target

DIMS = {"tokens": 5}
LAYOUTS = {
    "4-bit, packed zero points": dict(),
    "8-bit": dict(bits=8),
    "2-bit, blocks of 16": dict(bits=2, block=16),
    "symmetric, 1-D scales, bias": dict(zero_points=False, flat=True, bias=True),
}


def _nodes(model):
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def _width(model, output):
    """N of the MatMulNBits that writes `output`."""
    return next(attr(n, "N") for n in _nodes(model) if n.output[0] == output)


def _inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_nbits_weights_dequantize_as_onnxruntime_does(layout):
    """quant.nbits_weight (what criteria score and OBSPA compensates) reproduces onnxruntime's own
    MatMulNBits: the MLP computed from the dequantized weights matches a run of the model."""
    model = nbits_mlp(**LAYOUTS[layout])
    g = Graph(model)
    feeds = random_inputs(model, batch=2, seed=1, dims=DIMS)
    values = {}
    for node in _nodes(model):
        w = nbits_weight(g, node)
        values[node.output[0]] = (w.reshape(len(w), -1)[:, :attr(node, "K")],
                                  g.consts[node.input[5]] if len(node.input) > 5 else 0.0)

    def dense(x, out):
        w, b = values[out]
        return x @ w.T + b

    x = feeds["x"].astype(np.float64)
    gate, up = dense(x, "g"), dense(x, "u")
    expected = dense(gate / (1 + np.exp(-gate)) * up, "y")
    np.testing.assert_allclose(run(model, feeds)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", [*LAYOUTS, "fused gate and up, accuracy level 4"])
def test_matmul_nbits_prunes_in_whole_blocks_against_the_oracle(layout):
    """The MLP's channels go in whole blocks of the down projection's input (a block shares its
    scale: removing all of it keeps every other code and scale exact); gate and up lose the same
    rows. The pruned model matches the oracle, its weights stay packed integers, K and N follow."""
    layout = LAYOUTS.get(layout, {"fused": True})
    model = nbits_mlp(**layout)
    block = layout.get("block", 32)
    result = check_exact(model, Target(ratio=0.4), atol=1e-4, rtol=1e-4, dims=DIMS)
    before, after = _inits(model), _inits(result.model)
    removed = removed_by_kind(result.plan.to_json())["channels_removed"]
    assert removed > 0 and (removed % block == 0 or removed % block == 200 % block)
    fused = layout.get("fused", False)
    assert _width(result.model, "gu" if fused else "g") == (1 + fused) * (200 - removed)
    for node in _nodes(result.model):
        attrs = {a.name: a.i for a in node.attribute}
        codes = after[node.input[1]]
        assert codes.dtype == np.uint8 and codes.shape[0] == attrs["N"]
        assert codes.shape[1] == -(-attrs["K"] // attrs["block_size"])
        assert after[node.input[2]].size == codes.shape[0] * codes.shape[1]
    assert after["down_q"].shape[1] < before["down_q"].shape[1]


def test_analyze_counts_channels_blocks_and_packed_parameters():
    """`spa analyze` says the group's channels go in blocks and leaves the scales and zero points out
    of the weights it could not group; parameters count 8 / bits weights a byte; the summary counts
    removed channels, not blocks."""
    model = nbits_mlp()
    analysis = analyze(model)
    text = format_analysis(describe(analysis))
    assert "prunable 200/200 channels in 7 blocks" in text, text
    assert "_s " not in text and "_zp" not in text, text
    # gate and up 64 x 200, down 200 x 64 padded to 7 blocks of 32, and the float scales
    assert count_params(model) == 2 * 200 * 64 + 64 * 7 * 32 + (2 * 200 * 2 + 64 * 7)
    result = prune(model, Target(ratio=0.4), criterion="l1")
    assert removed_by_kind(result.plan.to_json())["channels_removed"] == 200 - _width(result.model, "g")


def test_act_order_matmul_nbits_is_frozen_with_its_reason():
    """A g_idx (GPTQ act-order: channels of one block scattered along K) freezes the channels that
    reach it, and says why."""
    text = format_analysis(describe(analyze(nbits_mlp(act_order=True))))
    assert text.startswith("2 channel groups, 0 prunable"), text
    assert "act-order weights (g_idx)" in text, text


@pytest.mark.parametrize("bias", [False, True])
def test_obspa_compensates_matmul_nbits_on_its_block_grid(bias):
    """OBSPA reads a MatMulNBits as the dense layer its blocks hold, compensates it and rounds the
    update back onto its own block grid (a bias stays float): the weights stay packed codes of the
    same scales, and the outputs move less from the original's than without compensation."""
    model = nbits_mlp(width=256, bias=bias, seed=2)
    results, said, errors = compensated_and_not(model, DIMS)
    assert any("MatMulNBits" in m and "integer grid" in m for m in said), said
    compensated = results["obs"]
    assert compensated.weights and count_params(compensated.model) == count_params(results["none"].model)
    for name, value in compensated.weights.items():
        original = _inits(model)[name]
        assert value.dtype == original.dtype and value.shape == original.shape
    assert any(value.dtype == np.uint8 for value in compensated.weights.values())
    assert errors["obs"] < errors["none"], errors


def test_a_llama_quantized_by_onnxruntime_prunes_heads_and_mlp_channels(tmp_path):
    """A LLaMA-shaped decoder (models.llama_onnx) quantized by onnxruntime's MatMulNBitsQuantizer, an
    exporter nobody here wrote: q/k/v/o and the SwiGLU projections become 4-bit MatMulNBits, and
    heads and MLP blocks prune against the oracle."""
    quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    from models.llama_onnx import build

    path = str(tmp_path / "llama.onnx")
    build(path, "tiny", dtype=np.float32, hidden=128, heads=4, kv_heads=4, intermediate=192, layers=1)
    quantize = quantizer.MatMulNBitsQuantizer(onnx.load(path), block_size=32)
    quantize.process()
    model = quantize.model.model
    assert len(_nodes(model)) >= 7
    result = check_exact(model, Target(ratio=0.5), atol=1e-4, rtol=1e-4, dims={"sequence": 6})
    pruned = result.plan.removed_by_group()
    assert {g.kind for g in result.analysis.groups if pruned.get(g.id)} == {"channels", "heads"}


def test_recovery_of_a_model_the_torch_converter_cannot_take_is_refused_before_pruning(tmp_path, capsys):
    """--recover trains a torch copy of the pruned model; the ONNX-to-torch converter has no
    MatMulNBits, so the command says so in one line before it prunes anything, and writes nothing."""
    pytest.importorskip("torch")
    from spa.cli import main

    path, out = str(tmp_path / "model.onnx"), str(tmp_path / "small.onnx")
    onnx.save(nbits_mlp(), path)
    assert main(["prune", path, "-o", out, "--ratio", "0.3", "--recover", "5"]) == 2
    err = capsys.readouterr().err
    assert "converter has no MatMulNBits" in err and "analyzing" not in err, err
    assert not (tmp_path / "small.onnx").exists()


def test_sensitivity_lists_a_block_group_by_its_channels():
    """`spa sensitivity` lists the MLP group of a 4-bit model with its 200 channels, not its 7 blocks."""
    from spa.group_sensitivity import prunable_groups

    found, isolated = prunable_groups(analyze(nbits_mlp()))
    assert [e["channels"] for e in found + isolated] == [200]


def test_widths_round_by_the_channels_of_a_block_group():
    """Rounding widths to a multiple of 8 counts a block group's channels, not its blocks: a block of
    32 channels keeps any width a multiple of 8, so a quarter of 88 blocks (2816 channels, an LLM's
    MLP) goes whole (counted in blocks, 22 removed left 66 and were cut back to 16)."""
    model = nbits_mlp(hidden=32, width=2816)
    result = prune(model, Target(ratio=0.25, round_to=8, round_from=64), criterion="l1")
    found = removed_by_kind({"groups": result.plan.group_entries()})
    assert found["channels_removed"] == 22 * 32, found


def test_sparsify_puts_a_pattern_in_matmul_nbits_blocks_on_their_grid():
    """spa sparsify reads a MatMulNBits as the [N, K] float layer its blocks hold: 2:4 along K, every
    removed weight at its block's zero point, the codes packed as before (same shape and dtype), scales
    and zero points untouched; OBS (updates on the block grid) loses no more than the magnitude mask."""
    from spa.calibration import Calibration
    from spa.layers import weighted_layers
    from spa.quant import as_float
    from spa.sparsity import conforms, parse_pattern, sparsify

    pattern = parse_pattern("2:4")
    errors = {"l1": 0.0, "obs": 0.0}
    for layout in LAYOUTS.values():
        model = nbits_mlp(**layout)
        feeds = random_inputs(model, dims=DIMS, seed=3)
        expected = run(model, feeds)[0]
        for criterion in errors:
            calibration = Calibration(source="synthetic", samples=32, dims=DIMS) if criterion == "obs" else None
            sparse, report = sparsify(model, pattern, criterion, calibration=calibration)
            g, before, after = Graph(sparse), _inits(model), _inits(sparse)
            layers = {layer.weight: layer for layer in weighted_layers(g)}
            assert sorted(row["weight"] for row in report["layers"]) == sorted(layers) and len(layers) == 3
            for name, value in before.items():
                assert after[name].shape == value.shape and after[name].dtype == value.dtype, name
                if name not in layers:
                    assert np.array_equal(after[name], value), name
            assert all(conforms(as_float(g, w, g.consts[w]), layers[w], pattern) for w in layers)
            errors[criterion] += float(np.linalg.norm(run(sparse, feeds)[0] - expected) / np.linalg.norm(expected))
    assert errors["obs"] <= errors["l1"]
