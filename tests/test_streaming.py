"""Models handled tensor by tensor (spa.external_data): the same analysis, the same pruned bytes
and the same outputs as the in-memory path; piecewise verification computes what one run does."""
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from models.llama_onnx import build
from spa import external_data, runtime, verify
from spa.cli import main
from spa.errors import SpaWarning
from spa.graph import external_tensor_names, load_model
from spa.groups import analyze
from spa.pipeline import prune, save
from spa.selection import Target

POOL = 1 << 16
IDS = {"input_ids": np.array([[3, 1, 4, 1, 5, 9, 2]], dtype=np.int64)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("llama") / "model.onnx")
    build(path, "tiny", dtype=np.float32, pool=POOL, hidden=128, intermediate=320)  # MLP weights over INLINE_BYTES
    return path


def _tensors(path):
    model = onnx.load(path)
    return model, {t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def _groups(model):
    return [(g.kind, g.prunable, len(g.atoms), sorted(m.tensor for m in g.members)) for g in analyze(model).groups]


def test_streamed_model_reads_no_weight_until_asked(llama):
    model = load_model(llama, stream=True)
    assert external_data.is_streamed(model)
    big = [t for t in model.graph.initializer if t.dims and np.prod(t.dims) * 4 > external_data.INLINE_BYTES]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in big)
    loaded = onnx.load(llama)
    want = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    g = analyze(model).graph
    for t in big:
        assert isinstance(g.consts[t.name], np.memmap)
        np.testing.assert_array_equal(g.consts[t.name], want[t.name])


def test_analysis_does_not_depend_on_where_the_weights_are(llama, tmp_path):
    inline = str(tmp_path / "inline.onnx")
    onnx.save_model(onnx.load(llama), inline)
    assert not external_tensor_names(inline)
    want = _groups(load_model(inline))
    assert _groups(load_model(llama, stream=True)) == want
    assert _groups(load_model(llama, stream=False)) == want


def test_analysis_does_not_depend_on_width(tmp_path):
    shapes = []
    for width in (1, 2):
        path = str(tmp_path / f"w{width}.onnx")
        build(path, "tiny", dtype=np.float32, pool=POOL, hidden=64 * width, intermediate=160 * width)
        shapes.append([(kind, prunable, members) for kind, prunable, _, members in _groups(load_model(path))])
    assert shapes[0] == shapes[1]
    assert sum(kind == "heads" and prunable for kind, prunable, _ in shapes[0]) == 2


def test_streamed_prune_writes_the_same_model_byte_for_byte(llama, tmp_path):
    written = {}
    for stream in (False, True):
        result = prune(load_model(llama, stream=stream), Target(ratio=0.5))
        out = str(tmp_path / f"pruned_{stream}.onnx")
        save(result.model, out, external=external_tensor_names(llama))  # as the CLI does
        written[stream] = out
    (a, ta), (b, tb) = _tensors(written[False]), _tensors(written[True])
    assert list(a.graph.node) == list(b.graph.node)
    assert ta == tb
    assert not any(p.key == external_data.BASE_KEY for p in b.metadata_props)
    before = sum(np.prod(t.dims) for t in onnx.load(llama, load_external_data=False).graph.initializer)
    assert sum(np.prod(d) for _, d, _ in tb.values()) < before
    run = [ort.InferenceSession(written[s]).run(None, IDS)[0] for s in (False, True)]
    np.testing.assert_array_equal(run[0], run[1])


def test_written_data_is_aligned_and_self_contained(llama, tmp_path):
    out = str(tmp_path / "p.onnx")
    save(prune(load_model(llama, stream=True), Target(ratio=0.3)).model, out)
    model = onnx.load(out, load_external_data=False)
    for t in external_data.external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "p.onnx.data" and int(info["offset"]) % external_data.ALIGN == 0
    assert sorted(os.listdir(tmp_path)) == ["p.onnx", "p.onnx.data"]


@pytest.mark.parametrize("piece_bytes", [1, 40_000, 1 << 30])
def test_run_in_pieces_computes_one_run(llama, piece_bytes):
    whole = ort.InferenceSession(llama).run(None, IDS)[0]
    pieces = verify.run_in_pieces(llama, IDS, piece_bytes=piece_bytes)[0]
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(os.path.dirname(llama))) == ["model.onnx", "model.onnx.data"]


def test_run_in_pieces_float16_uses_the_surrogate_per_piece(tmp_path):
    path = str(tmp_path / "half.onnx")
    build(path, "tiny", dtype=np.float16, pool=POOL)
    whole = ort.InferenceSession(path).run(None, IDS)[0].astype(np.float32)
    pieces = verify.run_in_pieces(path, IDS, piece_bytes=20_000)[0]
    assert pieces.dtype == np.float16
    np.testing.assert_allclose(pieces.astype(np.float32), whole, atol=0.05)


