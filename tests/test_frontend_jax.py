"""JAX/Flax NNX frontend: export (jax2onnx) matches JAX, SPA prunes the export exactly, the pruned
model converts to torch, and apply_plan narrows the NNX module to the pruned ONNX. The first test
covers the Reshape rule for jax2onnx's GroupNorm pattern and needs no JAX."""
import importlib.util
import os

import numpy as np
import onnx
import pytest

from builder import Builder
from oracle import check_exact
from spa import analyze
from spa.cost import count_params
from spa.errors import SpaError
from spa.groups import Options
from spa.pipeline import prune, save
from spa.runtime import run
from spa.selection import Target

HAVE_JAX = all(importlib.util.find_spec(m) for m in ("jax", "flax", "jax2onnx"))
jax_only = pytest.mark.skipif(not HAVE_JAX, reason="needs jax, flax and jax2onnx (the jax extra)")
if HAVE_JAX:
    import jax.numpy as jnp
    from flax import nnx

    from models import flax_zoo
    from spa.frontends import jax as spa_jax

N = "N"


def test_reshape_to_the_run_time_shape_of_another_tensor_couples_them():
    """y = Reshape(z, Shape(t)) (jax2onnx un-groups GroupNorm like this): y's channels must shrink
    with t's, even when z and t come from different convolutions."""
    b = Builder()
    x = b.input([N, 3, 4, 4])
    z = b.op("Reshape", [b.op("Relu", [b.conv(x, 3, 8)]), b.const(np.array([0, 8, 16], dtype=np.int64))])
    t = b.conv(x, 3, 8)
    y = b.op("Reshape", [b.op("Sigmoid", [z]), b.op("Shape", [t])])
    b.output(b.conv(b.op("Add", [y, t]), 8, 4), shape=[N, 4, 4, 4])
    model = b.model()
    [group] = [g for g in analyze(model).groups if g.prunable]
    assert {(m.tensor, m.axis) for m in group.members} >= {(y, 1), (t, 1)}
    check_exact(model)


MODELS = list(flax_zoo.FLAX_ZOO) if HAVE_JAX else []
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax2onnx's flax `.value`


def _jax_forward(module, x):
    return np.asarray(nnx.jit(lambda m, x: m(x))(module, x))


def _onnx_forward(model_or_path, x):
    model = onnx.load(model_or_path) if isinstance(model_or_path, str) else model_or_path
    return run(model_or_path, {model.graph.input[0].name: x})[0]


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """name -> path of the model exported once per session (verify off: the tests check it)."""
    directory = tmp_path_factory.mktemp("flax")
    cache = {}

    def get(name):
        if name not in cache:
            path = str(directory / f"{name}.onnx")
            spa_jax.export(flax_zoo.build(name), flax_zoo.example_input(name), path, verify=False)
            cache[name] = path
        return cache[name]
    return get


@pytest.fixture(scope="session")
def pruned(exported, tmp_path_factory):
    """name -> (prune Result checked against the oracle, path of the saved pruned model)."""
    directory = tmp_path_factory.mktemp("flax_pruned")
    cache = {}

    def get(name):
        if name not in cache:
            model = onnx.load(exported(name))
            result = check_exact(model, Target(ratio=0.5))
            path = str(directory / f"{name}.onnx")
            save(result.model, path)
            cache[name] = (result, path)
        return cache[name]
    return get


@jax_only
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_jax(name, exported):
    module = flax_zoo.build(name)
    for batch in (2, 3):  # 3: the batch axis is dynamic
        x = flax_zoo.example_input(name, batch=batch, seed=batch)
        expected = _jax_forward(module, x)
        np.testing.assert_allclose(_onnx_forward(exported(name), x), expected, rtol=1e-4,
                                   atol=1e-4 * max(1.0, float(np.abs(expected).max())))


