"""`spa prune ... -o small.pt2 / .pt / .keras / .h5` writes the framework's own file (reloaded here and
compared with the pruned ONNX in onnxruntime), or refuses the suffix with one line and writes
nothing; a TorchScript input takes its shape from --input-shape or its extra file, never a guess;
and the torch, Keras and JAX apply_plan take the same keywords."""
from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import onnx
import pytest

from spa.cli import main
from spa.runtime import random_inputs, run

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_KERAS = all(importlib.util.find_spec(m) for m in ("tensorflow", "tf2onnx", "keras"))
HAVE_JAX = all(importlib.util.find_spec(m) for m in ("jax", "flax", "jax2onnx"))
torch_only = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
keras_only = pytest.mark.skipif(not HAVE_KERAS, reason="needs tensorflow, tf2onnx, keras")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _relative(got, expected):
    return float(np.abs(np.asarray(got) - expected).max() / max(np.abs(expected).max(), 1e-12))


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spa: error:"), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    """(tiny VGG module, example inputs, its ONNX export, a TorchScript file without shapes)."""
    if not HAVE_TORCH:
        pytest.skip("needs torch")
    import torch

    from models import zoo
    from spa.frontends.torch import export

    directory = tmp_path_factory.mktemp("framework_outputs")
    module, inputs = zoo.build("vgg"), zoo.example_inputs("vgg")
    path = str(directory / "vgg.onnx")
    export(module, inputs, path)
    scripted = str(directory / "vgg.pt")
    torch.jit.save(torch.jit.trace(module, inputs), scripted)
    return module, inputs, path, scripted


# ------------------------------------------------------------------------------------------------
# torch outputs
# ------------------------------------------------------------------------------------------------
@torch_only
@pytest.mark.parametrize("suffix", [".pt2", ".pt"])
def test_torch_output_reloads_and_matches_the_pruned_onnx(suffix, torch_model, tmp_path):
    import torch

    _, _, path, _ = torch_model
    small_onnx, out = str(tmp_path / "small.onnx"), str(tmp_path / f"small{suffix}")
    assert main(["prune", path, "-o", small_onnx, "--ratio", "0.5", "-q"]) == 0
    assert main(["prune", path, "-o", out, "--ratio", "0.5", "-q", "--input-shape", "3x3x16x16"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["small.onnx", f"small{suffix}"])  # nothing staged left
    loaded = torch.export.load(out).module() if suffix == ".pt2" else torch.jit.load(out)
    feeds = random_inputs(onnx.load(small_onnx), batch=3, seed=5)
    expected = run(small_onnx, feeds)[0]
    with torch.no_grad():
        got = loaded(*[torch.from_numpy(v) for v in feeds.values()])
    assert _relative(got.numpy(), expected) < 1e-4


@torch_only
def test_torch_output_default_shape_is_batch_one(torch_model, tmp_path):
    from spa.frontends import from_onnx_file
    from spa.pipeline import prune, save
    from spa.selection import Target

    _, _, path, _ = torch_model
    small = str(tmp_path / "small.onnx")
    save(prune(onnx.load(path), Target(ratio=0.5)).model, small)
    written = from_onnx_file(small, str(tmp_path / "small.pt2"))
    assert written["input_shapes"] == {"input": [1, 3, 16, 16]} and written["max_error"] < 1e-4


@torch_only
def test_torchscript_input_takes_its_shape_from_the_flag_or_the_file(torch_model, tmp_path, capsys):
    import torch

    module, inputs, _, scripted = torch_model
    out = str(tmp_path / "small.pt2")
    assert main(["prune", scripted, "-o", out, "--ratio", "0.5", "-q"]) == 2
    _one_error_line(capsys, "vgg.pt: TorchScript stores no input shape; pass --input-shape 1x3x224x224")
    assert not os.path.exists(out)
    assert main(["analyze", scripted, "-q"]) == 2
    _one_error_line(capsys, "TorchScript stores no input shape")
    assert main(["analyze", scripted, "-q", "--input-shape", "1x3x16x16"]) == 0
    capsys.readouterr()
    assert main(["prune", scripted, "-o", out, "--ratio", "0.5", "-q", "--input-shape", "1x3x16x16"]) == 0
    assert torch.export.load(out).module()(inputs[0][:1]).shape == (1, 10)
    with_shapes = str(tmp_path / "with_shapes.pt")
    torch.jit.save(torch.jit.trace(module, inputs), with_shapes, _extra_files={"input_shapes": "[[1, 3, 16, 16]]"})
    assert main(["prune", with_shapes, "-o", str(tmp_path / "b.onnx"), "--ratio", "0.5", "-q"]) == 0
    assert main(["analyze", scripted, "-q", "--input-shape", "1x3x5"]) == 2
    _one_error_line(capsys, "does not run on input shape 1x3x5")


@torch_only
@pytest.mark.parametrize("suffix, words", [(".pth", ["small.pth", "torch.save", "-o small.pt"]),
                                           (".tflite", ["TFLite"]),
                                           (".keras", ["input is a Keras file", "vgg.onnx"]),
                                           (".h5", ["no ONNX -> Keras converter"])])
def test_refused_outputs_write_nothing(suffix, words, torch_model, tmp_path, capsys):
    _, _, path, _ = torch_model
    out = str(tmp_path / f"small{suffix}")
    assert main(["prune", path, "-o", out, "--ratio", "0.5"]) == 2  # not quiet: no progress line either
    _one_error_line(capsys, *words)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Keras outputs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    if not HAVE_KERAS:
        pytest.skip("needs tensorflow, tf2onnx, keras")
    from models import keras_zoo

    model = keras_zoo.build("sequential_cnn")
    path = str(tmp_path_factory.mktemp("keras_outputs") / "cnn.keras")
    model.save(path)
    return model, path


@keras_only
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_output_reloads_and_matches_the_pruned_onnx(suffix, keras_file, tmp_path):
    import keras

    model, path = keras_file
    small_onnx, out = str(tmp_path / "small.onnx"), str(tmp_path / f"small{suffix}")
    assert main(["prune", path, "-o", small_onnx, "--ratio", "0.5", "--criterion", "l1", "-q"]) == 0
    assert main(["prune", path, "-o", out, "--ratio", "0.5", "-q"]) == 0  # the default criterion: l1 here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = keras.models.load_model(out, compile=False)
    assert loaded.count_params() < 0.5 * model.count_params()
    feeds = random_inputs(onnx.load(small_onnx), batch=3, seed=5)
    expected = run(small_onnx, feeds)[0]
    assert _relative(loaded(next(iter(feeds.values())), training=False), expected) < 1e-4


@keras_only
def test_keras_output_takes_l1_as_the_default_criterion_and_says_why(keras_file, tmp_path, capsys):
    _, path = keras_file
    assert main(["prune", path, "-o", str(tmp_path / "small.keras"), "--ratio", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "criterion l1 (the default where obspa cannot serve: -o" in err and "Keras model's own weights" in err


@keras_only
def test_keras_output_refuses_changed_weights_before_pruning(keras_file, tmp_path, capsys):
    _, path = keras_file
    out = str(tmp_path / "small.keras")
    assert main(["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "obspa"]) == 2
    _one_error_line(capsys, "cannot be carried back")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# one apply_plan shape
# ------------------------------------------------------------------------------------------------
def _pruned(model_path, tmp_path, name):
    from spa.pipeline import prune, save
    from spa.selection import Target

    result = prune(onnx.load(model_path), Target(ratio=0.5))
    path = str(tmp_path / f"{name}.pruned.onnx")
    save(result.model, path)
    return result.plan, path


@pytest.mark.skipif(not (HAVE_TORCH and HAVE_KERAS and HAVE_JAX), reason="needs torch, keras and jax")
def test_apply_plan_takes_the_same_keywords_in_torch_keras_and_jax(torch_model, keras_file, tmp_path):
    import copy

    from models import flax_zoo, keras_zoo
    from spa.frontends import jax as spa_jax
    from spa.frontends import tensorflow as stf
    from spa.frontends import torch as storch

    module, inputs, torch_path, _ = torch_model
    module = copy.deepcopy(module)
    keras_model, _ = keras_file
    keras_path = stf.export(keras_model, str(tmp_path / "keras.onnx")).path
    flax_module = flax_zoo.build("mlp")
    jax_path = str(tmp_path / "jax.onnx")
    spa_jax.export(flax_module, flax_zoo.example_input("mlp"), jax_path, verify=False)
    cases = [(storch.apply_plan, module, torch_path, inputs),
             (stf.apply_plan, keras_model, keras_path, keras_zoo.example_input(keras_model)),
             (spa_jax.apply_plan, flax_module, jax_path, flax_zoo.example_input("mlp"))]
    for apply_plan, model, path, example in cases:
        plan, pruned = _pruned(path, tmp_path, os.path.basename(path))
        narrowed = apply_plan(model, plan, pruned=pruned, weight_map=None, example_inputs=example,
                              verify=True, rtol=1e-4)
        if apply_plan is stf.apply_plan:  # Keras layers cannot be resized: a new model
            assert narrowed is not model and narrowed.count_params() < model.count_params()
        else:  # torch and JAX narrow in place and return the same object
            assert narrowed is model
    assert module.spa_report.ok and module.spa_report.max_error <= 1e-4


@torch_only
def test_old_keyword_names_still_work_with_a_deprecation_warning(torch_model, tmp_path):
    import copy

    from spa.frontends.torch import apply_plan

    module, inputs, path, _ = torch_model
    plan, pruned = _pruned(path, tmp_path, "vgg")
    with pytest.warns(DeprecationWarning, match="onnx_path"):
        narrowed = apply_plan(copy.deepcopy(module), plan, onnx_path=pruned, example_inputs=inputs)
    assert narrowed.spa_report.max_error <= 1e-4
    with pytest.raises(TypeError, match="unexpected keyword"):
        apply_plan(copy.deepcopy(module), plan, onnx_model=pruned)


@keras_only
def test_keras_old_keyword_names_warn(keras_file, tmp_path):
    from spa.frontends import tensorflow as stf

    model, _ = keras_file
    path = stf.export(model, str(tmp_path / "keras.onnx")).path
    plan, pruned = _pruned(path, tmp_path, "keras")
    with pytest.warns(DeprecationWarning, match="pruned_onnx"):
        small = stf.apply_plan(model, plan, pruned_onnx=pruned)
    assert small.spa_max_error <= 1e-4
    with pytest.warns(DeprecationWarning, match="onnx_model"):
        stf.apply_plan(model, plan, onnx_model=path)


@pytest.mark.skipif(not HAVE_JAX, reason="needs jax, flax and jax2onnx")
def test_jax_positional_pruned_model_warns(tmp_path):
    from models import flax_zoo
    from spa.frontends import jax as spa_jax

    path = str(tmp_path / "mlp.onnx")
    spa_jax.export(flax_zoo.build("mlp"), flax_zoo.example_input("mlp"), path, verify=False)
    plan, pruned = _pruned(path, tmp_path, "mlp")
    module = flax_zoo.build("mlp")
    with pytest.warns(DeprecationWarning, match="pruned="):
        assert spa_jax.apply_plan(module, plan, pruned) is module
    assert [layer.out_features for layer in module.layers] == [16, 12, 4]


@torch_only
def test_float_shape_arithmetic_is_folded_for_torch_export(tmp_path):
    """YOLOv8's anchor grid is a float Range up to a Shape's size (Shape -> Gather -> Cast(float) ->
    Range -> Expand): folded at the example's shape like integer shape arithmetic, or torch.export
    meets a data-dependent size (nudenet's ultralytics export failed that way)."""
    import torch

    class Grid(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.head(torch.relu(self.conv(x)))
            grid = torch.arange(y.shape[-1], dtype=torch.float32) + 0.5
            return y + grid.expand(y.shape[-2], y.shape[-1])

    path, out = str(tmp_path / "grid.onnx"), str(tmp_path / "small.pt2")
    torch.onnx.export(Grid().eval(), (torch.randn(1, 3, 16, 16),), path, input_names=["images"], dynamo=False,
                      dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}})
    assert {"Range", "Cast", "Expand"} <= {n.op_type for n in onnx.load(path).graph.node}
    assert main(["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q",
                 "--input-shape", "1x3x16x16"]) == 0
    small = str(tmp_path / "small.onnx")
    assert main(["prune", path, "-o", small, "--ratio", "0.5", "--criterion", "l1", "-q"]) == 0
    feeds = random_inputs(onnx.load(small), seed=3, shapes={"images": (1, 3, 16, 16)})
    with torch.no_grad():
        got = torch.export.load(out).module()(torch.from_numpy(feeds["images"]))
    assert _relative(got.numpy(), run(small, feeds)[0]) < 1e-4
