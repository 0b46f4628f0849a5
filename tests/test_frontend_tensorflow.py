"""TensorFlow / Keras frontend: Keras, tf.Module, SavedModel, TFLite -> ONNX -> prune -> back to Keras
(apply_plan) or to a trainable tf.Module (from_onnx); torch exports into TensorFlow and Keras
exports into torch."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore")

from oracle import check_exact  # noqa: E402

from models import keras_zoo  # noqa: E402
from spa.errors import SpaError  # noqa: E402
from spa.frontends import tensorflow as stf  # noqa: E402
from spa.pipeline import prune, save  # noqa: E402
from spa.runtime import random_inputs, run  # noqa: E402
from spa.selection import Target  # noqa: E402


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tf_frontend")


_CACHE = {}


def pruned_keras(name, workdir, small_app=False):
    """(keras model, original ONNX path, pruned ONNX path, prune result): exported, checked
    against the equivalence oracle and pruned once per session."""
    key = (name, small_app)
    if key not in _CACHE:
        model = keras_zoo.small_application(name) if small_app else keras_zoo.build(name)
        path = os.path.join(workdir, f"{name}.onnx")
        exported = stf.export(model, path)
        result = check_exact(exported.model)  # NHWC graph + tf2onnx Transposes: exact
        pruned = os.path.join(workdir, f"{name}.pruned.onnx")
        save(result.model, pruned)
        _CACHE[key] = (model, path, pruned, result)
    return _CACHE[key]


def keras_vs_onnx(model, onnx_path, batch=3):
    proto = onnx.load(onnx_path)
    feeds = random_inputs(proto, batch=batch, seed=7)
    if "int" in str(model.inputs[0].dtype):
        feeds = {k: np.random.default_rng(7).integers(0, 20, v.shape).astype(v.dtype) for k, v in feeds.items()}
    expected = run(onnx_path, feeds)[0]
    got = np.asarray(model(list(feeds.values())[0], training=False))
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def assert_narrowed(name, workdir, small_app=False):
    model, _, pruned, result = pruned_keras(name, workdir, small_app)
    narrow = stf.apply_plan(model, result.plan, pruned=pruned)  # verifies (rtol 1e-4)
    assert narrow.count_params() < model.count_params()
    assert keras_vs_onnx(narrow, pruned) < 1e-4
    assert [type(a).__name__ for a in narrow.layers] == [type(a).__name__ for a in model.layers]
    return narrow


# ---- Keras -> ONNX -> prune -> Keras ----------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(keras_zoo.KERAS_ZOO))
def test_keras_zoo_prunes_and_narrows(name, workdir):
    assert_narrowed(name, workdir)


@pytest.mark.parametrize("name", sorted(keras_zoo.SMALL_APPLICATIONS))
def test_keras_applications_prune_and_narrow(name, workdir):
    """keras.applications' own code at a small width/depth (the full-size models take 10-70 s
    each in tf2onnx: run them with SPA_TF_FULL=1)."""
    assert_narrowed(name, workdir, small_app=True)


@pytest.mark.skipif(not os.environ.get("SPA_TF_FULL"), reason="full-size keras.applications: set SPA_TF_FULL=1")
@pytest.mark.parametrize("name", sorted(keras_zoo.APPLICATIONS))
def test_full_keras_applications(name, workdir):
    assert_narrowed(name, workdir)


def test_plan_file_and_dict_and_export_again(workdir):
    """The plan as a JSON file or dict; without a pruned ONNX the weight map comes from a fresh export."""
    model, path, pruned, result = pruned_keras("resnet_functional", workdir)
    plan_path = os.path.join(workdir, "plan.json")
    result.plan.save(plan_path)
    from_file = stf.apply_plan(model, plan_path, weight_map=path)
    from_dict = stf.apply_plan(model, result.plan.to_json())
    for narrow in (from_file, from_dict):
        assert keras_vs_onnx(narrow, pruned) < 1e-4


def test_weight_map_relations(workdir):
    model, path, _, _ = pruned_keras("mixed_layers", workdir)
    weight_map = stf.read_weight_map(path)
    by_var = {v["variable"]: v for v in weight_map.values()}
    assert by_var["stem/kernel"]["perm"] == [3, 2, 0, 1] and not by_var["stem/kernel"]["scaled"]
    assert by_var["head/kernel"]["perm"] == [0, 1]
    assert by_var["up/kernel"]["perm"] == [3, 2, 0, 1]  # (kh, kw, out, in) -> ONNX (in, out, kh, kw)
    folded = stf.read_weight_map(pruned_keras("resnet_functional", workdir)[1])
    assert all(v["scaled"] for v in folded.values() if v["variable"].endswith("c1/kernel"))  # BN folded
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    for onnx_name, rel in weight_map.items():
        if rel["scaled"]:
            continue
        value = np.transpose(_variable(model, rel["variable"]), rel["perm"]).reshape(rel["shape"])
        np.testing.assert_allclose(value, inits[onnx_name], rtol=1e-6)


def _variable(model, path):
    return next(v.numpy() for v in model.weights if v.path == path)


def test_lstm_gate_order(workdir):
    _, path, _, result = pruned_keras("text_lstm", workdir)
    weight_map = stf.read_weight_map(path)
    kernel = next(v for v in weight_map.values() if v["variable"] == "lstm/lstm_cell/kernel")
    assert kernel["blocks"] == [0, 3, 1, 2]  # Keras i,f,c,o -> ONNX i,o,f,c
    assert any(w["name"] in weight_map for w in result.plan.weight_entries())


def test_narrowed_keras_model_trains(workdir):
    narrow = assert_narrowed("sequential_cnn", workdir)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 5, 32)
    narrow.compile(optimizer=keras.optimizers.Adam(1e-3),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = narrow.evaluate(x, y, verbose=0)
    narrow.fit(x, y, epochs=8, batch_size=16, verbose=0)
    assert narrow.evaluate(x, y, verbose=0) < 0.9 * before


# ---- other TensorFlow sources -------------------------------------------------------------------------
class TinyModule(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.w1 = tf.Variable(rng.normal(size=(3, 3, 3, 8)).astype("float32"))
        self.b1 = tf.Variable(rng.normal(size=(8,)).astype("float32"))
        self.w2 = tf.Variable(rng.normal(size=(3, 3, 8, 8)).astype("float32") / 5)
        self.w3 = tf.Variable(rng.normal(size=(8, 4)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image")])
    def __call__(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.w1, 1, "SAME") + self.b1)
        y = tf.nn.relu(tf.nn.conv2d(y, self.w2, 2, "SAME"))
        return tf.matmul(tf.reduce_mean(y, axis=[1, 2]), self.w3)


def test_tf_module_and_saved_model(workdir):
    module = TinyModule()
    exported = stf.export(module, os.path.join(workdir, "module.onnx"))
    check_exact(exported.model)
    saved = os.path.join(workdir, "saved_model")
    tf.saved_model.save(module, saved)
    assert stf.handles(saved)
    path = stf.to_onnx(saved, os.path.join(workdir, "saved.onnx"))
    check_exact(onnx.load(path))


def test_tflite_and_keras_file(workdir):
    model = keras_zoo.build("resnet_functional")
    tflite = os.path.join(workdir, "model.tflite")
    with open(tflite, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    keras_file = os.path.join(workdir, "model.keras")
    model.save(keras_file)
    for source in (tflite, keras_file):
        assert stf.handles(source)
        path = stf.to_onnx(source, source + ".onnx")
        x = keras_zoo.example_input(model)
        got = run(path, {onnx.load(path).graph.input[0].name: x})[0]
        np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-4, atol=1e-4)
        check_exact(onnx.load(path))
    from spa.cli import main
    out = os.path.join(workdir, "cli.onnx")
    assert main(["prune", keras_file, "-o", out, "--ratio", "0.5"]) in (0, None)
    assert len(onnx.load(out).graph.initializer) and os.path.getsize(out) < os.path.getsize(keras_file + ".onnx")


def test_a_tflite_file_converts_to_the_same_names_every_time_so_its_plan_replays(workdir):
    """tf2onnx numbers the names it makes from a counter shared by the whole process (and, for
    MediaPipe's face detector, different from run to run): without renumbering, the second conversion
    of a file named its folded constants differently and the plan written from the first named
    weights it did not have."""
    from spa.cli import main
    model = keras_zoo.build("resnet_functional")
    tflite = os.path.join(workdir, "again.tflite")
    with open(tflite, "wb") as f:
        f.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    from spa.frontends.tensorflow_export import MADE_NAME
    first, second = (onnx.load(stf.to_onnx(tflite, os.path.join(workdir, f"again{k}.onnx"))) for k in (1, 2))
    weights = [{t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer} for m in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [(n.name, list(n.input), list(n.output)) for n in first.graph.node] == \
        [(n.name, list(n.input), list(n.output)) for n in second.graph.node]
    assert any(MADE_NAME.match(t.name) for t in first.graph.initializer)  # names it made, renumbered
    plan, out = os.path.join(workdir, "again.plan.json"), os.path.join(workdir, "again.pruned.onnx")
    assert main(["prune", tflite, "-o", out, "--ratio", "0.5", "--criterion", "l1", "-q",
                 "--plan-out", plan]) in (0, None)
    assert main(["apply-plan", tflite, plan, "-o", os.path.join(workdir, "again.replayed.onnx"), "-q"]) in (0, None)


def test_a_sparse_tflite_file_converts_with_its_weights_made_dense(workdir):
    """TFLite's sparse weights (a DENSIFY op expands them at run time; MediaPipe's *_sparse models):
    tf2onnx read them as dense arrays and failed ("cannot reshape array of size 77 into shape
    (8,1,1,32)"). The frontend converts a copy whose DENSIFY inputs hold the dense values."""
    from tensorflow.lite.tools import flatbuffer_utils

    from spa.frontends.tflite_sparse import DENSIFY
    model = keras_zoo.build("resnet_functional")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = layer.get_weights()
        if weights and weights[0].ndim >= 2:  # 80 % zeros: the converter stores such weights sparse
            layer.set_weights([weights[0] * (rng.random(weights[0].shape) < 0.2)] + weights[1:])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    path = os.path.join(workdir, "sparse.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    stored = flatbuffer_utils.read_model(path)
    assert DENSIFY in [max(c.builtinCode, c.deprecatedBuiltinCode) for c in stored.operatorCodes]
    converted = stf.to_onnx(path, path + ".onnx")
    x = keras_zoo.example_input(model)
    got = run(converted, {onnx.load(converted).graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-4, atol=1e-4)
    check_exact(onnx.load(converted))


def test_a_tflite_file_with_resource_variables_is_refused_by_name(workdir):
    """A streaming TFLite model keeps its state in resource variables (microWakeWord's wake-word
    detectors): tf2onnx stopped with "IndexError: list index out of range"."""
    class Accumulator(tf.Module):
        def __init__(self):
            super().__init__()
            self.state = tf.Variable(tf.zeros([1, 4]))

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
        def __call__(self, x):
            self.state.assign(self.state + x)
            return self.state * 2.0

    module = Accumulator()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([module.__call__.get_concrete_function()], module)
    converter.experimental_enable_resource_variables = True
    path = os.path.join(workdir, "stateful.tflite")
    with open(path, "wb") as f:
        f.write(converter.convert())
    with pytest.raises(SpaError, match=r"TFLite resource-variable ops \(.*VAR_HANDLE.*\) cannot be converted"):
        stf.to_onnx(path, path + ".onnx")


# ---- ONNX -> TensorFlow ------------------------------------------------------------------------------
def _torch_pruned(name, workdir):
    zoo = pytest.importorskip("models.zoo")
    path = zoo.cached_export(name, "torchscript", "eval")
    pruned = os.path.join(workdir, f"torch_{name}.pruned.onnx")
    save(prune(onnx.load(path), Target(ratio=0.5)).model, pruned)
    return pruned


def _module_error(module, path, batch=3):
    proto = onnx.load(path)
    feeds = random_inputs(proto, batch=batch, seed=5)
    expected = run(path, feeds)[0]
    got = np.asarray(module(*[feeds[n] for n in module.input_names]))
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_torch_zoo_into_tensorflow(name, workdir):
    pruned = _torch_pruned(name, workdir)
    module = stf.from_onnx(pruned)  # verify=True: onnxruntime comparison, rtol 1e-4
    assert _module_error(module, pruned) < 1e-4
    assert all(isinstance(v, tf.Variable) for v in module.trainable_variables)


def test_torch_lstm_into_tensorflow(workdir):
    torch = pytest.importorskip("torch")
    from models.sequence import sequence_models
    factory, x = sequence_models()["lstm"]
    path = os.path.join(workdir, "lstm.onnx")
    torch.manual_seed(0)
    torch.onnx.export(factory().eval(), (x,), path, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False)
    assert any(n.op_type == "LSTM" for n in onnx.load(path).graph.node)
    pruned = os.path.join(workdir, "lstm.pruned.onnx")
    save(prune(onnx.load(path), Target(ratio=0.5)).model, pruned)
    assert _module_error(stf.from_onnx(pruned), pruned) < 1e-4


def test_torch_transformer_encoder_into_tensorflow():
    transformers = pytest.importorskip("models.transformers")
    path = transformers.cached_export_transformer("torch_encoder", "torchscript")
    module = stf.from_onnx(path)
    assert _module_error(module, path) < 1e-4


def test_tf2onnx_graph_into_tensorflow(workdir):
    _, _, pruned, _ = pruned_keras("mixed_layers", workdir)
    assert _module_error(stf.from_onnx(pruned), pruned) < 1e-4


def test_from_onnx_module_trains(workdir):
    module = stf.from_onnx(_torch_pruned("resnet18", workdir))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 16, 16)).astype("float32")
    y = rng.integers(0, 10, 8)
    optimizer = keras.optimizers.Adam(1e-2)

    def loss_fn():
        logits = module(x)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))

    before = float(loss_fn())
    for _ in range(5):
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, module.trainable_variables)
        assert all(g is not None for g in grads)
        optimizer.apply_gradients(zip(grads, module.trainable_variables))
    assert float(loss_fn()) < 0.8 * before


