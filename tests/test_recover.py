"""spa.frontends.torch_recover: data-free recovery of a pruned model by distillation."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

torch = pytest.importorskip("torch")

from builder import Builder  # noqa: E402

from spa.frontends.torch_recover import (RecoveryResult, bn_inversion_batches, default_lr,  # noqa: E402
                                         recover, synthetic_batches)
from spa.pipeline import prune, save  # noqa: E402
from spa.runtime import session  # noqa: E402
from spa.selection import Target  # noqa: E402

torch.set_num_threads(1)


def _cnn(seed=0):
    b = Builder(seed=seed)
    x = b.input(["batch", 3, 8, 8])
    h = b.op("Relu", [b.bn(b.conv(x, 3, 16), 16)])
    h = b.op("Relu", [b.bn(b.conv(h, 16, 16), 16)])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    b.output(b.gemm(h, 16, 5))
    return b.model()


def _calibrated_cnn(seed=0, shift=(1.5, -1.0, 0.5), spread=0.5):
    """_cnn with every BatchNormalization's running statistics measured on inputs that are NOT
    standard Gaussian (per-channel means ``shift``, std ``spread``): what a trained model is like."""
    model = _cnn(seed)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((256, 3, 8, 8)) * spread + np.array(shift)[None, :, None, None]).astype(np.float32)
    inits = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(onnx.ValueInfoProto(name=node.input[0]))
        a = session(probe).run([node.input[0]], {"input": x})[0]
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(a.mean((0, 2, 3)), node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(a.var((0, 2, 3)), node.input[4]))
    return model


def _frontend(distill):
    """A stand-in for plugins.load: `distill` as the recovery frontend, whose check passes."""
    return lambda group, name: distill if name == "distill" else (lambda model: None)


def _mlp(seed=1):
    b = Builder(seed=seed)
    x = b.input(["batch", 12])
    h = b.op("Relu", [b.gemm(x, 12, 32)])
    h = b.op("Tanh", [b.gemm(h, 32, 32)])
    b.output(b.gemm(h, 32, 4))
    return b.model()


def _residual_mlp(seed=2):
    """x + MLP(x), twice: the residual stream (width 12, tied to the input) is not pruned."""
    b = Builder(seed=seed)
    x = b.input(["batch", 12])
    for _ in range(2):
        x = b.op("Add", [x, b.gemm(b.op("Relu", [b.gemm(x, 12, 24)]), 24, 12)])
    b.output(b.gemm(x, 12, 4))
    return b.model()


def _as_constants(model):
    """The same model with every initializer moved into a Constant node (Paddle/TF style)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name="const_" + t.name, value=t)
              for t in out.graph.initializer]
    nodes = consts + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


def _weights(model):
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _run(model, original, steps=60, lr=3e-3, **kw):
    return recover(original, model, synthetic_batches(original, batch_size=32), steps, lr=lr, threads=1, **kw)


def _check_same_layout(before, after):
    wa, wb = _weights(before), _weights(after)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].shape == wb[name].shape and wa[name].dtype == wb[name].dtype, name
        assert np.all(np.isfinite(wb[name])), name
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]


def test_recovers_pruned_cnn_with_batchnorm(tmp_path):
    original = _cnn()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    messages = []
    result = _run(pruned, original, progress=messages.append)
    assert isinstance(result, RecoveryResult)
    assert result.improved and result.steps == 60
    assert result.loss_after < 0.8 * result.loss_before
    assert len(messages) == 2 and messages[-1].startswith("recover: 60 steps, held-out distillation loss")
    _check_same_layout(pruned, result.model)
    changed = [n for n, v in _weights(result.model).items() if not np.array_equal(v, _weights(pruned)[n])]
    assert changed
    # BN running statistics are frozen (not trained, not re-estimated)
    bn_stats = {i for n in pruned.graph.node if n.op_type == "BatchNormalization" for i in n.input[3:5]}
    assert bn_stats and not bn_stats & set(changed)
    assert pruned.graph.initializer[0].name in _weights(pruned)  # the input copy is untouched
    save(result.model, str(tmp_path / "recovered.onnx"))
    # an independent check of the held-out claim on fresh inputs
    feeds = synthetic_batches(original, batch_size=64, seed=7)(0)
    ref = session(original).run(None, feeds)[0]
    err = lambda m: float(np.mean((session(m).run(None, feeds)[0] - ref) ** 2))  # noqa: E731
    assert err(result.model) < err(pruned)


