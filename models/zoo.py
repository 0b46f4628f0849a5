"""Model registry, deterministic construction and ONNX export for tests and benchmarks.

Public API
----------
ZOO: dict[str, ZooEntry]                 name -> entry (tiny default config + example shapes)
build(name, *, seed=0, full=False, randomize=True, input_shapes=None, **kw) -> nn.Module
example_inputs(name_or_module, batch=2, seed=0, full=False) -> tuple[torch.Tensor, ...]
export(name_or_module, path, exporter="torchscript", mode="eval", example_inputs=None,
       opset=None, *, fold_constants=True) -> str
cached_export(name, exporter="torchscript", mode="eval", cache_dir=None, opset=None) -> str
torch_reference(model, inputs, exporter="torchscript", mode="eval") -> list[np.ndarray]
verify_export(path, model, exporter="torchscript", mode="eval", batches=(1, 3), atol=1e-4,
              seed=1, full_check=True) -> dict
bn_count(path) -> int

Export modes
------------
``"eval"``     model.eval(); constant folding on, so the exporters fold BatchNormalization into
               the preceding Conv/Gemm where they can (torchscript: Conv+BN fusion in its eval
               peephole; dynamo: onnxscript's ``fuse_batchnorm`` rewrite). Pre-activation BNs
               (DenseNet, BN right after a Concat/Add) stay as BatchNormalization.
``"train"``    BatchNormalization nodes are kept (every BN module -> one BN node).
               * torchscript: model.train(), ``training=TrainingMode.TRAINING`` (constant
                 folding stays on: it never fuses BN in training mode, and it keeps weights as
                 plain initializers). The BN nodes carry ``training_mode=1``, ``momentum`` 0.9
                 and three outputs (Y, running_mean, running_var; the last two dangle).
                 onnxruntime's InferenceSession runs them with *batch statistics*, matching
                 torch in train mode (max err ~1e-6). The output of one sample therefore
                 depends on the rest of the batch, exactly as in torch. (Tracing updates the
                 running stats of the copy being exported; the model's original running stats
                 are written back into the file.)
               * dynamo: the torchlib lowering of ``_native_batch_norm_legit*`` hard-codes
                 ``training = False`` (onnxscript, "ORT only supports training mode with opset <
                 14"), so a true training-mode BN cannot be produced. We export model.eval()
                 with ``optimize=False`` and then run onnxscript's optimizer *without* its
                 ``fuse_batchnorm`` rule: BN nodes are kept with ``training_mode=0`` (running
                 statistics), i.e. eval semantics with BN unfused.
               Use :func:`torch_reference` to get the torch output matching a given
               (exporter, mode).
``"eval_bn"``  eval semantics with BN kept unfused (``training_mode=0``) for both exporters
               (torchscript: model.eval() + ``TrainingMode.PRESERVE`` with constant folding;
               dynamo: same as "train"). Deterministic and batch-independent, handy for exact
               pruning checks.

Every export has a dynamic batch axis on every input and output, input names ``input`` (or
``input0``, ``input1``, ..) and output names ``output`` (or ``output0``, ..). Example inputs
with batch 1 are repeated to batch 2 before tracing (avoids 0/1 specialisation). Files are
self-contained (no external data).
"""
from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from spa.frontends.torch_export import _cached_torchlib_registry, _io_names, _optimize_keep_bn, _quiet

from . import cnn

__all__ = ["ZooEntry", "ZOO", "build", "example_inputs", "export", "cached_export",
           "torch_reference", "verify_export", "bn_count", "EXPORTERS", "MODES"]

