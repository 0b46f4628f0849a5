"""TFLite custom ops through the TensorFlow frontend (issue 12): MediaPipe's
Convolution2DTransposeBias becomes an ONNX ConvTranspose; an unknown custom op is one SpaError line.

No network: the custom-op files are made here from small Keras models converted to TFLite, with the
TRANSPOSE_CONV operator rewritten (flatbuffer object API) into a CUSTOM operator as MediaPipe
writes it: inputs (input, weights OHWI, bias), custom_options = TfLiteTransposeConvParams
(int32 padding 1 SAME / 2 VALID, stride_width, stride_height)."""
from __future__ import annotations

import os
import struct

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")
flatbuffers = pytest.importorskip("flatbuffers")
pytestmark = pytest.mark.filterwarnings("ignore")

from oracle import check_exact  # noqa: E402

from spa.errors import SpaError  # noqa: E402
from spa.frontends import tensorflow as stf  # noqa: E402
from spa.frontends import tflite_custom_ops  # noqa: E402
from spa.runtime import run  # noqa: E402

schema = pytest.importorskip("tensorflow.lite.python.schema_py_generated")

CODE = "Convolution2DTransposeBias"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tflite_custom")


def keras_tflite(shape, filters=6, kernel=3, strides=2, padding="same", convs=True, float16=False):
    """A Keras model with one biased Conv2DTranspose (between two convs when `convs`) as TFLite
    bytes; every weight random (no zero bias)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape, batch_size=1)
    y = inp
    if convs:
        y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(y)
    y = keras.layers.Conv2DTranspose(filters, kernel, strides=strides, padding=padding)(y)
    if convs:  # no activation right after it: the converter would fuse it into TRANSPOSE_CONV
        y = keras.layers.Conv2D(3, 3, padding="same")(y)
    model = keras.Model(inp, y)
    rng = np.random.default_rng(1)
    for w in model.weights:
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.3)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if float16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def to_custom(buf, code=CODE, options=None):
    """TRANSPOSE_CONV (output_shape, weights, input, bias) -> CUSTOM `code` (input, weights, bias)
    with MediaPipe's custom_options; the output tensor's shape becomes what MediaPipe's kernel
    computes. Returns (bytes, [(weights, bias, (stride_h, stride_w), same) per op])."""
    model = schema.ModelT.InitFromPackedBuf(buf, 0)
    op_code = schema.OperatorCodeT()
    op_code.builtinCode = op_code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    op_code.customCode, op_code.version = code, 1
    model.operatorCodes.append(op_code)
    graph, found = model.subgraphs[0], []
    producer = {int(o): op for op in graph.operators for o in op.outputs}
    for op in graph.operators:
        if model.operatorCodes[op.opcodeIndex].builtinCode != schema.BuiltinOperator.TRANSPOSE_CONV:
            continue
        params = op.builtinOptions
        assert params.fusedActivationFunction == 0
        _, w, x, b = (int(i) for i in op.inputs)
        same = params.padding == schema.Padding.SAME
        op.opcodeIndex = len(model.operatorCodes) - 1
        op.inputs = np.array([x, w, b], dtype=np.int32)
        op.builtinOptionsType, op.builtinOptions = 0, None
        op.customOptions = np.frombuffer(
            options if options is not None else struct.pack("<3i", 1 if same else 2, params.strideW,
                                                             params.strideH), np.uint8)
        op.customOptionsFormat = 0
        weights = _constant(model, graph, producer, w)
        in_hw = graph.tensors[x].shape[1:3]
        strides = (params.strideH, params.strideW)
        out_hw, _ = tflite_custom_ops.transpose_conv_bias_geometry(in_hw, weights.shape[1:3], strides, same)
        out = graph.tensors[int(op.outputs[0])]
        out.shape = np.array([out.shape[0], *out_hw, out.shape[3]], dtype=np.int32)
        out.shapeSignature = None
        found.append((weights, _constant(model, graph, producer, b), strides, same))
    assert found, "no TRANSPOSE_CONV in the converted model"
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), found


def _constant(model, graph, producer, index):
    """A constant tensor's value (float16 ones read through their DEQUANTIZE)."""
    if index in producer and len(producer[index].inputs) == 1:
        index = int(producer[index].inputs[0])
    tensor = graph.tensors[index]
    dtype = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16}[tensor.type]
    data = np.asarray(model.buffers[tensor.buffer].data, dtype=np.uint8).tobytes()
    return np.frombuffer(data, dtype=dtype).reshape(tensor.shape).astype(np.float32)


def mediapipe_reference(x, weights, bias, strides, same):
    """MediaPipe's TransposeConvBias kernel in numpy: x NHWC, weights OHWI, bias [O]."""
    n, h, w, _ = x.shape
    o, kh, kw, _ = weights.shape
    sh, sw = strides
    full = np.zeros((n, sh * (h - 1) + kh, sw * (w - 1) + kw, o), np.float64)
    for dy in range(kh):
        for dx in range(kw):
            full[:, dy:dy + sh * (h - 1) + 1:sh, dx:dx + sw * (w - 1) + 1:sw] += np.einsum(
                "nhwi,oi->nhwo", x.astype(np.float64), weights[:, dy, dx, :].astype(np.float64))
    (out_h, out_w), (top, left, _, _) = tflite_custom_ops.transpose_conv_bias_geometry(
        (h, w), (kh, kw), strides, same)
    return (full[:, top:top + out_h, left:left + out_w] + bias).astype(np.float32)


