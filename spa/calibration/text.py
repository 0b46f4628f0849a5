"""Token models' calibration text: sentences from a .txt file (`from_text`) through a tokenizer
(`_tokenizer`, the `tokenizers` package), copies of them with a few words dropped or swapped for
distillation (`edited_sentences`), and synthetic sentences shaped like the tokenizer's own
(`SyntheticVocabulary`, `synthetic_vocabulary`): its frequent whole words framed by its special
tokens, a share of them in English clauses (`SCAFFOLD_WORDS`, `_scaffold`, `_clauses`).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SpaError, first_line
from .shapes import BATCH, TOKENS, _declared, _names

if TYPE_CHECKING:
    from .feeds import _Plan

FREQUENT_SHARE = 0.25      # synthetic sentences draw from this first share of the tokenizer's whole words
# closed-class English words a scaffolded clause is built from (its open slots: the tokenizer's frequent words)
SCAFFOLD_WORDS = {
    "det": "the a an this that these those my your his her our their some every no any each",
    "pron": "i you he she it we they", "obj": "me him her it us them you",
    "prep": "in on at to for with from by about of after before under over into through",
    "aux": "is are was were will can could would should do does did has have had may must",
    "conj": "and but or because so when if while", "wh": "what where when why how who which",
    "adv": "not very also just still never always really too"}


def from_text(plan: _Plan, path: str) -> list:
    opts = plan.options
    if not opts.tokenizer:
        raise SpaError(f"calibration {path}: a text file needs a tokenizer (pass --tokenizer PATH: a "
                       f"tokenizer.json or a directory holding one)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SpaError(f"calibration {path} is not UTF-8 text") from None
    except OSError as exc:
        raise SpaError(f"calibration file {path} cannot be read ({type(exc).__name__})") from None
    lines = [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]
    if not lines:
        raise SpaError(f"calibration {path} holds no sentences (one a line)")
    ids = _id_inputs(plan)
    tokenizer, static, limit, pad = _encoder(plan, ids)
    if not static and limit < opts.max_length:
        plan.say(f"calibration: sentences truncated at {limit} tokens, the model's position table "
                 f"(max_length {opts.max_length})")
    count = plan.sample_count(len(lines), path)
    try:
        encoded = [e.ids for e in tokenizer.encode_batch(lines[:count])]
    except Exception as exc:
        raise SpaError(f"calibration {path}: tokenizer {opts.tokenizer} failed ({first_line(exc, 200)})") from None
    for i in ids:
        top = max((max(e) for e in encoded if e), default=0)
        if i.vocab and top >= i.vocab:
            raise SpaError(f"calibration {path}: tokenizer {opts.tokenizer} gives id {top}, beyond the model's "
                           f"vocabulary of {i.vocab} (input '{i.name}'): is it this model's tokenizer?")
    order = sorted(range(count), key=lambda j: (len(encoded[j]), j))
    feeds = [_packed(plan, ids, [encoded[j] for j in order[s:s + plan.chunk]], static, pad)
             for s in range(0, count, plan.chunk)]
    lengths = [f[ids[0].name].shape[1] for f in feeds]
    alone = [i for i in plan.inputs if _left_alone(plan, i, ids) is not None]
    caches, flags = [i.name for i in alone if i.is_float], [i.name for i in alone if not i.is_float]
    if alone:
        plan.say("calibration: " + "; ".join(
            ([f"{len(caches)} cache input(s) ({caches[0]}, ...) fed empty, a prompt's first run"] if caches else [])
            + ([f"flag(s) {', '.join(flags)} fed true"] if flags else [])))
    plan.say(f"calibration: {count} sentences from {path} in {len(feeds)} batches of similar length "
             f"({min(lengths)}..{max(lengths)} tokens)")
    return feeds


def _id_inputs(plan: _Plan) -> list:
    """The token-id inputs of a text model (checked: every other input a mask, types or positions)."""
    ids = [i for i in plan.inputs if i.role == "ids"]
    if not ids:
        loose = [i for i in plan.inputs if not i.is_float and i.dtype != np.bool_ and i.role is None]
        if len(loose) != 1:
            raise SpaError(f"text calibration needs a model with one token-id input indexing an embedding table "
                           f"(inputs: {', '.join(_names(plan))})")
        ids = loose
    for i in plan.inputs:
        if i not in ids and i.role not in ("mask", "types", "positions"):
            if _left_alone(plan, i, ids) is None:
                raise SpaError(f"text calibration: cannot tell what input '{i.name}' carries (filled by name: "
                               f"*mask*, *type*/*segment*, *position*; the ids index the embedding table; a "
                               f"decoder's cache is fed empty, a boolean flag true)")
            continue
        if len(i.dims) != 2:
            raise SpaError(f"text calibration needs [batch, sequence] inputs; '{i.name}' is {_declared(i.dims)}")
    return ids


def _encoder(plan: _Plan, ids: list) -> tuple:
    """(the tokenizer, set to truncate where the model's sequence ends and not to pad; the static
    sequence length or None; the length sentences are cut at; the padding id it had)."""
    tokenizer = _tokenizer(plan.options.tokenizer)
    static = plan.known(ids[0], 1)
    static = static if isinstance(static, int) else None
    limit = static or plan.max_tokens()
    pad = _pad_id(tokenizer)
    try:
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=limit)
    except Exception as exc:
        raise SpaError(f"tokenizer {plan.options.tokenizer} failed ({first_line(exc, 200)})") from None
    return tokenizer, static, limit, pad


def _packed(plan: _Plan, ids: list, rows: list, static: int | None, pad: int) -> dict:
    """One batch of the token `rows`, padded to the longest (or the static length), every input filled."""
    length = static or max(1, max(len(r) for r in rows))
    tokens = np.full((len(rows), length), pad, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = row[:length]
        mask[r, :len(row)] = 1
    feed = {}
    for i in plan.inputs:
        shape = _left_alone(plan, i, ids)
        if shape is not None:
            size = {BATCH: len(rows), TOKENS: length}
            feed[i.name] = (np.ones if i.dtype == np.bool_ else np.zeros)(tuple(size.get(d, d) for d in shape), i.dtype)
            continue
        value = tokens if i in ids else mask if i.role == "mask" else np.zeros_like(tokens) \
            if i.role == "types" else np.broadcast_to(np.arange(length), tokens.shape)
        feed[i.name] = np.ascontiguousarray(value.astype(i.dtype))
    return feed


def _left_alone(plan: _Plan, inp, ids: list) -> tuple | None:
    """The shape (BATCH, TOKENS placeholders) of an input that sentences do not fill: a decoder's cache,
    whose past axis the model's ops want empty, or a boolean flag of fixed shape (a merged decoder's
    use_cache_branch), fed as generated calibration feeds them; None for every other input."""
    if inp in ids or inp.role in ("mask", "types", "positions"):
        return None
    if inp.dtype == np.bool_ and all(isinstance(d, int) for d in inp.dims):
        return tuple(inp.dims)
    if not inp.is_float or not any(plan.fixed.get((inp.name, k)) == 0 for k in range(len(inp.dims))):
        return None
    sequence = ids[0].dims[-1] if ids and isinstance(ids[0].dims[-1], str) else None
    shape = tuple(TOKENS if sequence and d == sequence else plan.known(inp, k) for k, d in enumerate(inp.dims))
    return None if None in shape else shape


EDITED_WORDS = 0.15  # an edited sentence loses, or has swapped for other sentences' words, this share of its words


def edited_sentences(plan: _Plan, batches: list):
    """`k -> feeds`: the k-th batch of `plan.chunk` sentences drawn from the token `batches` (real text),
    each given one edit: EDITED_WORDS of its words dropped, or swapped for words of the other sentences
    (whole words: decoded, edited, encoded again). Distillation that cycles 96 real sentences starts to
    fit them by 2000 steps: MiniLM with 128 sentences reached 0.9650 / 0.9653 mean cosine on two seeds
    with edited ones against 0.9633 / 0.9633 with the sentences as they were (docs/recover.md)."""
    ids = _id_inputs(plan)
    tokenizer, static, _, pad = _encoder(plan, ids)
    mask_input = next((i.name for i in plan.inputs if i.role == "mask"), None)
    rows = []
    for feed in batches:
        tokens = np.asarray(feed[ids[0].name])
        present = np.asarray(feed[mask_input]) != 0 if mask_input else np.ones(tokens.shape, dtype=bool)
        rows += [row[keep].tolist() for row, keep in zip(tokens, present)]
    try:
        framed = tokenizer.encode("a")  # the ids it puts around a sentence ([CLS], [SEP]), registered or not
        special = {i for i, m in zip(framed.ids, framed.special_tokens_mask) if m}
        rows = [[t for t in row if t not in special] for row in rows]
        sentences = [t.split() for t in tokenizer.decode_batch(rows, skip_special_tokens=True) if t.split()]
    except Exception as exc:
        raise SpaError(f"tokenizer {plan.options.tokenizer} failed ({first_line(exc, 200)})") from None
    if not sentences:
        raise SpaError("the calibration sentences decode to no words to edit")
    words = [w for s in sentences for w in s]

    def batch(k: int) -> dict:
        rng = np.random.default_rng((plan.options.seed, k))
        edited = [_edited(sentences[j], words, rng) for j in rng.integers(len(sentences), size=plan.chunk)]
        return _packed(plan, ids, [e.ids for e in tokenizer.encode_batch(edited)], static, pad)

    return batch


def _edited(sentence: list, words: list, rng) -> str:
    """`sentence` (its words) with EDITED_WORDS of them dropped (one kept at least) or, as often,
    swapped for words drawn from `words`."""
    drop = rng.random() < 0.5
    hit = rng.random(len(sentence)) < EDITED_WORDS
    if drop:
        return " ".join([w for w, h in zip(sentence, hit) if not h] or sentence[:1])
    return " ".join(words[rng.integers(len(words))] if h else w for w, h in zip(sentence, hit))


def _tokenizer(path):
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SpaError(f"tokenizer {path}: " + ("the directory holds no tokenizer.json" if os.path.isdir(path)
                                                else "no such file"))
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SpaError("text calibration needs the tokenizers package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(file)
    except Exception as exc:
        raise SpaError(f"tokenizer {path} cannot be loaded ({first_line(exc, 200)})") from None


@dataclass
class SyntheticVocabulary:
    """Synthetic sentences for a token model from its tokenizer: ``prefix`` + body + ``suffix``:
    the special ids the tokenizer puts around every sentence, a full stop before the closing ones
    (the tokenizer's encoding of '.' after a word), and a body drawn uniformly from
    ``body``: the first FREQUENT_SHARE of its whole-word tokens (ids that decode to text which
    encodes back to that one id: not special tokens, unused slots or word pieces) in id order.
    WordPiece and BPE vocabularies and SentencePiece's scores list tokens roughly from the most
    frequent down, so that share is the tokenizer's everyday words (docs/obspa.md: +0.02 mean
    cosine on MiniLM over uniform random ids)."""
    prefix: list
    suffix: list
    body: np.ndarray
    framing: str  # e.g. "[CLS] ... . [SEP]"
    scaffold: dict | None = None  # word class -> ids for English clauses (`_scaffold`); None: not English

    @classmethod
    def of(cls, path, vocab: int | None) -> "SyntheticVocabulary":
        tokenizer = _tokenizer(path)
        try:
            tokenizer.no_padding()
            tokenizer.no_truncation()
            framed = tokenizer.encode("a", add_special_tokens=True)
            period = _after_word(tokenizer, ".")
            texts = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())])
            back = tokenizer.encode_batch(texts, add_special_tokens=False)
        except Exception as exc:
            raise SpaError(f"tokenizer {path} failed ({first_line(exc, 200)})") from None
        special = list(framed.special_tokens_mask)
        lead = next((k for k, v in enumerate(special) if not v), len(special))
        trail = next((k for k, v in enumerate(reversed(special)) if not v), 0)
        closing = framed.ids[len(special) - trail:]
        prefix, suffix = framed.ids[:lead], period + closing
        words = [i for i, (t, e) in enumerate(zip(texts, back)) if t.strip() and e.ids == [i]]
        if not words:
            raise SpaError(f"tokenizer {path}: none of its tokens is a whole word that encodes back to itself; "
                           "cannot draw synthetic sentences from it")
        body = np.array(words[:max(1, round(len(words) * FREQUENT_SHARE))], dtype=np.int64)
        top = max(prefix + suffix + [int(body[-1])])
        if vocab and top >= vocab:
            raise SpaError(f"tokenizer {path} gives id {top}, beyond the model's vocabulary of {vocab}: is it this "
                           f"model's tokenizer?")
        framing = " ".join([tokenizer.id_to_token(i) for i in prefix] + ["..."] +
                           [tokenizer.id_to_token(i) for i in suffix])
        return cls(prefix, suffix, body, framing, _scaffold(tokenizer, body, texts, closing))

    def draw(self, shape: tuple, rng, scaffold: float = 0.0) -> np.ndarray:
        """Ids of `shape`; a `scaffold` share of the sequences (last axis) as English clauses."""
        ids = self.body[rng.integers(0, len(self.body), size=shape)]
        head, tail = len(self.prefix), len(self.suffix)
        if shape and shape[-1] > head + tail:
            ids[..., :head] = self.prefix
            ids[..., shape[-1] - tail:] = self.suffix
            if self.scaffold is not None and scaffold > 0:
                rows = ids.reshape(-1, shape[-1])
                closing = self.scaffold["closing"]
                end = shape[-1] - len(closing)
                for r in np.flatnonzero(rng.random(len(rows)) < scaffold):
                    rows[r, head:end] = _clauses(self.scaffold, end - head, rng)
                    rows[r, end:] = closing
        return ids


def synthetic_vocabulary(path, vocab: int | None) -> SyntheticVocabulary:
    """`SyntheticVocabulary.of`, built once per tokenizer file (as last modified) and vocabulary size:
    a run draws generated batches several times (fit, held-out, recovery), and decoding a 30k-token
    vocabulary takes a quarter of a second each time."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        stamp = os.stat(file).st_mtime_ns
    except (OSError, TypeError, ValueError):
        return SyntheticVocabulary.of(path, vocab)  # its own error says what is wrong with the path
    return _cached_vocabulary(path, stamp, vocab)


