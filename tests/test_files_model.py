"""models/files.py: magika's features of a file, and the machine's files it is judged on."""
import importlib.util
import os
import sysconfig

import numpy as np
import pytest

from models.files import PADDING, features, file_features, machine_files


def test_features_are_the_stripped_beginning_and_end_padded_as_magika_pads_them():
    short = features(b"  \n%PDF-1.4 hello \n\n")
    assert short.shape == (2048,) and short.dtype == np.int32
    assert bytes(short[:14].tolist()) == b"%PDF-1.4 hello" and set(short[14:2034].tolist()) == {PADDING}
    assert bytes(short[-14:].tolist()) == b"%PDF-1.4 hello"
    long = features(b"  " + bytes(range(256)) * 40 + b"\n\n")
    assert long[0] == 0 and long[1023] == 255 and long[-1] == 255 and PADDING not in long.tolist()


def test_machine_files_are_drawn_alike_for_a_seed_and_skip_what_they_are_told(tmp_path):
    for k, ext in enumerate(("py", "json", "txt", "png") * 3):
        (tmp_path / f"f{k}.{ext}").write_bytes(bytes([k]) * 100)
    (tmp_path / "tiny.py").write_bytes(b"x")  # under 64 bytes: never drawn
    first = machine_files(str(tmp_path), 8, seed=3)
    assert first == machine_files(str(tmp_path), 8, seed=3) and not any(p.endswith("tiny.py") for p in first)
    assert not set(machine_files(str(tmp_path), 8, seed=4, skip=set(first))) & set(first)
    assert file_features(first).shape == (8, 2048)


@pytest.mark.skipif(importlib.util.find_spec("magika") is None, reason="magika not installed (make survey-models)")
def test_magika_labels_the_machines_files_as_many_kinds():
    from models.files import magika_path
    from spa.runtime import session
    x = file_features(machine_files(sysconfig.get_paths()["purelib"], 48, seed=0))
    labels = session(magika_path(), quiet=True).run(None, {"bytes": x})[0].argmax(axis=1)
    assert len(set(labels.tolist())) >= 8 and os.path.exists(magika_path())
