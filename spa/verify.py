"""Validity checks for every model SPA writes, plus the equivalence oracle used by the tests."""
from __future__ import annotations

import os
import re
import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from .control_flow import folded
from .errors import SpaError, SpaWarning, first_line
from .graph import elem_types, outer_scope_inputs, sort_topologically
from .plan import Plan
from .quant import at_zero_point, is_integer_weight
from .rewrite import filled
from .runtime import (_NP_TYPES, DEFAULT_DIM, LARGER_SIZES, feed_shapes, is_float, onnxruntime_onnx_ops,
                      random_inputs, run, session)

def validate(source: str | bytes, feeds: dict | None = None, model: onnx.ModelProto | None = None,
             pieces: bool = False, original: str | None = None, shapes: dict | None = None) -> None:
    """Full checker (with strict, type-checking shape inference), an onnxruntime session and one
    run; SpaError if not. `source`: a model file or serialised model; `model`: the same proto, to
    read its inputs from. pieces: run the file piece by piece (`run_in_pieces`), for models whose
    onnxruntime session would not fit in memory. Without `feeds`, random inputs at `shapes`
    ({input: shape}, the user's --input-shape) and 32 for any other symbolic size; where the
    pruned model fails to run on them, the `original` model file is run on them too, so that
    inputs the model never takes are not reported as a broken pruned model."""
    stage = "onnx checker / strict shape inference"
    generated = feeds is None
    try:
        _check(source, original)
        stage = "onnxruntime"
        if feeds is None:
            if model is None:
                model = onnx.load(source, load_external_data=False) if isinstance(source, str) else onnx.load_from_string(source)
            feeds = random_inputs(model, shapes=shapes)
        if pieces:
            outputs, sess = run_in_pieces(source, feeds), None
        else:
            sess = session(source, quiet=True)
            outputs = sess.run(None, feeds)
        if getattr(sess, "surrogate", False):
            warnings.warn("verified on a float32 copy: onnxruntime's CPU provider has no kernel for some of the "
                          "model's float16/bfloat16/float64 ops (the written model keeps its types)", SpaWarning)
    except Exception as exc:
        if stage == "onnxruntime" and original is not None:
            larger = _larger_size_it_runs(original, model, shapes) if generated and not pieces else None
            if larger is None:
                _original_fails_too(original, feeds, shapes)
                raise SpaError(f"pruned model failed onnxruntime ({feed_shapes(feeds)}, where the original model "
                               f"runs): {first_line(exc, 300)}") from None
            else:
                feeds = larger
                try:
                    sess = session(source, quiet=True)
                    outputs = sess.run(None, feeds)
                except Exception as again:
                    raise SpaError(f"pruned model failed onnxruntime ({feed_shapes(feeds)}, where the original model "
                                   f"runs): {first_line(again, 300)}") from None
        else:
            raise SpaError(f"pruned model failed {stage}: {first_line(exc, 300)}") from None
    _check_finite(outputs, lambda: run_in_pieces(source, feeds) if pieces else sess.run(None, feeds),
                  lambda: model or (onnx.load(source, load_external_data=False) if isinstance(source, str)
                                    else onnx.load_from_string(source)),
                  (lambda: run(original, feeds)) if original is not None else None)


def _check_finite(outputs: list, rerun, model, original_outputs=None) -> None:
    """SpaError where a float output holds NaN or Inf, unless a second run (`rerun()`) on the same
    inputs does not give it alike: onnxruntime leaves part of such an output unwritten (a sliding
    window's cache), which is then announced, not blamed on the prune; or unless the original model
    (`original_outputs()`) gives NaN or Inf in that output too: random inputs it does not take (a
    graph network's distances drawn negative), announced as well."""
    bad = [k for k, out in enumerate(outputs) if not _finite(out)]
    if not bad:
        return

    def names():
        return ", ".join(f"'{model().graph.output[k].name}'" for k in bad)

    again = rerun()
    if not any(np.array_equal(outputs[k], again[k], equal_nan=True) for k in bad):
        warnings.warn(f"output {names()} holds NaN or Inf but differs between two runs on the same inputs: "
                      "onnxruntime leaves part of it unwritten (a sliding-window cache), so that is not the prune's "
                      "doing", SpaWarning)
        return
    expected = _outputs_or_none(original_outputs)
    if expected is None or any(_finite(expected[k]) for k in bad):
        raise SpaError("pruned model produced NaN or Inf")
    warnings.warn(f"output {names()} holds NaN or Inf, as the original model's does on the same random inputs "
                  "(values it may never take): not blamed on the prune; check the pruned model on real inputs",
                  SpaWarning)