# ---- Keras -> ONNX -> prune -> torch ----------------------------------------------------------------------
def test_keras_into_torch(workdir):
    torch = pytest.importorskip("torch")
    torch_frontend = pytest.importorskip("spa.frontends.torch")
    if not hasattr(torch_frontend, "from_onnx"):
        pytest.skip("spa.frontends.torch.from_onnx not there yet")
    _, _, pruned, _ = pruned_keras("resnet_functional", workdir)
    module = torch_frontend.from_onnx(pruned)
    proto = onnx.load(pruned)
    feeds = random_inputs(proto, batch=3, seed=5)
    with torch.no_grad():
        got = module(*[torch.from_numpy(v) for v in feeds.values()])
    got = got[0] if isinstance(got, (tuple, list)) else got
    expected = run(pruned, feeds)[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# ---- errors ------------------------------------------------------------------------------------------
def test_unknown_op_is_named(workdir):
    node = onnx.helper.make_node("NonMaxSuppression", ["x", "x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 1, 4])],
                                   [onnx.helper.make_tensor_value_info("y", 7, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(SpaError, match="NonMaxSuppression"):
        stf.from_onnx(model, verify=False)


def test_bad_inputs_give_one_line_errors(workdir):
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(SpaError, match="subclassed"):
        stf.apply_plan(Sub(), {"weights": []})
    model, _, _, _ = pruned_keras("resnet_functional", workdir)
    with pytest.raises(SpaError, match="not a SPA plan"):
        stf.apply_plan(model, os.path.join(workdir, "missing.json"))
    with pytest.raises(SpaError, match="not a .keras"):
        stf.export(os.path.join(workdir, "model.txt"), os.path.join(workdir, "x.onnx"))
    with pytest.raises(SpaError, match="saved_model.pb"):
        stf.export(str(workdir), os.path.join(workdir, "x.onnx"))