EXPORTERS = ("torchscript", "dynamo")
MODES = ("eval", "train", "eval_bn")


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    builder(**kwargs) builds the tiny test config; builder(**full_kwargs) the full-size one.
    input_shapes: example input shapes *including* the batch axis (batch 2) for the tiny config;
    full_input_shapes for the full one. num_outputs: length of the tuple forward returns (1 =
    a plain tensor).
    """

    name: str
    builder: Callable[..., nn.Module]
    kwargs: dict = field(default_factory=dict)
    input_shapes: tuple = ((2, 3, 32, 32),)
    full_kwargs: dict | None = None
    full_input_shapes: tuple | None = None
    num_outputs: int = 1
    description: str = ""

    def shapes(self, full: bool = False) -> tuple:
        if full:
            return self.full_input_shapes or self.input_shapes
        return self.input_shapes


_IMG224 = ((2, 3, 224, 224),)

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("vgg", cnn.VGG,
             dict(cfg=(8, "M", 16, "M", 16), hidden=16, num_classes=10, spatial=4),
             ((2, 3, 16, 16),),
             dict(cfg=cnn.VGG_CFGS["vgg11"], pool_to=7, hidden=4096, num_classes=1000),
             _IMG224, description="plain VGG, BN, max-pools, Flatten of a 4x4 map + MLP"),
    ZooEntry("resnet18", cnn.resnet18,
             dict(width=8, layers=(2, 1, 1, 1), num_classes=10, stem="cifar"),
             ((2, 3, 16, 16),), dict(), _IMG224,
             description="ResNet-18 (BasicBlock); tiny: cifar stem, 2 identity blocks in stage 1"),
    ZooEntry("resnet50", cnn.resnet50,
             dict(width=4, layers=(1, 1, 1, 1), num_classes=10, stem="imagenet"),
             ((2, 3, 64, 64),), dict(), _IMG224,
             description="ResNet-50 (Bottleneck, 7x7 stem + max-pool); full = torchvision"),
    ZooEntry("mobilenetv2", cnn.mobilenet_v2,
             dict(width_mult=1.0, setting=((1, 8, 1, 1), (4, 8, 2, 1), (4, 16, 2, 2)),
                  first_channel=8, last_channel=32, num_classes=10),
             ((2, 3, 16, 16),), dict(), _IMG224,
             description="MobileNetV2: depthwise, inverted residual, ReLU6 (Clip)"),
    ZooEntry("efficientnet", cnn.efficientnet_b0,
             dict(setting=((1, 3, 1, 8, 1), (4, 3, 2, 16, 2), (4, 5, 1, 16, 1)), stem=8,
                  head=32, num_classes=10),
             ((2, 3, 16, 16),), dict(), _IMG224,
             description="EfficientNet-B0 layout: MBConv + squeeze-excite Mul, SiLU"),
    ZooEntry("densenet", cnn.DenseNet,
             dict(growth=4, block_config=(3, 2), init_features=8, bn_size=2, num_classes=10,
                  stem="cifar"),
             ((2, 3, 16, 16),),
             dict(growth=32, block_config=(6, 12, 24, 16), init_features=64, bn_size=4),
             _IMG224, description="DenseNet: concat chains, pre-activation BN, transitions"),
    ZooEntry("inception", cnn.InceptionNet, dict(width=4, num_classes=10, n_blocks=2),
             ((2, 3, 16, 16),), dict(width=64, num_classes=1000, n_blocks=4), _IMG224,
             description="Inception: 4 parallel branches (1x3/3x1 too) concatenated, "
                         "reduction block concatenating a max-pooled pass-through"),
    ZooEntry("shufflenetv2", cnn.ShuffleNetV2,
             dict(stages_repeats=(2, 2, 1), stages_out_channels=(8, 16, 32, 64, 64),
                  num_classes=10, maxpool=False),
             ((2, 3, 32, 32),), dict(), _IMG224,
             description="ShuffleNetV2: chunk channel split, view-transpose-view shuffle"),
    ZooEntry("resnext", cnn.resnext50_32x4d,
             dict(width=8, layers=(1, 1, 1, 1), groups=4, width_per_group=32, num_classes=10,
                  stem="cifar"),
             ((2, 3, 16, 16),), dict(), _IMG224,
             description="ResNeXt: Bottleneck with grouped 3x3 conv (4 groups x 4 channels)"),
    ZooEntry("regnet", cnn.RegNet,
             dict(widths=(8, 16, 32), depths=(1, 2, 1), group_width=4, stem=8,
                  num_classes=10),
             ((2, 3, 32, 32),), dict(), _IMG224,
             description="RegNetY-style: grouped 3x3 + SE with ReLU; full = RegNetY-400MF"),
    ZooEntry("unet", cnn.UNet, dict(in_ch=3, num_classes=2, base=4, depth=3),
             ((2, 3, 16, 16),), dict(in_ch=3, num_classes=2, base=64, depth=4),
             ((2, 3, 256, 256),),
             description="UNet: skip concat, ConvTranspose, bilinear and nearest Resize"),
    ZooEntry("convnext", cnn.ConvNeXt, dict(dims=(8, 16, 32), depths=(1, 2, 1),
                                            num_classes=10),
             ((2, 3, 32, 32),), dict(), _IMG224,
             description="ConvNeXt: dw7x7, channels-last LayerNorm + Linear MLP + GELU, "
                         "layer-scale gamma on the last axis; no BatchNorm"),
    ZooEntry("yolo", cnn.YOLO, dict(width=4, depth=(1, 1, 1, 1), num_outputs=6, n_outputs=3,
                                       head_conv=False),
             ((2, 3, 64, 64),), dict(width=16, depth=1, num_outputs=84, n_outputs=3),
             ((2, 3, 640, 640),), num_outputs=3,
             description="YOLOv8-style: C2f (split/add/concat), SPPF max-pools, upsample+concat "
                         "PAN neck, 3 outputs (strides 8/16/32)"),
    ZooEntry("yolo11", cnn.YOLO, dict(width=4, depth=(1, 1, 1, 1), num_outputs=6, n_outputs=3,
                                         head_conv=False, psa_heads=2),
             ((2, 3, 64, 64),), dict(width=16, depth=1, num_outputs=84, n_outputs=3, psa_heads=2),
             ((2, 3, 640, 640),), num_outputs=3,
             description="YOLO11-style: the YOLOv8 layout with a C2PSA attention block after the SPPF "
                         "(packed q/k/v conv viewed per head, the merge's channel count read off the input)"),
    ZooEntry("conv1d", cnn.Conv1dNet, dict(in_ch=1, width=8, num_classes=10, hidden=16),
             ((2, 1, 40),), dict(in_ch=1, width=64, num_classes=10, hidden=256),
             ((2, 1, 40),),
             description="1-D conv net (mnist1d-shaped input): Conv1d, BN1d, Max/AvgPool1d, "
                         "residual add, Linear"),
]}


# ----------------------------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------------------------
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _as_tuple(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


@torch.no_grad()
def randomize_(model: nn.Module, inputs: Sequence[torch.Tensor] | None) -> nn.Module:
    """Give every norm layer non-trivial parameters (in place, uses torch's global RNG).

    BN / LayerNorm affine weight ~ U(0.5, 1.5), bias ~ U(-0.3, 0.3); any parameter named
    ``gamma`` (layer scale) ~ U(0.2, 1.0). BN running stats are then calibrated with one
    train-mode pass over ``inputs`` (so activations stay O(1) through deep nets) and perturbed
    (mean += 0.2*std*N(0,1), var *= U(0.6, 1.6)) so they differ from any batch's statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
    for m in model.modules():
        if isinstance(m, _BN_TYPES + (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.3, 0.3)
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "gamma":
            p.uniform_(0.2, 1.0)
    if bns and inputs is not None:
        was_training = model.training
        moms = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        model(*inputs)
        for m, mom in zip(bns, moms):
            m.momentum = mom
            m.num_batches_tracked.zero_()
        model.train(was_training)
    for m in bns:
        std = m.running_var.clamp_min(1e-6).sqrt()
        m.running_mean.add_(0.2 * std * torch.randn_like(std))
        m.running_var.mul_(torch.empty_like(std).uniform_(0.6, 1.6))
    return model


def build(name: str, *, seed: int = 0, full: bool = False, randomize: bool = True,
          input_shapes: Sequence[Sequence[int]] | None = None, **kw) -> nn.Module:
    """Build zoo model ``name`` (tiny config unless ``full``), overriding config with ``kw``.

    Deterministic: ``torch.manual_seed(seed)`` before construction and randomisation. The model
    is returned in eval mode with ``model.zoo_name`` and ``model.zoo_input_shapes`` set (the
    latter is used by :func:`export` / :func:`example_inputs` when no inputs are given; pass
    ``input_shapes`` when ``kw`` changes the input channels / size).
    """
    entry = ZOO[name]
    cfg = dict(entry.full_kwargs if full and entry.full_kwargs is not None else entry.kwargs)
    cfg.update(kw)
    shapes = tuple(tuple(s) for s in (input_shapes or entry.shapes(full)))
    torch.manual_seed(seed)
    model = entry.builder(**cfg)
    if randomize:
        calib_batch = 8 if not full else 4
        calib = tuple(torch.randn((calib_batch,) + s[1:]) for s in shapes)
        randomize_(model, calib)
    model.eval()
    model.zoo_name = name
    model.zoo_input_shapes = shapes
    return model


def example_inputs(name_or_module: str | nn.Module, batch: int = 2, seed: int = 0,
                   full: bool = False) -> tuple[torch.Tensor, ...]:
    """Random N(0,1) inputs (deterministic in ``seed``) for a zoo name or a built model."""
    if isinstance(name_or_module, str):
        shapes = ZOO[name_or_module].shapes(full)
    else:
        shapes = getattr(name_or_module, "zoo_input_shapes", None)
        if shapes is None:
            raise ValueError("module has no zoo_input_shapes: pass example inputs explicitly")
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch,) + tuple(s[1:]), generator=g) for s in shapes)


