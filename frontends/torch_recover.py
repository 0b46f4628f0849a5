"""Data-free recovery of a pruned ONNX model: distil the original (teacher) into the pruned model
(student) on synthetic inputs, then write the trained weights back into the pruned ONNX.

    from spa.frontends.torch_recover import recover, bn_inversion_batches, synthetic_batches
    inputs = bn_inversion_batches(original)            # models with BatchNormalization (best)
    inputs = synthetic_batches(original, batch_size=16, dims={"sequence": 32})   # any model
    result = recover(original, pruned, inputs, steps=300)
    if result.improved:
        save(result.model, "small.onnx")

- Inputs: ``batches(step) -> feeds`` or a list of feeds. :func:`synthetic_batches` gives fresh
  spa.calibration "synthetic" inputs per step; :func:`bn_inversion_batches` optimises Gaussian
  inputs until every BatchNormalization sees its running statistics (ZeroQ), which recovered
  pruned CNNs far better than Gaussian inputs (docs/recover.md).
- The student is ``spa.frontends.torch.from_onnx(pruned)``, run with ONNX semantics (each
  BatchNormalization as its node's ``training_mode`` says, so an inference BN keeps its running
  statistics frozen and only its scale and bias train; no dropout). ``bn="update"`` trains in
  torch train mode instead (batch statistics; running statistics updated and written back):
  no better on BN-inversion inputs, and on Gaussian inputs it failed to improve an OBSPA-pruned
  model that frozen BN improved.
- The teacher's tensors come from onnxruntime on the original model beside a CPU student (measured
  1.4-3.6x faster than a frozen torch module there), from a frozen torch copy on a GPU student's
  device (``teacher="auto"``; fresh token batches then hold GPU_TOKEN_SCALE times the tokens), or
  as ``teacher`` says.
- Loss: for every float output, the mean squared error divided by the teacher output's variance
  (measured once on the held-out batches), averaged over the outputs, so outputs of different
  scale weigh the same. ``match="shared"`` (default) adds, with weight ``match_weight``, every
  intermediate tensor that exists in both graphs with the same shape (e.g. a transformer's
  residual stream when heads and MLP channels were pruned); a CNN pruned globally usually has
  none. On MiniLM it is what made recovery help at all.
- Adam with a linear warm-up (``warmup`` fraction of the steps) and a cosine decay to zero;
  ``lr`` defaults to :func:`default_lr` (1e-3 with BatchNormalization, 1e-4 without). A run at
  the default lr that does not lower the held-out loss is tried once more from the pruned
  weights at ``lr * RETRY_LR`` (announced): 1e-3 suits the small CNNs trained here, the PP-OCRv4
  recognizer needs 1e-5, and its held-out loss cannot tell them apart early (docs/recover.md).
  An ``lr`` given is run once, as given (``spa prune --recover-lr``).
- ``seconds``: a time budget instead of ``steps`` (``spa prune --recover 20m``): training stops
  when the budget, less what setting up and checking take, is spent, and the warm-up and decay
  follow the elapsed fraction of it rather than the step count (so the steps run depend on the
  machine). No second try fits in it: one that did not lower the held-out loss is announced,
  with ``--recover-lr`` as the way to choose another rate.
- Never worse: the held-out loss (outputs only) is measured with onnxruntime on the pruned model
  before and on the rewritten model after; if neither try lowered it, the input model is returned
  unchanged with ``improved=False``. It is measured on the same kind of inputs as training: on
  random tokens a lower loss did not always mean better embeddings of real sentences.
- Trained values are written into a copy of the pruned ModelProto: initializers and Constant
  nodes, by the names ``onnx_parameters()`` reports, original dtype and shape; a tensor with a
  non-finite value keeps its old value (reported through ``progress`` and ``RecoveryResult.skipped``).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from spa.errors import SpaError
from spa.graph import as_model
from spa.pipeline import check_recovery, recovery_budget
from spa.progress import bar as progress_bar
from spa.runtime import FLOATS

from .torch_onnx import OnnxModule, from_onnx, run_graph, type_name, unsupported_ops
from .torch_threads import all_cores_but_one, intra_op_threads

__all__ = ["recover", "RecoveryResult", "synthetic_batches", "bn_inversion_batches", "default_lr",
           "DEFAULT_LR", "DEFAULT_LR_NO_BN", "DEFAULT_STEPS"]

DEFAULT_LR = 1e-3          # models with BatchNormalization (measured: docs/recover.md)
DEFAULT_LR_NO_BN = 1e-4    # others (transformers: 1e-3 recovered less than 1e-4)
DEFAULT_STEPS = 300
HOLDOUT_BATCHES = 4
GPU_TOKEN_SCALE = 8        # fresh token batches this many times as large for a GPU student with a GPU teacher
RETRY_LR = 0.01            # a run that did not lower the held-out loss is tried once more at lr x this
TIMED_HOLDOUT_STEP = 1 << 40  # held-out batches(step) of a timed run: a step no run reaches
MEMORY_SHARE = 0.5   # of the memory free, what a training step may take
# a step's memory over its forward's (gradients, the teacher's tensors, the next batch's, onnxruntime's own):
# smart-turn int8 held 0.515 GB an input at the end of its forward and peaked at 22.5 GB for 12 inputs
STEP_MEMORY = 4.0


@dataclass
class RecoveryResult:
    model: onnx.ModelProto           # the recovered model, or the pruned input when not improved
    improved: bool
    loss_before: float               # held-out distillation loss of the pruned model
    loss_after: float                # ... of the recovered model (before, when training failed)
    seconds: float
    steps: int                       # training steps run
    skipped: list = field(default_factory=list)  # weights left unchanged (non-finite values)
    message: str = ""
    lr: float | None = None          # the peak learning rate of the last run


def synthetic_batches(model: onnx.ModelProto, batch_size: int = 64, seed: int = 0, dims: dict | None = None):
    """A callable ``step -> feeds`` of fresh spa.calibration "synthetic" inputs for every step
    (Gaussian floats, token ids below the vocabulary size, masks of ones)."""
    from spa.calibration import calibration_batches

    model = as_model(model)

    def batches(step: int) -> dict:
        return calibration_batches(model, "synthetic", batch_size, batch_size,
                                   seed=seed * 1_000_003 + step + 1, dims=dims)[0]

    return batches


def check(model: onnx.ModelProto) -> None:
    """SpaError where `model` cannot be distilled (asked before pruning): an op the ONNX-to-torch
    converter has no torch form for, or no float output to distil."""
    missing = unsupported_ops(model)
    if missing:
        raise SpaError(f"recovery distils a torch copy of the model, and the ONNX-to-torch converter has no "
                       f"{', '.join(missing)}: run without --recover")
    if not any(o.type.tensor_type.elem_type in FLOATS for o in model.graph.output):
        raise SpaError("recovery distils the model's float outputs, and this model has none (its outputs are "
                       f"{', '.join(sorted({type_name(o.type.tensor_type.elem_type) for o in model.graph.output}))}"
                       "): run without --recover")


def recover(original: onnx.ModelProto, pruned: onnx.ModelProto, batches, steps: int = DEFAULT_STEPS,
            lr: float | None = None, seed: int = 0, progress=None, holdout=None, *,
            bn: str = "frozen", match: str = "shared", match_weight: float = 1.0,
            warmup: float = 0.2, weight_decay: float = 0.0, threads: int | None = None,
            teacher: str = "auto", keep_zeros: bool = False, train_lookups: bool = False,
            seconds: float | None = None, device: str | None = None) -> RecoveryResult:
    """Distil ``original`` into ``pruned`` for ``steps`` Adam steps; see the module docstring.

    ``batches``: ``batches(step) -> {input name: array}`` (fresh inputs per step) or a list of
    feeds (cycled; with 5 or more, the last fifth, at most 4, is held out when ``holdout`` is
    None). ``holdout``: list of feeds for the before/after check (default: ``batches(steps + k)``
    for k < 4). ``lr``: Adam's peak learning rate, run once (None: :func:`default_lr`, and a second
    try at ``RETRY_LR`` of it if the first does not lower the held-out loss). ``seed``: torch's
    generator during training (dropout with ``bn="update"``; the global state is restored).
    ``threads``: onnxruntime threads. ``progress(message)``: one line at the start, one at the end.
    ``keep_zeros``: every weight that is exactly zero stays zero (its gradient is masked: a
    fine-grained sparsity pattern survives training). ``train_lookups``: train the lookup tables
    too (2-D weights a Gather indexes, e.g. word embeddings; frozen by default: pruning leaves what a
    token looks up unchanged, generated ids reach scattered rows of them, and their Adam update was
    most of a short step's time; MiniLM: the same cosine, docs/recover.md). ``seconds``: train for
    this long instead of ``steps`` (which must then be 0 or None; module docstring). ``device``: where
    the student trains (a torch device: "cpu", "cuda", "cuda:1"; None: the first CUDA device when torch
    sees one, announced, else the CPU). ``teacher``: "ort" (onnxruntime on the CPU), "torch" (a frozen
    torch copy on the student's device) or "auto": onnxruntime beside a CPU student, torch on a GPU
    student's device, where fresh token batches (:func:`spa.calibration.fresh_batches`) also grow
    GPU_TOKEN_SCALE times (docs/recover.md); the before/after checks stay on onnxruntime's CPU."""
    say = progress or (lambda message: None)
    original, pruned = as_model(original), as_model(pruned)
    steps, seconds = _checked_budget(steps, seconds, lr)
    if bn not in ("frozen", "update"):
        raise SpaError(f"recover: bn must be 'frozen' or 'update', got {bn!r}")
    if match not in ("outputs", "shared"):
        raise SpaError(f"recover: match must be 'outputs' or 'shared', got {match!r}")
    device = _training_device(device)
    teacher, batches, larger = _for_device(device, teacher, batches)
    lr_given = lr is not None
    tries = 1 if lr_given or seconds is not None else 2
    lr = first_lr = default_lr(pruned) if lr is None else float(lr)
    start = time.perf_counter()
    train_feeds, holdout = _split_batches(batches, steps if seconds is None else TIMED_HOLDOUT_STEP, holdout)

    student = _moved(from_onnx(pruned, verify=False), device)
    names = _float_outputs(student, pruned)
    if not names:
        raise SpaError("recover: the pruned model has no float output to distil")
    if device.type == "cpu" and (steps or seconds):
        train_feeds = _within_memory(student, train_feeds, say)
    teach = _Teacher(original, teacher, threads, device)
    checking = time.perf_counter()
    pruned_session = _session(pruned, threads)
    t_hold = [teach.run(f, names) for f in holdout]
    scales = _scales(t_hold, names)
    loss_before = _holdout_loss(pruned_session, holdout, t_hold, names, scales)
    # what the check after training will take (a session and the held-out loss again), kept out of the budget
    deadline = None if seconds is None else start + seconds - 1.5 * (time.perf_counter() - checking) - 1.0

    shared = []
    if match == "shared" and (steps or seconds) and loss_before > 0:
        shared = _shared_tensors(student, teach, train_feeds(0), names)
        if shared:
            inner = [teach.run(f, shared) for f in holdout[:2]]
            scales.update(_scales(inner, shared))
    where = f" on {device}" if device.type != "cpu" else ""
    where += f", teacher on {device}" if teacher == "torch" and device.type != "cpu" else ""
    where += f", token batches {GPU_TOKEN_SCALE}x as large" if larger else ""
    say(f"recover: {_amount(steps, seconds)}{where} (lr {lr:g}), held-out distillation loss {loss_before:.4g}"
        + (f", matching {len(shared)} intermediate tensors" if shared else ""))

    params = _trainable(student, pruned, keep_zeros, train_lookups)
    trainable = bool((steps or seconds) and loss_before > 0 and params)
    model, skipped, loss_after, ran, diverged, improved = pruned, [], loss_before, 0, None, False
    for attempt in range(tries if trainable else 0):
        if attempt:
            say(f"recover: held-out loss {loss_before:.4g} -> {loss_after:.4g} at lr {lr:g}: once more from the pruned "
                f"weights at lr {lr * RETRY_LR:g} (a pretrained model can need a far lower one than its kind)")
            lr *= RETRY_LR
            student = _moved(from_onnx(pruned, verify=False), device)  # the pruned weights again
            params = _trainable(student, pruned, keep_zeros, train_lookups)
        with torch.random.fork_rng(devices=[]), intra_op_threads(all_cores_but_one()):
            torch.manual_seed(seed)
            done, diverged = _train(student, teach, train_feeds, steps, lr, names, shared, scales, match_weight,
                                    warmup, weight_decay, bn, list(params.values()), deadline)
        ran += done
        if done:
            model, skipped = _write_back(pruned, student, bn)
            loss_after = _holdout_loss(_session(model, threads), holdout, t_hold, names, scales)
        improved = math.isfinite(loss_after) and loss_after < loss_before
        if improved:
            break
    elapsed = time.perf_counter() - start
    notes = []
    if lr != first_lr:
        notes.append(f"at lr {lr:g}")
    if diverged is not None:
        notes.append(f"training diverged at step {diverged}, stopped")
    if skipped:
        notes.append(f"{len(skipped)} weight(s) with non-finite values kept unchanged: "
                     + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if seconds is not None and trainable and not ran:
        notes.append(f"the {seconds:g} s given were spent before training could start")
    elif seconds is not None and trainable and not improved and not lr_given:
        notes.append(f"no time for a second try at lr {lr * RETRY_LR:g} (--recover-lr sets the rate)")
    if not improved:
        notes.append("not improved, pruned model returned unchanged")
        model = pruned
    message = (f"recover: {ran} steps, held-out distillation loss {loss_before:.4g} -> {loss_after:.4g}, "
               f"{elapsed:.1f} s" + "".join(f"; {n}" for n in notes))
    say(message)
    return RecoveryResult(model, improved, loss_before, loss_after, elapsed, ran, skipped, message, lr)


def _training_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SpaError(f"recover: device must name a torch device ('cpu', 'cuda', 'cuda:1'), got {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SpaError(f"recover: device {device!r} asked for, but torch sees no CUDA device")
    return chosen


def _for_device(device: torch.device, teacher: str, batches) -> tuple:
    """(teacher kind, batches, whether they grew) for a student on ``device``. A GPU step costs about the
    same from 256 to 2048 tokens, where onnxruntime's CPU teacher slows down in proportion (MiniLM, H100:
    22 steps a second at either size with the teacher on the GPU; onnxruntime on 16 cores 29 at 256 tokens,
    11.5 at 1024), and more tokens a step lower the loss reached in a given time (docs/recover.md)."""
    if teacher not in ("auto", "ort", "torch"):
        raise SpaError(f"recover: teacher must be 'auto', 'ort' or 'torch', got {teacher!r}")
    if device.type == "cpu":
        return ("ort" if teacher == "auto" else teacher), batches, False
    teacher = "torch" if teacher == "auto" else teacher
    larger = teacher == "torch" and getattr(batches, "of_tokens", False)
    return teacher, (batches.scaled(GPU_TOKEN_SCALE) if larger else batches), larger


def _moved(student: OnnxModule, device: torch.device) -> OnnxModule:
    """The student's parameters, buffers and constants on ``device``."""
    if device.type == "cpu":
        return student
    student.to(device)
    student._consts = {k: v.to(device) for k, v in student._consts.items()}
    return student


def _device_of(module: OnnxModule) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _checked_budget(steps, seconds, lr) -> tuple[int, float | None]:
    """(steps, seconds) to run, ``steps`` also read as a time ("20m"), after refusing what cannot run."""
    count, timed = recovery_budget(0 if steps is None and seconds is not None else steps)
    if seconds is not None and (count or timed is not None):
        raise SpaError(f"recover: give steps or seconds, not both (steps={steps!r}, seconds={seconds!r})")
    seconds = timed if timed is not None else seconds
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not 0 < seconds < math.inf):
        raise SpaError(f"recover: seconds must be a positive number, got {seconds!r}")
    check_recovery(count if seconds is None else 1, lr)
    return count, None if seconds is None else float(seconds)


def _amount(steps, seconds) -> str:
    return f"{steps} steps" if seconds is None else f"as many steps as fit in {seconds:g} s"


def default_lr(model: onnx.ModelProto) -> float:
    """Adam's peak learning rate when none is given: DEFAULT_LR for a model with
    BatchNormalization, DEFAULT_LR_NO_BN otherwise (measured, docs/recover.md)."""
    has_bn = any(n.op_type == "BatchNormalization" for n in as_model(model).graph.node)
    return DEFAULT_LR if has_bn else DEFAULT_LR_NO_BN


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _split_batches(batches, steps, holdout):
    if callable(batches):
        feeds = batches
        if holdout is None:
            holdout = [batches(steps + k) for k in range(HOLDOUT_BATCHES)]
    else:
        items = list(batches)
        if not items:
            raise SpaError("recover: no batches")
        if holdout is None:
            if len(items) >= 5:
                k = min(HOLDOUT_BATCHES, len(items) // 5)
                items, holdout = items[:-k], items[-k:]
            else:
                holdout = list(items)

        def feeds(step):
            return items[step % len(items)]
    holdout = list(holdout)
    if not holdout:
        raise SpaError("recover: empty holdout")
    return feeds, holdout


def _session(model, threads):
    from spa.runtime import session

    return session(model, threads=threads, quiet=True)


def _float_outputs(student: OnnxModule, model) -> list[str]:
    types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    return [n for n in student.output_names if types.get(n) in FLOATS]


class _Teacher:
    """Teacher tensors by name: onnxruntime on the original model (extra graph outputs added for
    intermediate tensors on demand) or a frozen torch module on ``device``."""

    def __init__(self, model, kind, threads, device=torch.device("cpu")):
        self.model, self.kind, self.threads = model, kind, threads
        self.sessions = {}
        self.module = None
        if kind == "torch":
            self.module = _moved(from_onnx(model, verify=False), device)
            self.module.mimic_onnx = True
            self.module.eval()
            for p in self.module.parameters():
                p.requires_grad_(False)

    def run(self, feeds, names, tensors: bool = False) -> list:
        """The tensors ``names`` on ``feeds`` as arrays; ``tensors``: a torch teacher's stay torch
        tensors where it computed them (no copy to the host and back for the student's loss)."""
        names = list(names)
        if self.kind == "torch":
            with torch.no_grad():
                env = _forward_env(self.module, feeds)
            return [env[n] if tensors else env[n].detach().cpu().numpy() for n in names]
        key = tuple(names)
        if key not in self.sessions:
            self.sessions[key] = _session(_with_outputs(self.model, names), self.threads)
        sess = self.sessions[key]
        wanted = {i.name for i in sess.get_inputs()}
        return sess.run(names, {k: v for k, v in feeds.items() if k in wanted})


def _with_outputs(model, names):
    have = {o.name for o in model.graph.output}
    extra = [n for n in names if n not in have]
    if not extra:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in extra:
        copy.graph.output.append(onnx.ValueInfoProto(name=n))
    return copy


def _tensors(student, feeds):
    dtype, device = student.float_dtype(), _device_of(student)
    out = {}
    for name in student.input_names:
        if name in feeds:
            value = feeds[name]
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            out[name] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return out


def _within_memory(student: OnnxModule, feeds, say):
    """`feeds`, or their first inputs of each batch only where a training step on whole batches would take
    more than MEMORY_SHARE of the memory free (announced). A step's memory is measured on one and on two
    inputs of the first batch (`_forward_bytes`), their difference what each input adds: pipecat's int8
    smart-turn (a Whisper encoder on 80 x 800 mel frames) adds 0.5 GB an input at the end of its forward,
    and 16 of them a step were killed for memory on 23 GB; int8 MiniLM holds 0.1 GB whatever the batch
    (its weights fake-quantized), which per input would have cut 42 sequences of 6 tokens to 20."""
    first = feeds(0)
    sizes = {np.shape(v)[0] for v in first.values() if np.ndim(v)}
    free = _free_memory()
    if len(sizes) != 1 or free is None or (size := sizes.pop()) < 2:
        return feeds
    one, two = (_forward_bytes(student, {k: v[:n] if np.ndim(v) else v for k, v in first.items()}) for n in (1, 2))
    per_input = STEP_MEMORY * max(two - one, 1)  # what the weights alone hold (an int8 model's on its grid) aside
    fixed = STEP_MEMORY * max(2 * one - two, 0)
    fits = int((MEMORY_SHARE * free - fixed) // per_input)
    if fits >= size:
        return feeds
    fits = max(fits, 1)
    say(f"recover: a training step on {size} inputs would take about {(fixed + size * per_input) / 2**30:.1f} GB, "
        f"over {MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GB free: {fits} of each batch a step")
    return lambda step: {k: v[:fits] if np.ndim(v) else v for k, v in feeds(step).items()}


def _forward_bytes(module: OnnxModule, feeds) -> int:
    """Bytes alive at the end of one forward on `feeds`, parameters aside: every tensor the graph computed
    (the interpreter holds them all until it returns) and every one autograd keeps for the backward pass."""
    kept, own = {}, {p.untyped_storage().data_ptr() for p in module.parameters()}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        env = _forward_env(module, feeds)
    for value in env.values():
        if isinstance(value, torch.Tensor):
            keep(value)
    return sum(kept.values())


def _free_memory() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _forward_env(module: OnnxModule, feeds) -> dict:
    """Run the module and return every tensor by ONNX name (intermediates included)."""
    env = module.fill_constants(_tensors(module, feeds))
    device = _device_of(module)
    if device.type == "cpu":
        run_graph(module, module._nodes, env)
    else:
        with device:  # the tensors the ops create (shapes, fills, ranges) on the student's device too
            run_graph(module, module._nodes, env)
    return env


def _scales(teacher_outputs, names) -> dict:
    scales = {}
    for k, name in enumerate(names):
        values = np.concatenate([np.asarray(t[k], dtype=np.float64).ravel() for t in teacher_outputs])
        values = values[np.isfinite(values)]
        var = float(values.var()) if values.size else 0.0
        scales[name] = var if var > 1e-12 else max(float(np.mean(values ** 2)) if values.size else 0.0, 1e-12)
    return scales


def _holdout_loss(session, holdout, teacher_outputs, names, scales) -> float:
    wanted = {i.name for i in session.get_inputs()}
    total = 0.0
    for feeds, t_out in zip(holdout, teacher_outputs):
        got = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
        for name, g, t in zip(names, got, t_out):
            err = np.mean((np.asarray(g, np.float64) - np.asarray(t, np.float64)) ** 2)
            total += float(err) / scales[name]
    value = total / (len(holdout) * len(names))
    return value if math.isfinite(value) else float("inf")


def _shared_tensors(student, teacher, feeds, outputs) -> list[str]:
    """Intermediate float tensors present in both graphs with the same shape on ``feeds``."""
    with torch.no_grad():
        env = _forward_env(student, feeds)
    skip = set(outputs) | set(student.input_names) | set(student._consts) | set(student._stores)
    produced = [o for n in teacher.model.graph.node if n.op_type != "Constant" for o in n.output if o]
    candidates = [n for n in produced if n in env and n not in skip and isinstance(env[n], torch.Tensor)
                  and env[n].is_floating_point() and env[n].numel() > 1]
    if not candidates:
        return []
    try:
        values = teacher.run(feeds, candidates)
    except Exception:
        return []
    # (the student carries a quantized model's integer tensors as floats: only the teacher's floats match)
    return [n for n, v in zip(candidates, values) if np.issubdtype(v.dtype, np.floating)
            and tuple(v.shape) == tuple(env[n].shape) and np.all(np.isfinite(v))]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _trainable(student: OnnxModule, pruned: onnx.ModelProto, keep_zeros: bool, train_lookups: bool) -> dict:
    """The student's ONNX parameters to train; unless `train_lookups`, the lookup tables (2-D
    weights a Gather indexes, e.g. word embeddings) are frozen."""
    params = student.onnx_parameters()
    if not train_lookups:
        lookups = {n.input[0] for n in pruned.graph.node if n.op_type == "Gather" and n.input}
        dequantized = {n.output[0]: n.input[0] for n in pruned.graph.node if n.op_type == "DequantizeLinear"}
        lookups |= {dequantized[t] for t in lookups if t in dequantized}  # an int8 table read through its DQ
        for name in lookups & params.keys():
            if params[name].dim() == 2:
                params.pop(name).requires_grad_(False)
    if keep_zeros:
        _freeze_zeros(params.values())
    return params


def _freeze_zeros(params) -> None:
    """Zero gradients where a parameter is exactly zero: Adam (no weight decay) then never moves it."""
    for p in params:
        mask = p.detach() != 0
        if not bool(mask.all()):
            p.register_hook(lambda grad, mask=mask: grad * mask)


def _teacher_ahead(feeds, teacher, wanted, steps):
    """(batch, teacher tensors) for each step (without end for ``steps`` None); the next step's drawn
    and run in a background thread while the student trains on this one (onnxruntime and torch
    release the GIL; MiniLM, 2 vCPUs: 300 steps on fresh sentences 273 s instead of 291 s, 40 on
    cycled ones 32 s instead of 39 s)."""
    def fetch(step):
        batch = feeds(step)
        return batch, teacher.run(batch, wanted, tensors=True)

    def more(step):
        return steps is None or step < steps

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spa-teacher") as pool:
        ahead = pool.submit(fetch, 0) if more(0) else None
        step = 0
        while more(step):
            current = ahead.result()
            ahead = pool.submit(fetch, step + 1) if more(step + 1) else None
            yield current
            step += 1


def _adam(params, lr: float, weight_decay: float):
    """Adam (AdamW with weight decay), fused where torch has the kernel for these tensors: a few kernels a
    step instead of several per tensor (10.7M values in MiniLM's shapes on one CPU thread: 28-37 -> 8 ms a
    step, docs/recover.md); unfused where it has none."""
    params = list(params)
    kind, extra = (torch.optim.AdamW, {"weight_decay": weight_decay}) if weight_decay else (torch.optim.Adam, {})
    try:
        return kind(params, lr=lr, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):
        return kind(params, lr=lr, **extra)


def _train(student, teacher, feeds, steps, lr, names, shared, scales, match_weight, warmup, weight_decay,
           bn, params, deadline=None):
    """(steps run, step it diverged at or None). ``deadline`` (a time.perf_counter() value): train
    until then instead of for ``steps``, the schedule following the elapsed fraction of the time."""
    if bn == "frozen":
        student.mimic_onnx = True
        student.eval()
    else:
        student.mimic_onnx = False
        student.train()
    opt = _adam(params, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, warmup, deadline))
    wanted = list(names) + list(shared)
    inv = {n: 1.0 / scales[n] for n in wanted}
    timed = deadline is not None
    bar = progress_bar(_teacher_ahead(feeds, teacher, wanted, None if timed else steps), "recover",
                       total=None if timed else steps)
    running, diverged, ran = None, None, 0
    for step, (batch, targets) in enumerate(bar):
        if timed and time.perf_counter() >= deadline:
            break
        env = _forward_env(student, batch)
        loss = sum(_mse(env[name], targets[k]) * inv[name] for k, name in enumerate(names)) / len(names)
        if shared:
            extra = sum(_mse(env[name], targets[k]) * inv[name] for k, name in enumerate(shared, start=len(names)))
            loss = loss + match_weight * extra / len(shared)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ran = step + 1
        running = value if running is None else 0.9 * running + 0.1 * value
        left = {"left": f"{max(0.0, deadline - time.perf_counter()):.0f}s"} if timed else {}
        bar.set_postfix(loss=f"{running:.4g}", **left, refresh=False)
    bar.close()
    student.eval()
    student.mimic_onnx = True
    return ran, diverged


def _mse(tensor: torch.Tensor, target) -> torch.Tensor:
    """Mean squared error of a student tensor against the teacher's (one fused kernel each way)."""
    return torch.nn.functional.mse_loss(tensor, _like(target, tensor))


def _like(target, tensor: torch.Tensor) -> torch.Tensor:
    """A teacher's array or tensor as a tensor on ``tensor``'s device and dtype."""
    if not isinstance(target, torch.Tensor):
        target = torch.from_numpy(np.asarray(target))
    return target.to(tensor.device, tensor.dtype)


def _schedule(steps, warmup, deadline):
    """Adam's lr factor at a step: linear warm-up over the ``warmup`` fraction, then a cosine decay
    to zero, in steps, or in the fraction of the time until ``deadline`` when one is given."""
    if deadline is not None:
        begin = time.perf_counter()
        span = max(deadline - begin, 1e-9)

        def by_time(step):
            t = min(1.0, (time.perf_counter() - begin) / span)
            if t < warmup:
                return max(t, 1e-3) / warmup
            return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1 - warmup, 1e-9)))

        return by_time
    warm = max(0, min(steps - 1, int(round(warmup * steps))))

    def by_step(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        t = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * t))

    return by_step


