"""--eval FILE.npz / spa.prune(eval=...): a metric on the original and the pruned model, in the report,
the JSON, the summary line and Pruned.stats; bad files give one line and exit 2 before any pruning."""
import json
import re
import warnings

import numpy as np
import onnx
import pytest

import spa
from builder import Builder
from spa.cli import main
from spa.errors import SpaError
from spa.evaluate import AGREEMENT, Baseline, evaluate, load
from spa.runtime import run
from test_cli import small_model

SAMPLES = 40


def spa_cli(*args):
    return main([str(a) for a in args])


def inputs(n=SAMPLES, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(small_model(), path)
    return str(path)


@pytest.fixture
def val(model_path, tmp_path):
    """The classifier's inputs, labelled with its own top-1: accuracy 1 before pruning."""
    x = inputs()
    path = tmp_path / "val.npz"
    np.savez(path, x=x, labels=run(model_path, {"input": x})[0].argmax(-1))
    return str(path)


def top1(path, x):
    return run(str(path), {"input": x})[0].argmax(-1)


def test_report_json_and_summary_show_accuracy_before_and_after(model_path, val, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert spa_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--eval", val, "--json", "-q",
                   "--repeats", "1") == 0
    report = json.loads(capsys.readouterr().out)["eval"]
    expected = float(np.mean(top1(out, inputs()) == top1(model_path, inputs())))
    assert report == {"metric": "accuracy", "before": 1.0, "after": pytest.approx(expected),
                      "difference": pytest.approx(expected - 1), "samples": SAMPLES, "source": val}
    assert spa_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--eval", val, "--overwrite", "-q") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: parameters") and line.endswith(f"; accuracy 1.000 -> {expected:.3f}")
    assert spa_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--eval", val, "--report", "-q",
                   "--repeats", "1") == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("accuracy"))
    assert row.split() == ["accuracy", f"({SAMPLES}", "samples", "from", f"{val})", "1.000", f"{expected:.3f}",
                           f"{expected - 1:+.3f}"]


def test_apply_plan_and_dry_run_evaluate_too(model_path, val, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert spa_cli("prune", model_path, "--dry-run", "--ratio", "0.5", "--eval", val, "-q") == 0
    assert "; accuracy 1.000 -> " in capsys.readouterr().out
    assert spa_cli("prune", model_path, "-o", tmp_path / "a.onnx", "--ratio", "0.5", "--plan-out", plan, "-q") == 0
    capsys.readouterr()
    assert spa_cli("apply-plan", model_path, plan, "-o", tmp_path / "b.onnx", "--eval", val, "--json", "-q",
                   "--repeats", "1") == 0
    assert json.loads(capsys.readouterr().out)["eval"]["before"] == 1.0


def test_api_eval_path_and_callable(model_path, val):
    small = spa.prune(model_path, ratio=0.5, eval=val)
    assert small.stats["eval"]["metric"] == "accuracy"
    assert small.stats["eval"]["before"] == 1.0 and 0 <= small.stats["eval"]["after"] <= 1

    x = inputs()
    calls = []

    def mean_logit(run):
        calls.append(1)
        return float(np.mean(run(x)[0]))   # a bare array for a single-input model

    small = spa.prune(small_model(), ratio=0.5, eval=mean_logit)
    assert len(calls) == 2
    assert small.stats["eval"]["metric"] == "mean_logit"
    assert small.stats["eval"]["before"] == pytest.approx(float(np.mean(run(small_model(), {"input": x})[0])))
    assert small.stats["eval"]["after"] == pytest.approx(float(np.mean(run(small.model, {"input": x})[0])))
    with pytest.raises(SpaError, match="returned 'high', not a number"):
        spa.prune(model_path, ratio=0.5, eval=lambda run: "high")


def test_agreement_without_labels(model_path, tmp_path):
    x = inputs()
    path = tmp_path / "unlabelled.npz"
    np.savez(path, input=x)
    small = spa.prune(model_path, ratio=0.5, eval=str(path))
    found = small.stats["eval"]
    assert found["metric"] == AGREEMENT == "top-1 agreement with the original"
    assert found["before"] == 1.0
    assert found["after"] == pytest.approx(np.mean(top1_proto(small.model, x) == top1(model_path, x)))
    evaluation = load(str(path), model_path)
    with pytest.raises(SpaError, match="has no labels"):
        evaluate(small.model, evaluation)
    assert evaluate(small.model, evaluation, reference=model_path)["value"] == pytest.approx(found["after"])


def top1_proto(model, x):
    return run(model, {"input": x})[0].argmax(-1)


def test_same_file_as_calibration_is_a_warning(model_path, tmp_path, capsys):
    x = inputs(16)
    path = tmp_path / "data.npz"
    np.savez(path, input=x, labels=top1(model_path, x))
    assert spa_cli("prune", model_path, "-o", tmp_path / "s.onnx", "--ratio", "0.25", "--compensation", "scale",
                   "--calibration", path, "--eval", path, "-q") == 0
    assert "is also the --calibration data" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spa.prune(model_path, ratio=0.25, compensation="scale", calibration=str(path), eval=str(path))
    assert any("optimistic" in str(w.message) for w in caught)


def test_sequence_outputs_score_per_position_and_ignore_negative_labels(tmp_path):
    b = Builder()
    h = b.op("Relu", [b.op("MatMul", [b.input(["batch", "time", 4], "features"), b.weight(4, 8)])])
    b.output(b.op("MatMul", [h, b.weight(8, 5)]))
    model = b.model()
    x = np.random.default_rng(1).standard_normal((6, 7, 4)).astype(np.float32)
    labels = run(model, {"features": x})[0].argmax(-1)
    labels[:, -2:] = -100
    path = tmp_path / "tokens.npz"
    np.savez(path, features=x, y=labels)
    result = evaluate(model, load(str(path), model, batch_size=4))
    assert result == {"metric": "accuracy", "value": 1.0, "samples": 6, "positions": 6 * 5}
    wrong = labels.copy()
    wrong[0, 0] = (wrong[0, 0] + 1) % 5
    np.savez(path, features=x, y=wrong)
    assert evaluate(model, load(str(path), model))["value"] == pytest.approx(29 / 30)


def test_fixed_batch_pads_the_last_batch_and_files_are_read_lazily(tmp_path):
    b = Builder()
    x = b.op("Relu", [b.conv(b.input([4, 3, 8, 8]), 3, 6)])
    b.output(b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])]), 6, 3))
    model = b.model()
    data = inputs(10)
    labels = np.concatenate([run(model, {"input": data[s:s + 4]})[0].argmax(-1) for s in (0, 4)]
                            + [run(model, {"input": np.concatenate([data[8:], data[8:9], data[8:9]])})[0][:2]
                               .argmax(-1)])
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, inputs=data, labels=labels)
        evaluation = load(str(path), model)
        assert isinstance(evaluation.inputs["input"], np.memmap) == (save is np.savez)
        assert Baseline(model, str(path)).before == {"metric": "accuracy", "value": 1.0, "samples": 10}