@jax_only
@pytest.mark.parametrize("name", MODELS)
def test_weight_map_names_every_parameter(name, exported):
    model = onnx.load(exported(name))
    mapping = spa_jax.weight_map(model)
    assert mapping["ambiguous"] == {} and mapping["unmapped"] == []
    params = {".".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(flax_zoo.build(name)))}
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert {e["path"] for e in mapping["weights"].values()} == set(params)
    for onnx_name, entry in mapping["weights"].items():
        value = np.transpose(params[entry["path"]], entry["perm"]).reshape(entry["onnx_shape"])
        np.testing.assert_array_equal(initializers[onnx_name], value)


@jax_only
def test_weight_map_with_default_init_ties():
    """Flax's default init (BatchNorm ones/zeros, zero biases) makes many weights equal; the trace
    order and the node's other inputs tell them apart."""
    module = flax_zoo.build("cnn_bn")
    for _, node in nnx.iter_graph(module):
        for kind, fill in (("scale", np.ones), ("var", np.ones), ("bias", np.zeros), ("mean", np.zeros)):
            variable = getattr(node, kind, None)
            if isinstance(variable, nnx.Variable):
                variable.set_value(jnp.asarray(fill(variable.get_value().shape, np.float32)))
    model = spa_jax.to_onnx(module, (2, 8, 8, 3))
    mapping = spa_jax.weight_map(model)
    assert mapping["ambiguous"] == {} and mapping["unmapped"] == []
    paths = {name: entry["path"] for name, entry in mapping["weights"].items()}
    roles = {"BatchNormalization": ["scale", "bias", "mean", "var"], "Conv": ["kernel", "bias"],
             "Gemm": ["kernel", "bias"]}
    checked = 0
    for node in model.graph.node:  # each node's weights: one module's parameters, in role order
        if node.op_type in roles:
            owners = [paths[i].rsplit(".", 1) for i in node.input[1:]]
            assert len({owner for owner, _ in owners}) == 1
            assert [role for _, role in owners] == roles[node.op_type][:len(owners)]
            checked += 1
    assert checked == 5


@jax_only
@pytest.mark.parametrize("name", MODELS)
def test_prune_exact(name, exported, pruned):
    result, path = pruned(name)  # check_exact: oracle, validity, fewer parameters
    before, after = count_params(onnx.load(exported(name))), count_params(onnx.load(path))
    assert after < 0.7 * before
    sliced = {e["name"] for e in result.plan.weight_entries()}
    if name == "transformer":  # whole heads (query/key/value/out kernels) and MLP channels
        assert {"kernel2d_0", "kernel2d_1", "kernel2d_2", "kernel2d_3"} <= sliced
    if name == "resnet":  # the residual stream through both blocks is one group
        assert {f"kernel_oih_{i}" for i in range(5)} <= sliced
    if name == "groupnorm":  # GroupNorm (decomposed by jax2onnx), depthwise conv: nothing frozen
        assert all(g.prunable and not g.reasons() for g in result.analysis.groups[:-1])


