"""Every zoo model, both torch exporters, eval (BN folded) and train (BN kept): exact oracle."""
import onnx
import pytest

from oracle import check_exact
from spa import analyze
from spa.selection import Target

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("models.zoo")


@pytest.fixture(scope="session")
def cache_dir():
    """The shared export cache (keyed by source version, xdist-safe): other test files reuse it."""
    return None


CASES = [(name, exporter, mode) for name in zoo.ZOO for exporter in zoo.EXPORTERS for mode in ("eval", "train")]


@pytest.mark.parametrize("name,exporter,mode", CASES, ids=["-".join(c) for c in CASES])
def test_zoo_model_prunes_exactly(name, exporter, mode, cache_dir):
    model = onnx.load(zoo.cached_export(name, exporter, mode, cache_dir=cache_dir))
    analysis = analyze(model)
    prunable = [g for g in analysis.groups if g.prunable]
    assert prunable, f"{name}: nothing prunable"
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in zoo.build(name).modules())
    if mode == "train" and has_bn:  # train-mode exports keep BatchNormalization
        assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    check_exact(model, Target(ratio=0.5))


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "densenet", "yolo", "shufflenetv2"])
def test_zoo_global_and_mac_targets(name, cache_dir):
    model = onnx.load(zoo.cached_export(name, "torchscript", "eval", cache_dir=cache_dir))
    check_exact(model, Target(ratio=0.4, global_ranking=True))
    check_exact(model, Target(keep_macs=0.5), criterion="fpgm")


def test_convnext_layernorm_freezes_residual_stream_but_prunes_mlp(cache_dir):
    model = onnx.load(zoo.cached_export("convnext", "dynamo", "eval", cache_dir=cache_dir))
    analysis = analyze(model)
    frozen = [r for g in analysis.groups for r in g.reasons()]
    assert any("LayerNormalization" in r for r in frozen)
    assert sum(g.prunable for g in analysis.groups) >= 3  # the MLP expansions


def test_shufflenet_shuffle_is_pruned_not_frozen(cache_dir):
    for exporter in zoo.EXPORTERS:
        model = onnx.load(zoo.cached_export("shufflenetv2", exporter, "eval", cache_dir=cache_dir))
        reasons = [r for g in analyze(model).groups for r in g.reasons()]
        assert all("graph output" in r for r in reasons), reasons