def test_recovers_pruned_mlp_from_a_list_of_batches(tmp_path):
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    batches = [synthetic_batches(original, batch_size=32, seed=3)(k) for k in range(10)]
    result = recover(original, pruned, batches, 80, lr=3e-3, threads=1)
    assert result.improved and result.loss_after < 0.8 * result.loss_before
    _check_same_layout(pruned, result.model)
    save(result.model, str(tmp_path / "mlp.onnx"))


def test_constant_node_weights_are_written():
    original = _as_constants(_mlp())
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    assert not pruned.graph.initializer and any(n.op_type == "Constant" for n in pruned.graph.node)
    result = _run(pruned, original)
    assert result.improved
    _check_same_layout(pruned, result.model)
    before, after = _weights(pruned), _weights(result.model)
    assert sum(not np.array_equal(before[n], after[n]) for n in before) >= 3
    onnx.checker.check_model(result.model, full_check=True)


def test_float64_model_keeps_its_dtype():
    model = _mlp()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    pruned = prune(model, Target(ratio=0.5), criterion="l1").model
    result = _run(pruned, model, steps=30)
    assert result.improved
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in result.model.graph.initializer)
    _check_same_layout(pruned, result.model)


def test_identical_model_is_not_changed():
    original = _cnn()
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    result = _run(copy, original, steps=20)
    assert not result.improved and result.loss_before == 0
    assert result.model is copy
    assert result.model.SerializeToString() == original.SerializeToString()


@pytest.mark.parametrize("lr", [1e9, 1e38])
def test_diverging_training_never_writes_non_finite_values(lr):
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    messages = []
    result = _run(pruned, original, steps=30, lr=lr, progress=messages.append)
    assert not any("once more" in m for m in messages)  # an lr given is run once
    if lr > 1e30:  # the float32 loss overflows after one step: training stops
        assert result.steps == 1 and "diverged" in messages[-1]
    assert not result.improved
    assert result.model.SerializeToString() == pruned.SerializeToString()
    for value in _weights(result.model).values():
        assert np.all(np.isfinite(value))
    assert "not improved" in messages[-1]


def test_a_run_at_the_default_lr_that_does_not_lower_the_held_out_loss_is_tried_once_more_at_a_hundredth(
        monkeypatch):
    from spa.frontends import torch_recover
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    monkeypatch.setattr(torch_recover, "default_lr", lambda model: 30.0)
    messages = []
    result = _run(pruned, original, steps=100, lr=None, progress=messages.append)
    again = [m for m in messages if "once more from the pruned weights at lr 0.3" in m]
    assert len(again) == 1 and "at lr 30:" in again[0]
    assert result.steps == 200 and result.improved and result.loss_after < 0.8 * result.loss_before
    assert messages[-1].endswith("; at lr 0.3")
    _check_same_layout(pruned, result.model)
    # a run that lowers the loss is not repeated
    monkeypatch.setattr(torch_recover, "default_lr", lambda model: 0.3)
    messages.clear()
    assert _run(pruned, original, steps=100, lr=None, progress=messages.append).steps == 100
    assert not any("once more" in m for m in messages)


def test_an_lr_given_is_run_once_as_given():
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    messages = []
    result = _run(pruned, original, steps=100, lr=30.0, progress=messages.append)
    assert result.steps == 100 and not result.improved and "(lr 30)" in messages[0]
    assert not any("once more" in m for m in messages)


@pytest.mark.parametrize("steps, lr, message", [(10, 0.0, "must be a positive number"),
                                                 (10, float("nan"), "must be a positive number"),
                                                 (10, -1e-3, "must be a positive number"),
                                                 (0, 1e-3, "no effect without recovery steps"),
                                                 (-1, None, "number of steps >= 0 or a time"),
                                                 (None, None, "number of steps >= 0 or a time"),
                                                 (2.5, None, "number of steps >= 0 or a time"),
                                                 ("20 minutes", None, "number of steps >= 0 or a time"),
                                                 ("0s", None, "number of steps >= 0 or a time"),
                                                 (True, None, "number of steps >= 0 or a time")])
def test_a_recovery_that_cannot_run_is_refused(steps, lr, message):
    from spa.errors import SpaError
    original = _mlp()
    with pytest.raises(SpaError, match=message):
        _run(original, original, steps=steps, lr=lr)
    with pytest.raises(SpaError, match=message):
        prune(original, Target(ratio=0.5), criterion="l1", recover=steps, recover_lr=lr)


