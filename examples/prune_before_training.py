"""Pruning before training: prune an untrained network data-free, then train the small one.

    python -m examples.prune_before_training

export the untrained model -> SynFlow (data-free, made for untrained nets) keeps half the MACs ->
apply_plan narrows the user's own module in place -> train it on digits like the full one.
"""
from __future__ import annotations

import os
import sys
import tempfile

import onnx
import torch

from examples.digits import DigitsNet, accuracy, data, macs, train
from spa.frontends.torch import apply_plan, export
from spa.pipeline import prune, save
from spa.selection import Target


def main(epochs: int = 15, keep_macs: float = 0.5, log=print) -> dict:
    x_train, y_train, x_test, y_test = data()
    torch.manual_seed(0)
    model = DigitsNet()
    with tempfile.TemporaryDirectory() as tmp:
        full, small = os.path.join(tmp, "untrained.onnx"), os.path.join(tmp, "small.onnx")
        export(model, x_train[:2], full, training=True)  # keeps BatchNormalization and Dropout
        result = prune(onnx.load(full), Target(keep_macs=keep_macs), criterion="synflow")
        save(result.model, small)
        model = apply_plan(model, result.plan, pruned=small, example_inputs=x_train[:4])  # same module, narrowed
        macs_full, macs_small = macs(full), macs(small)
    log(f"pruned before training: {macs_full:,} -> {macs_small:,} MACs; narrowed {len(model.spa_report.narrowed)} tensors")
    losses = train(model, x_train, y_train, epochs)
    reference = DigitsNet()
    train(reference, x_train, y_train, epochs)
    figures = {"macs_full": macs_full, "macs_pruned": macs_small, "first_loss": losses[0],
               "last_loss": losses[-1], "accuracy_pruned": accuracy(model, x_test, y_test),
               "accuracy_full": accuracy(reference, x_test, y_test)}
    log(f"test accuracy after {epochs} epochs: pruned {figures['accuracy_pruned']:.3f}, "
        f"full-size {figures['accuracy_full']:.3f}")
    return figures


if __name__ == "__main__":
    main(epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 15)
