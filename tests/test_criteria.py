"""Gradient criteria (spa.frontends.torch_criteria): saliencies against torch / finite differences,
group lifting in the core, end-to-end pruning under the oracle, real labels on digits, the CLI."""
from __future__ import annotations

import copy
import os
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from builder import Builder  # noqa: E402
from oracle import check_exact  # noqa: E402

from spa.cli import main  # noqa: E402
from spa.errors import SpaError  # noqa: E402
from spa.frontends.torch_criteria import CRITERIA, load_labels, prune, saliency  # noqa: E402
from spa.groups import analyze  # noqa: E402
from spa.importance import available, normalize, score, score_from_saliency  # noqa: E402
from spa.pipeline import save  # noqa: E402
from spa.runtime import run  # noqa: E402
from spa.selection import Target  # noqa: E402


class Tiny(nn.Module):
    """Smooth (tanh) so that finite differences of gradients are accurate."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from models.zoo import export

    torch.manual_seed(0)
    net = Tiny().eval()
    path = str(tmp_path_factory.mktemp("criteria") / "tiny.onnx")
    export(net, path, example_inputs=torch.randn(2, 3, 8, 8))
    model = onnx.load(path)
    assert {t.name for t in model.graph.initializer} == set(dict(net.named_parameters()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    name = model.graph.input[0].name
    batches = [{name: x[:4]}, {name: x[4:]}]
    return net, model, batches, x, labels


def _loss(net, x, y):
    return F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))


def _grads(net, x, y):
    return dict(zip(dict(net.named_parameters()), torch.autograd.grad(_loss(net, x, y), list(net.parameters()))))


def _mean_grads(net, x, labels, parts=2):
    per = [_grads(net, xs, ys) for xs, ys in zip(np.split(x, parts), np.split(labels, parts))]
    return {n: sum(g[n] for g in per) / parts for n in per[0]}


def _close(got: dict, expected: dict, rtol=1e-4):
    assert set(got) == set(expected)
    for n, e in expected.items():
        e = e.detach().double().numpy() if isinstance(e, torch.Tensor) else e
        scale = max(np.abs(e).max(), 1e-12)
        assert np.abs(got[n] - e).max() <= rtol * scale, f"{n}: {np.abs(got[n] - e).max()} vs scale {scale}"
        assert got[n].shape == e.shape


# ----------------------------------------------------------------------------------------------
# per-weight saliencies against references
# ----------------------------------------------------------------------------------------------
def test_taylor_and_snip_equal_torch_on_the_same_network(tiny):
    net, model, batches, x, labels = tiny
    g = _mean_grads(net, x, labels)
    params = dict(net.named_parameters())
    _close(saliency(model, "taylor", batches=batches, labels=labels),
           {n: (params[n] * g[n]).abs() for n in params})
    first = _grads(net, x[:4], labels[:4])  # snip: the first batch only
    _close(saliency(model, "snip", batches=batches, labels=labels),
           {n: (params[n] * first[n]).abs() for n in params})


def test_obd_is_half_w_squared_times_the_empirical_fisher(tiny):
    net, model, batches, x, labels = tiny
    params = dict(net.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    for k in range(len(x)):
        for n, g in _grads(net, x[k:k + 1], labels[k:k + 1]).items():
            fisher[n] += g ** 2 / len(x)
    _close(saliency(model, "obd", batches=batches, labels=labels),
           {n: 0.5 * params[n] ** 2 * fisher[n] for n in params})


def test_synflow_is_abs_weights_on_an_all_ones_input(tiny):
    net, model, *_ = tiny
    linear = copy.deepcopy(net).double()
    with torch.no_grad():
        for p in linear.parameters():
            p.abs_()
    flow = linear(torch.ones(1, 3, 8, 8, dtype=torch.float64)).sum()
    grads = dict(zip(dict(linear.named_parameters()), torch.autograd.grad(flow, list(linear.parameters()))))
    _close(saliency(model, "synflow"), {n: (p * grads[n]).abs() for n, p in linear.named_parameters()}, 1e-9)


def test_grasp_and_crop_match_finite_differences_of_gradients(tiny):
    net, model, batches, x, labels = tiny
    net = copy.deepcopy(net).double()
    x64 = x.astype(np.float64)
    g = _mean_grads(net, x64, labels)
    norm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
    eps = 1e-4 / float(norm)
    shifted = {}
    for sign in (1, -1):
        moved = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p += sign * eps * g[n]
        shifted[sign] = _mean_grads(moved, x64, labels)
    params = dict(net.named_parameters())
    hg = {n: (shifted[1][n] - shifted[-1][n]) / (2 * eps) for n in params}
    grasp = saliency(model, "grasp", batches=batches, labels=labels, dtype="float64")
    _close(grasp, {n: params[n] * hg[n] for n in params}, 1e-5)
    assert min(v.min() for v in grasp.values()) < 0 < max(v.max() for v in grasp.values())  # signed
    crop = saliency(model, "crop", batches=batches, labels=labels, dtype="float64")
    _close(crop, {n: (params[n] * hg[n]).abs() for n in params}, 1e-5)


def test_default_losses_pseudo_labels_and_output_norm(tiny):
    net, model, batches, x, _ = tiny
    with torch.no_grad():
        pseudo = net(torch.from_numpy(x)).argmax(dim=1).numpy()
    _close(saliency(model, "taylor", batches=batches), saliency(model, "taylor", batches=batches, labels=pseudo), 1e-6)
    b = Builder()
    out = b.output(b.conv(b.op("Relu", [b.conv(b.input([2, 3, 6, 6]), 3, 4)]), 4, 5))
    trunk = b.model()  # a 4-D output: no classifier, the default loss is 0.5 ||f(x)||^2
    default = saliency(trunk, "taylor", calibration="synthetic", samples=8, batch_size=4)
    explicit = saliency(trunk, "taylor", calibration="synthetic", samples=8, batch_size=4,
                        loss=lambda o, batch: 0.5 * (o ** 2).sum() / len(o))
    _close(default, explicit, 1e-6)
    assert out and all(np.abs(v).sum() > 0 for v in default.values())


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    _, model, batches, _, labels = tiny
    with pytest.raises(SpaError, match="needs calibration inputs"):
        saliency(model, "taylor", calibration="none")
    with pytest.raises(SpaError, match="labels for"):
        saliency(model, "taylor", batches=batches, labels=labels[:3])
    with pytest.raises(SpaError, match="class count"):
        saliency(model, "taylor", batches=batches, labels=labels + 5)
    with pytest.raises(SpaError, match="1-D array"):
        load_labels(np.zeros((2, 2)))
    with pytest.raises(SpaError, match="unknown gradient criterion"):
        saliency(model, "l1")
    with pytest.raises(SpaError, match="needs per-weight saliencies"):
        score(analyze(model), "taylor")


# ----------------------------------------------------------------------------------------------
# lifting to groups (core only)
# ----------------------------------------------------------------------------------------------
def _residual():
    b = Builder(seed=1)
    a = b.conv(b.input([1, 4, 6, 6]), 4, 8)
    s = b.op("Add", [a, b.conv(b.op("Relu", [a]), 8, 8)])
    b.output(b.conv(s, 8, 3))
    return b.model()


def test_saliency_of_coupled_members_is_summed_and_aggregated():
    model = _residual()
    analysis = analyze(model)
    rng = np.random.default_rng(0)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    sal = {n: rng.random(w.shape) + 0.1 for n, w in consts.items()}
    group = next(g for g in analysis.groups if g.prunable and len(g.atoms) == 8)
    members = [m for m in group.members if m.is_const]
    assert len(members) == 6  # conv A out + bias, conv B in and out + bias, conv C in
    assert len({m.tensor for m in members}) == 5  # conv B's weight sits in the group twice
    per = np.stack([np.moveaxis(sal[m.tensor], m.axis, 0).reshape(8, -1).sum(axis=1) for m in members])
    expected = {"sum": per.sum(0), "mean": per.mean(0), "max": per.max(0)}
    for aggregation, total in expected.items():
        got = score_from_saliency(analysis, sal, aggregation, "none")[group.id]
        np.testing.assert_allclose(got, total, rtol=1e-12)
    total = expected["mean"]
    for how, want in {"mean": total / total.mean(), "max": total / total.max(),
                      "standardise": (total - total.mean()) / total.std()}.items():
        np.testing.assert_allclose(score(analysis, "taylor", "mean", how, saliency=sal)[group.id], want, rtol=1e-12)
    partial = {m.tensor: sal[m.tensor] for m in members[:1]}  # members without a saliency are skipped
    np.testing.assert_allclose(score_from_saliency(analysis, partial, "sum", "none")[group.id], per[0], rtol=1e-12)
    with pytest.raises(SpaError, match="has shape"):
        score_from_saliency(analysis, {members[0].tensor: np.ones(3)})


def test_signed_scores_keep_their_order_under_normalisation():
    values = np.array([-3.0, -1.0, -2.0, 0.5])
    for how in ("mean", "max", "standardise", "none"):
        assert list(np.argsort(normalize(values, how))) == list(np.argsort(values))


def test_gradient_criteria_are_listed_without_torch_in_the_core():
    assert set(CRITERIA) <= set(available())
    import subprocess
    code = "import sys, spa.cli, spa.pipeline, spa.importance; spa.cli.parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def resnet18():
    from models.zoo import cached_export
    from spa.pipeline import prune as core_prune
    model = onnx.load(cached_export("resnet18"))
    return model, set(core_prune(model, Target(ratio=0.5), "l1").plan.removed_atoms)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_each_criterion_prunes_resnet18_exactly(resnet18, criterion):
    model, by_l1 = resnet18
    result = check_exact(model, Target(ratio=0.5), criterion=criterion, calibration_samples=16)
    removed = set(result.plan.removed_atoms)
    assert len(removed) == len(by_l1) and removed != by_l1  # same budget, other channels than l1


def test_synflow_rounds_and_global_target(resnet18, tmp_path):
    model, _ = resnet18
    progress = []
    result = prune(model, Target(keep_params=0.5), "synflow", rounds=3, progress=progress.append)
    assert sum("round" in p for p in progress) == 3
    save(result.model, str(tmp_path / "s.onnx"))
    from spa.cost import count_params
    assert count_params(result.model) <= 0.5 * count_params(model) * 1.05


# ----------------------------------------------------------------------------------------------
# real labels: a digits classifier
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from models.zoo import export

    data = pytest.importorskip("sklearn.datasets").load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1200], order[1200:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(xt), yt).backward()
        opt.step()
    folder = tmp_path_factory.mktemp("digits")
    path = str(folder / "digits.onnx")
    export(net.eval(), path, example_inputs=torch.from_numpy(x[:2]))
    name = onnx.load(path).graph.input[0].name
    calib = str(folder / "calib.npz")
    np.savez(calib, **{name: x[train[:256]], "labels": y[train[:256]]})
    return path, calib, name, x[test], y[test]


def _accuracy(model, name, x, y):
    return float((run(model, {name: x})[0].argmax(axis=1) == y).mean())


def test_taylor_with_real_labels_beats_random_on_digits(digits):
    path, calib, name, x, y = digits
    model = onnx.load(path)
    full = _accuracy(model, name, x, y)
    taylor = _accuracy(prune(model, Target(ratio=0.5), "taylor", calibration=calib, samples=256).model, name, x, y)
    random = [_accuracy(check_exact(model, Target(ratio=0.5), criterion="random", seed=s).model, name, x, y)
              for s in range(5)]
    print(f"digits accuracy: full {full:.3f}, taylor 50% {taylor:.3f}, random 50% {np.mean(random):.3f} "
          f"(min {min(random):.3f}, max {max(random):.3f})")
    assert full > 0.9
    assert taylor > max(random) and taylor > np.mean(random) + 0.05


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def test_cli_taylor_with_labels_and_one_line_errors(digits, tmp_path, capsys):
    path, calib, *_ = digits
    out = str(tmp_path / "small.onnx")
    assert main(["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "taylor", "--calibration", calib,
                 "--calibration-samples", "64", "-q"]) == 0
    assert os.path.exists(out) and "removed 64 channels" in capsys.readouterr().out
    bad_labels = tmp_path / "labels.npy"
    np.save(bad_labels, np.zeros((4, 3)))
    missing = str(tmp_path / "nothing.npz")
    for extra in (["--labels", str(bad_labels)], ["--labels", missing], ["--calibration", missing]):
        code = main(["prune", path, "-o", str(tmp_path / "x.onnx"), "--ratio", "0.5", "--criterion", "taylor",
                     "-q"] + extra)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("spa: error:") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "x.onnx")


def test_cli_without_torch_says_what_to_install(digits, tmp_path):
    import subprocess
    path, *_ = digits
    code = ("import sys; sys.modules['torch'] = None; from spa.cli import main; "
            f"sys.exit(main(['prune', {path!r}, '-o', {str(tmp_path / 'x.onnx')!r}, '--ratio', '0.5', "
            "'--criterion', 'snip', '-q']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "spa: error: criterion snip needs PyTorch (pip install spa[torch])\n"
