"""Tiny transformer zoo (HF transformers + torch built-ins) and ONNX export with dynamic batch
*and* sequence axes, for pruning tests.

Public API
----------
TRANSFORMERS: dict[str, TransformerEntry]      name -> entry (builder, inputs, exporters, notes)
SUPPORTED: dict[str, tuple[str, ...]]          name -> exporters giving a fully dynamic file
build_transformer(name, *, seed=0, attn=None, randomize=True, **config_overrides) -> nn.Module
transformer_inputs(name_or_module, batch=2, seq=7, seed=0) -> tuple[torch.Tensor, ...]
export_transformer(name_or_module, path, exporter="torchscript", example_inputs=None,
                   opset=None, *, fold_constants=True) -> str
cached_export_transformer(name, exporter="torchscript", cache_dir=None, opset=None) -> str
verify_transformer(path, model, shapes=((1, 5), (3, 9)), atol=1e-4, seed=1,
                   full_check=True) -> dict
node_listing(path_or_model, scope="", *, skip=("Constant",), max_const=8) -> str

Every model is randomly initialised from a config (seeded; no hub access, HF_HUB_OFFLINE=1 is
set on import), wrapped so that ``forward`` takes positional tensors named by
``model.tz_inputs`` and returns ONE tensor (last_hidden_state or logits), and is returned in eval
mode.  Initialisation is "non-trivial" on purpose (see :func:`_randomize`): linear weights with
std 1/sqrt(fan_in) instead of HF's 0.02 (so attention is not uniform), norm weights ~
U(0.5, 1.5) and biases ~ U(-0.3, 0.3).  Tiny sizes: hidden 32, 2 layers, 4 heads (head dim 8;
LLaMA 2 KV heads), FFN 64, vocab 100, max positions 64.

Inputs (names used in the ONNX file):
  ``input_ids``          int64 [batch, sequence], values in [0, vocab)
  ``attention_mask``     int64 [batch, sequence], 1 = keep; examples right-pad the last row
  ``token_type_ids``     int64 [batch, sequence] (MiniLM, see models/minilm.py)
  ``decoder_input_ids``  int64 [batch, decoder_sequence] (encoder-decoder "bart" only)
  ``pixel_values``       float [batch, 3, 16, 16] (ViT: only batch is dynamic, so the
                         output's sequence axis (17 tokens) is static there)
Output: ``output`` ([batch, sequence, hidden] or [batch, sequence, vocab]).

Attention implementation: HF models use ``attn="sdpa"`` (HF's default, what real users
export) unless the entry or the caller says "eager" (t5_encoder, *_eager entries).

Exporters: "torchscript" (``torch.onnx.export(dynamo=False)``, constant folding on) and
"dynamo" (``torch.export`` + onnxscript optimizer); both emit opset 20 by default.  Files are
self-contained.  Torchscript needs two transformers code paths swapped for numerically
identical ones while exporting (see :func:`_torchscript_hf_patches`).  nn.MultiheadAttention
under torchscript bakes the traced sequence length (``fixed_seq_exporters``).

What the graphs look like (folded exports, both exporters unless said):
  * Linear -> MatMul(x, W^T stored pre-transposed [in, out]) + Add(bias); 2-D Gemm for GPT-2's
    Conv1D (after Reshape to [-1, d]) and for nn.MultiheadAttention's out_proj (transB=1).
  * q/k/v separate MatMuls (BERT, ViT, LLaMA, T5, BART); packed [d, 3d] for GPT-2 (Gemm +
    Split) and torch MHA (MatMul + Reshape [.., 3, d] + Unsqueeze/Transpose/Squeeze + 3 Gather).
  * head split: Reshape to [B, S, H, d] with a shape computed from Shape/Gather/Concat
    (torchscript: Unsqueeze+Concat per use; dynamo: one shared Concat; ViT dynamo: a constant
    [-1, 17, 4, 8]) then Transpose [0, 2, 1, 3]; merge: Transpose [0, 2, 1, 3] + Reshape.
  * SDPA decomposition: scale sqrt(1/sqrt(d)) multiplied into BOTH q and k^T (Mul 0.5946),
    K^T as Transpose [0, 2, 3, 1] (torchscript) or Reshape/Transpose [0, 2, 1]/Reshape
    (dynamo); additive mask Where(bool, 0, -inf|-3.4e38); Softmax; IsNaN + Where guard when a
    mask is given.  Eager: MatMul(q, Transpose(k)) then Mul(0.3536) then Add(mask), Softmax.
  * GQA repeat_kv: Unsqueeze(axis 2) + Expand [B, 2, 2, S, d] + Reshape [B, 4, S, d].
  * rotary: Cos/Sin of Concat(f, f) (outside the layers), in-layer Mul(x, cos) +
    Mul(Concat(Neg(Slice hi), Slice lo), sin) + Add.
  * LayerNorm -> LayerNormalization; RMSNorm (LLaMA, T5) is decomposed: Pow 2, ReduceMean,
    Add eps, Sqrt, Div 1/x (torchscript) | Reciprocal (dynamo), Mul, Mul(weight); GELU(erf) ->
    Gelu; gelu_new (GPT-2, T5) -> Mul/Pow/Tanh; SiLU -> Sigmoid + Mul.  No fused Attention,
    RMSNormalization or SimplifiedLayerNormalization op appears.
  * tied lm_head: folded exports store a separate pre-transposed copy [d, vocab] next to the
    [vocab, d] embedding table (the tie is lost); ``fold_constants=False`` keeps one table and
    MatMul(h, Transpose(table)).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from .zoo import _cached_torchlib_registry, _quiet  # noqa: E402

__all__ = ["TransformerEntry", "TRANSFORMERS", "SUPPORTED", "EXPORTERS", "build_transformer",
           "transformer_inputs", "export_transformer", "cached_export_transformer",
           "verify_transformer", "node_listing", "InputSpec", "HFWrapper", "TorchEncoder",
           "MHABlock"]

EXPORTERS = ("torchscript", "dynamo")

VOCAB = 100
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
FFN = 64
MAX_POS = 64


# ----------------------------------------------------------------------------------------------
# input specs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One model input: ONNX name, kind ("ids", "mask", "types" (zeros), "pixels") and its
    dynamic axes."""

    name: str
    kind: str
    axes: tuple = ((0, "batch"), (1, "sequence"))
    vocab: int = VOCAB
    image: tuple = (3, 16, 16)

    @property
    def axes_dict(self) -> dict:
        return dict(self.axes)


