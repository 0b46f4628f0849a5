"""Einsum (torch.einsum, exported as is by both torch exporters): a channel is a label; kept labels
pass through, summed ones are contracted, a weight's own output label creates channels. Spatial
self-attention written in einsum (as diffusion UNets write it) and dense layers written in einsum,
with an ellipsis and with an implicit output, prune against the oracle."""
import numpy as np
import onnx
import pytest

from oracle import check_exact
from spa import analyze
from spa.rules import Frozen
from spa.rules.layers import einsum_labels
from spa.selection import Target

torch = pytest.importorskip("torch")


class EinsumBlock(torch.nn.Module):
    """x [B, C, T] -> q, k, v by a 1x1 conv; softmax(q^T k) over positions ('bct,bcs->bts'), the values
    mixed ('bts,bcs->bct'), projected and added; then an MLP in einsum: '...c,cf->...f' on the
    positions, ReLU, and 'btf,fc' (implicit output: bct). With `heads`, q, k and v fold their heads
    into the batch ([B*H, C/H, T]) and the attended values merge back ([B, C, T]): guided diffusion's
    QKVAttention, which diffusion UNets copy."""

    def __init__(self, c=16, f=24, heads=1):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Conv1d(c, 3 * c, 1), torch.nn.Conv1d(c, c, 1)
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(c, f, generator=generator) * 0.3)
        self.w2 = torch.nn.Parameter(torch.randn(f, c, generator=generator) * 0.3)

    def forward(self, x):
        batch, width, length = x.shape
        q, k, v = (t.reshape(batch * self.heads, width // self.heads, length) for t in self.qkv(x).chunk(3, dim=1))
        weights = torch.einsum("bct,bcs->bts", q, k).softmax(-1)
        y = x + self.proj(torch.einsum("bts,bcs->bct", weights, v).reshape(batch, width, length))
        h = torch.relu(torch.einsum("...c,cf->...f", y.transpose(1, 2), self.w1))
        return y + torch.einsum("btf,fc", h, self.w2)


def _export(module, path, dynamo):
    kwargs = dict(dynamic_shapes=({0: torch.export.Dim("batch")},)) if dynamo else \
        dict(dynamic_axes={"x": {0: "batch"}})
    torch.onnx.export(module.eval(), (torch.randn(2, 16, 10),), path, dynamo=dynamo, input_names=["x"],
                      output_names=["y"], **kwargs)
    return onnx.load(path)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_einsum_attention_and_dense_layers_prune_exactly(dynamo, tmp_path):
    model = _export(EinsumBlock(), str(tmp_path / "einsum.onnx"), dynamo)
    assert sum(n.op_type == "Einsum" for n in model.graph.node) == 4
    groups = [g for g in analyze(model).groups if g.prunable]
    # the qkv conv's 48: q with k (contracted together, 16) and v (through the attention into the
    # projection, 16); the MLP's 24
    assert sorted(len(g.atoms) for g in groups) == [24, 32], [len(g.atoms) for g in groups]
    check_exact(model, Target(ratio=0.5))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_heads_folded_into_the_batch_and_merged_back_prune_whole(dynamo, tmp_path):
    """[B, C, T] -> [B*H, C/H, T] -> einsum attention -> [B, C, T]: the heads ride the symbolic batch
    axis through the einsums and come back as the merged channels, whole heads (before: frozen,
    "Reshape of an axis with heads merged into a symbolic size"); the head count inside the
    batch*heads shape is rewritten."""
    model = _export(EinsumBlock(heads=4), str(tmp_path / "heads.onnx"), dynamo)
    kinds = sorted(g.kind for g in analyze(model).groups if g.prunable)
    assert kinds == ["channels", "heads"], kinds
    check_exact(model, Target(ratio=0.5))


def test_einsum_labels_spell_out_ellipses_and_implicit_outputs():
    assert einsum_labels("...c,cf->...f", [3, 2]) == (["\u0100\u0101c", "cf"], "\u0100\u0101f")
    assert einsum_labels(b"btf,fc", [3, 2]) == (["btf", "fc"], "bct")
    assert einsum_labels("...ij,...jk", [4, 2]) == (["\u0100\u0101ij", "jk"], "\u0100\u0101ik")
    with pytest.raises(Frozen, match="diagonal"):
        einsum_labels("ii->i", [2])
    assert np.array_equal(np.einsum("...ij,...jk", np.ones((2, 3, 4, 5)), np.ones((5, 6))).shape, (2, 3, 4, 6))
