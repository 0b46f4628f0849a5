"""The model's inputs as calibration sees them, and what their shapes can be: `_Input` (a declared
input and the role its name gives it), the user's shapes checked against the declarations
(`user_shapes`), the sizes batches shared (`shared_shapes`), the image layout and spatial axes of
an input, the vocabulary and position table a token model shows (`vocabulary_size`,
`position_limit`), and the default sizes of unknown axes (`spa.calibration.feeds` resolves them).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import SpaError
from ..runtime import batch_axes, declared_inputs, imposed_sizes, is_float, named_mask

DEFAULT_SEQUENCE = 16      # any other unknown axis
DEFAULT_IMAGE = 224        # unknown height / width of an image-like input
DEFAULT_SIGNAL = 256       # unknown L of a float [N, C, L] input
MIN_TOKENS = 4             # shortest synthetic token batch (the longest: max_length)
MAX_SIGNAL_CHANNELS = 4    # a float [N, C, L] input with at most this many channels is a signal
LAYOUT_AXES = {"nchw": (1, (2, 3)), "nhwc": (3, (1, 2))}  # (channel axis, (height, width) axes)


def metadata_image_size(model) -> tuple[int, int] | None:
    """(height, width) the exporter recorded for the model's images: Ultralytics writes `imgsz`
    ('[320, 320]', or one number for a square) into every YOLO export, whose height and width are
    symbolic when exported dynamic. None where the metadata gives no size."""
    value = next((p.value for p in model.metadata_props if p.key == "imgsz"), None)
    numbers = [int(n) for n in re.findall(r"\d+", value or "")]
    if len(numbers) == 1:
        numbers *= 2
    return (numbers[0], numbers[1]) if len(numbers) == 2 and min(numbers) > 0 else None


class _Batch:
    def __repr__(self):
        return "N"


class _Tokens:
    def __repr__(self):
        return "L"


BATCH, TOKENS = _Batch(), _Tokens()


@dataclass
class _Input:
    name: str
    dims: tuple      # declared: int, symbolic name or None
    dtype: type
    vocab: int | None = None

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)

    @property
    def role(self) -> str | None:
        """What a token model's integer (or mask) input carries, read from its name."""
        lower = self.name.lower()
        if named_mask(self.name):
            return "mask"
        if "type" in lower or "segment" in lower:
            return "types"
        if "position" in lower:
            return "positions"
        if self.dtype != np.bool_ and self.vocab:  # a float input too, cast to the table's indices (tf2onnx)
            return "ids"
        return None


def user_shapes(model, shapes) -> dict:
    """{input: shape} from the user's shapes ({input: shape}, or one bare shape for a
    single-input model), checked against the model's declared inputs; SpaError if they do not fit."""
    return _checked_shapes([_Input(n, d, t) for n, d, t in declared_inputs(model)], shapes, _empty_axes(model, shapes))


def _empty_axes(model, shapes) -> set:
    """(input, axis) pairs that may be 0: where the model's ops want them empty (a decoder's cache)."""
    if not shapes:
        return set()
    return {pair for pair, size in imposed_sizes(model).items() if size == 0}


def shared_shapes(model, batches: list) -> dict | None:
    """{input: shape} of the inputs with a symbolic size after the batch axis, where every batch
    fed them at the same sizes (batch axis 1): the sizes the model ran at, which verification and
    the summary take where the user gave none (the 32 they default to may not run). None where no
    input has such a size or the batches differ (token batches of varied length)."""
    declared = declared_inputs(model)
    axes = batch_axes([dims for _, dims, _ in declared])  # the batch leads an input, or sits elsewhere in a state

    shapes = {}
    for (name, dims, _), axis in zip(declared, axes):
        if all(isinstance(d, int) or k == axis for k, d in enumerate(dims)):
            continue
        sizes = {tuple(1 if k == axis and not isinstance(d, int) else n
                       for k, (d, n) in enumerate(zip(dims, np.shape(b[name])))) for b in batches if name in b}
        if len(sizes) != 1:
            return None
        shapes[name] = sizes.pop()
    return shapes or None


