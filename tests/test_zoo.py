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


def _export_with_dynamic_image(model, path, exporter):
    x = torch.randn(2, 3, 64, 64)
    if exporter == "torchscript":
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
        return
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=32, max=1024),
            3: torch.export.Dim("width", min=32, max=1024)}
    torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=(dims,), verbose=False).save(path)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("image", ["batch", "any size"])
def test_yolo11_attention_prunes_heads_and_its_residual(exporter, image, cache_dir, tmp_path):
    """C2PSA's view(B, heads, 2 key_dim + head_dim, H*W) with H*W symbolic (an export for any image size),
    and its merge view(B, C, H, W) with C read off the residual stream: heads and the stream both prune,
    and the pruned model equals the original with the removed channels zeroed (at 96x64 for the any-size
    export, not the 64x64 it was traced at)."""
    if image == "batch":
        path = zoo.cached_export("yolo11", exporter, "eval", cache_dir=cache_dir)
    else:
        path = str(tmp_path / "yolo11.onnx")
        _export_with_dynamic_image(zoo.build("yolo11").eval(), path, exporter)
    model = onnx.load(path)
    analysis = analyze(model)
    reasons = [r for g in analysis.groups for r in g.reasons()]
    assert all("graph output" in r for r in reasons), reasons
    heads = [g.id for g in analysis.groups if g.kind == "heads" and g.prunable]
    assert len(heads) == 1
    dims = None if image == "batch" else {"height": 96, "width": 64}
    result = check_exact(model, Target(ratio=0.5), dims=dims)
    assert result.plan.removed_atoms_by_group().get(heads[0]) is not None  # one of the two heads went
