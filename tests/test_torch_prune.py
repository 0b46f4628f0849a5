"""spa.frontends.torch.prune: torch.nn.utils.prune's API, N:M and k-of-n masks, make_physical."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from spa.frontends.torch import prune

torch.set_num_threads(1)


def _effective(module, name="weight"):
    return getattr(module, name).detach()


# -- torch's own methods ----------------------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", [
    ("random_unstructured", {"amount": 0.3}),
    ("l1_unstructured", {"amount": 0.4}),
    ("random_structured", {"amount": 0.5, "dim": 0}),
    ("ln_structured", {"amount": 0.5, "n": 2, "dim": 1}),
    ("identity", {}),
])
def test_shared_methods_give_torchs_masks(method, kwargs):
    torch.manual_seed(0)
    ours = nn.Conv2d(4, 6, 3)
    theirs = copy.deepcopy(ours)
    torch.manual_seed(1)
    getattr(prune, method)(ours, "weight", **kwargs)
    torch.manual_seed(1)
    getattr(torch_prune, method)(theirs, "weight", **kwargs)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


def test_global_unstructured_and_custom_mask_are_torchs():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    theirs = copy.deepcopy(ours)
    for lib, model in ((prune, ours), (torch_prune, theirs)):
        lib.global_unstructured([(model[0], "weight"), (model[1], "weight")],
                                pruning_method=lib.L1Unstructured, amount=0.5)
        lib.custom_from_mask(model[1], "bias", torch.tensor([1.0, 0.0, 1.0, 0.0]))
    for a, b in zip(ours, theirs):
        assert torch.equal(a.weight_mask, b.weight_mask)
    assert torch.equal(ours[1].bias_mask, theirs[1].bias_mask)
    assert prune.PruningContainer is torch_prune.PruningContainer


# -- n:m ---------------------------------------------------------------------------------------------
def _blocks(weight, m):
    """Every m consecutive weights along the input axis (axis 1), one block per row."""
    return weight.movedim(1, -1).reshape(-1, m)


@pytest.mark.parametrize("layer", [nn.Linear(16, 6), nn.Conv2d(8, 6, 3), nn.Conv2d(8, 6, 3, groups=2)],
                         ids=["linear", "conv", "grouped-conv"])
def test_n_m_conforms_and_keeps_the_largest(layer):
    original = layer.weight.detach().clone()
    prune.n_m(layer, "weight", n=2, m=4)
    kept = _blocks(layer.weight_mask, 4)
    assert torch.equal(kept.sum(1), torch.full((kept.shape[0],), 2.0))
    assert (_blocks(_effective(layer), 4) != 0).sum(1).max() <= 2
    magnitudes = _blocks(original.abs(), 4)
    smallest_kept = torch.where(kept.bool(), magnitudes, torch.inf).min(1).values
    largest_dropped = torch.where(kept.bool(), -torch.inf, magnitudes).max(1).values
    assert torch.all(smallest_kept >= largest_dropped)


def test_n_m_along_conv_transpose_input_axis():
    layer = nn.ConvTranspose2d(8, 3, 3)
    prune.n_m(layer, "weight", n=1, m=4)
    assert (layer.weight_mask.movedim(0, -1).reshape(-1, 4).sum(1) == 1).all()


# -- k of n ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: nn.Linear(10, 6), lambda: nn.Conv2d(5, 6, 3)],
                         ids=["linear", "conv"])
def test_k_of_n_keeps_exactly_k_per_unit(make):
    torch.manual_seed(0)
    weight_level, kernel_level, filter_level = make(), make(), make()
    out, n_in = weight_level.weight.shape[:2]
    prune.k_of_n(weight_level, "weight", amount=0.5, granularity="weight")
    per_row = (_effective(weight_level).reshape(out, -1) != 0).sum(1)
    assert (per_row == round(0.5 * weight_level.weight[0].numel())).all()
    prune.k_of_n(kernel_level, "weight", amount=0.4, granularity="kernel")
    kernels = kernel_level.weight_mask.reshape(out, n_in, -1)
    assert torch.equal(kernels.amax(2), kernels.amin(2))  # whole kernels kept or dropped
    assert (kernels.amax(2).sum(1) == round(0.6 * n_in)).all()
    prune.k_of_n(filter_level, "weight", amount=0.5, granularity="filter")
    filters = filter_level.weight_mask.reshape(out, -1)
    assert torch.equal(filters.amax(1), filters.amin(1)) and filters.amax(1).sum() == round(0.5 * out)


def test_k_of_n_filter_keeps_the_largest_norms():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(16.0).reshape(4, 4) * torch.tensor([[1.0], [-3.0], [0.5], [2.0]]))
    prune.k_of_n(layer, "weight", amount=0.5, granularity="filter")
    assert layer.weight_mask[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]


# -- composition, remove, is_pruned ------------------------------------------------------------------
def test_iterative_l1_then_n_m_keeps_earlier_zeros():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    prune.l1_unstructured(layer, "weight", amount=0.6)
    first = layer.weight_mask.clone()
    prune.n_m(layer, "weight", n=2, m=4)
    hook = next(iter(layer._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer)
    assert torch.all(layer.weight_mask <= first)
    assert (_blocks(layer.weight_mask, 4).sum(1) <= 2).all()
    then_k = nn.Linear(16, 8)
    prune.n_m(then_k, "weight", n=2, m=4)
    before = then_k.weight_mask.clone()
    prune.k_of_n(then_k, "weight", amount=0.75, granularity="weight")
    assert torch.all(then_k.weight_mask <= before) and (then_k.weight_mask.sum(1) == 4).all()


def test_remove_and_is_pruned_on_new_methods():
    layer = nn.Conv2d(4, 4, 3)
    assert not prune.is_pruned(layer)
    prune.n_m(layer, "weight", n=2, m=4)
    assert prune.is_pruned(layer) and hasattr(layer, "weight_orig")
    masked = layer.weight.detach().clone()
    prune.remove(layer, "weight")
    assert not prune.is_pruned(layer) and not hasattr(layer, "weight_orig")
    assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight.detach(), masked)
    prune.k_of_n(layer, "weight", amount=0.5, granularity="kernel")
    assert isinstance(next(iter(layer._forward_pre_hooks.values())), prune.KOfN)


@pytest.mark.parametrize("call, message", [
    (lambda l: prune.n_m(l, "weight", n=5, m=4), "n <= m"),
    (lambda l: prune.n_m(l, "weight", n=0, m=4), "n <= m"),
    (lambda l: prune.n_m(l, "weight", n=2, m=4), "multiple of m=4"),
    (lambda l: prune.n_m(l, "bias", n=1, m=2), "input axis"),
    (lambda l: prune.k_of_n(l, "weight", amount=1.0), r"\[0, 1\)"),
    (lambda l: prune.k_of_n(l, "weight", amount=-0.1), r"\[0, 1\)"),
    (lambda l: prune.k_of_n(l, "weight", amount=0.5, granularity="block"), "granularity"),
])
def test_bad_arguments_raise_and_leave_the_module_alone(call, message):
    layer = nn.Linear(6, 4)
    with pytest.raises(ValueError, match=message):
        call(layer)
    assert not prune.is_pruned(layer) and isinstance(layer.weight, nn.Parameter)


# -- make_physical -----------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.ca, self.bna = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.cb, self.bnb = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.bnb(self.cb(torch.relu(self.bna(self.ca(y))))))
        return self.fc(self.head(y).mean((2, 3)))


def _randomise_bn(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def _zeroed_rows(mask):
    return set(torch.nonzero(mask.reshape(mask.shape[0], -1).sum(1) == 0).flatten().tolist())


def test_make_physical_cnn_matches_masked_module():
    model = _randomise_bn(SmallCNN())
    prune.ln_structured(model.ca, "weight", amount=0.25, n=2, dim=0)  # filters, and BN zeroed with them
    filters = (model.ca.weight_mask.sum((1, 2, 3)) != 0).float()
    prune.custom_from_mask(model.bna, "weight", filters)
    prune.custom_from_mask(model.bna, "bias", filters)
    prune.ln_structured(model.cb, "weight", amount=0.5, n=1, dim=1)  # input channels of the same group
    prune.ln_structured(model.fc, "weight", amount=0.5, n=2, dim=1)  # head channels, read by fc only
    gone_inner = _zeroed_rows(model.ca.weight_mask) | _zeroed_rows(model.cb.weight_mask.transpose(0, 1))
    gone_head = _zeroed_rows(model.fc.weight_mask.t())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    params = sum(p.numel() for p in model.parameters())
    physical, report = prune.make_physical(model, x)
    assert physical is model and not prune.is_pruned(model)
    assert model.ca.out_channels == 8 - len(gone_inner) and model.cb.in_channels == 8 - len(gone_inner)
    assert model.bna.num_features == 8 - len(gone_inner)
    assert model.head[0].out_channels == 12 - len(gone_head) and model.fc.in_features == 12 - len(gone_head)
    assert report.narrowed["ca.weight"] == {0: len(gone_inner)}
    assert report.params_before == params > report.params_after == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_make_physical_mlp_producer_and_consumer_masks():
    torch.manual_seed(0)
    model = MLP()
    prune.k_of_n(model.fc1, "weight", amount=0.5, granularity="filter")
    prune.custom_from_mask(model.fc1, "bias", model.fc1.weight_mask[:, 0])
    prune.ln_structured(model.fc3, "weight", amount=0.25, n=1, dim=1)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)
    _, report = prune.make_physical(model, (x,))
    assert (model.fc1.out_features, model.fc2.in_features) == (8, 8)
    assert (model.fc2.out_features, model.fc3.in_features) == (9, 9)
    assert report.params_after < report.params_before and not report.not_removable
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_make_physical_reports_weight_only_masks_with_live_bias():
    torch.manual_seed(0)
    model = MLP()
    prune.ln_structured(model.fc1, "weight", amount=0.5, n=2, dim=0)  # bias left alive
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="not physically removable"):
        _, report = prune.make_physical(model, x)
    assert model.fc1.out_features == 16 and report.params_after == report.params_before
    assert any("fc1.weight" in note and "fc1.bias" in note for note in report.not_removable)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_make_physical_inexact_removes_filters_with_live_bias_and_reports_the_change():
    torch.manual_seed(0)
    model = MLP()
    prune.ln_structured(model.fc1, "weight", amount=0.5, n=2, dim=0)  # bias left alive
    x = torch.randn(4, 6)
    with torch.no_grad():
        masked = model(x)
    with pytest.warns(UserWarning, match="outputs moved by up to"):
        _, report = prune.make_physical(model, x, exact=False)
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    with torch.no_grad():
        moved = float((model(x) - masked).abs().max())
    assert report.max_deviation == pytest.approx(moved) and moved > 0


class GatedMLP(MLP):
    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.sigmoid(self.fc1(x)))))


def test_make_physical_keeps_groups_whose_removal_changes_outputs():
    torch.manual_seed(0)
    model = GatedMLP()
    prune.ln_structured(model.fc1, "weight", amount=0.5, n=2, dim=0)
    prune.custom_from_mask(model.fc1, "bias", model.fc1.weight_mask[:, 0])  # but sigmoid(0) = 0.5
    prune.ln_structured(model.fc3, "weight", amount=0.5, n=2, dim=1)
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match="changes the outputs"):
        _, report = prune.make_physical(model, x)
    assert model.fc1.out_features == 16 and model.fc3.in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