# ----------------------------------------------------------------------------------------------
# write back
# ----------------------------------------------------------------------------------------------
def _write_back(pruned, student: OnnxModule, bn):
    """A copy of ``pruned`` with the student's trained values; returns (model, skipped names)."""
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    values = student.stored_values()
    if bn == "update":  # running statistics (not the private copies of shared ones)
        private = set(student._private_stats)
        for name, (path, kind) in student._stores.items():
            if kind == "buffer" and name not in private:
                values[name] = student.get_buffer(path).detach().cpu().numpy()
    skipped = []

    def fits(name, old, new):
        if tuple(old.shape) != tuple(new.shape):
            return None
        if not np.all(np.isfinite(new)):
            skipped.append(name)
            return None
        return np.asarray(new).astype(old.dtype)

    for tensor in model.graph.initializer:
        if tensor.name in values:
            old = numpy_helper.to_array(tensor)
            new = fits(tensor.name, old, values[tensor.name])
            if new is not None:
                _replace(tensor, new)
    for node in model.graph.node:
        if node.op_type != "Constant" or not node.output or node.output[0] not in values:
            continue
        name = node.output[0]
        for a in node.attribute:
            if a.name == "value":
                new = fits(name, numpy_helper.to_array(a.t), values[name])
                if new is not None:
                    _replace(a.t, new)
            elif a.name == "value_floats":
                old = np.array(list(a.floats), dtype=np.float32)
                new = fits(name, old, values[name])
                if new is not None:
                    del a.floats[:]
                    a.floats.extend(float(v) for v in new.ravel())
    return model, sorted(set(skipped))