@functools.lru_cache(maxsize=8)
def _cached_vocabulary(path, stamp, vocab) -> SyntheticVocabulary:  # stamp: in the key, not read
    return SyntheticVocabulary.of(path, vocab)


def _after_word(tokenizer, mark: str) -> list:
    """The ids `mark` takes right after a word (in 'a' + mark); [] where it does not encode apart."""
    word, marked = (tokenizer.encode(t, add_special_tokens=False).ids for t in ("a", "a" + mark))
    ids = marked[len(word):]
    return ids if marked[:len(word)] == word and tokenizer.decode(ids).strip() == mark else []


def _scaffold(tokenizer, body: np.ndarray, texts: list, closing: list) -> dict | None:
    """Word classes of English clauses for this tokenizer: SCAFFOLD_WORDS that are one token each
    (as a word after a space), '.', '?', '!' and ',' after a word, and the open slots: `body`'s
    alphabetic words of two letters or more. None where a tenth of those words or a mark is missing
    (not an English vocabulary)."""
    def one(text):  # the id of `text` as one token (not an unknown-word id)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 and tokenizer.decode(ids).strip() == text.strip() else None

    marks = {}
    for mark in ".?!,":
        ids = _after_word(tokenizer, mark)
        marks[mark] = ids[0] if len(ids) == 1 else None
    classes = {k: [one(" " + w) for w in v.split()] for k, v in SCAFFOLD_WORDS.items()}
    found = [i for ids in classes.values() for i in ids if i is not None]
    if None in marks.values() or len(found) < 0.9 * sum(len(ids) for ids in classes.values()):
        return None
    closed = set(found) | set(marks.values())
    alphabetic = [int(i) for i in body if texts[i].strip().isascii() and texts[i].strip().isalpha()
                  and len(texts[i].strip()) > 1 and int(i) not in closed]
    if not alphabetic:
        return None
    scaffold = {k: np.array([i for i in ids if i is not None]) for k, ids in classes.items()}
    return {**scaffold, "open": np.array(alphabetic), "marks": marks, "closing": list(closing)}