def _checked_shapes(inputs: list, shapes, empty=()) -> dict:
    """{input: shape} checked against the declared `inputs`; `empty`: (input, axis) pairs that may be 0."""
    if shapes is None:
        return {}
    by_name = {i.name: i for i in inputs}
    if not isinstance(shapes, Mapping):
        if len(inputs) != 1:
            raise SpaError(f"input shape without an input name needs a single-input model "
                           f"(inputs: {', '.join(by_name)}); name the input (NAME=1x3x224x224)")
        shapes = {inputs[0].name: shapes}
    out = {}
    for name, shape in shapes.items():
        if name not in by_name:
            raise SpaError(f"input shape for '{name}', which is no input of the model (inputs: {', '.join(by_name)})")
        try:
            shape = tuple(shape)
        except TypeError:
            raise SpaError(f"input shape for '{name}' must be a list of sizes, got {shape!r}") from None
        if not all(_positive_int(s) or ((name, k) in empty and _positive_int(s + 1)) for k, s in enumerate(shape)):
            raise SpaError(f"input shape for '{name}' must be positive integers, got {shape}")
        dims = by_name[name].dims
        if len(shape) != len(dims):
            raise SpaError(f"input shape for '{name}' has rank {len(shape)}, the input has rank "
                           f"{len(dims)} ({_declared(dims)})")
        for k, (s, d) in enumerate(zip(shape, dims)):
            if k and isinstance(d, int) and s != d:
                raise SpaError(f"input shape for '{name}' {_shape_text(shape)}: axis {k} must be {d} "
                               f"({_declared(dims)})")
        out[name] = tuple(int(s) for s in shape)
    return out


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def model_inputs(model: onnx.ModelProto) -> list:
    """The model's declared inputs as `_Input`s, each integer one with the vocabulary of the embedding table it
    indexes (None where it indexes none)."""
    inputs = [_Input(n, d, t) for n, d, t in declared_inputs(model)]
    for inp in inputs:
        if _may_index(inp):
            inp.vocab = vocabulary_size(model, inp.name)
    return inputs


def _may_index(inp: _Input) -> bool:
    """Whether `inp` may hold token ids: an integer input, or a float one of rank 2 ([batch, sequence]; a
    Keras model whose ids tf2onnx casts to integers before its embedding: piper-tts' nakdimon)."""
    return inp.dtype != np.bool_ and (not inp.is_float or len(inp.dims) == 2)


def generated_token_lengths(model: onnx.ModelProto) -> bool:
    """Whether generated inputs have a token axis whose length max_length bounds: an integer input
    indexing an embedding table with no static sequence length."""
    for name, dims, dtype in declared_inputs(model):
        inp = _Input(name, dims, dtype)
        if _may_index(inp) and len(dims) >= 2 and not isinstance(dims[-1], int):
            inp.vocab = vocabulary_size(model, name)
            if inp.role == "ids":
                return True
    return False


def _image_layout(inp: _Input, shape: list) -> str | None:
    if not inp.is_float or len(shape) != 4:
        return None
    if shape[1] in (1, 3):
        return "nchw"
    if shape[3] in (1, 3):
        return "nhwc"
    return None


def _pixel_layout(inp: _Input, shape) -> str | None:
    """The layout of a uint8 image input, pixels in [0, 255] ([N, H, W, C] first, as TensorFlow and OpenCV hand them
    over, or [N, C, H, W]; C of 1, 3 or 4), else None."""
    if inp.dtype != np.uint8 or len(shape) != 4:
        return None
    if shape[3] in (1, 3, 4):
        return "nhwc"
    if shape[1] in (1, 3, 4):
        return "nchw"
    return None