def _replace(tensor: onnx.TensorProto, array: np.ndarray):
    fresh = numpy_helper.from_array(np.ascontiguousarray(array), tensor.name)
    fresh.doc_string = tensor.doc_string
    tensor.CopyFrom(fresh)


# ----------------------------------------------------------------------------------------------
# inputs from BatchNormalization statistics (ZeroQ-style "distilled data")
# ----------------------------------------------------------------------------------------------
def bn_inversion_batches(model: onnx.ModelProto, batches: int = 10, batch_size: int = 64,
                         iterations: int = 50, lr: float = 0.1, seed: int = 0, dims: dict | None = None,
                         progress=None) -> list:
    """``batches`` feeds of ``batch_size`` data-free inputs that the model itself says are typical:
    spa.calibration "synthetic" feeds optimised (``iterations`` Adam steps) until every inference
    BatchNormalization sees its running mean and std (ZeroQ / DeepInversion;
    :func:`spa.frontends.torch_synthesis.bn_inversion` does the optimisation).

    Measured (docs/recover.md): distilling on these instead of Gaussian inputs recovers an
    OBSPA-pruned digits ResNet to 0.99 test accuracy instead of 0.89; 50 iterations were as good
    as 200. Needs BatchNormalization nodes with running statistics (SpaError otherwise)."""
    from spa.calibration import calibration_batches

    from .torch_synthesis import bn_inversion

    model = as_model(model)
    start = [calibration_batches(model, "synthetic", batch_size, batch_size, seed=seed * 1_000_003 + b,
                                 dims=dims)[0] for b in range(batches)]
    return bn_inversion(model, start, steps=iterations, lr=lr, seed=seed, progress=progress)
