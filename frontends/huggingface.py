"""Hugging Face model directories (``save_pretrained`` folders: config.json + weights) in and out.

    spa analyze ./bert-dir
    spa prune ./bert-dir -o ./small-dir --ratio 0.3     # a directory from_pretrained reloads
    spa prune ./bert-dir -o small.onnx --ratio 0.3      # the pruned ONNX instead

In: the model is loaded with transformers from local files only (the class named in config.json's
``architectures``, else ``AutoModel``; float32), wrapped so that its inputs are ``input_ids``,
``attention_mask``, ``token_type_ids`` (those its forward takes; ``decoder_input_ids`` for
encoder-decoders; ``pixel_values`` for vision models) and its outputs are the tensor fields of its
output (``last_hidden_state``, ``pooler_output``, ``logits``, ...), and exported by
:func:`spa.frontends.torch.export` (TorchScript) with dynamic batch and sequence axes and the
weight map.

Out (:func:`save_pruned`): the pruned plan is applied to the transformers model with
``apply_plan`` (layers narrowed, head counts and config fields updated), the config's size
fields are fitted to the narrowed tensors (a config has ONE ``intermediate_size``, one head count
for every layer), the model is written with ``save_pretrained`` next to the target, reloaded with
``from_pretrained`` (no missing or size-mismatched tensors) and run against the pruned ONNX in
onnxruntime; only then is it moved into place, with the source's other top-level files (tokenizer,
generation config, README) copied. What a config cannot express is refused before anything is
written, with what to change (see :func:`head_pruning_reloads` and :func:`fit_config`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import math
import os
import shutil
import warnings

from spa.errors import SpaError
from spa.paths import staging_folder

CONFIG = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".gguf",
                   ".safetensors.index.json", ".bin.index.json")
# config fields holding one width for every layer, fitted to the narrowed tensors
MLP_KEYS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "d_ff",
            "ffn_hidden_size")
WIDTH_KEYS = MLP_KEYS + ("hidden_size", "n_embd", "d_model")
HEAD_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim")
BATCH, SEQ, DECODER_SEQ = 2, 7, 5

__all__ = ["is_pretrained_dir", "load", "export_dir", "to_onnx", "save_pruned", "head_pruning_reloads",
           "fit_config"]

_LOADED: dict = {}  # abspath -> model loaded by to_onnx, reused by save_pruned (one CLI run)


def is_pretrained_dir(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise SpaError(f"reading a Hugging Face directory needs transformers (pip install transformers): "
                       f"{exc}") from None
    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    return transformers


def _first_line(exc) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _read_config(path) -> dict:
    if not os.path.isdir(path):
        raise SpaError(f"{path} is not a directory")
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise SpaError(f"{path} has no {CONFIG}: not a Hugging Face save_pretrained directory")
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise SpaError(f"{file} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise SpaError(f"{file} is not a JSON object")
    return data


def load_config(path):
    data = _read_config(path)
    hf = _transformers()
    try:
        with _silent():
            return hf.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        kind = data.get("model_type")
        raise SpaError(f"{path}/{CONFIG} (model_type {kind!r}) is not a config transformers "
                       f"{hf.__version__} can read: {_first_line(exc)}") from None


def model_class(config):
    """The class config.json names in ``architectures`` (when transformers has it), else AutoModel."""
    hf = _transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(hf, name, None)
        if isinstance(cls, type):
            return cls
    return hf.AutoModel


def load(path):
    """The model of a save_pretrained directory, float32, eval mode (local files only)."""
    import torch

    config = load_config(path)
    cls = model_class(config)
    try:
        with _silent():
            model = cls.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32,
                                        trust_remote_code=False)
    except Exception as exc:
        raise SpaError(f"cannot load {path} with transformers ({getattr(cls, '__name__', cls)}): "
                       f"{_first_line(exc)}") from None
    return model.eval()


@contextlib.contextmanager
def _silent():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


# ------------------------------------------------------------------------------------------------
# inputs, wrapper, export
# ------------------------------------------------------------------------------------------------
def _wrapper_class():
    import torch.nn as nn

    class PretrainedWrapper(nn.Module):
        """Positional tensors in (``names``), the tensor fields of the model's output out."""

        def __init__(self, model, names, extra):
            super().__init__()
            self.model, self.names, self.extra = model, tuple(names), dict(extra)

        def forward(self, *args):
            import torch

            out = self.model(**dict(zip(self.names, args)), **self.extra, return_dict=True)
            return tuple(v for v in out.values() if isinstance(v, torch.Tensor))

        def fields(self, *args):
            import torch

            with torch.no_grad():
                out = self.model(**dict(zip(self.names, args)), **self.extra, return_dict=True)
            return [k for k, v in out.items() if isinstance(v, torch.Tensor)]

    return PretrainedWrapper


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def input_spec(model) -> dict:
    """{input name: {axis: label}} of the inputs spa feeds the model."""
    params = inspect.signature(model.forward).parameters
    config = model.config
    if "input_ids" in params:
        names = ["input_ids"] + [n for n in ("attention_mask", "token_type_ids") if n in params]
        spec = {n: {0: "batch", 1: "sequence"} for n in names}
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            spec["decoder_input_ids"] = {0: "batch", 1: "decoder_sequence"}
        return spec
    if "pixel_values" in params:
        return {"pixel_values": {0: "batch"}}
    raise SpaError(f"{type(model).__name__} takes neither input_ids nor pixel_values: spa cannot tell its "
                   f"inputs; export it with spa.frontends.torch.export and prune the ONNX")