def _spatial_axes(inp: _Input, shape) -> tuple | None:
    """(channel axis, spatial axes) of an image-like input or a float [N, C, L] signal with at most
    four channels; None for any other input (feature vectors, embeddings, masks)."""
    layout = _image_layout(inp, list(shape))
    if layout:
        return LAYOUT_AXES[layout]
    if inp.is_float and len(shape) == 3 and shape[1] <= MAX_SIGNAL_CHANNELS and shape[2] > shape[1]:
        return 1, (2,)
    return None


def _hint(name: str, shape: list, letters: dict | None = None) -> str:
    letters = letters or {}
    parts = ["1" if v is BATCH else letters.get(k) or ("L" if v is TOKENS else str(v)) for k, v in enumerate(shape)]
    return f"{name}={'x'.join(parts)}"


def _declared(dims) -> str:
    return "[" + ", ".join("N" if k == 0 and not isinstance(d, int) else str(d) if d is not None else "?"
                           for k, d in enumerate(dims)) + "]"


def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape)


def _names(plan):
    return [i.name for i in plan.inputs]


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Expand"}
# com.microsoft EmbedLayerNormalization (onnxruntime's fused BERT embeddings) and QEmbedLayerNormalization
# (quantized): input slot -> the slot of the table it indexes (token ids -> word embeddings, segment
# ids -> segment embeddings); slot 3 is the position table
_EMBED_OPS = ("EmbedLayerNormalization", "QEmbedLayerNormalization")
_EMBED_TABLES = {0: 2, 1: 4}


def _constant_dims(model) -> dict:
    """{constant: dims}, a Transpose of one included (onnxruntime-genai's tied embedding is its LM
    head's [hidden, vocab] weight transposed), and a DequantizeLinear or Cast of one (a QDQ model's
    int8 embedding table)."""
    consts = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = tuple(a.t.dims)
        elif node.op_type in ("DequantizeLinear", "Cast") and node.input and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
        elif node.op_type == "Transpose" and node.input[0] in consts:
            dims = consts[node.input[0]]
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), range(len(dims))[::-1])
            consts[node.output[0]] = tuple(dims[p] for p in perm)
    return consts


def vocabulary_size(model, name) -> int | None:
    """Rows of the constant table that `name` indexes (through casts and reshapes), if any."""
    consts = _constant_dims(model)
    readers: dict = {}
    for node in model.graph.node:
        for slot, x in enumerate(node.input):
            readers.setdefault(x, []).append((node, slot))
    frontier, seen = [name], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node, slot in readers.get(tensor, []):
            if node.op_type == "Gather" and slot == 1 and node.input[0] in consts:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                shape = consts[node.input[0]]
                return int(shape[axis]) if shape else None
            table = _EMBED_TABLES.get(slot) if node.op_type in _EMBED_OPS else None
            if table is not None and len(node.input) > table and node.input[table] in consts:
                return int(consts[node.input[table]][0])
            if node.op_type in _PASS_THROUGH and slot == 0:
                frontier.extend(node.output)
    return None


def position_limit(model) -> int | None:
    """The longest sequence a token model can take, if it shows: the rows of a position table
    (a `position*` input's table, or a constant 2-D table, at least 4 rows, that a Gather reads
    with computed indices: an exported position-id buffer sliced to the sequence length)."""
    consts = _constant_dims(model)
    inputs = [vi.name for vi in model.graph.input if vi.name not in consts]
    limits = [vocabulary_size(model, n) for n in inputs if "position" in n.lower()]
    direct, frontier = set(), list(inputs)
    while frontier:
        tensor = frontier.pop()
        if tensor in direct:
            continue
        direct.add(tensor)
        for node in model.graph.node:
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] == tensor:
                frontier.extend(node.output)
    for node in model.graph.node:
        if node.op_type in _EMBED_OPS and len(node.input) > 3 and node.input[3] in consts:
            limits.append(int(consts[node.input[3]][0]))  # its position table
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in consts:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table, index = consts[node.input[0]], node.input[1]
        if axis == 0 and len(table) == 2 and index not in direct and index not in consts and table[0] >= MIN_TOKENS:
            limits.append(int(table[0]))
    limits = [v for v in limits if v]
    return min(limits) if limits else None
