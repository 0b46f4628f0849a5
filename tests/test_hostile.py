"""Hostile input: every case ends in exit 0 with a valid output, or exit 2 with exactly one
`spa: error:` line (warnings aside), nothing written and no input changed; never a traceback,
never long (each case runs in-process under an alarm)."""
import contextlib
import copy
import hashlib
import json
import os
import random
import signal
import sys

import numpy as np
import onnx
import pytest

from builder import Builder
from test_cli import small_model
from spa.cli import main

CASE_SECONDS = 30


@contextlib.contextmanager
def _alarm(seconds):
    def expire(*_):
        raise TimeoutError(f"case ran over {seconds} s")
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _hashes(folder):
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def check(capsys, folder, argv, outputs=(), expect=None):
    """Run `spa argv` in-process; assert the contract; return (rc, the error line or None)."""
    capsys.readouterr()
    before = _hashes(folder)
    with _alarm(CASE_SECONDS):
        rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("spa: warning:")]
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("spa: error: "), err
        assert _hashes(folder) == before, f"files changed on a refusal: {err}"
        for out in outputs:
            assert not os.path.exists(out), f"{out} written on a refusal: {err}"
        assert not [n for _, dirs, files in os.walk(folder) for n in dirs + files if n.startswith(".spa-")], \
            "temporary files left behind"
    else:
        for path, digest in before.items():
            if os.path.exists(path) and str(path) not in map(str, outputs):
                assert _hashes(os.path.dirname(path)).get(path) == digest, f"{path} changed"
        for out in outputs:
            if str(out).endswith(".onnx"):
                onnx.checker.check_model(str(out), full_check=True)
    if expect is not None:
        assert rc == 2 and expect in lines[0], err
    return rc, lines[0] if rc == 2 else None


@pytest.fixture
def folder(tmp_path):
    onnx.save(small_model(), tmp_path / "m.onnx")
    return tmp_path


def _external(folder, name="ext.onnx"):
    onnx.save(small_model(), folder / name, save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=0)
    return folder / name


PRUNE = ["--ratio", "0.5", "-q"]


# ---- output paths ------------------------------------------------------------------------------

def test_output_paths(folder, capsys):
    m, out = folder / "m.onnx", folder / "out.onnx"
    (folder / "d").mkdir()
    (folder / "link").symlink_to(folder, target_is_directory=True)
    os.link(m, folder / "hard.onnx")
    cases = [
        (["-o", folder / "d"], [], "is a directory"),
        (["-o", str(folder / "d") + "/"], [], "is a directory"),
        (["-o", folder / "none" / "x.onnx"], [folder / "none" / "x.onnx"], "does not exist"),
        (["-o", out, "--plan-out", folder / "none" / "p.json"], [out], "--plan-out"),
        (["-o", out, "--plan-out", folder / "d"], [out], "--plan-out"),
        (["-o", out, "--plan-out", m], [out], "input model"),
        (["-o", out, "--plan-out", out], [out], "-o file"),
        (["-o", folder / "link" / "m.onnx"], [], "overwrite the input"),
        (["-o", folder / "hard.onnx"], [], "overwrite the input"),
        (["-o", folder / "d" / ".." / "m.onnx"], [], "overwrite the input"),
    ]
    for flags, outputs, expect in cases:
        check(capsys, folder, ["prune", m] + flags + PRUNE, outputs, expect)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(folder, capsys):
    ro = folder / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        check(capsys, folder, ["prune", folder / "m.onnx", "-o", ro / "x.onnx"] + PRUNE, [ro / "x.onnx"],
              "not writable")
    finally:
        ro.chmod(0o755)