_make_inputs = example_inputs  # export() has a parameter of the same name


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def _export_torchscript(model, args, path, in_names, out_names, mode, opset, fold):
    if mode == "train":
        model.train()
        training = torch.onnx.TrainingMode.TRAINING
    else:
        model.eval()
        # PRESERVE on an eval model keeps BN nodes even with constant folding on; EVAL + folding
        # fuses Conv+BN.
        training = torch.onnx.TrainingMode.EVAL if mode == "eval" else \
            torch.onnx.TrainingMode.PRESERVE
    dyn = {n: {0: "batch"} for n in in_names + out_names}
    kw = {} if opset is None else {"opset_version": opset}
    stats = {k: v.detach().clone() for k, v in model.state_dict().items()
             if k.endswith(("running_mean", "running_var"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, input_names=in_names,
                          output_names=out_names, dynamic_axes=dyn, training=training,
                          do_constant_folding=fold, **kw)
    if mode == "train" and stats:
        _restore_running_stats(path, stats)


def _restore_running_stats(path, stats: dict) -> None:
    """Tracing a train-mode model runs its forward, which updates the BN running statistics
    before they are captured: put the model's original values back into the file (matched by
    initializer name, which the torchscript exporter takes from the state_dict)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for name in node.input[3:5]:
            if name in inits and name in stats:
                inits[name].CopyFrom(numpy_helper.from_array(stats[name].numpy(), name))
    onnx.save(proto, str(path))


def _export_dynamo(model, args, path, in_names, out_names, mode, opset, fold):
    model.eval()  # see module docstring: dynamo cannot emit training-mode BN anyway
    batch = torch.export.Dim("batch")
    dyn = tuple({0: batch} for _ in args)
    kw = {} if opset is None else {"opset_version": opset}
    with _cached_torchlib_registry():
        prog = torch.onnx.export(model, args, dynamo=True, input_names=in_names,
                                 output_names=out_names, dynamic_shapes=dyn,
                                 optimize=fold and mode == "eval", verbose=False, **kw)
    if fold and mode != "eval":
        _optimize_keep_bn(prog.model)
    prog.save(str(path), external_data=False)


def export(name_or_module: str | nn.Module, path: str | os.PathLike,
           exporter: str = "torchscript", mode: str = "eval",
           example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
           opset: int | None = None, *, fold_constants: bool = True) -> str:
    """Export a zoo model (by name: tiny config, seed 0) or any module to ONNX at ``path``.

    ``exporter``: "torchscript" (``torch.onnx.export(dynamo=False)``) or "dynamo"
    (``torch.export`` + onnxscript). ``mode``: "eval", "train" or "eval_bn" (see module doc).
    ``fold_constants=False`` gives the raw exporter graph (torchscript
    ``do_constant_folding=False``; dynamo ``optimize=False`` and no optimizer pass): BN is then
    never fused (even in "eval"), and weights may be *computed* from initializers (e.g.
    torchscript's Transpose(W) feeding MatMul for a Linear on a 4-D input, dynamo's Constant
    nodes and Shape/Concat-built Reshape shapes).
    The passed module is not modified (a deep copy is exported). Returns ``str(path)``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = build(name_or_module) if isinstance(name_or_module, str) else name_or_module
    if example_inputs is None:
        args = _make_inputs(model, batch=2)
    else:
        args = _as_tuple(example_inputs)
    args = tuple(torch.cat([a, a]) if a.shape[0] == 1 else a for a in args)
    model = copy.deepcopy(model)
    with torch.no_grad():
        out = model.eval()(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    in_names, out_names = _io_names(len(args), "input"), _io_names(n_out, "output")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fn = _export_torchscript if exporter == "torchscript" else _export_dynamo
    with _quiet():
        fn(model, args, path, in_names, out_names, mode, opset, fold_constants)
    return str(path)


def _source_hash() -> str:
    h = hashlib.sha1(torch.__version__.encode())
    here = Path(__file__).parent
    for f in ("cnn.py", "zoo.py"):
        h.update((here / f).read_bytes())
    return h.hexdigest()[:10]


def default_cache_dir() -> str:
    return os.environ.get("SPA_ZOO_CACHE") or os.path.join(tempfile.gettempdir(),
                                                           "spa_zoo_cache")


def cached_export(name: str, exporter: str = "torchscript", mode: str = "eval",
                  cache_dir: str | os.PathLike | None = None, opset: int | None = None) -> str:
    """Export the tiny zoo model ``name`` once per (exporter, mode, opset, source version) into
    ``cache_dir`` (default ``$SPA_ZOO_CACHE`` or ``<tmp>/spa_zoo_cache``) and return its path.
    Safe under pytest-xdist: each writer exports to a private temp file and renames it."""
    cache = Path(cache_dir or default_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{name}-{exporter}-{mode}-{opset or 'default'}-{_source_hash()}.onnx"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        export(name, tmp, exporter=exporter, mode=mode, opset=opset)
        os.replace(tmp, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# verification helpers
# ----------------------------------------------------------------------------------------------
def bn_training_semantics(exporter: str, mode: str) -> bool:
    """True when the exported BN nodes use batch statistics (torchscript + "train")."""
    return exporter == "torchscript" and mode == "train"


@torch.no_grad()
def torch_reference(model: nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor,
                    exporter: str = "torchscript", mode: str = "eval") -> list[np.ndarray]:
    """Torch outputs with the semantics of the given export (train-mode BN for torchscript
    "train", eval otherwise). Does not modify ``model`` (running stats untouched)."""
    m = copy.deepcopy(model)
    m.train(bn_training_semantics(exporter, mode))
    out = m(*_as_tuple(inputs))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.detach().numpy() for o in outs]


def bn_count(path_or_model) -> int:
    import onnx

    m = onnx.load(str(path_or_model)) if not hasattr(path_or_model, "graph") else path_or_model
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def verify_export(path: str | os.PathLike, model: nn.Module, exporter: str = "torchscript",
                  mode: str = "eval", batches: Sequence[int] = (1, 3), atol: float = 1e-4,
                  seed: int = 1, full_check: bool = True) -> dict:
    """Check an exported file: ``onnx.checker`` (full_check), then onnxruntime at each batch
    size vs :func:`torch_reference`. Raises AssertionError on mismatch; returns
    {"max_abs_err": float, "op_types": {op: count}}."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=full_check)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst = 0.0
    for b in batches:
        xs = example_inputs(model, batch=b, seed=seed)
        ref = torch_reference(model, xs, exporter, mode)
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})
        assert len(got) == len(ref), f"{path}: {len(got)} outputs, torch has {len(ref)}"
        for r, g in zip(ref, got):
            assert r.shape == g.shape, f"{path}: batch {b}: shape {g.shape} != {r.shape}"
            err = float(np.abs(r - g).max()) if r.size else 0.0
            assert err <= atol, f"{path}: batch {b}: max abs err {err:.3g} > {atol}"
            worst = max(worst, err)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"max_abs_err": worst, "op_types": ops}
