"""Real model files from ordinary exports: torch.onnx.export of torch built-ins and hand-written
blocks, exactly as a user would call it (no zoo helpers)."""
import warnings

import onnx
import pytest

from oracle import check_exact
from spa import Options, analyze
from spa.selection import Target

torch = pytest.importorskip("torch")
nn = torch.nn

SEQ = 7


def _quiet_export(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(*args, **kw)


def _encoder():
    """nn.TransformerEncoder: its layers are deep copies of one layer, so every layer gets its own
    random weights (the dynamo exporter would otherwise share equal matrices: tied weights)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return enc, torch.randn(2, SEQ, 32)


def _export_encoder(how, path):
    enc, x = _encoder()
    if how == "spa":  # spa.frontends.torch.export's default: dynamo, dynamic batch
        from frontends.torch_export import export

        export(enc, x, str(path))
        return {}
    if how == "torchscript":  # it bakes the sequence into MHA's views: batch only is dynamic
        _quiet_export(enc, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return {}
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} if how == "dynamo" else \
        {0: torch.export.Dim.DYNAMIC}
    prog = _quiet_export(enc, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                         dynamic_shapes=(dyn,), verbose=False)
    prog.save(str(path))
    shape = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return {shape[1].dim_param: 5} if shape[1].dim_param else {}


@pytest.mark.parametrize("how", ["dynamo", "dynamo-static-seq", "torchscript", "spa"])
def test_torch_transformer_encoder_heads_prune_exactly(how, tmp_path):
    """With a static sequence the exporters write MHA's view(S, B*H, d) as a constant [S, -1, d]:
    the -1 infers B*H' after pruning, so heads are prunable with no head-count constant."""
    path = tmp_path / "enc.onnx"
    dims = _export_encoder(how, path)
    model = onnx.load(str(path))
    kinds = sorted((g.kind, len(g.atoms)) for g in analyze(model).groups if g.prunable)
    assert kinds == [("channels", 64), ("channels", 64), ("heads", 4), ("heads", 4)], kinds
    check_exact(model, Target(ratio=0.5), dims=dims)


class _AttentionBlock(nn.Module):
    """Hand-written attention: q/k/v Linear, view to heads, matmul, softmax, out Linear, residual +
    LayerNorm, between a token embedding and a classifier. `width_from_input`: the merge view
    reads its width off the residual stream (x.shape), as hand-written code often does."""

    def __init__(self, width_from_input, d=32, heads=4):
        super().__init__()
        self.width_from_input, self.d, self.h = width_from_input, d, heads
        self.emb = nn.Embedding(50, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, ids):
        x = self.emb(ids)
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.h, self.d // self.h).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / (self.d // self.h) ** 0.5, dim=-1)
        y = (a @ v).transpose(1, 2).reshape(b, t, d if self.width_from_input else self.d)
        return self.head(self.ln(x + self.o(y)))


@pytest.mark.parametrize("width_from_input", [True, False])
def test_hidden_of_hand_written_attention_torchscript(width_from_input, tmp_path):
    """The merge view's width read off the residual stream (Shape(x)[2]) would follow the pruned
    hidden size while the attention width does not: the pruned model takes it as a constant, the
    attention's new width (it froze hidden before). Either way hidden prunes (approximate: LayerNorm
    statistics), the file runs, and heads prune exactly."""
    torch.manual_seed(0)
    block = _AttentionBlock(width_from_input).eval()
    ids = torch.randint(0, 50, (2, SEQ))
    axes = {0: "batch", 1: "seq"}
    path = tmp_path / "block.onnx"
    _quiet_export(block, (ids,), str(path), dynamo=False, input_names=["ids"], output_names=["y"],
                  dynamic_axes={"ids": axes, "y": axes})
    model = onnx.load(str(path))
    options = Options(granularity=("channels", "hidden"))
    groups = analyze(model, options).groups
    hidden = [g for g in groups if g.kind == "hidden"]
    assert len(hidden) == 1 and hidden[0].prunable
    assert "heads" in {g.kind for g in analyze(model).groups if g.prunable}
    check_exact(model, Target(ratio=0.5), dims={"seq": 5})  # heads prune exactly
    check_exact(model, Target(ratio=0.25), options=options, dims={"seq": 5}, atol=1e9, rtol=1e9)


class _HeadsOfAMap(nn.Module):
    """A feature map split into heads with the head size computed from the map's own channel count,
    view(B, heads, C // heads, H, W) (trueocr's recognizer): a weight per head scales its slice."""

    def __init__(self, heads=4):
        super().__init__()
        self.heads = heads
        self.conv, self.out = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 8, 1)
        self.gate = nn.Linear(heads, heads)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        heads = y.view(b, self.heads, c // self.heads, h, w)
        gate = torch.sigmoid(self.gate(heads.mean(dim=(2, 3)).transpose(1, 2))).transpose(1, 2)
        return self.out((heads * gate[:, :, None, None, :]).reshape(b, c, h, w))


def test_head_size_computed_from_the_channel_count_becomes_a_constant(tmp_path):
    """The head size C // heads is computed at run time from the map's Shape: once a head goes it
    would shrink too (the heads constant stays in the Div), so the pruned file writes it as a constant."""
    torch.manual_seed(0)
    path = tmp_path / "heads.onnx"
    _quiet_export(_HeadsOfAMap().eval(), (torch.randn(2, 3, 6, 10),), str(path), dynamo=False, input_names=["x"],
                  dynamic_axes={"x": {0: "batch", 3: "width"}})
    model = onnx.load(str(path))
    assert any(n.op_type == "Div" for n in model.graph.node)
    heads = [g for g in analyze(model).groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].prunable
    result = check_exact(model, Target(ratio=0.5), dims={"width": 12})
    assert result.plan.removed_atoms_by_group().get(heads[0].id)


class _StackedBiLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.rnn(x)[0])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_stacked_bidirectional_lstm_layers_prune_independently(exporter, tmp_path):
    """torch feeds every layer a slice of one zeros [layers * 2, B, hidden] initial state, which
    tied the layers' hidden sizes into one group. A zero state is the op's default: it is dropped
    where the hidden size shrinks, so each layer is its own group (its two directions stay one
    unit j: an ONNX LSTM has one hidden_size; the next layer reads columns j and hidden + j)."""
    torch.manual_seed(0)
    model, x = _StackedBiLSTM().eval(), torch.randn(5, 2, 8)
    path = tmp_path / "lstm.onnx"
    if exporter == "torchscript":
        _quiet_export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {1: "batch"}, "y": {1: "batch"}})
    else:
        _quiet_export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                      dynamic_shapes=({1: torch.export.Dim.DYNAMIC},), verbose=False).save(str(path))
    proto = onnx.load(str(path))
    groups = [g for g in analyze(proto).groups if g.prunable]
    assert sorted(len(g.atoms) for g in groups) == [16, 16]
    first_w = next(n for n in proto.graph.node if n.op_type == "LSTM").input[1]
    result = check_exact(proto, Target(ratio=0.5, ratios={first_w: 0.25}))
    sizes = [next(a.i for a in n.attribute if a.name == "hidden_size")
             for n in result.model.graph.node if n.op_type == "LSTM"]
    assert sizes == [12, 8], sizes