def _finite(output) -> bool:
    """Not a float array holding NaN or Inf."""
    return not (isinstance(output, np.ndarray) and is_float(output.dtype)
                and not np.all(np.isfinite(np.asarray(output, np.float32))))


def _outputs_or_none(compute):
    try:
        return None if compute is None else compute()
    except Exception:  # noqa: BLE001 -- the original failing here changes nothing: the prune is blamed
        return None


def _check(source: str | bytes, original: str | None) -> None:
    """The full checker; where it fails, a failure the `original` file shows word for word (an
    exporter's slip: paddle2onnx's SLANet declares a rank-0 Cast output inside its Loop that infers
    as rank 1) is announced and let through to the onnxruntime checks."""
    try:
        onnx.checker.check_model(source, full_check=True)
    except Exception as exc:
        unknown = re.search(r"No Op registered for (\w+) with domain_version", str(exc))
        if unknown and unknown.group(1) in onnxruntime_onnx_ops():
            warnings.warn(f"the onnx checker does not know onnxruntime's {unknown.group(1)}: the pruned model is "
                          "held to onnxruntime's checks", SpaWarning)
            return
        if original is None or checker_error(original) != str(exc):
            raise
        warnings.warn(f"the original model fails the onnx checker the same way ({first_line(exc, 200)}): the pruned "
                      "model is held to onnxruntime's checks, as the original runs", SpaWarning)