IDS = InputSpec("input_ids", "ids")
MASK = InputSpec("attention_mask", "mask")
TYPES = InputSpec("token_type_ids", "types")
DEC_IDS = InputSpec("decoder_input_ids", "ids", ((0, "batch"), (1, "decoder_sequence")))
PIXELS = InputSpec("pixel_values", "pixels", ((0, "batch"),))
SEQ_OUT = ((0, "batch"), (1, "sequence"))


# ----------------------------------------------------------------------------------------------
# wrappers: positional tensors in, one tensor out
# ----------------------------------------------------------------------------------------------
class HFWrapper(nn.Module):
    """Calls an HF model with keyword inputs named after ``tz_inputs`` and returns one field of
    its output (``last_hidden_state`` or ``logits``)."""

    def __init__(self, model: nn.Module, names: Sequence[str], field_name: str):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.field_name = field_name

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), return_dict=True)
        return getattr(out, self.field_name)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (batch_first, 2 post-norm layers, GELU FFN) over token +
    learned position embeddings; ``attention_mask`` becomes ``src_key_padding_mask``."""

    def __init__(self, vocab=VOCAB, d_model=HIDDEN, nhead=HEADS, ffn=FFN, layers=LAYERS,
                 max_pos=MAX_POS, norm_first=False, activation="gelu"):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_pos, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=0.0, batch_first=True,
                                           activation=activation, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(pos)
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return self.norm(x)


class MHABlock(nn.Module):
    """A pre-norm block using ``nn.MultiheadAttention`` directly (packed in_proj_weight
    [3*d, d]), causal attention mask, SiLU MLP, tied output head (logits = h @ E^T)."""

    def __init__(self, vocab=VOCAB, d_model=HIDDEN, nhead=HEADS, ffn=FFN, max_pos=MAX_POS):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_pos, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn)
        self.fc2 = nn.Linear(ffn, d_model)
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=causal, need_weights=False)
        x = x + a
        x = x + self.fc2(nn.functional.silu(self.fc1(self.ln2(x))))
        return self.ln_f(x) @ self.embed.weight.t()


# ----------------------------------------------------------------------------------------------
# HF builders
# ----------------------------------------------------------------------------------------------
def _hf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _set_attn(cfg, attn: str):
    cfg._attn_implementation = attn
    return cfg


def _bert(attn="sdpa", **kw):
    hf = _hf()
    cfg = hf.BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FFN, max_position_embeddings=MAX_POS,
                                  type_vocab_size=2), **kw})
    _set_attn(cfg, attn)
    return hf.BertModel(cfg, add_pooling_layer=False), "last_hidden_state"


def _vit(attn="sdpa", **kw):
    hf = _hf()
    cfg = hf.ViTConfig(**{**dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                 num_attention_heads=HEADS, intermediate_size=FFN,
                                 image_size=16, patch_size=4, num_channels=3), **kw})
    _set_attn(cfg, attn)
    return hf.ViTModel(cfg, add_pooling_layer=False), "last_hidden_state"


def _gpt2(attn="sdpa", **kw):
    hf = _hf()
    cfg = hf.GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, n_inner=FFN, n_positions=MAX_POS,
                                  tie_word_embeddings=True, use_cache=False), **kw})
    _set_attn(cfg, attn)
    return hf.GPT2LMHeadModel(cfg), "logits"


def _llama_cfg(attn, **kw):
    hf = _hf()
    cfg = hf.LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN,
                                   intermediate_size=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=MAX_POS, use_cache=False,
                                   tie_word_embeddings=False), **kw})
    return _set_attn(cfg, attn)


def _llama(attn="sdpa", **kw):
    return _hf().LlamaModel(_llama_cfg(attn, **kw)), "last_hidden_state"


def _llama_lm(attn="sdpa", **kw):
    kw.setdefault("tie_word_embeddings", True)
    return _hf().LlamaForCausalLM(_llama_cfg(attn, **kw)), "logits"


def _t5_encoder(attn="sdpa", **kw):
    hf = _hf()
    cfg = hf.T5Config(**{**dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS,
                                d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                                relative_attention_num_buckets=8,
                                relative_attention_max_distance=16,
                                feed_forward_proj="gated-gelu", use_cache=False), **kw})
    _set_attn(cfg, attn)  # T5 only has eager attention; kept for uniformity
    return hf.T5EncoderModel(cfg), "last_hidden_state"


def _bart_cfg(attn, **kw):
    hf = _hf()
    cfg = hf.BartConfig(**{**dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS,
                                  decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                                  decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                                  decoder_ffn_dim=FFN, max_position_embeddings=MAX_POS,
                                  use_cache=False), **kw})
    return _set_attn(cfg, attn)


def _bart(attn="sdpa", **kw):
    return _hf().BartModel(_bart_cfg(attn, **kw)), "last_hidden_state"


def _bart_encoder(attn="sdpa", **kw):
    return _hf().BartModel(_bart_cfg(attn, **kw)).get_encoder(), "last_hidden_state"


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformerEntry:
    """builder(**kw) -> (module, output field) for HF models (``hf=True``) or -> module for
    torch built-ins.  ``inputs``: the positional inputs of the wrapped model.
    ``exporters``: the exporters that give a fully dynamic (batch and sequence) file here;
    ``fixed_seq_exporters``: those that export but bake the traced sequence length (7) into the
    graph (batch stays dynamic); why is in ``notes``.  ``attn``: default HF attention
    implementation ("sdpa" or "eager")."""

    name: str
    builder: Callable
    inputs: tuple
    hf: bool = True
    output_axes: tuple = SEQ_OUT
    exporters: tuple = EXPORTERS
    description: str = ""
    notes: str = ""
    kwargs: dict = field(default_factory=dict)
    attn: str = "sdpa"
    fixed_seq_exporters: tuple = ()


_TS_MHA_NOTE = ("torchscript: nn.MultiheadAttention's k.view(k.shape[0], bsz*heads, d) after "
                "the packed in-projection is exported with k.shape[0] folded to the traced "
                "sequence length (Reshape to a constant [7, B*H, 8]): batch stays dynamic, "
                "other sequence lengths fail in onnxruntime")

TRANSFORMERS: dict[str, TransformerEntry] = {e.name: e for e in [
    TransformerEntry("bert", _bert, (IDS, MASK),
                     description="HF BertModel: post-LN, separate q/k/v Linear, GELU(erf), "
                                 "absolute positions + token types, padding mask; SDPA"),
    TransformerEntry("bert_eager", _bert, (IDS, MASK), attn="eager",
                     description="bert with eager attention (explicit MatMul/Mul/Add/Softmax)"),
    TransformerEntry("vit", _vit, (PIXELS,), output_axes=((0, "batch"),),
                     description="HF ViTModel: Conv patch embedding 4x4 on 16x16, CLS token, "
                                 "pre-LN; sequence fixed (17 tokens)"),
    TransformerEntry("gpt2", _gpt2, (IDS,),
                     description="HF GPT2LMHeadModel: Conv1D packed c_attn [d, 3d] split, "
                                 "gelu_new (tanh), causal, lm_head tied to wte"),
    TransformerEntry("llama", _llama, (IDS,),
                     description="HF LlamaModel: RMSNorm, SwiGLU, rotary, GQA 4 q / 2 kv heads; "
                                 "SDPA"),
    TransformerEntry("llama_eager", _llama, (IDS,), attn="eager",
                     description="llama with eager attention (repeat_kv + explicit softmax)"),
    TransformerEntry("llama_lm", _llama_lm, (IDS,),
                     description="HF LlamaForCausalLM, tie_word_embeddings=True "
                                 "(lm_head.weight is embed_tokens.weight)"),
    TransformerEntry("t5_encoder", _t5_encoder, (IDS, MASK), attn="eager",
                     description="HF T5EncoderModel: RMS-style T5LayerNorm, relative position "
                                 "bias buckets, gated-GELU (tanh) FFN, no attention scaling",
                     notes="eager attention: with attn='sdpa' the dynamo exporter fails "
                           "(decomposition: 'Cannot view a tensor with shape [s, s, 4, 8] and "
                           "strides ... as (s, s, 32)'); torchscript works with both"),
    TransformerEntry("bart_encoder", _bart_encoder, (IDS, MASK),
                     description="encoder of HF BartModel (post-LN, learned positions "
                                 "offset 2, q/k/v with bias, q scaled before QK^T)"),
    TransformerEntry("bart", _bart, (IDS, MASK, DEC_IDS),
                     output_axes=((0, "batch"), (1, "decoder_sequence")),
                     description="HF BartModel encoder-decoder: decoder self-attn (causal) + "
                                 "cross-attn; output = decoder last_hidden_state"),
    TransformerEntry("torch_encoder", TorchEncoder, (IDS, MASK), hf=False,
                     exporters=("dynamo",), fixed_seq_exporters=("torchscript",),
                     notes=_TS_MHA_NOTE,
                     description="nn.TransformerEncoder (batch_first, 2 post-norm layers, "
                                 "packed in_proj, key padding mask)"),
    TransformerEntry("torch_mha", MHABlock, (IDS,), hf=False,
                     exporters=("dynamo",), fixed_seq_exporters=("torchscript",),
                     notes=_TS_MHA_NOTE,
                     description="nn.MultiheadAttention used directly: pre-LN, causal "
                                 "attn_mask, SiLU MLP, tied output head h @ E^T"),
]}

SUPPORTED: dict[str, tuple] = {n: e.exporters for n, e in TRANSFORMERS.items()}


# ----------------------------------------------------------------------------------------------
# construction
# ----------------------------------------------------------------------------------------------
_NORM_NAMES = ("LayerNorm", "RMSNorm", "T5LayerNorm", "LlamaRMSNorm")


@torch.no_grad()
def _randomize(model: nn.Module) -> nn.Module:
    """Non-trivial random weights (torch global RNG): Linear / Conv1D / Conv / Embedding weights
    ~ N(0, 1/fan_in) (embeddings N(0, 0.5)), biases ~ U(-0.1, 0.1), norm weights ~ U(0.5, 1.5),
    norm biases ~ U(-0.3, 0.3). Tied weights stay tied (parameters are shared objects)."""
    seen = set()
    for m in model.modules():
        cls = type(m).__name__
        params = [(n, p) for n, p in m.named_parameters(recurse=False) if id(p) not in seen]
        for _, p in params:
            seen.add(id(p))
        is_norm = isinstance(m, nn.LayerNorm) or any(k in cls for k in _NORM_NAMES)
        for n, p in params:
            if is_norm:
                if n == "weight":
                    p.uniform_(0.5, 1.5)
                elif n == "bias":
                    p.uniform_(-0.3, 0.3)
            elif isinstance(m, nn.Embedding) or "embed" in n or p.dim() == 3 and "pos" in n:
                p.normal_(0.0, 0.5 ** 0.5)
            elif n.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            elif p.dim() >= 2:
                fan_in = p.shape[0] if cls == "Conv1D" else p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
            else:  # 1-D non-bias parameters (CLS token, mask token, ...)
                p.normal_(0.0, 0.5)
    return model


def build_transformer(name: str, *, seed: int = 0, attn: str | None = None,
                      randomize: bool = True, **kw) -> nn.Module:
    """Build registry model ``name`` (tiny config; ``kw`` overrides config fields).

    ``attn``: HF attention implementation ("sdpa" default, "eager"); ignored by the torch
    built-ins.  Deterministic in ``seed``.  Returns the wrapper in eval mode with attributes
    ``tz_name``, ``tz_inputs`` (tuple of :class:`InputSpec`) and ``tz_output_axes``."""
    entry = TRANSFORMERS[name]
    torch.manual_seed(seed)
    cfg = {**entry.kwargs, **kw}
    if entry.hf:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inner, field_name = entry.builder(attn=attn or entry.attn, **cfg)
        model = HFWrapper(inner, [s.name for s in entry.inputs], field_name)
    else:
        model = entry.builder(**cfg)
    if randomize:
        _randomize(model)
    vocab = getattr(getattr(model, "model", None), "config", None)
    vocab = getattr(vocab, "vocab_size", None) or cfg.get("vocab", VOCAB)
    image = None
    if name == "vit":
        c = model.model.config
        image = (c.num_channels, c.image_size, c.image_size)
    model.tz_name = name
    model.tz_inputs = tuple(InputSpec(s.name, s.kind, s.axes, vocab=vocab,
                                      image=image or s.image) for s in entry.inputs)
    model.tz_output_axes = entry.output_axes
    return model.eval()


def transformer_inputs(name_or_module: str | nn.Module, batch: int = 2, seq: int = 7,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs: token ids uniform in [0, vocab), masks of ones with the
    last row right-padded (``seq // 3`` zeros) when batch > 1, pixels N(0, 1). The decoder
    sequence of "bart" is ``max(1, seq - 2)`` long."""
    specs = _specs(name_or_module)
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        if s.kind == "pixels":
            out.append(torch.randn((batch,) + tuple(s.image), generator=g))
            continue
        t = seq if s.name != "decoder_input_ids" else max(1, seq - 2)
        if s.kind == "ids":
            out.append(torch.randint(0, s.vocab, (batch, t), generator=g, dtype=torch.int64))
        elif s.kind == "types":
            out.append(torch.zeros(batch, t, dtype=torch.int64))
        elif s.kind == "mask":
            m = torch.ones(batch, t, dtype=torch.int64)
            if batch > 1 and t > 1:
                m[-1, t - max(1, t // 3):] = 0
            out.append(m)
        else:
            raise ValueError(f"unknown input kind {s.kind!r}")
    return tuple(out)


def _specs(name_or_module) -> tuple:
    if isinstance(name_or_module, str):
        e = TRANSFORMERS[name_or_module]
        return e.inputs
    specs = getattr(name_or_module, "tz_inputs", None)
    if specs is None:
        raise ValueError("module has no tz_inputs: pass example inputs explicitly")
    return specs


def _infer_specs(args: Sequence[torch.Tensor]) -> tuple:
    """Input specs for a foreign module: float 4-D -> pixel_values (batch axis), first integer
    2-D -> input_ids, second -> attention_mask, others input<i>; float 3-D -> inputs_embeds
    (batch and sequence)."""
    specs, n_int = [], 0
    for i, a in enumerate(args):
        if a.is_floating_point() and a.dim() == 4:
            specs.append(InputSpec("pixel_values", "pixels", ((0, "batch"),)))
        elif not a.is_floating_point() and a.dim() == 2:
            specs.append(InputSpec(("input_ids", "attention_mask")[n_int] if n_int < 2
                                   else f"input{i}", "ids"))
            n_int += 1
        elif a.is_floating_point() and a.dim() == 3:
            specs.append(InputSpec("inputs_embeds", "embeds"))
        else:
            specs.append(InputSpec(f"input{i}", "other", ((0, "batch"),)))
    return tuple(specs)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def export_transformer(name_or_module: str | nn.Module, path: str | os.PathLike,
                       exporter: str = "torchscript",
                       example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
                       opset: int | None = None, *, fold_constants: bool = True) -> str:
    """Export a registry model (by name: seed 0, sdpa) or a module to ONNX at ``path`` with
    dynamic batch and sequence axes on every input and on the output ``output``.

    The module is deep-copied (torchscript's exporter would otherwise leave a wrapper that was
    never put in eval mode in train mode).  Example inputs default to
    :func:`transformer_inputs` (batch 2, seq 7: avoids 0/1 specialisation).  The file is
    self-contained.  ``fold_constants=False`` gives the raw exporter graph (torchscript
    ``do_constant_folding=False``; dynamo ``optimize=False``): weights may then be computed
    from initializers (e.g. a tied lm_head as MatMul(h, Transpose(embedding weight)); with
    folding both exporters store a separate pre-transposed copy instead).
    Returns ``str(path)``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    model = build_transformer(name_or_module) if isinstance(name_or_module, str) \
        else name_or_module
    if example_inputs is None:
        args = transformer_inputs(model)
    else:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
            else tuple(example_inputs)
    specs = getattr(model, "tz_inputs", None) or _infer_specs(args)
    out_axes = dict(getattr(model, "tz_output_axes", SEQ_OUT))
    if getattr(model, "tz_inputs", None) is None and all(len(s.axes) == 1 for s in specs):
        out_axes = {0: "batch"}
    model = copy.deepcopy(model).eval()
    in_names = [s.name for s in specs]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {} if opset is None else {"opset_version": opset}
    # no torch.no_grad() here: under no_grad, torch's nn.TransformerEncoderLayer /
    # nn.MultiheadAttention take their fused fast path (aten::_transformer_encoder_layer_fwd,
    # aten::_native_multi_head_attention), which the torchscript exporter cannot translate.
    with _quiet():
        if exporter == "torchscript":
            dyn = {s.name: s.axes_dict for s in specs}
            dyn["output"] = out_axes
            if isinstance(name_or_module, str) and \
                    exporter in TRANSFORMERS[name_or_module].fixed_seq_exporters:
                # the exporter bakes the sequence length: say so in the file (static seq axis)
                dyn = {k: {a: n for a, n in v.items() if n == "batch"} for k, v in dyn.items()}
            with _torchscript_hf_patches():
                torch.onnx.export(model, args, str(path), dynamo=False, input_names=in_names,
                                  output_names=["output"], dynamic_axes=dyn,
                                  do_constant_folding=fold_constants, **kw)
        else:
            dims: dict[str, torch.export.Dim] = {}

            max_seq = _max_seq(model)

            def dim(label):
                if label not in dims:
                    dims[label] = torch.export.Dim(label, min=1, max=4096 if label == "batch"
                                                   else max_seq)
                return dims[label]

            dyn = tuple({ax: dim(lbl) for ax, lbl in s.axes} for s in specs)
            if _var_positional(model):  # forward(self, *args): one entry for ``args``
                dyn = (dyn,)
            with _cached_torchlib_registry():
                prog = torch.onnx.export(model, args, dynamo=True, input_names=in_names,
                                         output_names=["output"], dynamic_shapes=dyn,
                                         optimize=fold_constants, verbose=False, **kw)
            prog.save(str(path), external_data=False)
    return str(path)


def _max_seq(model: nn.Module) -> int:
    """Upper bound for the dynamo sequence Dim: the model's position table size if it has one
    (``max_position_embeddings`` / ``n_positions``), else 4096."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 1:
                return v
        if isinstance(m, (TorchEncoder, MHABlock)):
            return m.pos.num_embeddings
    return 4096


@contextlib.contextmanager
def _patched(module_name: str, attr: str, value):
    """Temporarily replace ``module.attr`` (no-op when the module or attribute is missing)."""
    import importlib

    try:
        mod = importlib.import_module(module_name)
        saved = getattr(mod, attr)
    except Exception:
        yield
        return
    setattr(mod, attr, value)
    try:
        yield
    finally:
        setattr(mod, attr, saved)


@contextlib.contextmanager
def _torchscript_hf_patches():
    """Two transformers code paths the torchscript exporter cannot translate, replaced by their
    numerically identical alternatives while exporting:

    * ``masking_utils.find_packed_sequence_indices(position_ids)`` runs for every decoder-only
      model called without an attention mask (``torch.diff`` + bool ``cumsum``: no
      ``aten::diff`` symbolic, and an invalid bool CumSum). Eager execution throws its result
      away when the positions are a plain arange (always the case here): return None.
    * ``sdpa_attention.use_gqa_in_sdpa`` -> False: HF then repeats the KV heads itself
      (``repeat_kv``: Unsqueeze/Expand/Reshape) instead of calling SDPA with
      ``enable_gqa=True``, which the torchscript SDPA symbolic rejects.
    """
    with contextlib.ExitStack() as st:
        st.enter_context(_patched("transformers.masking_utils", "find_packed_sequence_indices",
                                  lambda position_ids: None))
        st.enter_context(_patched("transformers.integrations.sdpa_attention", "use_gqa_in_sdpa",
                                  lambda *a, **k: False))
        yield


def _var_positional(model: nn.Module) -> bool:
    import inspect

    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _source_hash() -> str:
    import transformers

    h = hashlib.sha1((torch.__version__ + transformers.__version__).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:10]


def cached_export_transformer(name: str, exporter: str = "torchscript",
                              cache_dir: str | os.PathLike | None = None,
                              opset: int | None = None) -> str:
    """Export registry model ``name`` once per (exporter, opset, source version) into
    ``cache_dir`` (default ``$SPA_ZOO_CACHE`` or ``<tmp>/spa_zoo_cache``); xdist-safe."""
    cache = Path(cache_dir or os.environ.get("SPA_ZOO_CACHE")
                 or os.path.join(tempfile.gettempdir(), "spa_zoo_cache"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"tf-{name}-{exporter}-{opset or 'default'}-{_source_hash()}.onnx"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        export_transformer(name, tmp, exporter=exporter, opset=opset)
        os.replace(tmp, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------
def verify_transformer(path: str | os.PathLike, model: nn.Module,
                       shapes: Sequence[tuple[int, int]] = ((1, 5), (3, 9)), atol: float = 1e-4,
                       seed: int = 1, full_check: bool = True) -> dict:
    """``onnx.checker`` (full_check) then onnxruntime vs torch at each (batch, seq). Raises
    AssertionError on mismatch; returns {"max_abs_err", "op_types"}."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=full_check)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst = 0.0
    model = model.eval()
    for b, s in shapes:
        xs = transformer_inputs(model, batch=b, seq=s, seed=seed)
        with torch.no_grad():
            ref = model(*xs).numpy()
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, xs)})
        assert len(got) == 1, f"{path}: {len(got)} outputs"
        assert got[0].shape == ref.shape, f"{path}: {(b, s)}: shape {got[0].shape} != {ref.shape}"
        err = float(np.abs(ref - got[0]).max())
        assert err <= atol, f"{path}: {(b, s)}: max abs err {err:.3g} > {atol}"
        worst = max(worst, err)
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"max_abs_err": worst, "op_types": ops}


# ----------------------------------------------------------------------------------------------
# graph inspection
# ----------------------------------------------------------------------------------------------
def _scope(node) -> str:
    """Module scope of a node: torchscript names nodes '/model/encoder/layer.0/.../MatMul';
    dynamo keeps it in metadata ``pkg.torch.onnx.name_scopes``."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            import ast

            try:
                return "/".join(ast.literal_eval(p.value))
            except Exception:
                return p.value
    return node.name


_SHAPE_ARITH = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Reshape", "Add",
                "Sub", "Mul", "Div", "Mod", "Equal", "Where", "ConstantOfShape", "Min", "Max",
                "Neg", "Abs", "Identity", "Floor", "Ceil"}


def node_listing(path_or_model, scope: str | Sequence[str] = "", *, skip=("Constant",),
                 max_const: int = 8, shape_math: bool = True) -> str:
    """Compact listing of the nodes whose scope contains ``scope`` (any of them if a list; "."
    and "/" are equivalent, so "layer.0.attention" matches both exporters), in graph order:
    ``%k = Op(inputs) {attrs}``. Graph inputs appear by name, initializers as
    ``W:name[shape]``, small constants (Constant nodes or initializers with <= ``max_const``
    elements) by value, outputs of unlisted nodes as ``^OpType``.  ``shape_math=False`` hides
    the nodes that only do shape arithmetic on Shape outputs and constants (Gather, Unsqueeze,
    Concat, Slice, Cast, Mul, ...; not Range/Cos/Trilu, so positions, rotary tables and causal
    masks stay visible) and prints their results as ``<shape>``."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path_or_model)) if not hasattr(path_or_model, "graph") else path_or_model
    g = m.graph
    scopes = [scope] if isinstance(scope, str) else list(scope)
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts = {}
    producer = {}
    for n in g.node:
        for o in n.output:
            producer[o] = n
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    # shape plumbing: tensors computed from Shape outputs and constants by shape arithmetic
    static = set(inits) | set(consts)
    shape_only: set[str] = set()
    for n in g.node:
        if n.op_type == "Shape" or (n.op_type in _SHAPE_ARITH and all(
                i in shape_only or i in static or i == "" for i in n.input)
                and any(i in shape_only for i in n.input)):
            shape_only.update(n.output)
    ids: dict[str, str] = {}
    lines = []

    def show(t: str) -> str:
        if t == "":
            return "_"
        if t in ids:
            return ids[t]
        if not shape_math and t in shape_only:
            return "<shape>"
        arr = consts.get(t, inits.get(t))
        if arr is not None:
            if arr.size <= max_const:
                return np.array2string(arr.reshape(-1) if arr.ndim > 1 else arr,
                                       separator=",", precision=4).replace("\n", "")
            return f"W:{t}{list(arr.shape)}"
        if t in producer:
            return f"^{producer[t].op_type}"
        return t

    for n in g.node:
        sc = _scope(n).replace(".", "/")
        if n.op_type in skip or not any(s.replace(".", "/") in sc for s in scopes):
            continue
        if not shape_math and all(o in shape_only for o in n.output):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()
                 if not hasattr(v, "dims")}
        for o in n.output:
            ids[o] = f"%{len(ids)}"
        outs = ",".join(ids[o] for o in n.output)
        a = f" {attrs}" if attrs else ""
        dom = f"{n.domain}." if n.domain not in ("", "ai.onnx") else ""
        lines.append(f"{outs} = {dom}{n.op_type}({', '.join(show(i) for i in n.input)}){a}")
    return "\n".join(lines)
