"""A tiny ONNX graph builder for rule tests: random weights, shapes tracked by onnx itself."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, opset=17, seed=0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.count = 0

    def name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def input(self, shape, name="input", dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, name=None):
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape):
        return self.const((self.rng.standard_normal(shape) * 0.5).astype(np.float32), self.name("w"))

    def positive(self, *shape):
        return self.const((self.rng.random(shape) + 0.5).astype(np.float32), self.name("p"))

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_"), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, c_in, c_out, k=3, group=1, bias=True, **attrs):
        inputs = [x, self.weight(c_out, c_in // group, k, k)] + ([self.weight(c_out)] if bias else [])
        return self.op("Conv", inputs, pads=[k // 2] * 4, group=group, **attrs)

    def bn(self, x, c):
        return self.op("BatchNormalization", [x, self.positive(c), self.weight(c), self.weight(c), self.positive(c)])

    def gemm(self, x, k, n, **attrs):
        w = self.weight(n, k) if attrs.get("transB") else self.weight(k, n)
        return self.op("Gemm", [x, w, self.weight(n)], **attrs)

    def output(self, x, shape=None):
        self.outputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, shape))
        return x

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                 if vi.type.tensor_type.HasField("shape")}
        for out in model.graph.output:
            if out.name in known:
                out.CopyFrom(known[out.name])
        onnx.checker.check_model(model, full_check=True)
        return model


def four_bit_mlp(inputs=64, width=128, outputs=32, seed=0) -> onnx.ModelProto:
    """x -> DequantizeLinear(INT4 weight) MatMul -> + bias -> Relu -> DequantizeLinear(INT4) MatMul: the
    `width` hidden channels prunable, the weights two to a byte in the file."""
    import ml_dtypes

    rng = np.random.default_rng(seed)

    def four(shape, name):
        return numpy_helper.from_array(rng.integers(-8, 8, size=shape).astype(np.int8).astype(ml_dtypes.int4), name)

    inits = [four((inputs, width), "w1"), numpy_helper.from_array(np.array(0.05, np.float32), "s1"),
             four((width, outputs), "w2"), numpy_helper.from_array(np.array(0.05, np.float32), "s2"),
             numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b1")]
    nodes = [helper.make_node("DequantizeLinear", ["w1", "s1"], ["W1"]), helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("DequantizeLinear", ["w2", "s2"], ["W2"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "four_bit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def nbits_matrix(w, bits=4, block=32, zero_points=True, flat=False):
    """A float [K, N] weight as com.microsoft MatMulNBits stores it: (packed codes [N, blocks, bytes],
    scales, packed zero points or None), one scale and zero point per block of `block` along K,
    codes `bits` wide packed low bits first; `flat`: scales and zero points 1-D (the older layout)."""
    from spa.quant import pack_bits

    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block))
    padded[:, :k] = w.T
    padded = padded.reshape(n, blocks, block)
    top = (1 << bits) - 1
    if zero_points:
        low, high = np.minimum(padded.min(-1), 0), np.maximum(padded.max(-1), 0)
        scale = np.maximum(high - low, 1e-8) / top
        zero = np.clip(np.rint(-low / scale), 0, top)
    else:
        scale = np.maximum(np.abs(padded).max(-1), 1e-8) / (1 << (bits - 1))
        zero = np.full(scale.shape, 1 << (bits - 1))
    codes = np.clip(np.rint(padded / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    scale, zero = scale.astype(np.float32), pack_bits(zero.astype(np.uint8), bits)
    if flat:
        scale, zero = scale.reshape(-1), zero.reshape(-1)
    return pack_bits(codes, bits), scale, zero if zero_points else None


def nbits_mlp(hidden=64, width=200, bits=4, block=32, zero_points=True, flat=False, bias=False,
              act_order=False, fused=False, seed=0) -> onnx.ModelProto:
    """An LLM's gated MLP (SwiGLU) in com.microsoft MatMulNBits, as onnxruntime-genai writes it:
    x -> gate, up (hidden -> width) -> SiLU(gate) * up -> down (width -> hidden); the `width`
    channels prunable in blocks of `block` (the down projection's input blocks). `act_order`: the
    down projection carries a g_idx (GPTQ act-order); `fused`: gate and up are one layer of 2 x
    width outputs, sliced in two, with accuracy_level 4 (int8 products), as in genai's CPU exports."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def layer(x, name, k, n, out):
        codes, scale, zero = nbits_matrix(rng.standard_normal((k, n)) * 0.1, bits, block, zero_points, flat)
        inputs = [x, name + "_q", name + "_s"]
        inits.extend([numpy_helper.from_array(codes, name + "_q"), numpy_helper.from_array(scale, name + "_s")])
        if zero is not None:
            inputs.append(name + "_zp")
            inits.append(numpy_helper.from_array(zero, name + "_zp"))
        if act_order and name == "down":
            inputs += [""] * (4 - len(inputs)) + [name + "_g"]
            inits.append(numpy_helper.from_array((np.arange(k) // block).astype(np.int32), name + "_g"))
        if bias:
            inputs += [""] * (5 - len(inputs)) + [name + "_b"]
            inits.append(numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), name + "_b"))
        extra = {"accuracy_level": 4} if fused else {}
        nodes.append(helper.make_node("MatMulNBits", inputs, [out], domain="com.microsoft", K=k, N=n, bits=bits,
                                      block_size=block, **extra))

    if fused:
        layer("x", "gate_up", hidden, 2 * width, "gu")
        for name, value in (("first", 0), ("middle", width), ("end", 2 * width), ("last", -1)):
            inits.append(numpy_helper.from_array(np.array([value], np.int64), name))
        nodes += [helper.make_node("Slice", ["gu", "first", "middle", "last"], ["g"]),
                  helper.make_node("Slice", ["gu", "middle", "end", "last"], ["u"])]
    else:
        layer("x", "gate", hidden, width, "g")
        layer("x", "up", hidden, width, "u")
    nodes += [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["a"]),
              helper.make_node("Mul", ["a", "u"], ["m"])]
    layer("m", "down", width, hidden, "y")
    shape = ["N", "tokens", hidden]
    graph = helper.make_graph(nodes, "nbits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def fused_transformer_block(hidden=32, heads=4, qk_head=8, v_head=6, ffn=48, tokens=5, seed=0):
    """A post-norm transformer block in com.microsoft's fused ops (what onnxruntime's transformer
    optimizer writes), with the rarer options: Attention with qkv_hidden_sizes (value heads narrower
    than the query/key heads) and a constant attention bias [1, heads, tokens, tokens];
    SimplifiedLayerNormalization; an MLP through FastGelu (with bias), QuickGelu and Gelu;
    SkipSimplifiedLayerNormalization; projections from and to 8 features around the block (so that
    the hidden size can prune). x and y: [N, tokens, 8]."""
    b = Builder(seed=seed)
    x = b.op("MatMul", [b.input(["N", tokens, 8], "x"), b.weight(8, hidden)])
    q, v = heads * qk_head, heads * v_head
    bias = b.const((b.rng.standard_normal((1, heads, tokens, tokens)) * 0.5).astype(np.float32), "attention_bias")
    ms = dict(domain="com.microsoft")
    a = b.op("Attention", [x, b.weight(hidden, 2 * q + v), b.weight(2 * q + v), "", "", bias],
             num_heads=heads, qkv_hidden_sizes=[q, q, v], **ms)
    r = b.op("Add", [b.op("MatMul", [a, b.weight(v, hidden)]), x])
    n = b.op("SimplifiedLayerNormalization", [r, b.positive(hidden)], axis=-1, epsilon=1e-5)
    h = b.op("FastGelu", [b.op("MatMul", [n, b.weight(hidden, ffn)]), b.weight(ffn)], **ms)
    h = b.op("Gelu", [b.op("QuickGelu", [h], alpha=1.702, **ms)], **ms)
    y = b.op("SkipSimplifiedLayerNormalization", [b.op("MatMul", [h, b.weight(ffn, hidden)]), n, b.positive(hidden)],
             epsilon=1e-5, **ms)
    b.output(b.op("MatMul", [y, b.weight(hidden, 8)]), ["N", tokens, 8])
    graph = helper.make_graph(b.nodes, "fused_transformer_block", b.inputs, b.outputs, b.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def gqa_attention(hidden=16, heads=4, kv_heads=2, head=4, tokens=5, rotary=True, packed=True, cache=False, seed=0):
    """ONNX Attention (opset 23) with grouped key/value heads (4 query heads over 2 key/value heads),
    the query rotated by RotaryEmbedding (constant position ids: batch 1): x [1, tokens, hidden] -> q,
    k, v -> attention -> out. `packed`: Q, K, V as [B, S, heads x head size] (q_num_heads,
    kv_num_heads and the rotary's num_heads say how many); else split as [B, heads, S, head size] by
    Reshape and Transpose, with the scale left implicit. `cache`: past_key / past_value [1, kv heads,
    past, head size] graph inputs, present_key / present_value graph outputs (a decoder's cache)."""
    b = Builder(opset=23, seed=seed)
    x = b.input([1, tokens, hidden], "x")

    def project(n):
        y = b.op("MatMul", [x, b.weight(hidden, n * head)])
        if packed:
            return y
        y = b.op("Reshape", [y, b.const(np.array([1, tokens, n, head], dtype=np.int64))])
        return b.op("Transpose", [y], perm=[0, 2, 1, 3])

    q, k, v = project(heads), project(kv_heads), project(kv_heads)
    if rotary:
        angles = np.arange(8)[:, None] * (1.0 / 10000 ** (np.arange(head // 2) / (head // 2)))[None, :]
        cos, sin = (b.const(f(angles).astype(np.float32)) for f in (np.cos, np.sin))
        q = b.op("RotaryEmbedding", [q, cos, sin, b.const(np.arange(tokens, dtype=np.int64)[None, :])],
                 **({"num_heads": heads} if packed else {}))
    past = [b.input([1, kv_heads, "past", head], f"past_{n}") for n in ("key", "value")] if cache else []
    inputs, outs = [q, k, v, "", *past], 3 if cache else 1
    if packed:
        y = b.op("Attention", inputs, n_out=outs, q_num_heads=heads, kv_num_heads=kv_heads)
    else:
        y = b.op("Attention", inputs, n_out=outs)
    y, present = (y[0], y[1:]) if cache else (y, [])
    if not packed:
        y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]),
                             b.const(np.array([1, tokens, heads * head], dtype=np.int64))])
    b.output(b.op("MatMul", [y, b.weight(heads * head, hidden)]), [1, tokens, hidden])
    for t in present:
        b.output(t, [1, kv_heads, "total", head])
    return b.model()


def multi_head_attention_block(hidden=16, heads=4, qk_head=4, v_head=6, tokens=5, memory=7, seed=0):
    """Cross-attention in com.microsoft MultiHeadAttention: queries from x [N, tokens, hidden], keys
    and values from m [N, memory, hidden], each projected by a MatMul, the q | k | v bias and a constant
    attention bias [1, heads, tokens, memory] inside the op (value heads wider than query/key heads),
    then the output projection."""
    b = Builder(seed=seed)
    x, m = b.input(["N", tokens, hidden], "x"), b.input(["N", memory, hidden], "m")
    q = b.op("MatMul", [x, b.weight(hidden, heads * qk_head)])
    k = b.op("MatMul", [m, b.weight(hidden, heads * qk_head)])
    v = b.op("MatMul", [m, b.weight(hidden, heads * v_head)])
    bias = b.weight(heads * (2 * qk_head + v_head))
    mask = b.const((b.rng.standard_normal((1, heads, tokens, memory)) * 0.5).astype(np.float32))
    y = b.op("MultiHeadAttention", [q, k, v, bias, "", mask], num_heads=heads, domain="com.microsoft")
    b.output(b.op("MatMul", [y, b.weight(heads * v_head, hidden)]), ["N", tokens, hidden])
    graph = helper.make_graph(b.nodes, "multi_head_attention_block", b.inputs, b.outputs, b.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def group_query_attention_block(hidden=16, heads=4, kv_heads=2, head=16, cache=True, packed=True, rotary=True,
                                sink=False, window=0, seed=0):
    """A decoder layer's attention in com.microsoft GroupQueryAttention, as onnxruntime-genai writes
    it: x [B, S, hidden] -> q | k | v (one packed MatMul, or three) -> attention over `heads` query
    heads sharing `kv_heads` key/value heads (rotated inside with cos/sin caches; `sink`: a head_sink
    per query head) -> output projection. seqlens_k and total_sequence_length come from an attention
    mask [B, total] as genai computes them; `cache`: past_key / past_value [B, kv_heads, past, head]
    are graph inputs and present_key / present_value graph outputs; `window`: a sliding window of that
    many positions whose cache is a ring buffer of that capacity (Gemma 2's local layers)."""
    b = Builder(seed=seed)
    x = b.input(["batch", "sequence", hidden], "x")
    mask = b.input(["batch", "total"], "attention_mask", TensorProto.INT64)
    seqlens = b.op("Cast", [b.op("Sub", [b.op("ReduceSum", [mask, b.const(np.array([1], np.int64))], keepdims=0),
                                         b.const(np.array(1, np.int64))])], to=TensorProto.INT32)
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", [mask]), b.const(np.array(1, np.int64))])],
                 to=TensorProto.INT32)
    if packed:
        q, k, v = b.op("MatMul", [x, b.weight(hidden, (heads + 2 * kv_heads) * head)]), "", ""
    else:
        q, k, v = (b.op("MatMul", [x, b.weight(hidden, n * head)]) for n in (heads, kv_heads, kv_heads))
    past = [b.input(["batch", kv_heads, "past", head], f"past_{n}") for n in ("key", "value")] if cache else ["", ""]
    rotation = ["", ""]
    if rotary:
        angles = np.arange(64)[:, None] * (1.0 / 10000 ** (np.arange(head // 2) / (head // 2)))[None, :]
        rotation = [b.const(f(angles).astype(np.float32)) for f in (np.cos, np.sin)]
    inputs = [q, k, v, *past, seqlens, total, *rotation]
    if sink:
        inputs += ["", "", b.weight(heads)]
    windowed = dict(local_window_size=window, sliding_window_cache=1) if window else {}
    outputs = b.op("GroupQueryAttention", inputs, n_out=3 if cache else 1, domain="com.microsoft", num_heads=heads,
                   kv_num_heads=kv_heads, do_rotary=int(rotary), **windowed)
    y = outputs[0] if cache else outputs
    b.output(b.op("MatMul", [y, b.weight(heads * head, hidden)]), ["batch", "sequence", hidden])
    outs = list(b.outputs)
    if cache:
        outs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["batch", kv_heads, "total", head])
                 for t in outputs[1:]]
    graph = helper.make_graph(b.nodes, "group_query_attention_block", b.inputs, outs, b.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def rotary_self_attention_block(hidden=16, heads=4, head=4, tokens=5, seed=0):
    """Self-attention as onnxruntime-genai's float16 CPU decoders write it (here in float32): q and k
    rotated by com.microsoft RotaryEmbedding without num_heads (onnxruntime reads the head size off
    the cos cache), com.microsoft MultiHeadAttention with an attention bias [1, heads, tokens, tokens]
    made by a Tile of a [1, 1, tokens, tokens] mask over the heads, then the output projection."""
    b = Builder(seed=seed)
    x = b.input([1, tokens, hidden], "x")
    q, k, v = (b.op("MatMul", [x, b.weight(hidden, heads * head)]) for _ in range(3))
    angles = np.arange(16)[:, None] * (1.0 / 10000 ** (np.arange(head // 2) / (head // 2)))[None, :]
    cos, sin = (b.const(f(angles).astype(np.float32)) for f in (np.cos, np.sin))
    positions = b.const(np.arange(tokens, dtype=np.int64)[None, :])
    q, k = (b.op("RotaryEmbedding", [t, positions, cos, sin], domain="com.microsoft") for t in (q, k))
    mask = b.const((b.rng.standard_normal((1, 1, tokens, tokens)) * 0.5).astype(np.float32))
    bias = b.op("Tile", [mask, b.const(np.array([1, heads, 1, 1], dtype=np.int64))])
    y = b.op("MultiHeadAttention", [q, k, v, "", "", bias], num_heads=heads, domain="com.microsoft")
    b.output(b.op("MatMul", [y, b.weight(heads * head, hidden)]), [1, tokens, hidden])
    graph = helper.make_graph(b.nodes, "rotary_self_attention_block", b.inputs, b.outputs, b.inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)
