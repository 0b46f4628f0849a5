"""Dynamic Probabilistic Pruning (spa.frontends.torch.dpp): exact k-out-of-n masks at every
training step for every granularity, gradients to the logits, the temperature schedule,
finalize's exact zeros, diagnostics, fake quantisation, and a toy training that learns."""
import copy
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from spa.errors import SpaError  # noqa: E402
from spa.frontends.torch import dpp  # noqa: E402

torch.set_num_threads(1)
GRANULARITIES = dpp.GRANULARITIES
AMOUNT = 0.75


class Net(nn.Module):
    """Conv2d, Conv1d and Linear in one model."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(2, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 5)

    def forward(self, x):
        y = F.relu(self.conv2d(x))                       # (b, 8, 4, 4)
        y = F.relu(self.conv1d(y.flatten(2)))            # (b, 8, 16)
        return self.fc(y.flatten(1))


def make(granularity="weight", amount=AMOUNT, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Net()
    return model, dpp.attach(model, amount, granularity, **kwargs)


def inputs(batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, 4, 4, generator=g), torch.randint(0, 5, (batch,), generator=g)


def unit_counts(mask: torch.Tensor, granularity: str) -> torch.Tensor:
    """Kept elements per unit of a weight-shaped 0/1 mask."""
    if granularity == "weight":
        return mask.reshape(mask.shape[0], -1).sum(1)
    if granularity == "kernel":
        return mask.reshape(*mask.shape[:2], -1).amax(2).sum(1)
    return mask.reshape(mask.shape[0], -1).amax(1).sum().reshape(1)


def train_steps(model, pruning, steps, lr=1e-2, schedule=None):
    x, y = inputs()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if schedule:
            schedule.step()
        yield losses


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_exactly_k_of_n_at_every_training_step(granularity):
    model, pruning = make(granularity)
    for _ in train_steps(model, pruning, 10):
        for mask in pruning.masks.values():
            sample = mask.last_sample
            assert set(sample.unique().tolist()) <= {0.0, 1.0}
            assert (sample.sum(1) == mask.k).all()
            weight_mask = dpp.expand_mask(sample, mask.shape, granularity).expand(mask.shape)
            assert (unit_counts(weight_mask, granularity) == mask.k).all()
    ks = {name: (m.k, m.n) for name, m in pruning.masks.items()}
    assert all(k == dpp.keep_count(n, AMOUNT) for k, n in ks.values())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_exactly_k_of_n_with_the_sigmoid_relaxation_and_annealed_noise(granularity):
    model, pruning = make(granularity, relaxation="sigmoid")
    for step, _ in enumerate(train_steps(model, pruning, 6)):
        pruning.set_noise(1.0 - step / 5)
        for mask in pruning.masks.values():
            assert mask.noise == pytest.approx(1.0 - step / 5)
            assert (mask.last_sample.sum(1) == mask.k).all()
            assert mask.logits.grad is not None
    with pytest.raises(SpaError):
        pruning.set_noise(-0.1)
    with pytest.raises(SpaError):
        dpp.attach(Net(), 0.5, relaxation="sinkhorn")


def test_zero_noise_samples_are_the_hard_top_k():
    model, pruning = make("weight")
    pruning.set_noise(0.0)
    model.train()
    for name, module in model.named_modules():
        if name in pruning.masks:
            mask = pruning.masks[name]
            module.weight  # draws a sample
            assert torch.equal(mask.last_sample, mask.hard())


def test_sigmoid_top_k_sharpens_to_the_hard_top_k():
    scores = torch.randn(4, 10)
    for k in (1, 3, 7, 9):
        soft = dpp.sigmoid_top_k(scores, k, 1.0)
        assert ((soft > 0) & (soft < 1)).all()
        assert torch.allclose(dpp.sigmoid_top_k(scores, k, 1e-4), dpp.top_k_mask(scores, k), atol=1e-3)
    assert torch.equal(dpp.sigmoid_top_k(scores, 10, 1.0), torch.ones_like(scores))
    x = scores.clone().requires_grad_()
    dpp.sigmoid_top_k(x, 3, 0.5).sum().backward()
    assert (x.grad > 0).all()  # every logit gets a gradient, most near the threshold


def test_recalibrate_batchnorm_uses_the_current_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1, bias=False), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8, 3))
    pruning = dpp.attach(model, 0.5)
    pruning.freeze()
    x = torch.randn(32, 1, 8)
    used = dpp.recalibrate_batchnorm(model, [(x[:16], None), (x[16:], None), (x, None)], max_batches=2)
    assert used == 2 and not model.training
    with torch.no_grad():
        expected = model[0](x)  # the masked conv output: its batch statistics are the running ones
    torch.testing.assert_close(model[1].running_mean, expected.mean((0, 2)), atol=1e-5, rtol=1e-4)
    assert model[1].momentum == 0.1


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_masked_weight_has_exactly_k_nonzero_elements_per_unit(granularity):
    model, pruning = make(granularity)
    model.train()
    for name, module in model.named_modules():
        if name in pruning.masks:
            weight = module.weight  # a fresh sample, masked
            k = pruning.masks[name].k
            assert (unit_counts((weight != 0).float(), granularity) == k).all()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradients_reach_the_logits(granularity):
    model, pruning = make(granularity)
    model.train()
    x, y = inputs()
    F.cross_entropy(model(x), y).backward()
    for name, mask in pruning.masks.items():
        assert mask.logits.grad is not None and mask.logits.grad.abs().sum() > 0, name
    assert all(any(p is logit for p in model.parameters()) for logit in pruning.parameters())


def test_soft_top_k_rows_sum_to_k_and_sharpen_with_temperature():
    scores = torch.randn(4, 10)
    for k in (1, 3, 7, 9):
        for t in (1.0, 0.01):
            soft = dpp.soft_top_k(scores, k, t)
            assert torch.allclose(soft.sum(1), torch.full((4,), float(k)), atol=1e-4)
        assert torch.allclose(dpp.soft_top_k(scores, k, 1e-3), dpp.top_k_mask(scores, k), atol=1e-3)


def test_temperature_schedule_is_exponential_and_reaches_t1():
    model, pruning = make()
    schedule = pruning.schedule(t0=2.0, t1=0.02, steps=5)
    temps = [next(iter(pruning.masks.values())).temperature]
    for _ in range(6):
        schedule.step()
        temps.append(next(iter(pruning.masks.values())).temperature)
    assert temps[:5] == pytest.approx([2.0, 2.0 * 0.1 ** 0.5, 0.2, 0.2 * 0.1 ** 0.5, 0.02])
    assert temps[5:] == pytest.approx([0.02, 0.02])
    assert all(m.temperature == pytest.approx(0.02) for m in pruning.masks.values())
    assert pruning.set_temperature(0.5) == 0.5
    with pytest.raises(SpaError):
        pruning.schedule(t0=0.0, t1=1.0, steps=3)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_finalize_leaves_exact_zeros_conforming_to_k_of_n(granularity):
    model, pruning = make(granularity)
    for _ in train_steps(model, pruning, 3):
        pass
    model.eval()
    x, _ = inputs()
    with torch.no_grad():
        expected = model(x)
    hard = pruning.hard_masks()
    pruning.finalize(model)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    modules = dict(model.named_modules())
    for name, mask in hard.items():
        weight = modules[name].weight
        assert isinstance(weight, nn.Parameter)
        assert (weight[mask == 0] == 0).all()
        dropped = mask.reshape(mask.shape[0], -1).amax(1) == 0  # whole filters (filter granularity only)
        assert isinstance(modules[name].bias, nn.Parameter)
        assert (modules[name].bias[dropped] == 0).all()
        assert (unit_counts((weight != 0).float(), granularity) <= pruning.masks[name].k).all()
        assert (unit_counts(mask, granularity) == pruning.masks[name].k).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert set(model.state_dict()) == set(Net().state_dict())
    with pytest.raises(SpaError):
        pruning.finalize(model)


@pytest.mark.parametrize("training", [True, False])
def test_filter_granularity_masks_the_bias_with_the_same_sample(training):
    model, pruning = make("filter")
    model.train(training)
    x, _ = inputs()
    for _ in range(3):  # a fresh sample each pass in training
        outputs = model.conv2d(x)
        kept = pruning.masks["conv2d"].filters()
        assert kept.sum() == pruning.masks["conv2d"].k
        assert (outputs[:, kept == 0] == 0).all() and (outputs[:, kept == 1] != 0).any()
        fc = model.fc(torch.randn(3, 8 * 16))
        assert (fc[:, pruning.masks["fc"].filters() == 0] == 0).all()
    model.train()
    F.cross_entropy(model(x), inputs()[1]).backward()
    assert all(m.logits.grad is not None and m.logits.grad.abs().sum() > 0 for m in pruning.masks.values())
    copy.deepcopy(model)(x)  # the bias reads its own copy's mask


def test_filter_removal_without_batchnorm_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    pruning = dpp.attach(model, 0.5, "filter", skip=("4",))
    for _ in range(3):
        model(torch.randn(4, 6)).sum().backward()
    model.eval()
    x = torch.randn(8, 6)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "live biases removed" warning
        pruning.finalize(model, x, physical=True)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [8, 8, 3]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class ConvBN(nn.Module):
    def __init__(self, branch=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 5)
        self.branch = branch  # control flow on a shape: torch.fx cannot trace it (torch.export can)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.branch and y.shape[-1] > 1:
            y = y * 1.0
        return self.fc(F.relu(y).flatten(1))


def test_filter_granularity_masks_the_batchnorm_after_the_layer_and_removal_is_exact():
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)  # a live shift in every channel, as after training
        model.bn.bias.uniform_(-1, 1)
    pruning = dpp.attach(model, 0.5, "filter", skip=("fc",))
    assert pruning.batchnorms == {"bn": "conv"}
    x, _ = inputs()
    model.train()
    y = model.bn(model.conv(x))
    dropped = pruning.masks["conv"].filters() == 0
    assert dropped.sum() == 4 and (y[:, dropped] == 0).all() and (y[:, ~dropped] != 0).any()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert (model.bn(model.conv(x))[:, pruning.masks["conv"].filters() == 0] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "live biases / BN shifts removed" warning
        pruning.finalize(model, x, physical=True)
    assert model.conv.out_channels == 4 and model.bn.num_features == 4
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_untraceable_model_keeps_its_batchnorm_unmasked_and_says_what_removal_moved():
    torch.manual_seed(0)
    model = ConvBN(branch=True)
    with torch.no_grad():
        model.bn.bias.uniform_(0.5, 1)
    pruning = dpp.attach(model, 0.5, "filter", skip=("fc",))
    assert pruning.batchnorms == {}
    model.eval()
    with pytest.warns(UserWarning, match="BN shifts removed"):
        pruning.finalize(model, inputs()[0], physical=True)
    assert "outputs moved by up to" in pruning.physical_status


@pytest.mark.parametrize("branch", [False, True])
def test_example_inputs_pair_the_batchnorm_of_any_model_that_runs_and_removal_is_exact(branch):
    torch.manual_seed(0)
    model = ConvBN(branch=branch)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(0.5, 1)
    x, _ = inputs()
    model.train()
    before = model.bn.running_mean.clone()
    pruning = dpp.attach(model, 0.5, "filter", skip=("fc",), example_inputs=(x,))
    assert pruning.batchnorms == {"bn": "conv"}
    assert model.training and torch.equal(model.bn.running_mean, before)  # the pairing pass changed nothing
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruning.finalize(model, x, physical=True)
    assert model.conv.out_channels == 4 and model.bn.num_features == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class InPlaceBetween(ConvBN):
    def forward(self, x):
        y = self.conv(x)
        y.add_(1.0)  # a dropped filter's channel is 1 here, not 0: masking the BatchNorm would change the model
        return self.fc(F.relu(self.bn(y)).flatten(1))


def test_a_batchnorm_reading_an_in_place_modified_output_is_not_paired():
    model = InPlaceBetween()
    assert dpp.attach(model, 0.5, "filter", skip=("fc",), example_inputs=(inputs()[0],)).batchnorms == {}


def test_example_inputs_that_do_not_fit_the_model_are_one_clear_error():
    model = ConvBN()
    with pytest.raises(SpaError, match="example_inputs do not run through the model") as caught:
        dpp.attach(model, 0.5, "filter", skip=("fc",), example_inputs=(torch.randn(2, 5),))
    assert caught.value.__cause__ is not None and model.training  # the model's own error, chained; mode restored


def test_finalize_physical_removal_reports_what_it_did():
    model, pruning = make("filter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruning.finalize(model, inputs()[0], physical=True)
    assert pruning.physical_status.startswith("physical removal by spa.frontends.torch_prune.make_physical")
    model, pruning = make("weight")
    with pytest.raises(SpaError):
        pruning.finalize(model, inputs()[0], physical=True)


def test_diagnostics_in_range_and_diversity_since_last_call():
    model, pruning = make("weight")
    for _ in train_steps(model, pruning, 5):
        pass
    first = pruning.diagnostics()
    assert set(first) == set(pruning.masks)
    for d in first.values():
        assert 0.0 <= d["entropy"] <= 1.0 + 1e-6
        assert d["k"] / d["n"] - 1e-6 <= d["confidence"] <= 1.0 + 1e-6
        assert 0.0 <= d["diversity"] <= 1.0
        assert d["steps"] == 5
    assert any(d["diversity"] > 0 for d in first.values())  # temperature 1: samples differ
    assert all(d["steps"] == 0 and d["diversity"] == 0 for d in pruning.diagnostics().values())


def test_peaked_logits_give_low_entropy_high_confidence_no_diversity():
    model, pruning = make("weight")
    for mask in pruning.masks.values():
        with torch.no_grad():
            mask.logits.copy_(100 * dpp.top_k_mask(torch.randn_like(mask.logits), mask.k))
    for _ in train_steps(model, pruning, 3, lr=0.0):
        pass
    for d in pruning.diagnostics().values():  # mass uniform on the k chosen: entropy log k / log n
        assert d["entropy"] == pytest.approx(math.log(d["k"]) / math.log(d["n"]), abs=1e-3)
        assert d["confidence"] > 0.99 and d["diversity"] == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_at_most_2_pow_bits_levels_per_channel(bits):
    model, pruning = make("weight", quantize_bits=bits)
    model.train()
    for name, module in model.named_modules():
        if name in pruning.masks:
            weight = module.weight
            for channel in weight.detach().reshape(weight.shape[0], -1):
                assert channel.unique().numel() <= 2 ** bits
            assert (unit_counts((weight != 0).float(), "weight") <= pruning.masks[name].k).all()
    x, y = inputs()
    F.cross_entropy(model(x), y).backward()  # straight-through: gradients reach weights and logits
    assert all(m.logits.grad.abs().sum() > 0 for m in pruning.masks.values())
    assert model.fc.parametrizations.weight.original.grad.abs().sum() > 0
    pruning.finalize(model)
    for channel in model.fc.weight.detach():
        assert channel.unique().numel() <= 2 ** bits


def test_freeze_trains_on_the_hard_masks():
    model, pruning = make("kernel")
    pruning.freeze()
    model.train()
    hard = pruning.hard_masks()
    for name, module in model.named_modules():
        if name in hard:
            assert torch.equal(module.weight != 0, (hard[name] != 0) & (module.parametrizations.weight.original != 0))
    assert all(m._draws == 0 for m in pruning.masks.values())  # nothing sampled


def test_magnitude_prior_hard_mask_is_top_magnitude():
    torch.manual_seed(0)
    layer = nn.Linear(12, 3)
    mask = dpp.DPPMask(layer.weight, 0.5, "weight")
    assert torch.equal(mask.hard(), dpp.top_k_mask(layer.weight.detach().abs(), 6))


def test_toy_training_decreases_the_loss():
    model, pruning = make("weight", amount=0.5)
    schedule = pruning.schedule(t0=1.0, t1=0.1, steps=30)
    for losses in train_steps(model, pruning, 30, schedule=schedule):
        pass
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_state_dict_round_trip_and_bad_arguments():
    model, pruning = make("kernel")
    clone, clone_pruning = make("kernel", seed=1)
    clone.load_state_dict(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(a.hard(), b.hard()) for a, b in zip(pruning.masks.values(), clone_pruning.masks.values()))
    with pytest.raises(SpaError):
        dpp.attach(Net(), 0.5, "channel")
    with pytest.raises(SpaError):
        dpp.attach(Net(), 1.0)
    with pytest.raises(SpaError):
        dpp.attach(model, 0.5)  # already parametrized


def test_export_onnx_has_the_zeros(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import numpy_helper

    model, pruning = make("weight")
    exported = pruning.export_onnx(model, (inputs()[0],), tmp_path / "dpp.onnx", exporter="torchscript")
    assert torch.nn.utils.parametrize.is_parametrized(model.fc)  # the user's model is untouched
    model(inputs()[0])  # and still runs: finalizing the copy left the shared class alone
    weights = [numpy_helper.to_array(t) for t in onnx.load(exported.path).graph.initializer]
    fc = next(w for w in weights if w.size == model.fc.weight.numel())
    rows = fc if fc.shape == (5, 8 * 16) else fc.T  # exporters may pre-transpose Linear weights
    assert (np.count_nonzero(rows, axis=1) <= pruning.masks["fc"].k).all()