def test_non_finite_weights_are_skipped_when_written():
    from spa.frontends.torch_onnx import from_onnx
    from spa.frontends.torch_recover import _write_back

    pruned = prune(_mlp(), Target(ratio=0.5), criterion="l1").model
    student = from_onnx(pruned, verify=False)
    params = student.onnx_parameters()
    names = sorted(params)
    with torch.no_grad():
        params[names[0]][...] = float("nan")
        params[names[1]].add_(1.0)
    model, skipped = _write_back(pruned, student, "frozen")
    assert skipped == [names[0]]
    after, before = _weights(model), _weights(pruned)
    assert np.array_equal(after[names[0]], before[names[0]])
    assert np.allclose(after[names[1]], before[names[1]] + 1.0)


def test_intermediate_tensors_of_equal_shape_are_matched():
    original = _residual_mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    messages = []
    result = _run(pruned, original, steps=60, progress=messages.append)
    assert "matching 4 intermediate tensors" in messages[0]  # each block's down-projection and Add
    assert result.improved and result.loss_after < 0.8 * result.loss_before
    _check_same_layout(pruned, result.model)


def test_default_learning_rate_depends_on_batchnorm():
    assert default_lr(_cnn()) == 1e-3 and default_lr(_mlp()) == 1e-4


def test_bn_inversion_inputs_match_the_running_statistics():
    from spa.frontends.torch_onnx import from_onnx
    from spa.frontends.torch_recover import _forward_env

    original = _calibrated_cnn()
    pool = bn_inversion_batches(original, batches=3, batch_size=16, iterations=40)
    assert len(pool) == 3 and all(f["input"].shape == (16, 3, 8, 8) and f["input"].dtype == np.float32
                                  for f in pool)
    module = from_onnx(original, verify=False)
    module.mimic_onnx = True
    module.eval()
    bn = next(n for n in module._nodes if n.op == "BatchNormalization")
    mean = module.onnx_tensor(bn.inputs[3])

    def mismatch(feeds):
        with torch.no_grad():
            a = _forward_env(module, feeds)[bn.inputs[0]]
        return float(torch.linalg.vector_norm(a.mean((0, 2, 3)) - mean))

    gaussian = synthetic_batches(original, batch_size=16)(0)
    assert mismatch(pool[0]) < 0.5 * mismatch(gaussian)
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    result = recover(original, pruned, pool, 40, threads=1)
    assert result.improved


def test_bn_inversion_needs_batchnorm():
    from spa.errors import SpaError

    with pytest.raises(SpaError, match="BatchNormalization"):
        bn_inversion_batches(_mlp(), batches=1, iterations=1)


def test_pipeline_recovery_on_generated_inputs_says_it_was_judged_on_them(tmp_path):
    original = _mlp()
    messages = []
    result = prune(original, Target(ratio=0.5), criterion="l1", recover=60, progress=messages.append)
    assert result.recovery.improved
    assert any("generated held-out inputs" in m and "check the model on your data" in m for m in messages)
    x = synthetic_batches(original, batch_size=64, seed=3)(0)
    np.savez(tmp_path / "data.npz", **x)
    messages.clear()
    result = prune(original, Target(ratio=0.5), criterion="l1", recover=60, progress=messages.append,
                   calibration=str(tmp_path / "data.npz"))
    assert result.recovery is not None and not any("generated held-out inputs" in m for m in messages)


def test_pipeline_recovery_draws_fresh_synthetic_batches_and_judges_on_the_held_out_ones(monkeypatch):
    from spa import plugins
    seen = {}

    def fake(original, pruned, batches, steps, seed=0, progress=None, holdout=None):
        seen.update(batches=batches, holdout=holdout)
        return RecoveryResult(pruned, False, 1.0, 1.0, 0.0, 0)

    monkeypatch.setattr(plugins, "load", _frontend(fake))
    messages = []
    prune(_mlp(), Target(ratio=0.5), criterion="obspa", recover=5, progress=messages.append,
          calibration="synthetic", calibration_samples=32)
    assert callable(seen["batches"]) and len(seen["holdout"]) == 1
    first, later = seen["batches"](0), seen["batches"](40)
    assert not np.array_equal(first["input"], later["input"])
    assert not any(np.array_equal(first["input"], h["input"]) for h in seen["holdout"])
    assert any("fresh synthetic batches every step" in m for m in messages)


