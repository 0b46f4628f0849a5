"""TFLite custom ops -> ONNX, as tf2onnx custom-op handlers (used by tensorflow_export for .tflite).

tf2onnx names a TFLite custom op `TFL_<custom_code>` and, unless it has a handler for it, leaves
it in the graph unconverted. It also drops the op's raw `custom_options` bytes (it only keeps them
when they parse as a FlexBuffer map), so they are read here from the flatbuffer, keyed by the
op's first output tensor name (which tf2onnx uses as the node's name).

Converted:
- `Convolution2DTransposeBias` (MediaPipe: selfie/hair segmentation, ...): a transposed 2-D
  convolution with a bias, inputs (input NHWC, weights OHWI, bias [O]), custom_options the C struct
  TfLiteTransposeConvParams (little-endian int32 padding, stride_width, stride_height; padding
  1 = SAME, anything else = none, as in MediaPipe's kernel
  mediapipe/util/tflite/operations/transpose_conv_bias.cc). Output size and padding follow that
  kernel exactly: pad = max(0, k - (in - 1) % stride - 1) for SAME (0 otherwise),
  out = stride * (in - 1) + k - pad, the first pad // 2 rows/columns cropped. That is an ONNX
  ConvTranspose with pads [pad // 2, pad - pad // 2], weights OHWI -> IOHW, between NHWC <-> NCHW
  Transposes (the same pattern tf2onnx's own conv handlers emit, so its optimizer cancels them).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from spa.errors import SpaError

TRANSPOSE_CONV_BIAS = "Convolution2DTransposeBias"
PADDING_SAME = 1  # TfLitePadding: 0 unknown, 1 SAME, 2 VALID


@dataclass
class CustomOp:
    code: str        # the custom_code, e.g. "Convolution2DTransposeBias"
    output: str      # name of its first output tensor (tf2onnx's node name)
    options: bytes   # raw custom_options
    subgraph: int


def read_custom_ops(path) -> list:
    """Every CUSTOM operator in the TFLite file at `path`, in subgraph/operator order."""
    from tf2onnx.tflite.Model import Model
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    try:
        model = Model.GetRootAsModel(buf, 0)
        codes = {}
        for i in range(model.OperatorCodesLength()):
            op_code = model.OperatorCodes(i)
            if _builtin(op_code) == 32:  # BuiltinOperator.CUSTOM
                codes[i] = (op_code.CustomCode() or b"").decode("utf-8", "replace")
        found = []
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            for j in range(graph.OperatorsLength()):
                op = graph.Operators(j)
                code = codes.get(op.OpcodeIndex())
                if code is None or code.startswith("Flex"):  # Flex ops are TF ops (tf2onnx)
                    continue
                outputs = [op.Outputs(k) for k in range(op.OutputsLength()) if op.Outputs(k) >= 0]
                output = graph.Tensors(outputs[0]).Name().decode() if outputs else ""
                options = b"" if op.CustomOptionsIsNone() else op.CustomOptionsAsNumpy().tobytes()
                found.append(CustomOp(code, output, options, g))
        return found
    except Exception as exc:  # noqa: BLE001 - a damaged flatbuffer is bad input
        raise SpaError(f"{path}: damaged TFLite file: its flatbuffer cannot be read ({type(exc).__name__} "
                       "while reading its operators)") from None


def builtin_codes(path) -> set:
    """The BuiltinOperator codes the TFLite file at `path` uses (read lazily: its buffers are not unpacked)."""
    from tf2onnx.tflite.Model import Model
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    try:
        model = Model.GetRootAsModel(buf, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        return {_builtin(c) for c in codes}
    except Exception as exc:  # noqa: BLE001 - a damaged flatbuffer is bad input
        raise SpaError(f"{path}: damaged TFLite file: its flatbuffer cannot be read ({type(exc).__name__} "
                       "while reading its operator codes)") from None


def _builtin(op_code) -> int:
    """An OperatorCode's BuiltinOperator, as tf2onnx reads it: the deprecated int8 field, or the int32
    one where that says PLACEHOLDER_FOR_GREATER_OP_CODES (127)."""
    code = op_code.DeprecatedBuiltinCode()
    return op_code.BuiltinCode() if code == 127 else code


def supported_codes() -> list:
    """Custom codes SPA converts (tf2onnx converts a few more itself, see unconvertible)."""
    return sorted(_HANDLERS)


def unconvertible(custom_ops) -> list:
    """Custom codes among `custom_ops` that neither SPA nor tf2onnx has a handler for (tf2onnx
    maps a few TFLite custom ops itself, e.g. TFLite_Detection_PostProcess)."""
    import tf2onnx.tfonnx  # noqa: F401 - registers tf2onnx's handlers
    from tf2onnx import handler
    known = {name for versions in handler.tf_op.get_opsets().values() for by_version in versions
             for name in by_version}
    return sorted({op.code for op in custom_ops
                   if op.code not in _HANDLERS and f"TFL_{op.code}" not in known})


def handlers(custom_ops, errors) -> dict:
    """tf2onnx `custom_op_handlers` for the ops in `custom_ops` SPA converts (old-style API:
    {op type: (func(ctx, node, name, args), [])}). A handler that cannot convert its node leaves it
    as it was and appends the SpaError to `errors` (tf2onnx would log an exception's traceback and
    carry on): the caller raises errors[0] after the conversion."""
    result = {}
    for code in sorted({op.code for op in custom_ops if op.code in _HANDLERS}):
        options = {op.output: op.options for op in custom_ops if op.code == code}
        result[f"TFL_{code}"] = (_bind(_HANDLERS[code], code, options, errors), [])
    return result


def _bind(convert, code, options, errors):
    def handler(ctx, node, name, args):
        try:
            # tf2onnx names the node after its first output tensor; the output itself may have
            # been renamed since (a graph output gets an Identity after a "_raw_output_" copy)
            key = next((k for k in (node.name, node.output[0]) if k in options), None)
            if key is None:
                raise SpaError(f"TFLite custom op {code} ({node.name}): its custom_options "
                               "were not found in the file")
            convert(ctx, node, options[key])
        except SpaError as exc:
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - reported by the caller as one line
            errors.append(SpaError(f"TFLite custom op {code} ({node.name}) could not be "
                                   f"converted: {type(exc).__name__}: {exc}"))
    return handler


def transpose_conv_bias_params(options: bytes):
    """(same_padding, stride_h, stride_w) from TfLiteTransposeConvParams bytes."""
    if len(options) < 12:
        raise SpaError(f"TFLite custom op {TRANSPOSE_CONV_BIAS}: custom_options has {len(options)} "
                       "bytes, expected TfLiteTransposeConvParams (padding, stride_width, "
                       "stride_height: 3 int32)")
    padding, stride_w, stride_h = struct.unpack_from("<3i", options)
    if padding not in (0, 1, 2) or stride_w < 1 or stride_h < 1:
        raise SpaError(f"TFLite custom op {TRANSPOSE_CONV_BIAS}: unexpected custom_options "
                       f"(padding {padding}, stride_width {stride_w}, stride_height {stride_h})")
    return padding == PADDING_SAME, stride_h, stride_w


def transpose_conv_bias_geometry(in_hw, kernel_hw, strides, same):
    """(output size, pads [top, left, bottom, right]) as MediaPipe's kernel computes them."""
    outs, begin, end = [], [], []
    for size, k, s in zip(in_hw, kernel_hw, strides):
        pad = max(0, k - (size - 1) % s - 1) if same else 0
        outs.append(s * (size - 1) + k - pad)
        begin.append(pad // 2)
        end.append(pad - pad // 2)
    return outs, begin + end


def _convert_transpose_conv_bias(ctx, node, options):
    from tf2onnx import utils
    what = f"TFLite custom op {TRANSPOSE_CONV_BIAS} ({node.name})"
    if len(node.input) != 3 or len(node.output) != 1:
        raise SpaError(f"{what}: expected inputs (input, weights, bias) and one output, "
                       f"got {len(node.input)} inputs and {len(node.output)} outputs")
    same, stride_h, stride_w = transpose_conv_bias_params(options)
    x, weights, bias = node.input
    x_shape, w_shape = ctx.get_shape(x), ctx.get_shape(weights)
    if not w_shape or len(w_shape) != 4 or min(w_shape) < 1:
        raise SpaError(f"{what}: weights must be OHWI with a known shape, got {w_shape}")
    if not x_shape or len(x_shape) != 4:
        raise SpaError(f"{what}: input must be NHWC, got shape {x_shape}")
    out_c, kh, kw, in_c = w_shape
    if x_shape[3] > 0 and x_shape[3] != in_c:
        raise SpaError(f"{what}: input has {x_shape[3]} channels, the OHWI weights {in_c}")
    b_shape = ctx.get_shape(bias)
    if b_shape is not None and list(b_shape) not in ([out_c], [-1]):
        raise SpaError(f"{what}: bias shape {b_shape} does not match the weights' {out_c} "
                       "output channels")
    if x_shape[1] < 1 or x_shape[2] < 1:
        if same:
            raise SpaError(f"{what}: SAME padding needs the input's height and width, "
                           f"got shape {x_shape}")
        out_hw, pads = [-1, -1], [0, 0, 0, 0]
    else:
        out_hw, pads = transpose_conv_bias_geometry(x_shape[1:3], (kh, kw), (stride_h, stride_w), same)

    node.type, node.domain = "ConvTranspose", ""
    for key in list(node.attr):
        del node.attr[key]
    node.set_attr("kernel_shape", [kh, kw])
    node.set_attr("strides", [stride_h, stride_w])
    node.set_attr("pads", pads)
    node.set_attr("dilations", [1, 1])
    node.set_attr("group", 1)

    to_nchw = ctx.insert_new_node_on_input(node, "Transpose", x, perm=[0, 3, 1, 2])
    to_nchw.skip_conversion = True
    ctx.set_shape(to_nchw.output[0], [x_shape[0], x_shape[3], x_shape[1], x_shape[2]])

    w_node = node.inputs[1]
    if w_node.is_const():  # OHWI -> ONNX ConvTranspose's [C_in, C_out, kH, kW]
        value = np.transpose(w_node.get_tensor_value(as_list=False), (3, 0, 1, 2))
        const = ctx.make_const(utils.make_name(f"{node.name}_weights"), np.ascontiguousarray(value))
        ctx.replace_input(node, weights, const.output[0], 1)
    else:  # e.g. float16 weights behind a Dequantize/Cast
        w_t = ctx.insert_new_node_on_input(node, "Transpose", weights, perm=[3, 0, 1, 2])
        w_t.skip_conversion = True
        ctx.set_shape(w_t.output[0], [in_c, out_c, kh, kw])

    output = node.output[0]
    nhwc = [x_shape[0], out_hw[0], out_hw[1], out_c]
    to_nhwc = ctx.insert_new_node_on_output("Transpose", output, name=utils.make_name(node.name),
                                            perm=[0, 2, 3, 1])
    to_nhwc.skip_conversion = True
    ctx.set_shape(to_nhwc.output[0], nhwc)
    ctx.set_shape(output, [nhwc[0], out_c, out_hw[0], out_hw[1]])


_HANDLERS = {TRANSPOSE_CONV_BIAS: _convert_transpose_conv_bias}