def test_external_data_collisions_and_permissions(folder, capsys):
    ext = _external(folder)
    os.chmod(ext, 0o644)
    other = folder / "a.onnx"
    other.write_bytes(ext.read_bytes())  # its data is ext.onnx.data
    check(capsys, folder, ["prune", other, "-o", ext] + PRUNE, [], "external data")
    check(capsys, folder, ["prune", other, "-o", folder / "ext.onnx.data"] + PRUNE, [], "external data")
    check(capsys, folder, ["prune", other, "-o", folder / "o.onnx", "--plan-out", folder / "ext.onnx.data"] + PRUNE,
          [folder / "o.onnx"], "external data")
    onnx.load(str(other))  # still loads
    out = folder / "small.onnx"
    assert check(capsys, folder, ["prune", ext, "-o", out] + PRUNE, [out])[0] == 0
    assert os.stat(str(out) + ".data").st_mode & 0o777 == os.stat(out).st_mode & 0o777
    assert check(capsys, folder, ["prune", ext, "-o", ext, "--overwrite"] + PRUNE,
                 [ext, folder / "ext.onnx.data"])[0] == 0
    onnx.load(str(ext))


# ---- plans -------------------------------------------------------------------------------------

def _plan(folder, capsys):
    plan = folder / "plan.json"
    assert check(capsys, folder, ["prune", folder / "m.onnx", "-o", folder / "p.onnx", "--plan-out", plan] + PRUNE,
                 [folder / "p.onnx", plan])[0] == 0
    os.unlink(folder / "p.onnx")
    return json.loads(plan.read_text())


def _bad_plans(plan, rng):
    group = plan["weights"][0]["group"]
    every = copy.deepcopy(plan)
    for entry in every["weights"]:
        if entry["group"] == group:
            size = len(entry["kept"]) + len(entry["removed"])
            entry["removed"], entry["kept"] = list(range(size)), []
    yield "all", every, "all"
    yield "deep", "[" * 100_000 + "]" * 100_000, "nested"
    for text in ("", "{", "null", "[1]", "{}", '{"weights": null}', '{"weights": {}}', '{"weights": [1]}',
                 '{"spa_plan": 2, "weights": []}', "\udcff"):
        yield f"text {text[:10]!r}", text, None
    fields = ["name", "axis", "removed", "kept", "group"]
    values = [None, "0", 1.5, -1, 10 ** 30, [], [None], ["a"], {}, True, [1.5], [-1], [0, 0], "nope"]
    for field in fields:
        for value in values:
            bad = copy.deepcopy(plan)
            bad["weights"][0][field] = value
            yield f"{field}={value!r}", bad, None
        missing = copy.deepcopy(plan)
        del missing["weights"][0][field]
        yield f"no {field}", missing, None
    contradicts = copy.deepcopy(plan)
    contradicts["weights"][0]["kept"] = contradicts["weights"][0]["removed"]
    yield "kept=removed", contradicts, "kept"
    for k in range(10):  # random structural damage
        bad = copy.deepcopy(plan)
        entry = rng.choice(bad["weights"])
        key = rng.choice(list(entry))
        entry[key] = rng.choice(values + [entry[key][::-1] if isinstance(entry[key], list) else entry[key]])
        yield f"random{k}", bad, None


def test_bad_plans(folder, capsys):
    plan = _plan(folder, capsys)
    rng = random.Random(0)
    out = folder / "o.onnx"
    for name, content, expect in _bad_plans(plan, rng):
        path = folder / "bad.json"
        if isinstance(content, str):
            path.write_bytes(content.encode("utf-8", "surrogateescape"))
        else:
            path.write_text(json.dumps(content))
        rc, line = check(capsys, folder, ["apply-plan", folder / "m.onnx", path, "-o", out, "-q"], [out], expect)
        if rc == 0:
            os.unlink(out)
    check(capsys, folder, ["apply-plan", folder / "m.onnx", folder / "plan.json", "-o", folder / "plan.json", "-q"],
          [], "plan")


# ---- corrupt models ----------------------------------------------------------------------------

def _corrupt_tensors(folder):
    model = small_model()

    def variant(change):
        m = copy.deepcopy(model)
        change(m.graph.initializer[0])
        return m

    def short(t):
        t.raw_data = t.raw_data[:-4]

    def absurd(t):
        t.ClearField("raw_data")
        del t.dims[:]
        t.dims.extend([1 << 20, 1 << 20, 2])

    def typed(t):
        t.ClearField("raw_data")
        t.float_data.extend([1.0, 2.0])

    yield "short raw", variant(short), "bytes of data"
    yield "unknown type", variant(lambda t: setattr(t, "data_type", 99)), "unknown data type"
    yield "undefined type", variant(lambda t: setattr(t, "data_type", 0)), "unknown data type"
    yield "absurd dims", variant(absurd), "w1"
    yield "negative dim", variant(lambda t: t.dims.__setitem__(0, -4)), "negative"
    yield "typed count", variant(typed), "values"


