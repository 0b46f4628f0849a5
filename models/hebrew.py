"""piper-tts' Hebrew diacritizer (Nakdimon: a character embedding, two bidirectional Keras LSTMs with masking that
tf2onnx wrote as `Loop`s, and three per-character heads for niqqud, dagesh and sin marks; its float [batch,
sequence] ids are cast to int32 in front of the embedding), judged on Hebrew text built from faker's he_IL word
lists (both packages installed with --no-deps by `make survey-models`; no data ships here):

    in-distribution  lines of 2-9 real Hebrew words: first and last names, cities, street names
    shifted          lines of 2-9 of faker's Hebrew lorem-ipsum words (Latin filler spelt in Hebrew letters)

`nakdimon_judge(original)` gives the share of words that a model marks exactly as the original does, through
piper's own decoding (`piper.hebrew.NakdimonDiacritizer.diacritize`).
"""
from __future__ import annotations

import random

import numpy as np

LINES = 200


def nakdimon_path() -> str:
    try:
        from piper.hebrew import DEFAULT_MODEL_PATH
    except ImportError:
        raise ImportError("piper-tts is not installed (pip install --no-deps piper-tts==1.8.0)") from None
    return str(DEFAULT_MODEL_PATH)


def hebrew_sets(count: int = LINES, seed: int = 0) -> dict:
    """{"in-distribution": lines of real Hebrew words, "shifted": lines of Hebrew lorem-ipsum words}."""
    from faker.providers.address.he_IL import Provider as Address
    from faker.providers.lorem.he_IL import Provider as Lorem
    from faker.providers.person.he_IL import Provider as Person

    def hebrew(values) -> list:
        return sorted({w for v in values for w in str(v).split() if any("\u05d0" <= c <= "\u05ea" for c in w)})

    real = hebrew(list(Person.first_names) + list(Person.last_names) + list(Address.city_names) +
                  list(getattr(Address, "street_titles", ())))
    filler = hebrew(Lorem.word_list)
    rng = random.Random(seed)
    return {kind: [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(count)]
            for kind, words in (("in-distribution", real), ("shifted", filler))}


def _diacritizer(model):
    from piper.hebrew import NakdimonDiacritizer

    from spa.runtime import session

    runner = NakdimonDiacritizer.__new__(NakdimonDiacritizer)
    runner.session = session(model, quiet=True)
    runner._input_name = runner.session.get_inputs()[0].name
    return runner


def nakdimon_judge(original, count: int = LINES):
    """`evaluate(model) -> {kind: share of words marked exactly as the original marks them}`."""
    sets = hebrew_sets(count)
    reference = _diacritizer(original)
    words = {k: [w for line in lines for w in reference.diacritize(line).split()] for k, lines in sets.items()}

    def evaluate(model) -> dict:
        runner = _diacritizer(model)
        return {kind: float(np.mean([a == b for a, b in zip(
            words[kind], [w for line in lines for w in runner.diacritize(line).split()])])) for kind, lines in sets.items()}

    return evaluate