def test_pipeline_passes_the_recovery_lr_to_the_frontend_only_when_given(monkeypatch):
    from spa import plugins
    seen = []

    def fake(original, pruned, batches, steps, seed=0, progress=None, holdout=None, **options):
        seen.append(options)
        return RecoveryResult(pruned, False, 1.0, 1.0, 0.0, 0)

    monkeypatch.setattr(plugins, "load", _frontend(fake))
    prune(_mlp(), Target(ratio=0.5), criterion="l1", recover=5)
    prune(_mlp(), Target(ratio=0.5), criterion="l1", recover=5, recover_lr=2e-5)
    assert seen == [{}, {"lr": 2e-5}]


@pytest.mark.parametrize("given, budget", [(300, (300, None)), ("300", (300, None)), (0, (0, None)),
                                           ("90s", (0, 90.0)), ("20m", (0, 1200.0)), ("1.5h", (0, 5400.0)),
                                           (" 2 min ", (0, 120.0)), ("0.5s", (0, 0.5))])
def test_a_recovery_is_given_as_steps_or_as_a_time(given, budget):
    from spa.pipeline import recovery_budget
    assert recovery_budget(given) == budget


def test_a_timed_recovery_trains_until_its_time_is_spent_and_ends_its_schedule_there():
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    messages = []
    result = _run(pruned, original, steps=0, seconds=4.0, progress=messages.append)
    assert result.improved and result.loss_after < 0.8 * result.loss_before
    assert result.steps > 10 and result.seconds < 4.0 + 1.5
    assert "recover: as many steps as fit in 4 s (lr 0.003)" in messages[0]
    assert f"recover: {result.steps} steps" in messages[-1]
    _check_same_layout(pruned, result.model)
    # the same through steps="4s" (the pipeline's spelling)
    assert _run(pruned, original, steps="4s").improved


def test_the_time_schedule_warms_up_then_decays_to_zero_at_the_deadline(monkeypatch):
    from spa.frontends import torch_recover
    clock = [100.0]
    monkeypatch.setattr(torch_recover.time, "perf_counter", lambda: clock[0])
    factor = torch_recover._schedule(0, 0.2, deadline=110.0)
    seen = {}
    for t in (0.0, 1.0, 2.0, 6.0, 10.0, 12.0):
        clock[0] = 100.0 + t
        seen[t] = factor(0)
    assert seen[0.0] < 0.01 and seen[1.0] == pytest.approx(0.5) and seen[2.0] == pytest.approx(1.0)
    assert seen[6.0] == pytest.approx(0.5) and seen[10.0] == pytest.approx(0.0, abs=1e-12) and seen[12.0] == seen[10.0]


def test_a_time_too_short_to_train_in_returns_the_pruned_model_and_says_why():
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    result = _run(pruned, original, steps=0, seconds=0.01)
    assert result.steps == 0 and not result.improved and result.model is pruned
    assert "the 0.01 s given were spent before training could start" in result.message


def test_a_timed_run_that_does_not_improve_says_there_was_no_time_for_a_second_try(monkeypatch):
    from spa.frontends import torch_recover
    original = _mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    monkeypatch.setattr(torch_recover, "default_lr", lambda model: 30.0)
    result = _run(pruned, original, steps=0, lr=None, seconds=3.0)
    assert not result.improved and "no time for a second try at lr 0.3 (--recover-lr sets the rate)" in result.message


@pytest.mark.parametrize("steps, seconds", [(10, 5.0), ("1m", 5.0), (0, -1.0), (0, float("inf")), (0, True)])
def test_steps_and_seconds_together_or_a_bad_time_are_refused(steps, seconds):
    from spa.errors import SpaError
    original = _mlp()
    with pytest.raises(SpaError, match="recover: "):
        _run(original, original, steps=steps, seconds=seconds)


def test_the_pipeline_passes_a_time_to_the_frontend_as_seconds(monkeypatch):
    from spa import plugins
    seen = []

    def fake(original, pruned, batches, steps, seed=0, progress=None, holdout=None, **options):
        seen.append((steps, options))
        return RecoveryResult(pruned, False, 1.0, 1.0, 0.0, 0)

    monkeypatch.setattr(plugins, "load", _frontend(fake))
    prune(_mlp(), Target(ratio=0.5), criterion="l1", recover="2m")
    prune(_mlp(), Target(ratio=0.5), criterion="l1", recover="300")
    assert seen == [(0, {"seconds": 120.0}), (300, {})]