def _external_damage(folder):
    def edit(location=None, length=None, offset=None, dims=None):
        m = onnx.load(str(folder / "ext.onnx"), load_external_data=False)
        t = m.graph.initializer[0]
        info = {e.key: e.value for e in t.external_data}
        for key, value in (("location", location), ("length", length), ("offset", offset)):
            if value is not None:
                info[key] = value
        del t.external_data[:]
        for key, value in info.items():
            t.external_data.add(key=key, value=value)
        if dims:
            del t.dims[:]
            t.dims.extend(dims)
        return m

    yield "escapes", edit(location="../ext.onnx.data"), "outside"
    yield "absolute", edit(location="/etc/passwd"), "outside"
    yield "missing", edit(location="nothing.data"), "missing"
    yield "length", edit(length="99999999"), "length"
    yield "offset", edit(offset="99999999"), "past the end"
    yield "bad offset", edit(offset="x"), "malformed"
    yield "absurd dims", edit(dims=[1 << 22, 1 << 22]), "w1"


def test_corrupt_tensors(folder, capsys):
    _external(folder)
    sub = folder / "sub"
    sub.mkdir()
    (sub / "ext.onnx.data").write_bytes((folder / "ext.onnx.data").read_bytes()[:1000])  # shorter than the dims
    (sub / "ext.onnx").write_bytes((folder / "ext.onnx").read_bytes())
    check(capsys, folder, ["analyze", sub / "ext.onnx", "-q"], [], "past the end")
    (sub / "ext.onnx.data").unlink()
    (sub / "ext.onnx.data").symlink_to(folder / "ext.onnx.data")
    check(capsys, folder, ["analyze", sub / "ext.onnx", "-q"], [], "symbolic link")
    cases = list(_corrupt_tensors(folder)) + list(_external_damage(folder))
    for name, model, expect in cases:
        path = folder / "bad.onnx"
        onnx.save(model, path)
        check(capsys, folder, ["prune", path, "-o", folder / "o.onnx"] + PRUNE, [folder / "o.onnx"], expect)