def test_a_baked_sequence_length_is_named_as_the_freeze_reason(tmp_path):
    """TorchScript bakes the sequence length of nn.MultiheadAttention into its reshapes even with
    dynamic_axes: the file runs only at that length, and the head group's reason says so."""
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(self.mha(x, x, x, need_weights=False)[0])

    path = str(tmp_path / "mha.onnx")
    _quiet_export(Attention().eval(), (torch.randn(2, 7, 32),), path, dynamo=False, input_names=["x"],
                  output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}}, opset_version=17)
    reasons = [r for g in analyze(onnx.load(path)).groups for r in g.reasons()]
    assert any("does not run at other input sizes" in r and "[7,8,8]" in r and "dynamo=True" in r for r in reasons), reasons


def test_modules_exported_as_local_functions_are_inlined_and_prune(tmp_path):
    """torch's export_modules_as_functions writes each block as a call of a local function: every layer inside read
    as one custom-domain boundary ("nothing prunable"). load_model inlines the calls, said, and they prune exactly."""
    import spa
    from spa.errors import SpaWarning
    from spa.graph import load_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(16, 4)).eval()
    path = str(tmp_path / "functions.onnx")
    _quiet_export(model, (torch.randn(2, 16),), path, dynamo=False, export_modules_as_functions={Block},
                  opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert len(onnx.load(path).functions) == 1
    with pytest.warns(SpaWarning, match="the calls of its local function Block inlined"):
        proto = load_model(path)
    assert not proto.functions and {n.op_type for n in proto.graph.node} == {"Gemm", "Relu", "Add"}
    assert sorted(len(g.atoms) for g in analyze(proto).groups if g.prunable) == [32, 32]
    check_exact(proto)
    given = onnx.load(path)  # spa's API given the ModelProto: inlined in a copy, the caller's left as it is
    assert sorted(len(g.atoms) for g in spa.analyze(given).groups if g.prunable) == [32, 32]
    assert spa.prune(given, 0.5, criterion="l1").model.graph.initializer and len(given.functions) == 1