def _embedding_mlp(seed=3, vocab=40):
    """ids -> Gather(table) -> MLP: a token model whose lookup table pruning leaves alone."""
    b = Builder(seed=seed)
    ids = b.input(["batch", "sequence"], name="ids", dtype=onnx.TensorProto.INT64)
    h = b.op("Gather", [b.weight(vocab, 8), ids])
    h = b.op("Relu", [b.op("MatMul", [h, b.weight(8, 24)])])
    b.output(b.op("MatMul", [h, b.weight(24, 8)]))
    return b.model()


def test_lookup_tables_are_not_trained():
    original = _embedding_mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    table = next(n.input[0] for n in pruned.graph.node if n.op_type == "Gather")
    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, 40, (16, 6))} for _ in range(10)]
    result = recover(original, pruned, batches, 60, lr=3e-3, threads=1)
    before, after = _weights(pruned), _weights(result.model)
    assert result.improved and np.array_equal(before[table], after[table])
    assert all(not np.array_equal(before[n], after[n]) for n in before if n != table)
    trained = recover(original, pruned, batches, 60, lr=3e-3, threads=1, train_lookups=True)
    assert not np.array_equal(before[table], _weights(trained.model)[table])


def test_pipeline_recovery_interleaves_calibration_sentences_with_fresh_synthetic_ones(tmp_path, monkeypatch):
    """Sentences from a text file on even steps, a few words of each dropped or swapped for words of the
    others, fresh synthetic sentences from the same tokenizer on odd ones, judged on the held-out
    sentences as they are (MiniLM, 128 real sentences: docs/recover.md)."""
    from spa import plugins
    from spa.calibration import Calibration
    from test_calibration import SENTENCES, _ids, _tokenizer
    seen = {}

    def fake(original, pruned, batches, steps, seed=0, progress=None, holdout=None):
        seen.update(batches=batches, holdout=holdout)
        return RecoveryResult(pruned, False, 1.0, 1.0, 0.0, 0)

    monkeypatch.setattr(plugins, "load", _frontend(fake))
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES * 4), encoding="utf-8")
    real = {tuple(_ids(s)) for s in SENTENCES if s.strip()}

    def rows(feeds):  # the sentences' ids without padding ([PAD] is 0)
        return {tuple(r[r > 0]) for r in feeds["ids"]}

    messages = []
    cal = Calibration(source=str(tmp_path / "s.txt"), tokenizer=str(_tokenizer(tmp_path / "tok")), batch_size=8)
    prune(_embedding_mlp(), Target(ratio=0.5), criterion="l1", recover=5, calibration_options=cal,
          progress=messages.append)
    batches = seen["batches"]
    assert callable(batches) and seen["holdout"]
    words = {i for r in real for i in r}
    edited = set().union(*(rows(batches(step)) for step in (0, 2, 4)))
    assert {i for r in edited for i in r} <= words and not edited <= real
    assert all(r[0] == 2 and r[-1] == 3 for r in edited)  # encoded again: [CLS] ... [SEP]
    assert not rows(batches(1)) <= real and not rows(batches(3)) <= real
    assert all(rows(h) <= real for h in seen["holdout"])
    assert not any(batches(step) is h for h in seen["holdout"] for step in (0, 2, 4))
    assert any("dropped or swapped, interleaved with fresh synthetic" in m for m in messages)

    np.savez(tmp_path / "ids.npz", **batches(0))  # the same data without a tokenizer: cycled as before
    prune(_embedding_mlp(), Target(ratio=0.5), criterion="l1", recover=5, calibration=str(tmp_path / "ids.npz"))
    assert isinstance(seen["batches"], list) and seen["holdout"] is None


@pytest.mark.parametrize("device, message", [("gpu0", "must name a torch device"),
                                             ("cuda", "torch sees no CUDA device")])
def test_a_training_device_that_is_not_there_is_refused(device, message, monkeypatch):
    import torch

    from spa.errors import SpaError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    original = _mlp()
    with pytest.raises(SpaError, match=message):
        _run(original, original, steps=5, device=device)


def test_the_training_device_is_cuda_by_default_when_torch_sees_one(monkeypatch):
    import torch

    from spa.frontends.torch_recover import _training_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _training_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _training_device(None) == torch.device("cuda")
    assert _training_device("cpu") == torch.device("cpu")