def test_a_model_onnxruntime_cannot_load_is_named_so(folder, capsys):
    """Reshape's shape in external data: onnxruntime refuses the file itself, so no input sizes would help
    and the error says why it does not load instead of asking for --input-shape."""
    b = Builder()
    x = b.op("Reshape", [b.op("MatMul", [b.input(["batch", 8]), b.weight(8, 8)]),
                         b.const(np.array([-1, 2, 4], dtype=np.int64))])
    b.output(b.op("Relu", [x]))
    onnx.save(b.model(), folder / "shape_outside.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="shape_outside.onnx.data", size_threshold=0)
    out = folder / "o.onnx"
    check(capsys, folder, ["sparsify", folder / "shape_outside.onnx", "-o", out, "--criterion", "l1", "-q"], [out],
          "the original model does not load in onnxruntime either: ")


def test_truncated_random_and_flipped_files(folder, capsys):
    valid = (folder / "m.onnx").read_bytes()
    rng = random.Random(1)
    blobs = [valid[:n] for n in (0, 1, 7, len(valid) // 4, len(valid) // 2, len(valid) - 1)]
    blobs += [bytes(rng.randrange(256) for _ in range(n)) for n in (16, 600, 4000)]
    for _ in range(25):
        flipped = bytearray(valid)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        blobs.append(bytes(flipped))
    out = folder / "o.onnx"
    for k, blob in enumerate(blobs):
        path = folder / "bad.onnx"
        path.write_bytes(blob)
        rc, _ = check(capsys, folder, ["prune", path, "-o", out] + PRUNE, [out])
        if rc == 0:
            os.unlink(out)
        if k < 9:
            check(capsys, folder, ["analyze", path, "-q"])


# ---- option values -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expect", [
    (["--report", "--repeats", "0"], "--repeats"),
    (["--report", "--batch", "0"], "--batch"),
    (["--report", "--threads", "-2"], "--threads"),
    (["--criterion", "random", "--seed", "-1"], "--seed"),
    (["--criterion", "random", "--seed", str(2 ** 40)], "--seed"),
    (["--criterion", "obspa", "--calibration-samples", "0"], None),
])
def test_bad_option_values(folder, capsys, flags, expect):
    out = folder / "o.onnx"
    check(capsys, folder, ["prune", folder / "m.onnx", "-o", out, "--ratio", "0.5", "-q"] + flags, [out], expect)


def test_bad_targets(folder, capsys):
    out = folder / "o.onnx"
    for flags in (["--ratio", "-0.5"], ["--ratio", "1"], ["--ratio", "2"], ["--ratio", "nan"], ["--ratio", "inf"],
                  ["--target-params", "0"], ["--target-params", "1.5"], ["--target-flops", "nan"],
                  ["--ratio", "0.99", "--max-group-ratio", "1"], ["--ratio-for", "*=1"], ["--ratio-for", "*=nan"],
                  ["--ratio", "0.5", "--round-to", "0"], ["--ratio", "0.5", "--round-to", "-3"]):
        rc, _ = check(capsys, folder, ["prune", folder / "m.onnx", "-o", out, "-q"] + flags, [out])
        if rc == 0:
            os.unlink(out)


# ---- framework files a converter cannot read ---------------------------------------------------

def test_garbage_tflite_files(folder, capsys):
    pytest.importorskip("tf2onnx")
    rng = random.Random(2)
    no_identifier = folder / "noise.tflite"
    no_identifier.write_bytes(bytes(rng.randrange(256) for _ in range(3000)))
    check(capsys, folder, ["prune", no_identifier, "-o", folder / "o.onnx"] + PRUNE, [folder / "o.onnx"],
          "not a TFLite model")
    corrupt = folder / "corrupt.tflite"  # the flatbuffer identifier, then noise
    corrupt.write_bytes(b"\x10\x00\x00\x00TFL3" + bytes(rng.randrange(256) for _ in range(3000)))
    check(capsys, folder, ["prune", corrupt, "-o", folder / "o.onnx"] + PRUNE, [folder / "o.onnx"],
          "damaged TFLite file")


def test_converter_failure_is_one_line_on_the_terminal(folder):
    """TensorFlow's native start-up lines bypass Python's stderr: the whole process's stderr is
    checked."""
    import subprocess
    pytest.importorskip("tf2onnx")
    corrupt = folder / "corrupt.tflite"
    corrupt.write_bytes(b"\x10\x00\x00\x00TFL3" + bytes(range(256)) * 12)
    done = subprocess.run([sys.executable, "-m", "spa", "prune", str(corrupt), "-o", str(folder / "o.onnx"), "-q",
                           "--ratio", "0.5"], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith("spa: error: ") and "damaged TFLite file" in done.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the probe runs in this process where fork is unavailable")
def test_onnxruntime_dying_in_the_shape_probe_takes_only_the_probe_with_it(monkeypatch, tmp_path, capsys):
    """The shape probe runs the model at sizes it was not built for; onnxruntime can die of a signal
    there (onnx-asr's wespeaker fbank: SIGFPE, an integer division by zero on fewer samples than its
    window). The probe runs in a forked child, so the command goes on without the probed shapes."""
    from builder import nbits_mlp  # a com.microsoft op: ONNX's shape inference leaves its output open
    import spa.graph
    import spa.runtime

    def dies(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGFPE)

    path = str(tmp_path / "model.onnx")
    onnx.save(nbits_mlp(), path)
    monkeypatch.setattr(spa.graph, "_symbolic_shapes", lambda light: {})  # as for an op onnxruntime's does not know
    monkeypatch.setattr(spa.runtime, "session", dies)
    assert main(["analyze", path]) == 0
    out = capsys.readouterr().out
    assert "rank of 'g' unknown" in out, out
    assert "note: shape probe: onnxruntime was killed by SIGFPE running the model at the probe's sizes" in out, out
