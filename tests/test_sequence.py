"""Recurrent nets from torch (stacked, bidirectional LSTM/GRU/RNN, CRNN): hidden units pruned
per gate block, exact under the oracle, with both exporters."""
import onnx
import pytest

from oracle import check_exact
from spa import analyze

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("models.zoo")
from models.sequence import sequence_models  # noqa: E402

CASES = [(name, exporter) for name in sequence_models() for exporter in zoo.EXPORTERS]


@pytest.mark.parametrize("name,exporter", CASES, ids=["-".join(c) for c in CASES])
def test_recurrent_model_prunes_hidden_exactly(name, exporter, tmp_path):
    factory, example = sequence_models()[name]
    torch.manual_seed(0)
    module = factory().eval()
    path = zoo.export(module, tmp_path / f"{name}.onnx", exporter=exporter, example_inputs=(example,))
    model = onnx.load(path)
    recurrent = [n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    groups = analyze(model).groups
    if recurrent:
        weights = {n.input[2] for n in recurrent}
        hidden_groups = [g for g in groups if any(m.tensor in weights for m in g.members)]
    else:  # dynamo unrolls nn.RNN into MatMul + Tanh steps: the general rules must cope
        hidden_groups = [g for g in groups if len(g.atoms) == 12]
    assert hidden_groups and all(g.prunable for g in hidden_groups), [g.reasons() for g in hidden_groups]
    result = check_exact(model)
    if recurrent:
        sizes = [a.i for n in result.model.graph.node if n.op_type in ("LSTM", "GRU", "RNN")
                 for a in n.attribute if a.name == "hidden_size"]
        assert sizes and all(s < 12 for s in sizes)