def _write(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


BAD = {
    "missing": (lambda t: t / "nowhere.npz", "eval file .*nowhere.npz: no such file"),
    "not an npz": (lambda t: (t / "text.npz").write_text("hello") and t / "text.npz", "is not an .npz archive"),
    "no array for the input": (lambda t: _write(t, "names.npz", a=inputs(), b=inputs()),
                               r"has no array for input input \(or x / inputs"),
    "wrong rank": (lambda t: _write(t, "rank.npz", x=inputs()[:, 0]), r"input 'input' needs rank 4"),
    "wrong static axis": (lambda t: _write(t, "axis.npz", x=np.zeros((4, 2, 8, 8), np.float32)),
                          "input 'input' axis 1 must be 3"),
    "wrong dtype": (lambda t: _write(t, "dtype.npz", x=np.zeros((4, 3, 8, 8), np.int32)), "needs float32, got int32"),
    "labels too short": (lambda t: _write(t, "short.npz", x=inputs(), labels=np.zeros(SAMPLES - 1, np.int64)),
                         f"holds {SAMPLES - 1} labels for {SAMPLES} samples"),
    "labels out of range": (lambda t: _write(t, "range.npz", x=inputs(), labels=np.full(SAMPLES, 7)),
                            "holds class 7, but output .* has 4 classes"),
    "labels of the wrong shape": (lambda t: _write(t, "shape.npz", x=inputs(), labels=np.zeros((SAMPLES, 2), int)),
                                  r"labels of shape \[40, 2\] do not fit the first output of shape \[N, 4\]"),
    "float labels": (lambda t: _write(t, "float.npz", x=inputs(), labels=np.zeros(SAMPLES)),
                     "must hold integer class indices, got float64"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_eval_files_give_one_line_and_exit_2_before_pruning(model_path, tmp_path, capsys, case):
    make, message = BAD[case]
    path = make(tmp_path)
    out = tmp_path / "small.onnx"
    assert spa_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--eval", path) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("[spa")]
    assert len(lines) == 1 and lines[0].startswith("spa: error: eval"), err
    assert re.search(message, lines[0]), lines[0]
    assert "pruning" not in err and "scoring" not in err and not out.exists()


def test_eval_output_is_checked(model_path, val, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert spa_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--eval", val, "--eval-output", "nope", "-q") == 2
    assert "eval output 'nope' is no output of the model" in capsys.readouterr().err
    assert spa_cli("prune", model_path, "-o", out, "--ratio", "0.5", "--eval-output", "nope", "-q") == 2
    assert "--eval-output has no effect without --eval" in capsys.readouterr().err