def test_cli_says_when_verification_ran_in_pieces(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(external_data, "STREAM_BYTES", 0)
    monkeypatch.setattr(verify, "available_memory", lambda: 1)
    out = str(tmp_path / "small.onnx")
    assert main(["prune", llama, "-o", out, "--ratio", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "verified piece by piece" in err
    assert ort.InferenceSession(out).run(None, IDS)[0].shape == (1, 7, 101)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_obspa_runs_a_streamed_model_from_its_file(tmp_path, monkeypatch, dtype):
    """Calibration, Hessians, allocation runs and verification read the weights through memory
    maps (onnxruntime takes them as arrays; bfloat16 ones as 16-bit integers, and the float32
    surrogate the CPU provider needs for them reads the maps too): nothing is read in, and the
    pruned model is the one the in-memory path writes."""
    import ml_dtypes

    path = str(tmp_path / "model.onnx")
    build(path, "tiny", dtype=ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32, pool=POOL, hidden=128,
          intermediate=320)
    monkeypatch.setattr(runtime, "SERIALIZE_BYTES", 1 << 40)  # in memory: the plain serialized session
    written = {}
    for stream in (False, True):
        model = load_model(path, stream=stream)
        said = []
        result = prune(model, Target(ratio=0.3), criterion="obspa", calibration_samples=8, progress=said.append)
        assert not any("reading every weight into memory" in s for s in said)
        assert external_data.is_streamed(result.model) == stream
        written[stream] = str(tmp_path / f"pruned_{stream}.onnx")
        save(result.model, written[stream], external=external_tensor_names(path))
    assert _tensors(written[False])[1] == _tensors(written[True])[1]


def test_torch_criteria_read_the_weights_in(llama):
    model = load_model(llama, stream=True)
    said = []
    result = prune(model, Target(ratio=0.3), criterion="snip", calibration_samples=8, progress=said.append)
    assert any("reading every weight into memory: this criterion converts the model to torch" in s for s in said)
    assert not external_data.is_streamed(result.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpaWarning)
        verify.validate(result.model.SerializeToString(), IDS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_weights_stream_natively(tmp_path, dtype):
    import ml_dtypes
    path = str(tmp_path / "m.onnx")
    build(path, "tiny", dtype=getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16, pool=POOL,
          hidden=128, intermediate=320)
    outs = {}
    for stream in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpaWarning)  # bfloat16 is verified on a float32 copy
            out = str(tmp_path / f"p_{stream}.onnx")
            save(prune(load_model(path, stream=stream), Target(ratio=0.3)).model, out,
                 external=external_tensor_names(path))
        outs[stream] = _tensors(out)[1]
    assert outs[True] == outs[False]
    assert {t for t, _, _ in outs[True].values()} == {onnx.TensorProto.FLOAT16 if dtype == "float16"
                                                     else onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT64}


def test_a_constant_node_kept_in_external_data_is_read_in(tmp_path):
    from onnx import helper
    w = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)  # 77 KB: over INLINE_BYTES
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.ones((300, 4), np.float32), "w2")])
    path = str(tmp_path / "c.onnx")
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path,
                    save_as_external_data=True, all_tensors_to_one_file=True, location="c.data", size_threshold=0,
                    convert_attribute=True)
    model = load_model(path, stream=True)
    assert external_data.is_streamed(model)
    out = str(tmp_path / "p.onnx")
    save(prune(model, Target(ratio=0.5)).model, out)
    assert ort.InferenceSession(out).run(None, {"x": np.ones((2, 64), np.float32)})[0].shape == (2, 4)


def test_report_on_a_model_too_big_for_one_session_is_refused_up_front(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(external_data, "STREAM_BYTES", 0)
    monkeypatch.setattr(verify, "available_memory", lambda: 1)
    out = tmp_path / "small.onnx"
    assert main(["prune", llama, "-o", str(out), "--ratio", "0.3", "--report"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[spa ")]
    assert len(err) == 1 and err[0].startswith("spa: error: --report would time") and "piece by piece" in err[0]
    assert not out.exists()


def test_four_bit_weights_reach_onnxruntime_intact_and_prune_in_memory_or_streamed(tmp_path, monkeypatch):
    """Sub-byte tensors (INT4: two to a byte in the file, one to a byte in numpy) cannot go to
    onnxruntime as arrays: an OrtValue over numpy's buffer read the wrong bytes (max error 15 where
    rounding gives 0.06). They stay in the proto, or external in a streamed model's folder; a streamed
    model reads them unpacked, and its pruned tensors are written packed, as in memory."""
    from builder import four_bit_mlp

    from spa.graph import tensor_bytes

    model = four_bit_mlp(inputs=512, width=512)  # w1: 128 KB packed, over BIG_TENSOR and INLINE_BYTES
    assert tensor_bytes(model.graph.initializer[0]) == len(model.graph.initializer[0].raw_data) == 512 * 512 // 2
    path = str(tmp_path / "int4.onnx")
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # onnx.save turns the proto's tensors into references to the file
    onnx.save(saved, path, save_as_external_data=True, location="int4.data", size_threshold=1024)
    x = {"x": np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)}
    w1, _, w2, _, b1 = (numpy_helper.to_array(t).astype(np.float32) for t in model.graph.initializer)
    expected = np.maximum(x["x"] @ (w1 * 0.05) + b1, 0) @ (w2 * 0.05)
    monkeypatch.setattr(runtime, "SERIALIZE_BYTES", 1 << 40)  # the plain serialized session
    serialized = runtime.session(model, quiet=True).run(None, x)[0]
    assert np.abs(serialized - expected).max() < 0.01 * np.abs(expected).max()  # its 4-bit MatMul rounds inputs
    monkeypatch.setattr(runtime, "SERIALIZE_BYTES", 0)  # every big tensor handed over where it can be
    streamed = load_model(path, stream=True)
    for loaded in (model, streamed):
        assert np.array_equal(runtime.session(loaded, quiet=True).run(None, x)[0], serialized)
    mapped = external_data.array(streamed.graph.initializer[0], external_data.base_of(streamed))
    assert np.array_equal(np.asarray(mapped, dtype=np.float32), w1)  # read and unpacked, not mapped one to a byte
    pruned = {}
    for stream in (False, True):
        result = prune(load_model(path, stream=stream), Target(ratio=0.5), criterion="l1")
        pruned[stream] = str(tmp_path / f"pruned_{stream}.onnx")
        save(result.model, pruned[stream], external=external_tensor_names(path))
    assert _tensors(pruned[False])[1] == _tensors(pruned[True])[1]
    assert onnx.load(pruned[True]).graph.initializer[0].dims[1] == 256
