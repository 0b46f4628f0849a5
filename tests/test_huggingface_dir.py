"""`spa prune ./hf-dir -o ./small-dir`: Hugging Face save_pretrained directories in, reloadable
directories out (tiny BERT and LLaMA built from configs, no network)."""
import json
import os

import numpy as np
import pytest

from spa.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
tz = pytest.importorskip("models.transformers")

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def spa(*args):
    return main([str(a) for a in args] + ["-q"])


def _save(model, path, tokenizer=False):
    tz._randomize(model)  # HF's init (zero biases, equal layers) would tie layers in the export
    model.save_pretrained(path)
    if tokenizer:
        vocab = path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
        transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(path)
        (path / "README.md").write_text("tiny bert\n")
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return _save(transformers.BertModel(config), tmp_path_factory.mktemp("hf") / "bert", tokenizer=True)


def _llama(path, **kw):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                                max_position_embeddings=64, tie_word_embeddings=False), **kw})
    return _save(transformers.LlamaForCausalLM(config), path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _llama(tmp_path_factory.mktemp("hf") / "llama")


def _inputs(names, batch=3, seq=6, vocab=100):
    g = torch.Generator().manual_seed(5)
    feeds = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
             "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
             "token_type_ids": torch.randint(0, 2, (batch, seq), generator=g)}
    feeds["attention_mask"][-1, -2:] = 0
    return {n: feeds[n] for n in names}


def _matches_onnx(model, onnx_path, output):
    """The reloaded model and the pruned ONNX agree (at a batch and sequence not exported)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = _inputs([i.name for i in session.get_inputs()])
    want = session.run([output], {k: v.numpy() for k, v in feeds.items()})[0]
    with torch.no_grad():
        got = getattr(model(**feeds, return_dict=True), output).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def _reload(cls, path):
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spa: error:"), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_bert_dir_to_dir_reloads_and_matches_the_pruned_onnx(bert_dir, tmp_path, capsys):
    small, small_onnx = tmp_path / "small", tmp_path / "small.onnx"
    plan = tmp_path / "plan.json"
    assert spa("prune", bert_dir, "-o", small, "--ratio", "0.3", "--plan-out", plan) == 0
    assert f"wrote {small}:" in capsys.readouterr().out
    assert spa("apply-plan", bert_dir, plan, "-o", small_onnx) == 0  # -o NAME.onnx: the pruned ONNX
    config = json.loads((small / "config.json").read_text())
    # BertConfig derives the head size from hidden_size / heads: heads stay, MLP channels go
    assert config["intermediate_size"] == 48 and config["num_attention_heads"] == 4  # 64 * 0.7, rounded up to 8s
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "README.md"} <= set(os.listdir(small))
    model = _reload(transformers.AutoModel, small)
    assert model.encoder.layer[1].intermediate.dense.out_features == 48
    _matches_onnx(model, small_onnx, "last_hidden_state")
    _matches_onnx(model, small_onnx, "pooler_output")
    tokenizer = transformers.AutoTokenizer.from_pretrained(small, local_files_only=True)
    assert tokenizer("w1 w2")["input_ids"][0] == tokenizer.cls_token_id


def test_llama_dir_prunes_heads_and_reloads(llama_dir, tmp_path, capsys):
    small, small_onnx = tmp_path / "small", tmp_path / "small.onnx"
    assert main(["prune", str(llama_dir), "-o", str(small), "--ratio", "0.5"]) == 0
    assert "criterion l1 (the default where obspa cannot serve: -o" in capsys.readouterr().err  # a directory
    assert spa("prune", llama_dir, "-o", small_onnx, "--ratio", "0.5", "--criterion", "l1") == 0
    config = json.loads((small / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["intermediate_size"]) == (2, 1, 8, 32)
    model = _reload(transformers.AutoModelForCausalLM, small)
    _matches_onnx(model, small_onnx, "logits")


def test_analyze_a_hf_dir(bert_dir, capsys):
    assert spa("analyze", bert_dir) == 0
    out = capsys.readouterr().out
    assert "prunable 4/4 heads" in out and "prunable 64/64 channels" in out


def test_layers_of_different_widths_are_refused_before_writing(bert_dir, tmp_path, capsys):
    small = tmp_path / "small"
    assert spa("prune", bert_dir, "-o", small, "--ratio-for", "*layer.0*=0.5") == 2
    _one_error_line(capsys, "different widths", "intermediate_size [32, 64]", "uniform", ".onnx")
    assert not small.exists() and os.listdir(tmp_path) == []
    assert spa("prune", bert_dir, "-o", tmp_path / "layer0.onnx", "--ratio-for", "*layer.0*=0.5") == 0


def test_heads_a_config_cannot_describe_are_refused(bert_dir, llama_dir, tmp_path, capsys):
    assert spa("prune", bert_dir, "-o", tmp_path / "a", "--ratio", "0.5", "--granularity", "heads") == 2
    _one_error_line(capsys, "attention heads", "--granularity channels")
    # LlamaConfig keeps head_dim but wants hidden_size divisible by the head count: 4 -> 3 is not
    odd = _llama(tmp_path / "odd", num_key_value_heads=4)
    assert spa("prune", odd, "-o", tmp_path / "b", "--ratio", "0.25") == 2
    _one_error_line(capsys, "LlamaConfig refuses", "3 heads do not divide hidden_size 32")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_directories_give_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert spa("analyze", empty) == 2
    _one_error_line(capsys, "config.json", "saved_model.pb")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert spa("prune", broken, "-o", tmp_path / "out", "--ratio", "0.3") == 2
    _one_error_line(capsys, "not valid JSON")
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    assert spa("analyze", broken) == 2
    _one_error_line(capsys, "no-such-model")
    transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, vocab_size=100).save_pretrained(broken)
    assert spa("analyze", broken) == 2  # a config without weights
    _one_error_line(capsys, "cannot load")


def test_output_directory_rules(bert_dir, tmp_path, capsys):
    assert spa("prune", bert_dir, "-o", bert_dir, "--ratio", "0.3") == 2
    _one_error_line(capsys, "--overwrite")
    # compensated weights are no slices of the model's own: refused before any work
    assert spa("prune", bert_dir, "-o", tmp_path / "c", "--ratio", "0.3", "--criterion", "obspa") == 2
    _one_error_line(capsys, "obspa", ".onnx")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "pytorch_model.bin").write_text("stale")
    assert spa("prune", bert_dir, "-o", taken, "--ratio", "0.3") == 2
    _one_error_line(capsys, "non-empty", "--overwrite")
    assert spa("prune", bert_dir, "-o", taken, "--ratio", "0.3", "--overwrite") == 0
    assert "pytorch_model.bin" not in os.listdir(taken)  # stale weights would shadow the new ones
    _reload(transformers.AutoModel, taken)
