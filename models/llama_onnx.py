"""A LLaMA/Mistral-shaped decoder written directly as ONNX with its weights streamed into one
external data file: no torch, no model held in memory (a 7B fp16 model is 14 GB on disk and a
few MB of graph). Weights are deterministic (seeded per tensor) and scaled like an initialised
network, so activations stay finite through 32 layers.

The graph follows what exporters emit for this architecture: RMSNorm as Pow/ReduceMean/Add/Sqrt/
Div/Mul, q/k/v/o and SwiGLU projections as MatMul, heads split and merged by Reshape with constant
head counts, rotary embeddings through Slice/Neg/Concat on the head dimension, grouped-query
attention repeating each key/value head with Unsqueeze/Expand/Reshape, an untied lm_head.

    python -m models.llama_onnx OUT.onnx --size 7b
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import onnx
from onnx import TensorProto, helper

CONFIGS = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=32000),
    "tiny": dict(hidden=64, layers=2, heads=8, kv_heads=2, intermediate=160, vocab=101),
}
ALIGN = 4096
_CHUNK = 1 << 24
_POOL = 1 << 26
MAX_POSITIONS = 256


class _Weights:
    """Initializers whose bytes go straight to one data file, `ALIGN`-aligned."""

    def __init__(self, data_path: str, dtype, seed: int, pool: int = _POOL):
        self.file = open(data_path, "wb")
        self.location = os.path.basename(data_path)
        self.dtype = np.dtype(dtype)
        self.seed = seed
        self.tensors = []
        self._pools = {}
        self.pool_size = pool

    def _pool(self, scale):
        if scale not in self._pools:
            rng = np.random.default_rng([self.seed, len(self._pools), 7])
            values = rng.standard_normal(self.pool_size, dtype=np.float32) * np.float32(scale)
            self._pools[scale] = values.astype(self.dtype)
        return self._pools[scale]

    def add(self, name: str, shape, scale: float | None = None, fill: float | None = None):
        count = math.prod(shape)
        offset = self.file.tell()
        rng = np.random.default_rng([self.seed, len(self.tensors)])
        chunk = min(_CHUNK, self.pool_size)
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            if fill is not None:
                self.file.write(np.full(n, fill, self.dtype).tobytes())
            else:  # a window of a seeded Gaussian pool: 14 GB in about a minute
                at = int(rng.integers(0, max(1, self.pool_size - n + 1)))
                self.file.write(self._pool(scale)[at:at + n].tobytes())
        length = self.file.tell() - offset
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(self.dtype), dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        self.tensors.append(t)
        return name

    def close(self):
        self.file.close()


def _const(inits, name, values, dtype=np.int64):
    inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
    return name


def build(path: str, size: str = "7b", dtype=np.float16, seed: int = 0, pool: int = _POOL, past: bool = False,
          **overrides) -> dict:
    """Write the model to `path` (+ `path`.data); returns its config and byte counts. `past`: a
    key/value cache, as decoders exported for generation have: graph inputs past_key.i /
    past_value.i [batch, kv heads, past, head size] are concatenated before the new keys and values,
    and the results are graph outputs present_key.i / present_value.i (no causal mask, no position
    offset: a graph of that shape, not a working decoder)."""
    cfg = dict(CONFIGS[size], **overrides)
    h, heads, kv, inter, vocab = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["intermediate"], cfg["vocab"]
    hd = h // heads
    rep = heads // kv
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = _Weights(path + ".data", dtype, seed, pool)
    nodes, small = [], []

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def scalar(name, value):
        small.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    two, eps = scalar("two", 2.0), scalar("eps", 1e-5)
    inv_sqrt = scalar("attn_scale", 1.0 / math.sqrt(hd))
    q_shape = _const(small, "q_shape", [0, 0, heads, hd])
    kv_shape = _const(small, "kv_shape", [0, 0, kv, hd])
    expand = _const(small, "kv_expand", [1, 1, rep, 1, 1])
    merged_kv = _const(small, "kv_merged", [0, heads, -1, hd])
    merge = _const(small, "merge_shape", [0, 0, heads * hd])
    axis2 = _const(small, "axis2", [2])
    half_lo = (_const(small, "half_start", [0]), _const(small, "half_mid", [hd // 2]))
    half_hi = (half_lo[1], _const(small, "half_end", [hd]))
    axis3 = _const(small, "axis3", [3])
    zero = _const(small, "zero", [0])
    one = _const(small, "one", [1])
    pos = np.arange(MAX_POSITIONS)[:, None] / (10000 ** (np.arange(0, hd, 2) / hd))[None, :]
    angles = np.concatenate([pos, pos], axis=1)
    _const(small, "cos_cache", np.cos(angles), dtype)
    _const(small, "sin_cache", np.sin(angles), dtype)
    seq = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), one], "seq_len", axis=0)
    cos = node("Slice", ["cos_cache", zero, seq, zero], "cos")
    sin = node("Slice", ["sin_cache", zero, seq, zero], "sin")

    def rms_norm(x, prefix):
        w = weights.add(f"{prefix}.weight", [h], fill=1.0)
        var = node("ReduceMean", [node("Pow", [x, two], f"{prefix}/pow")], f"{prefix}/var", axes=[-1], keepdims=1)
        std = node("Sqrt", [node("Add", [var, eps], f"{prefix}/add_eps")], f"{prefix}/std")
        return node("Mul", [node("Div", [x, std], f"{prefix}/div"), w], f"{prefix}/out")

    def linear(x, prefix, n_in, n_out):
        return node("MatMul", [x, weights.add(f"{prefix}.weight", [n_in, n_out], scale=1 / math.sqrt(n_in))],
                    f"{prefix}/out")

    def rotary(x, prefix):
        lo = node("Slice", [x, *half_lo, axis3], f"{prefix}/x1")
        hi = node("Slice", [x, *half_hi, axis3], f"{prefix}/x2")
        rotated = node("Concat", [node("Neg", [hi], f"{prefix}/neg"), lo], f"{prefix}/rot", axis=-1)
        return node("Add", [node("Mul", [x, cos], f"{prefix}/xcos"), node("Mul", [rotated, sin], f"{prefix}/rsin")],
                    f"{prefix}/out")

    def heads_first(x, shape, prefix):
        return node("Transpose", [node("Reshape", [x, shape], f"{prefix}/split")], f"{prefix}/heads",
                    perm=[0, 2, 1, 3])

    def repeat_kv(x, prefix):
        grown = node("Expand", [node("Unsqueeze", [x, axis2], f"{prefix}/unsq"), expand], f"{prefix}/expand")
        return node("Reshape", [grown, merged_kv], f"{prefix}/repeated")

    x = node("Gather", [weights.add("embed_tokens.weight", [vocab, h], scale=1.0), "input_ids"], "embed")
    for i in range(cfg["layers"]):
        p = f"layers.{i}"
        y = rms_norm(x, f"{p}.input_layernorm")
        q = rotary(heads_first(linear(y, f"{p}.self_attn.q_proj", h, heads * hd), q_shape, f"{p}/q"), f"{p}/q_rope")
        k = rotary(heads_first(linear(y, f"{p}.self_attn.k_proj", h, kv * hd), kv_shape, f"{p}/k"), f"{p}/k_rope")
        v = heads_first(linear(y, f"{p}.self_attn.v_proj", h, kv * hd), kv_shape, f"{p}/v")
        if past:
            k = node("Concat", [f"past_key.{i}", k], f"present_key.{i}", axis=2)
            v = node("Concat", [f"past_value.{i}", v], f"present_value.{i}", axis=2)
        k, v = repeat_kv(k, f"{p}/k"), repeat_kv(v, f"{p}/v")
        kt = node("Transpose", [k], f"{p}/kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [q, kt], f"{p}/qk"), inv_sqrt], f"{p}/scores")
        context = node("MatMul", [node("Softmax", [scores], f"{p}/probs", axis=-1), v], f"{p}/context")
        merged = node("Reshape", [node("Transpose", [context], f"{p}/context_t", perm=[0, 2, 1, 3]), merge],
                      f"{p}/merged")
        x = node("Add", [x, linear(merged, f"{p}.self_attn.o_proj", heads * hd, h)], f"{p}/attn_residual")
        y = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = linear(y, f"{p}.mlp.gate_proj", h, inter)
        act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/gate_sigmoid")], f"{p}/silu")
        up = linear(y, f"{p}.mlp.up_proj", h, inter)
        down = linear(node("Mul", [act, up], f"{p}/swiglu"), f"{p}.mlp.down_proj", inter, h)
        x = node("Add", [x, down], f"{p}/mlp_residual")
    logits = linear(rms_norm(x, "norm"), "lm_head", h, vocab)
    weights.close()
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    outputs = [helper.make_tensor_value_info(logits, elem, ["batch", "sequence", vocab])]
    for i in range(cfg["layers"] if past else 0):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", elem, ["batch", kv, "past", hd]))
            total = ["batch", kv, "past + sequence", hd]
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", elem, total))
    graph = helper.make_graph(nodes, "llama", inputs, outputs, initializer=small + weights.tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="spa.models.llama_onnx")
    onnx.save_model(model, path)
    params = sum(math.prod(t.dims) for t in weights.tensors)
    return {"config": cfg, "dtype": np.dtype(dtype).name, "parameters": params,
            "data_bytes": os.path.getsize(path + ".data"), "onnx_bytes": os.path.getsize(path)}


def build_merged(path: str, size: str = "tiny", dtype=np.float32, seed: int = 0, **overrides) -> dict:
    """Write an optimum-style merged decoder to `path`: the `past=True` decoder in the then-branch of an If on a
    `use_cache_branch` input [1] and, in the else-branch, the same decoder without its cache (the present keys and
    values are the new ones; the past inputs unread), every weight a top-level initializer both branches read.
    Returns `build`'s figures."""
    info = build(path, size, dtype, seed, past=True, **overrides)
    decoder = onnx.load(path)
    os.remove(path + ".data")

    def branch(tag: str, cached: bool) -> onnx.GraphProto:
        made = {o for n in decoder.graph.node for o in n.output}
        rename = {name: f"{tag}/{name}" for name in made}
        nodes = []
        for n in decoder.graph.node:
            if not cached and n.op_type == "Concat" and n.output[0].startswith("present_"):
                n = helper.make_node("Identity", [n.input[1]], list(n.output), name=n.name)
            nodes.append(helper.make_node(n.op_type, [rename.get(x, x) for x in n.input],
                                          [rename[o] for o in n.output], name=f"{tag}/{n.name}",
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
        outputs = []
        for o in decoder.graph.output:
            info = onnx.ValueInfoProto()
            info.CopyFrom(o)
            info.name = rename[o.name]
            outputs.append(info)
        return helper.make_graph(nodes, tag, [], outputs)

    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    node = helper.make_node("If", ["use_cache_branch"], [o.name for o in decoder.graph.output], name="optimum::if",
                            then_branch=branch("with_past", True), else_branch=branch("no_past", False))
    graph = helper.make_graph([node], "merged", list(decoder.graph.input) + [flag], list(decoder.graph.output),
                              list(decoder.graph.initializer))
    onnx.save_model(helper.make_model(graph, opset_imports=list(decoder.opset_import),
                                      producer_name="spa.models.llama_onnx"), path)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output")
    p.add_argument("--size", choices=sorted(CONFIGS), default="7b")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    args = p.parse_args(argv)
    print(build(args.output, args.size, np.dtype(args.dtype)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