def write(workdir, name, data):
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def interpret(buf, x):
    interpreter = tf.lite.Interpreter(model_content=buf)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def interpret_custom(buf, x):
    """The stock interpreter runs Convolution2DTransposeBias only through its default XNNPACK
    delegate (an independent implementation of MediaPipe's op); None where it cannot."""
    try:
        return interpret(buf, x)
    except RuntimeError as exc:
        if "custom op" not in str(exc):
            raise
        return None


def onnx_output(path, x):
    return run(path, {onnx.load(path).graph.input[0].name: x})[0]


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_transpose_conv_bias_matches_tflite_and_prunes(padding, workdir):
    """Even input size, where MediaPipe's op and TFLite's TRANSPOSE_CONV agree: the converted
    custom-op file gives the original model's output (stock interpreter), and prunes exactly."""
    original = keras_tflite((8, 8, 4), padding=padding)
    custom, _ = to_custom(original)
    path = write(workdir, f"custom_{padding}.tflite", custom)
    with pytest.raises(RuntimeError, match=CODE):  # a real custom op: no builtin kernel
        tf.lite.Interpreter(model_content=custom, experimental_op_resolver_type=(
            tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)).allocate_tensors()
    assert stf.handles(path)
    onnx_path = stf.to_onnx(path, path + ".onnx")
    proto = onnx.load(onnx_path)
    assert [n.op_type for n in proto.graph.node].count("ConvTranspose") == 1
    assert not any(n.op_type.startswith("TFL_") for n in proto.graph.node)
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
    expected = interpret(original, x)
    got = onnx_output(onnx_path, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    xnnpack = interpret_custom(custom, x)
    if xnnpack is not None:
        np.testing.assert_allclose(xnnpack, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    result = check_exact(proto)  # prune 50% and compare with the oracle
    convt = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert any(i.name == convt.input[1] and i.dims[1] < 6 for i in result.model.graph.initializer)

    from spa.cli import main
    out = os.path.join(workdir, f"small_{padding}.onnx")
    assert main(["prune", path, "-o", out, "--ratio", "0.5"]) in (0, None)
    assert os.path.getsize(out) < os.path.getsize(onnx_path)


@pytest.mark.parametrize("shape,kernel,strides,padding,float16", [
    ((7, 9, 4), 3, (2, 3), "same", False),   # odd sizes: MediaPipe's SAME differs from TF's
    ((5, 6, 3), 4, (2, 2), "same", False),
    ((6, 5, 4), (2, 3), (3, 2), "valid", False),
    ((7, 8, 4), 3, (2, 2), "same", True),   # float16 weights behind DEQUANTIZE
])
def test_transpose_conv_bias_follows_mediapipe_kernel(shape, kernel, strides, padding, float16, workdir):
    """The op alone against a numpy port of MediaPipe's kernel (output size, crop, stride order)
    and, where the stock interpreter has its XNNPACK delegate, against TFLite itself."""
    custom, [(weights, bias, hw_strides, same)] = to_custom(keras_tflite(
        shape, kernel=kernel, strides=strides, padding=padding, convs=False, float16=float16))
    assert hw_strides == tuple(strides)
    name = f"alone_{'x'.join(map(str, shape))}_{padding}{'_f16' if float16 else ''}.tflite"
    path = write(workdir, name, custom)
    onnx_path = stf.to_onnx(path, path + ".onnx")
    x = np.random.default_rng(2).normal(size=(1, *shape)).astype(np.float32)
    expected = mediapipe_reference(x, weights, bias, tuple(strides), same)
    xnnpack = interpret_custom(custom, x)
    if xnnpack is not None:  # the numpy port agrees with TFLite's own implementation
        assert xnnpack.shape == expected.shape
        np.testing.assert_allclose(xnnpack, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    got = onnx_output(onnx_path, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_custom_options_layout():
    assert tflite_custom_ops.transpose_conv_bias_params(struct.pack("<3i", 1, 3, 2)) == (True, 2, 3)
    assert tflite_custom_ops.transpose_conv_bias_params(struct.pack("<4i", 2, 2, 2, 0)) == (False, 2, 2)
    # MediaPipe: 256 -> 512 for k 4, s 2 SAME (pad 2, crop 1 each side)
    assert tflite_custom_ops.transpose_conv_bias_geometry((256, 256), (4, 4), (2, 2), True) == \
        ([512, 512], [1, 1, 1, 1])


def _one_error_line(capfd, argv):
    from spa.cli import main
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[spa")]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("spa: error: "), err
    return lines[0]


def test_unknown_custom_op_is_one_line(workdir, capfd):
    custom, _ = to_custom(keras_tflite((8, 8, 4)), code="MyUnknownOp")
    path = write(workdir, "unknown.tflite", custom)
    with pytest.raises(SpaError, match="MyUnknownOp"):
        stf.to_onnx(path, path + ".onnx")
    line = _one_error_line(capfd, ["prune", path, "-o", os.path.join(workdir, "u.onnx"), "--ratio", "0.5"])
    assert "MyUnknownOp" in line and "custom op" in line


def test_bad_custom_options_is_one_line(workdir, capfd):
    custom, _ = to_custom(keras_tflite((8, 8, 4)), options=b"\x01\x00\x00\x00")
    path = write(workdir, "short_options.tflite", custom)
    with pytest.raises(SpaError, match=CODE):
        stf.to_onnx(path, path + ".onnx")
    line = _one_error_line(capfd, ["prune", path, "-o", os.path.join(workdir, "s.onnx"), "--ratio", "0.5"])
    assert CODE in line and "custom_options" in line