def _clauses(words: dict, length: int, rng) -> list:
    """`length` ids of English-shaped clauses (statements, questions, one-word replies, two clauses
    joined), open slots filled at random; cut to length, ending on '.', '?' or '!'."""
    def pick(kind):
        return int(words[kind][rng.integers(len(words[kind]))])

    def noun_phrase():
        if rng.random() < 0.3:
            return [pick("pron")]
        phrase = ([pick("det")] if rng.random() < 0.8 else []) + [pick("open") for _ in range(rng.integers(1, 3))]
        if rng.random() < 0.2:
            phrase += [pick("prep")] + ([pick("det")] if rng.random() < 0.7 else []) + [pick("open")]
        return phrase

    def verb_phrase():
        phrase = ([pick("aux")] if rng.random() < 0.5 else []) + ([pick("adv")] if rng.random() < 0.15 else [])
        phrase += [pick("open")]
        if rng.random() < 0.7:
            phrase += noun_phrase() if rng.random() < 0.7 else [pick("obj")]
        if rng.random() < 0.4:
            phrase += [pick("prep")] + noun_phrase()
        return phrase

    marks = words["marks"]
    out: list = []
    while len(out) < length:
        kind = rng.random()
        if kind < 0.08:
            out += [pick("open") for _ in range(rng.integers(1, 3))] + [marks[".!?"[rng.integers(3)]]]
        elif kind < 0.28:
            out += [pick("wh"), pick("aux")] + noun_phrase() + verb_phrase()[-3:] + [marks["?"]]
        else:
            clause = noun_phrase() + verb_phrase()
            if rng.random() < 0.25:
                clause += [marks[","], pick("conj")] + noun_phrase() + verb_phrase()
            out += clause + [marks["." if rng.random() < 0.85 else "!"]]
    out = out[:length]
    if length and out[-1] not in (marks["."], marks["?"], marks["!"]):
        out[-1] = marks["."]
    return out


def _pad_id(tokenizer) -> int:
    padding = tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>", "<PAD>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0
