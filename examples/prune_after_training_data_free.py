"""Pruning after training, without fine-tuning and without data: OBSPA.

    python -m examples.prune_after_training_data_free

train -> export -> OBSPA with synthetic calibration inputs (no training data) removes channels
and compensates the remaining weights in closed form -> the pruned ONNX runs as is (or comes back
as a torch module with from_onnx). L1 magnitude pruning at the same MAC budget for comparison.
"""
from __future__ import annotations

import os
import sys
import tempfile

import onnx

from examples.digits import DigitsNet, accuracy, data, macs, train
from spa.frontends.torch import export, from_onnx
from spa.pipeline import prune, save
from spa.selection import Target


def main(epochs: int = 15, keep_macs: float = 0.5, log=print) -> dict:
    x_train, y_train, x_test, y_test = data()
    model = DigitsNet()
    train(model, x_train, y_train, epochs)
    figures = {"accuracy_trained": accuracy(model, x_test, y_test)}
    with tempfile.TemporaryDirectory() as tmp:
        full = os.path.join(tmp, "trained.onnx")
        export(model, x_train[:2], full)
        figures["macs_full"] = macs(full)
        for criterion in ("l1", "obspa"):
            small = os.path.join(tmp, f"{criterion}.onnx")
            result = prune(onnx.load(full), Target(keep_macs=keep_macs), criterion=criterion,
                           calibration="synthetic")
            save(result.model, small)
            figures[f"macs_{criterion}"] = macs(small)
            figures[f"accuracy_{criterion}"] = accuracy(from_onnx(small), x_test, y_test)
    log(f"MACs {figures['macs_full']:,} -> {figures['macs_obspa']:,}; test accuracy: trained "
        f"{figures['accuracy_trained']:.3f}, L1 {figures['accuracy_l1']:.3f}, "
        f"OBSPA (no data) {figures['accuracy_obspa']:.3f}")
    return figures


if __name__ == "__main__":
    main(epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 15)