@jax_only
@pytest.mark.parametrize("name", MODELS)
def test_apply_plan_matches_pruned_onnx(name, pruned):
    result, path = pruned(name)
    module = flax_zoo.build(name)
    x = flax_zoo.example_input(name, batch=3, seed=7)
    spa_jax.apply_plan(module, result.plan, pruned=path, example_inputs=x)
    expected = _onnx_forward(path, x)
    np.testing.assert_allclose(_jax_forward(module, x), expected, rtol=1e-4,
                               atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    if name == "cnn_bn":
        assert (module.conv1.out_features, module.bn1.num_features, module.conv2.in_features) == (4, 4, 4)
    if name == "transformer":
        assert (module.attn.num_heads, module.attn.qkv_features, module.fc1.out_features) == (2, 8, 16)


@jax_only
def test_groupnorm_loses_whole_groups(exported, tmp_path):
    result = check_exact(onnx.load(exported("groupnorm")), Target(ratio=0.8))
    path = str(tmp_path / "groupnorm.onnx")
    save(result.model, path)
    module = flax_zoo.build("groupnorm")
    x = flax_zoo.example_input("groupnorm", batch=3, seed=7)
    spa_jax.apply_plan(module, result.plan, pruned=path)
    expected = _onnx_forward(path, x)
    np.testing.assert_allclose(_jax_forward(module, x), expected, rtol=1e-4,
                               atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    norm, depthwise = module.norm, module.depthwise
    assert norm.num_groups < 4 and norm.num_groups * 2 == norm.num_features == depthwise.out_features
    assert depthwise.feature_group_count == depthwise.out_features == module.conv1.out_features


@jax_only
def test_apply_plan_without_pruned_model_slices_module_values(pruned):
    result, path = pruned("mlp")
    module = spa_jax.apply_plan(flax_zoo.build("mlp"), result.plan)
    x = flax_zoo.example_input("mlp", batch=2)
    np.testing.assert_allclose(_jax_forward(module, x), _onnx_forward(path, x), rtol=1e-4, atol=1e-5)
    assert [layer.out_features for layer in module.layers] == [16, 12, 4]


@jax_only
def test_apply_plan_restores_module_on_mismatch(pruned, exported):
    result, _ = pruned("mlp")
    module = flax_zoo.build("mlp")
    wrong = onnx.load(exported("mlp"))  # right map, unpruned weights: sizes cannot fit
    with pytest.raises(SpaError, match="does not fit"):
        spa_jax.apply_plan(module, result.plan, pruned=wrong)
    assert module.layers[0].kernel.get_value().shape == (12, 32)


@jax_only
def test_apply_plan_refuses_head_dim_pruning(exported, tmp_path):
    """nnx.MultiHeadAttention recomputes 1/sqrt(head_dim); the pruned ONNX keeps the old scale."""
    result = prune(onnx.load(exported("transformer")), Target(ratio=0.5),
                   options=Options(granularity=("channels", "head-dim")))
    path = str(tmp_path / "head_dim.onnx")
    save(result.model, path)
    module = flax_zoo.build("transformer")
    with pytest.raises(SpaError, match="pruned ONNX model differs"):
        spa_jax.apply_plan(module, result.plan, pruned=path,
                           example_inputs=flax_zoo.example_input("transformer"))
    assert module.attn.query.kernel.get_value().shape == (16, 4, 4) and module.attn.head_dim == 4


@jax_only
@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_pruned_to_torch(name, pruned):
    torch = pytest.importorskip("torch")
    frontend = pytest.importorskip("spa.frontends.torch")
    if not hasattr(frontend, "from_onnx"):
        pytest.skip("spa.frontends.torch.from_onnx not available yet")
    _, path = pruned(name)
    module = frontend.from_onnx(path, verify=True)
    x = flax_zoo.example_input(name, batch=3, seed=5)
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    got = got[0] if isinstance(got, (tuple, list)) else got
    expected = _onnx_forward(path, x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4,
                               atol=1e-4 * max(1.0, float(np.abs(expected).max())))


@jax_only
def test_export_verifies_and_writes(tmp_path):
    path = str(tmp_path / "mlp.onnx")
    exported = spa_jax.export(flax_zoo.build("mlp"), [(2, 12)], path)  # shapes only: random inputs
    assert exported.path == path and os.path.exists(path)
    assert exported.input_names == ["in_0"] and len(exported.weight_map["weights"]) == 6
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"
    assert spa_jax.weight_map(path) == exported.weight_map


@jax_only
def test_bad_inputs_give_spa_errors(tmp_path):
    with pytest.raises(SpaError, match="flax.nnx.Module"):
        spa_jax.to_onnx(lambda x: x, (2, 3))
    with pytest.raises(SpaError, match="does not exist"):
        spa_jax.export(flax_zoo.build("mlp"), (2, 12), str(tmp_path / "missing" / "m.onnx"))
    with pytest.raises(SpaError, match="example_inputs"):
        spa_jax.to_onnx(flax_zoo.build("mlp"), [])
    with pytest.raises(SpaError, match="jax2onnx could not export"):
        spa_jax.to_onnx(flax_zoo.build("mlp"), (2, 7))  # wrong feature size
    with pytest.raises(SpaError, match="spa.jax.weight_map"):
        spa_jax.weight_map(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])))