def checker_error(path: str) -> str | None:
    """The full checker's complaint about a model file (None: it passes)."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        return str(exc)
    return None


def runs(source, feeds: dict) -> bool:
    """Whether onnxruntime runs `source` (a path, a ModelProto or a session) on `feeds`."""
    try:
        (source if hasattr(source, "run") else session(source, quiet=True)).run(None, feeds)
        return True
    except Exception:
        return False


PROBE_ELEMENTS = 1 << 22  # input elements past which `_larger_size_it_runs` stops trying larger sizes


def _larger_size_it_runs(original: str, model: onnx.ModelProto, shapes) -> dict | None:
    """Random inputs at the first of LARGER_SIZES for the symbolic sizes not in `shapes` that the
    `original` model file runs on (announced, with the flags that give it), or None: it runs on none,
    it does not load, it has no symbolic size to change, or it is too big to probe."""
    from .graph import PROBE_LIMIT, weight_bytes

    if model is None or weight_bytes(onnx.load(original, load_external_data=False)) > PROBE_LIMIT:
        return None
    default = random_inputs(model, shapes=shapes)
    try:
        sess = session(original, quiet=True)
    except Exception:
        return None
    for size in LARGER_SIZES:
        feeds = random_inputs(model, shapes=shapes, default_dim=size)
        if all(np.shape(feeds[n]) == np.shape(default[n]) for n in feeds):
            return None  # no symbolic size to change
        if sum(np.size(v) for v in feeds.values()) > PROBE_ELEMENTS:
            return None  # an image at 4096 x 4096: not a size to guess
        if runs(sess, feeds):
            flags = " ".join(f"--input-shape {n}={'x'.join(map(str, np.shape(v)))}" for n, v in feeds.items()
                             if np.ndim(v) and np.shape(v) != np.shape(default[n]))
            warnings.warn(f"the original model does not run on the verification inputs at symbolic size "
                          f"{DEFAULT_DIM} ({feed_shapes(default)}); verified at {size} ({feed_shapes(feeds)}) instead, "
                          f"where it runs ({flags} sets the sizes)", SpaWarning)
            return feeds
    return None


def _original_fails_too(original: str, feeds: dict, shapes) -> None:
    """SpaError where the original model fails in onnxruntime as the pruned one did: it does not load
    at all (no input sizes would help: onnxruntime's reason), or does not run on `feeds` (the sizes it
    takes); nothing where it runs, so that the pruned model is blamed."""
    try:
        sess = session(original, quiet=True)
    except Exception as exc:
        raise SpaError(f"the original model does not load in onnxruntime either: {first_line(exc, 300)}") from None
    try:
        sess.run(None, feeds)
    except Exception:
        defaulted = "" if shapes else f"; symbolic sizes not given are {DEFAULT_DIM}"
        raise SpaError(f"the original model does not run on the verification inputs either "
                       f"({feed_shapes(feeds)}{defaulted}): give the sizes it "
                       f"takes, {_shape_hint(original)} (input_shape= in Python)") from None


def _shape_hint(path: str) -> str:
    """--input-shape flags, one per input, with the model's declared dims: static sizes, symbolic
    names, batch 1 (a name that leads some input, wherever it stands). Scalars take no shape."""
    from .runtime import batch_names, declared_inputs

    inputs = [(name, dims) for name, dims, _ in declared_inputs(onnx.load(path, load_external_data=False)) if dims]
    batch = batch_names(dims for _, dims in inputs)

    def dim(k, d):
        return str(d) if isinstance(d, int) else "1" if k == 0 or d in batch else d or "?"
    return " ".join(f"--input-shape {name}={'x'.join(dim(k, d) for k, d in enumerate(dims))}" for name, dims in inputs)


def session_fits(path: str | onnx.ModelProto) -> bool:
    """Whether an onnxruntime session of the model file (or streamed model: weights in external
    data) fits in the memory available: float32 copies of 16-bit weights (the CPU provider's
    fallback) counted."""
    from .graph import tensor_bytes
    model = onnx.load(path, load_external_data=False) if isinstance(path, str) else path
    need = sum(tensor_bytes(t) * (4 if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) else 1.5)
               for t in model.graph.initializer)
    return need < 0.6 * available_memory()


def runs_whole(model: onnx.ModelProto) -> bool:
    """Whether onnxruntime can hold the model in one session: its weights are in memory already,
    or they stream from external data and a session of them fits (`session_fits`)."""
    from .external_data import is_streamed

    return not is_streamed(model) or session_fits(model)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 62  # unknown: whole-model verification, as everywhere else


def run_in_pieces(path: str, feeds: dict, piece_bytes: int | None = None) -> list:
    """Run the model file in consecutive pieces of its (topologically ordered) nodes, each a model
    holding only the weights its nodes read (at most `piece_bytes` of them, one node at least),
    fed with the values the pieces before it computed: the same computation as one run, with the
    memory of one piece. Piece models are written beside `path` and read its external data
    where it lies."""
    from .graph import outer_scope_inputs, tensor_bytes
    model = onnx.load(path, load_external_data=False)
    g = model.graph
    piece_bytes = piece_bytes or max(1 << 28, available_memory() // 24)
    inits = {t.name: t for t in g.initializer}
    types = _value_types(model)
    reads = [[x for x in list(n.input) + sorted(outer_scope_inputs(n)) if x] for n in g.node]
    last_read = {}
    for k, names in enumerate(reads):
        for x in names:
            last_read[x] = k
    outputs = [o.name for o in g.output]
    live = dict(feeds)
    start = 0
    while start < len(g.node):
        end, held, size = start, set(), 0
        while end < len(g.node):
            new = {x for x in reads[end] if x in inits} - held
            grown = size + sum(tensor_bytes(inits[x]) for x in new)
            if end > start and grown > piece_bytes:
                break
            held, size, end = held | new, grown, end + 1
        produced = {o for n in g.node[start:end] for o in n.output if o}
        needed = sorted({x for names in reads[start:end] for x in names} - produced - held)
        wanted = sorted(x for x in produced if last_read.get(x, -1) >= end or x in outputs)
        piece = helper.make_model(
            helper.make_graph(list(g.node[start:end]), f"piece_{start}",
                              [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(live[x].dtype),
                                                             live[x].shape) for x in needed],
                              [helper.make_tensor_value_info(x, types.get(x, 0), None) for x in wanted],
                              initializer=[inits[x] for x in sorted(held)]),
            opset_imports=model.opset_import, ir_version=model.ir_version)
        piece.functions.extend(model.functions)
        piece_path = f"{path}.piece.onnx"
        onnx.save_model(piece, piece_path)
        try:
            values = session(piece_path).run(wanted, {x: live[x] for x in needed})
        finally:
            os.remove(piece_path)
        live.update(zip(wanted, values))
        for x in [x for x in live if last_read.get(x, -1) < end and x not in outputs]:
            del live[x]
        start = end
    return [live[o] for o in outputs]


def _value_types(model) -> dict:
    """Element types of every value shape inference knows (weights carry dims, not data)."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    return {vi.name: vi.type.tensor_type.elem_type for vi in
            list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}