def example_inputs(model, spec, batch=BATCH, seq=SEQ, seed=0):
    """Random inputs in spec order: token ids below the vocabulary size, the last row's attention
    mask right-padded (so tracing keeps the mask), token types below type_vocab_size."""
    import torch

    config = _text_config(model.config)
    g = torch.Generator().manual_seed(seed)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and limit > 2:
        seq = min(seq, limit - 2)
    out = []
    for name in spec:
        length = DECODER_SEQ if name == "decoder_input_ids" else seq
        if name in ("input_ids", "decoder_input_ids"):
            vocab = getattr(config, "vocab_size", None) or 100
            out.append(torch.randint(0, vocab, (batch, length), generator=g))
        elif name == "attention_mask":
            mask = torch.ones(batch, length, dtype=torch.int64)
            if batch > 1 and length > 2:
                mask[-1, length - max(1, length // 3):] = 0
            out.append(mask)
        elif name == "token_type_ids":
            types = getattr(config, "type_vocab_size", None) or 1
            out.append(torch.randint(0, types, (batch, length), generator=g))
        elif name == "pixel_values":
            vision = getattr(model.config, "vision_config", None) or model.config
            size = getattr(vision, "image_size", 224)
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            out.append(torch.randn((batch, getattr(vision, "num_channels", 3)) + size, generator=g))
    return tuple(out)


def wrap(model):
    """(wrapper module, input spec) for export and apply_plan."""
    spec = input_spec(model)
    params = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in params else {}
    return _wrapper_class()(model, list(spec), extra).eval(), spec


def _output_axes(out, args, spec) -> dict:
    """Batch on axis 0; axis 1 is a sequence when its size is an input's (7 or 5: no other size)."""
    seqs = {a.shape[1]: spec[n][1] for n, a in zip(spec, args) if 1 in spec[n]}
    dims = {0: "batch"} if out.dim() else {}
    if out.dim() >= 2 and out.shape[1] in seqs:
        dims[1] = seqs[out.shape[1]]
    return dims


@contextlib.contextmanager
def _torchscript_patches():
    """transformers code paths the TorchScript exporter cannot translate, swapped for numerically
    identical ones while exporting (as models/transformers.py does for the tests): packed-sequence
    detection (torch.diff; discarded for plain positions) and SDPA's enable_gqa (HF repeats the KV
    heads itself instead)."""
    import importlib

    patches = (("transformers.masking_utils", "find_packed_sequence_indices", lambda position_ids: None),
               ("transformers.integrations.sdpa_attention", "use_gqa_in_sdpa", lambda *a, **k: False))
    saved = []
    for module_name, attr, value in patches:
        try:
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        except Exception:
            continue
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def export_dir(path, out_path, model=None):
    """Export the model of directory ``path`` to ONNX at ``out_path`` (weight map included);
    returns spa.frontends.torch.Exported."""
    import torch

    from .torch_export import export

    model = load(path) if model is None else model
    wrapper, spec = wrap(model)
    args = example_inputs(model, spec)
    try:
        with torch.no_grad(), _silent():
            outputs = wrapper(*args)
            fields = wrapper.fields(*args)
    except Exception as exc:
        raise SpaError(f"{type(model).__name__} does not run on {', '.join(spec)}: {_first_line(exc)}") from None
    dynamic = dict(spec)
    for name, out in zip(fields, outputs):
        dynamic[name] = _output_axes(out, args, spec)
    with _torchscript_patches(), _silent():
        return export(wrapper, args, out_path, exporter="torchscript", input_names=list(spec),
                      output_names=fields, dynamic_axes=dynamic)


def to_onnx(path: str, out_path: str) -> str:
    """``spa prune ./hf-dir``: the directory's model as ONNX at ``out_path``."""
    model = load(path)
    export_dir(path, out_path, model)
    _LOADED[os.path.abspath(path)] = model
    return out_path


# ------------------------------------------------------------------------------------------------
# what a config can express
# ------------------------------------------------------------------------------------------------
def _rebuilt(config):
    """The config as from_pretrained would read it back (its validation included)."""
    return type(config).from_dict(config.to_dict())


def _meta_shapes(cls, config) -> dict:
    import torch

    with torch.device("meta"), _silent():
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _param_count(cls, config) -> int:
    return sum(math.prod(s) for s in _meta_shapes(cls, config).values())


def head_pruning_reloads(path) -> tuple[bool, str]:
    """Whether a config of this directory's architecture can say "fewer attention heads": LLaMA,
    Mistral, Qwen and T5 keep the head size in the config, ViT reads a ``head_dim`` when the config
    has one (then it is written); BERT, GPT-2 and BART derive it from hidden_size / heads, so fewer
    heads means the same width. Tried on the meta device with a head count dividing hidden_size."""
    config = load_config(path)
    cls = model_class(config)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or heads < 2:
        return False, f"{type(config).__name__} has no head count to lower"
    kv = getattr(config, "num_key_value_heads", None)
    group = heads // kv if isinstance(kv, int) and 0 < kv < heads and heads % kv == 0 else 1
    head_size = _head_size(config)
    try:
        base = _param_count(cls, config)
    except Exception as exc:
        return False, f"cannot build {cls.__name__} from its config ({_first_line(exc)})"
    for units in range(heads // group - 1, 0, -1):
        if isinstance(hidden, int) and hidden % (units * group):
            continue  # models deriving the head size would round it: no evidence either way
        probe = copy.deepcopy(config)
        try:
            probe.num_attention_heads = units * group
            if group > 1:
                probe.num_key_value_heads = units
            if head_size:
                probe.head_dim = head_size
            count = _param_count(cls, _rebuilt(probe))
        except Exception:
            continue
        if count < base:
            return True, ""
        break
    return False, (f"{type(config).__name__} derives the head size from hidden_size / num_attention_heads, "
                   f"so a config cannot describe pruned heads")


def _head_size(config):
    value = getattr(config, "head_dim", None)
    if isinstance(value, int):
        return value
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return hidden // heads if isinstance(heads, int) and isinstance(hidden, int) and heads else None


def fit_config(model) -> None:
    """Set the config's width fields (intermediate_size, ...) to what the narrowed tensors say, so
    that ``type(model)(config)`` builds exactly their shapes; SpaError (nothing written) when no
    config can, with what to change."""
    cls, config = type(model), model.config
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def mismatches(cfg):
        expected = _meta_shapes(cls, _rebuilt(cfg))
        keys = set(actual) | set(expected)
        return [(k, expected.get(k), actual.get(k)) for k in sorted(keys) if expected.get(k) != actual.get(k)]

    try:
        wrong = mismatches(config)
    except Exception as exc:
        raise SpaError(f"{type(config).__name__} refuses the pruned sizes ({_first_line(exc)})"
                       f"{_head_hint(config)}; write ONNX instead (-o small.onnx)") from None
    sizes = {getattr(m, a) for m in model.modules() for a in ("head_dim", "attention_head_size")
             if isinstance(getattr(m, a, None), int)}
    if wrong and len(sizes) == 1 and getattr(config, "head_dim", None) != next(iter(sizes)):
        trial = copy.deepcopy(config)  # e.g. ViT reads config.head_dim when there is one
        trial.head_dim = next(iter(sizes))
        with contextlib.suppress(Exception):
            now = mismatches(trial)
            if len(now) < len(wrong):
                config.head_dim, wrong = trial.head_dim, now
    widths: dict = {}  # MLP key -> the widths its tensors have now (more than one: layers differ)
    original = {key: getattr(config, key, None) for key in WIDTH_KEYS}
    progress = True
    while wrong and progress:
        progress = False
        for key in WIDTH_KEYS:
            value = getattr(config, key, None)
            if value is None and key == "n_inner" and isinstance(getattr(config, "n_embd", None), int):
                value = 4 * config.n_embd  # GPT-2's default
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            proposals = _sizes_at(wrong, value)
            for proposal in sorted(proposals):
                trial = copy.deepcopy(config)
                setattr(trial, key, proposal)
                try:
                    now = mismatches(trial)
                except Exception:
                    continue
                if key in MLP_KEYS and value == original[key]:  # what the trial breaks: other layers' widths
                    broken = [m for m in now if m[0] not in {w[0] for w in wrong}]
                    widths.setdefault(key, set()).update(proposals | _sizes_at(broken, proposal))
                if len(now) < len(wrong):
                    setattr(config, key, proposal)
                    wrong, progress = now, True
                    break
    if not wrong:
        return
    name, expected, got = wrong[0]
    what = (f"'{name}' is {list(got) if got else 'missing'} but {type(config).__name__} builds "
            f"{list(expected) if expected else 'no such tensor'}")
    differ = [(key, sorted(values)) for key, values in widths.items() if len(values) > 1]
    if differ:
        key, values = differ[0]
        raise SpaError(f"cannot write a Hugging Face directory: layers were pruned to different widths "
                       f"({key} {values}) and {type(config).__name__} has one {key} for every layer ({what}); "
                       f"prune uniformly (--ratio without --global/--ratio-for, --allocation uniform) or write "
                       f"ONNX (-o small.onnx)")
    if any(_is_attention(n) for n, _, _ in wrong):
        raise SpaError(f"cannot write a Hugging Face directory: the pruned attention heads do not fit "
                       f"{type(config).__name__} ({what}; layers with different head counts, or a head size "
                       f"derived from hidden_size / num_attention_heads); prune with --granularity channels or "
                       f"write ONNX (-o small.onnx)")
    raise SpaError(f"cannot write a Hugging Face directory: {type(config).__name__} cannot express the pruned "
                   f"shapes ({what}); write ONNX instead (-o small.onnx)")


def _sizes_at(mismatched, value) -> set:
    """The sizes the tensors have where the config builds ``value``."""
    return {a[i] for _, e, a in mismatched if e and a and len(e) == len(a)
            for i in range(len(e)) if e[i] == value and a[i] != value}


def _is_attention(name) -> bool:
    return any(k in name for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", ".query",
                                   ".key", ".value", "c_attn", "SelfAttention", "EncDecAttention"))


def _head_hint(config) -> str:
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int):
        return ""
    kv = getattr(config, "num_key_value_heads", None)
    group = max(1, heads // kv) if isinstance(kv, int) and kv > 0 else 1
    return "" if hidden % heads == 0 else (
        f": {heads} heads do not divide hidden_size {hidden}" if group == 1 else
        f": {heads} heads ({heads // group} KV heads) do not divide hidden_size {hidden}")


# ------------------------------------------------------------------------------------------------
# pruned ONNX -> transformers -> save_pretrained
# ------------------------------------------------------------------------------------------------
def check_output(source, output, overwrite=False) -> None:
    """Refuse before pruning what could not be written."""
    if os.path.abspath(source) == os.path.abspath(output) and not overwrite:
        raise SpaError("refusing to overwrite the input model directory (pass --overwrite)")
    if os.path.exists(output) and not os.path.isdir(output):
        raise SpaError(f"{output} exists and is not a directory (a Hugging Face model is written as a directory; "
                       f"name the output .onnx for an ONNX file)")
    if os.path.isdir(output) and os.listdir(output) and not overwrite and \
            os.path.abspath(source) != os.path.abspath(output):
        raise SpaError(f"{output} is a non-empty directory (pass --overwrite to write into it)")


def _apply(wrapper, plan, pruned_onnx, weight_map, spec, inputs):
    """apply_plan with keywords both of its signatures take; its warnings collected."""
    import onnx

    from .torch_apply import apply_plan

    graph = onnx.load(str(pruned_onnx), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    given = dict(zip(spec, inputs))  # in graph order, without inputs the exporter dropped as unused
    inputs = tuple(given[i.name] for i in graph.input if i.name not in initializers and i.name in given)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            apply_plan(wrapper, plan, pruned=str(pruned_onnx), weight_map=weight_map, example_inputs=inputs,
                       verify=True)
        except SpaError as exc:
            raise SpaError(f"the transformers model does not follow the pruned ONNX: {exc}") from None
    return [str(w.message) for w in caught if "apply_plan" in str(w.message)]


def _run_onnx(path, names, inputs):
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    known = {i.name for i in session.get_inputs()}
    feeds = {n: np.ascontiguousarray(x.numpy()) for n, x in zip(names, inputs) if n in known}
    return session.run(None, feeds)


def _compare(got, want, rtol) -> float:
    import numpy as np

    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        if g.shape != w.shape:
            raise SpaError(f"the reloaded model's output has shape {list(g.shape)}, the pruned ONNX {list(w.shape)}")
        scale = max(float(np.abs(w).max()), 1e-6) if w.size else 1.0
        worst = max(worst, float(np.abs(g - w).max()) / scale if w.size else 0.0)
    if worst > rtol:
        raise SpaError(f"the reloaded model differs from the pruned ONNX by {worst:.3g} (relative; "
                       f"tolerance {rtol:g})")
    return worst


def _copy_side_files(source, target):
    written = set(os.listdir(target))
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name in written or name.startswith(".") or not os.path.isfile(path) or name == CONFIG or \
                name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(path, os.path.join(target, name))
        copied.append(name)
    return copied


def _move_into(tmp, output):
    os.makedirs(output, exist_ok=True)
    for name in os.listdir(output):  # stale weights would be read instead of (or with) the new ones
        path = os.path.join(output, name)
        if os.path.isfile(path) and name.endswith(WEIGHT_SUFFIXES):
            os.remove(path)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output, name))


def _dtype_of(source_config):
    import torch

    value = source_config.get("dtype") or source_config.get("torch_dtype")
    dtype = getattr(torch, str(value).replace("torch.", ""), None) if value else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def save_pruned(source, pruned_onnx, plan, output, *, weight_map=None, overwrite=False, say=None) -> dict:
    """Bring the pruned ONNX (its plan) back into the transformers model of directory ``source`` and
    write it to directory ``output`` with save_pretrained, verified by reloading it and running both.
    Returns {"max_error", "copied", "config"} (config: the changed fields, old -> new)."""
    import torch

    say = say or (lambda message: None)
    check_output(source, output, overwrite)
    source_config = _read_config(source)
    model = _LOADED.pop(os.path.abspath(source), None) or load(source)
    wrapper, spec = wrap(model)
    inputs = example_inputs(model, spec, batch=3, seq=SEQ + 2, seed=1)  # other sizes than the export's
    before = model.config.to_dict()
    say("narrowing the transformers model to the plan")
    notes = _apply(wrapper, plan, pruned_onnx, weight_map, spec, inputs)
    fit_config(model)
    after = model.config.to_dict()
    changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v and not k.startswith("_")}
    dtype = _dtype_of(source_config)
    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    with staging_folder(output) as tmp:
        if dtype != torch.float32:
            model.to(dtype)
        with _silent():
            model.save_pretrained(tmp)
        copied = _copy_side_files(source, tmp)
        say(f"reloading {output} with {type(model).__name__}.from_pretrained and checking it against the pruned ONNX")
        error = _verify_reload(tmp, type(model), pruned_onnx, spec, inputs, dtype)
        _move_into(tmp, output)
    return {"max_error": error, "copied": copied, "config": changed, "notes": notes}


def _verify_reload(directory, cls, pruned_onnx, spec, inputs, dtype) -> float:
    import torch

    try:
        with _silent():
            model, info = cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                              output_loading_info=True)
    except Exception as exc:
        raise SpaError(f"the written model does not reload: {_first_line(exc)}") from None
    bad = {k: v for k, v in (info or {}).items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
           and v}
    if bad:
        key, values = next(iter(bad.items()))
        raise SpaError(f"the written model does not reload cleanly: {key.replace('_', ' ')} "
                       f"{', '.join(str(v) for v in list(values)[:3])}")
    wrapper, _ = wrap(model.eval())
    with torch.no_grad(), _silent():
        got = [t.numpy() for t in wrapper(*inputs)]
    want = _run_onnx(pruned_onnx, list(spec), inputs)
    return _compare(got, want, 1e-4 if dtype == torch.float32 else 5e-2)