def test_a_gpu_student_gets_a_teacher_on_its_device_and_token_batches_eight_times_as_large():
    import torch

    from spa.calibration import Calibration, fresh_batches
    from spa.errors import SpaError
    from spa.frontends.torch_recover import GPU_TOKEN_SCALE, _for_device
    tokens = fresh_batches(_embedding_mlp(), Calibration(source="synthetic", samples=32))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # a device object: no CUDA needed to build one
    assert _for_device(cpu, "auto", tokens) == ("ort", tokens, False)
    teacher, batches, larger = _for_device(gpu, "auto", tokens)
    assert teacher == "torch" and larger and batches.scale == GPU_TOKEN_SCALE == 8
    assert _for_device(gpu, "ort", tokens) == ("ort", tokens, False)  # onnxruntime's CPU teacher: as drawn
    listed = [tokens(0)]
    assert _for_device(gpu, "auto", listed) == ("torch", listed, False)  # given batches are not redrawn
    with pytest.raises(SpaError, match="teacher must be 'auto', 'ort' or 'torch'"):
        _for_device(cpu, "onnx", tokens)


def test_a_torch_teacher_distils_as_onnxruntime_does():
    original = _residual_mlp()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    by_ort, by_torch = _run(pruned, original, teacher="ort"), _run(pruned, original, teacher="torch")
    assert by_torch.improved and by_torch.loss_after < 0.8 * by_torch.loss_before
    assert by_torch.loss_before == pytest.approx(by_ort.loss_before, rel=1e-5)
    assert by_torch.loss_after == pytest.approx(by_ort.loss_after, rel=1e-3)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make", [_cnn, _residual_mlp])
def test_recovery_on_a_cuda_device_lowers_the_held_out_loss_and_says_where_it_ran(make):
    original = make()
    pruned = prune(original, Target(ratio=0.5), criterion="l1").model
    messages = []
    result = _run(pruned, original, progress=messages.append, device="cuda")
    assert " on cuda, teacher on cuda" in messages[0]
    assert result.improved and result.loss_after < 0.8 * result.loss_before
    _check_same_layout(pruned, result.model)


def test_batches_are_cut_to_what_a_training_step_can_take_in_the_memory_free(monkeypatch):
    """A step on a whole batch that would take more than MEMORY_SHARE of the memory free trains on the
    first inputs of each batch that fit (announced); with room, the batches stay whole."""
    from spa.frontends import torch_recover
    from spa.frontends.torch_onnx import from_onnx

    model = _mlp()
    student = from_onnx(model, verify=False)
    batches = synthetic_batches(model, batch_size=32)
    one, two = (torch_recover._forward_bytes(student, {"input": batches(0)["input"][:n]}) for n in (1, 2))
    step = torch_recover.STEP_MEMORY * (max(2 * one - two, 0) + 10.5 * (two - one))  # what 10.5 inputs take
    said = []
    monkeypatch.setattr(torch_recover, "_free_memory", lambda: int(step / torch_recover.MEMORY_SHARE))
    cut = torch_recover._within_memory(student, batches, said.append)
    assert cut(3)["input"].shape[0] == 10 and np.array_equal(cut(3)["input"], batches(3)["input"][:10])
    assert "a training step on 32 inputs would take" in said[0] and "10 of each batch a step" in said[0]
    monkeypatch.setattr(torch_recover, "_free_memory", lambda: 1 << 40)
    assert torch_recover._within_memory(student, batches, said.append) is batches and len(said) == 1


def test_a_model_without_a_float_output_is_refused_before_pruning(tmp_path, capsys):
    """Recovery distils float outputs: a model whose outputs are all integers (class ids) is refused
    before any work, its output types named."""
    from spa.cli import main

    b = Builder()
    x = b.input(["batch", 12])
    ids = b.op("ArgMax", [b.gemm(b.op("Relu", [b.gemm(x, 12, 16)]), 16, 4)], axis=1, keepdims=0)
    b.outputs.append(helper.make_tensor_value_info(ids, onnx.TensorProto.INT64, ["batch"]))
    onnx.save(b.model(), str(tmp_path / "ids.onnx"))
    assert main(["prune", str(tmp_path / "ids.onnx"), "-o", str(tmp_path / "small.onnx"), "--ratio", "0.5",
                 "--recover", "10"]) == 2
    err = capsys.readouterr().err
    assert "this model has none (its outputs are int64): run without --recover" in err and "rewriting" not in err
    assert not (tmp_path / "small.onnx").exists()