def masked_original(plan: Plan) -> onnx.ModelProto:
    """The oracle: the original model with every removed channel's consumer slices zeroed.

    Removing channel c must be exactly the same as zeroing input slice c of every consumer;
    a Mul by a 0/1 mask is inserted in front of each contracted input. The integer weight of a
    QOperator layer (QLinearConv, QLinearMatMul, QGemm) gets its slices set to its zero point.
    """
    return _with_masks(plan.analysis, plan.removed)[0]


def _with_masks(analysis, removed_of, every: bool = False) -> tuple:
    """(the masked model, {mask initializer: (tensor, axis)}): a mask for each contracted input
    that loses slices (`removed_of(tensor, axis)`), or for every one of them (`every`: all-ones
    masks, the original's values, for `MaskedRuns` to replace)."""
    g = analysis.graph
    model = onnx.ModelProto()
    model.CopyFrom(g.model)
    members = {m.tensor for m in analysis.members.values()}
    for alias, (i, slot, _, _) in g.aliases.items():  # a consumer's own copy of a shared constant
        fill = g.consts.fill(alias)
        if alias in members and fill is not None:  # a filled constant's copy: filled again, never written out
            shape_tensor, node = filled(alias, g.consts.shape(alias), fill)
            model.graph.initializer.append(shape_tensor)
            model.graph.node.append(node)
            model.graph.node[i].input[slot] = alias
        elif alias in members:  # (compensation may give it its own value)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(g.consts[alias]), alias))
            model.graph.node[i].input[slot] = alias
    masked: dict = {}
    masks: dict = {}
    replaced: set = set()  # integer weights whose reader now reads their masked copy
    types = elem_types(model)
    for node_index, slot, axis in analysis.contracted:
        tensor = g.nodes[node_index].input[slot]
        removed = removed_of(tensor, axis)
        if len(removed) == 0 and not every:
            continue
        key = (tensor, axis)
        integer = None if key in masked else at_zero_point(g, tensor, axis, removed)
        if integer is not None:  # a QOperator layer's integer weight: removed slices := zero point
            masked[key] = _masked_name(tensor, axis)
            model.graph.initializer.append(numpy_helper.from_array(integer, masked[key]))
            masks[masked[key]] = key
            replaced.add(tensor)
        elif key not in masked:
            shape = [1] * g.rank(tensor)
            shape[axis] = g.dim(tensor, axis)
            mask = np.ones(shape, dtype=_NP_TYPES.get(types(tensor), np.float32))
            np.moveaxis(mask, axis, 0)[removed] = 0
            out = _masked_name(tensor, axis)
            model.graph.initializer.append(numpy_helper.from_array(mask, out + "_mask"))
            model.graph.node.append(helper.make_node("Mul", [tensor, out + "_mask"], [out]))
            masked[key] = out
            masks[out + "_mask"] = key
        model.graph.node[node_index].input[slot] = masked[key]
    _drop_unread(model, replaced)
    sort_topologically(model.graph)  # the masks' Mul nodes were appended at the end
    loops = [entry for entry in g.folding if entry.kind == "Loop"]
    if loops:  # the Loop computes with its masked first-iteration copy as its body; masks stay feedable
        model = folded(model, loops, outside=masks)
    return model, masks


