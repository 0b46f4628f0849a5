"""The three pruning times, run as the README shows them (fewer epochs)."""
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def test_prune_before_training_then_train():
    from examples.prune_before_training import main
    f = main(epochs=4, log=lambda *_: None)
    assert f["macs_pruned"] <= 0.55 * f["macs_full"]
    assert f["last_loss"] < 0.5 * f["first_loss"]
    assert f["accuracy_pruned"] > 0.85


def test_prune_after_training_with_fine_tuning():
    from examples.prune_after_training_finetune import main
    f = main(epochs=6, finetune_epochs=2, log=lambda *_: None)
    assert f["accuracy_trained"] > 0.9
    assert f["macs_pruned"] < 0.5 * f["macs_full"]
    assert f["accuracy_finetuned"] > max(0.9, f["accuracy_pruned"])


def test_prune_after_training_data_free_obspa_beats_l1():
    from examples.prune_after_training_data_free import main
    f = main(epochs=6, log=lambda *_: None)
    assert f["macs_obspa"] <= 0.52 * f["macs_full"]
    assert f["accuracy_obspa"] > f["accuracy_l1"] + 0.2