def _masked_name(tensor: str, axis: int) -> str:
    return f"{tensor}__spa_masked{axis}"


def masked_integer_copies(analysis, plan: Plan, weights: dict) -> dict:
    """{name: value} of the copies through which masked_original(plan) reads the integer weights in
    `weights` (new values, e.g. compensated): each with its removed slices at the zero point, as
    the model's own are. Replacing the weight by name would not reach its reader."""
    g, copies = analysis.graph, {}
    for node_index, slot, axis in analysis.contracted:
        tensor = g.nodes[node_index].input[slot]
        removed = plan.removed(tensor, axis)
        if tensor in weights and len(removed) and is_integer_weight(g, tensor):
            copies[_masked_name(tensor, axis)] = at_zero_point(g, tensor, axis, removed, weights[tensor])
    return copies


def _drop_unread(model: onnx.ModelProto, names: set) -> None:
    """Initializers of `names` that no node reads any more: dropped, as onnxruntime would, but
    before it sees them (with its weights handed over as arrays, onnxruntime 1.32.0 fails an int8
    fusion over a dropped array: "Failed to find existing initializer", dynamically quantized MiniLM)."""
    read = {x for n in model.graph.node for x in n.input} | {o.name for o in model.graph.output}
    read |= {x for n in model.graph.node for x in outer_scope_inputs(n)}
    dropped = {t.name for t in model.graph.initializer if t.name in names and t.name not in read}
    for field in (model.graph.initializer, model.graph.input):  # IR < 4 lists initializers as inputs too
        kept = [x for x in field if x.name not in dropped]
        if len(kept) < len(field):
            del field[:]
            field.extend(kept)


class MaskedRuns:
    """Outputs of masked_original(plan) with some weights replaced, over fixed batches, for many
    plans of one analysis: every mask and every weight in `weights` is an input of one model
    (an initializer listed as a graph input is a default the feeds may override), so a plan
    costs one run instead of a model copy, its serialisation and a session (MiniLM: 0.4 s a plan
    instead of 0.9 s; onnxruntime cannot prepack weights that are inputs, so the run itself is
    slower)."""

    def __init__(self, analysis, batches: list, weights=()):
        from .activations import constants_as_initializers

        model, self.masks = _with_masks(analysis, lambda tensor, axis: np.zeros(0, np.int64), every=True)
        model = constants_as_initializers(model)
        self.defaults = {t.name: t for t in model.graph.initializer
                         if t.name in self.masks or t.name in set(weights)}
        declared = {i.name for i in model.graph.input}  # IR < 4 lists every initializer as an input
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in self.defaults.values() if t.name not in declared)
        self.analysis, self.batches = analysis, batches
        self.session = session(model, quiet=True, calibration_pass=True)

    def outputs(self, plan: Plan | None = None, weights: dict | None = None,
                batches: list | None = None) -> list | None:
        """Every batch's outputs (of `batches`, default all; None when a weight is not one of the model's
        inputs). An integer weight goes in through its masked copy (its removed slices at the zero point)."""
        weights = weights or {}
        masked = {tensor for tensor, _ in self.masks.values()}
        through_masks = {name for name in weights if name not in self.defaults and name in masked
                         and is_integer_weight(self.analysis.graph, name)}
        if not set(weights) - through_masks <= set(self.defaults):
            return None
        feeds = {name: value for name, value in weights.items() if name not in through_masks}
        for name, (tensor, axis) in self.masks.items():
            removed = plan.removed(tensor, axis) if plan is not None else []
            if len(removed) or tensor in through_masks:
                feeds[name] = self._masked(name, tensor, axis, removed, weights.get(tensor))
        return [self.session.run(None, {**batch, **feeds}) for batch in (self.batches if batches is None else batches)]

    def _masked(self, name, tensor, axis, removed, value=None) -> np.ndarray:
        integer = at_zero_point(self.analysis.graph, tensor, axis, removed, value)
        if integer is not None:
            return integer
        mask = numpy_helper.to_array(self.defaults[name]).copy()
        np.moveaxis(mask, axis, 0)[removed] = 0
        return mask
