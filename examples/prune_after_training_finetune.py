"""Pruning after training, with fine-tuning.

    python -m examples.prune_after_training_finetune

train -> export -> remove half of every channel group (L1) -> apply_plan narrows the trained module
-> fine-tune briefly. Accuracy before, right after pruning and after fine-tuning.
"""
from __future__ import annotations

import os
import sys
import tempfile

import onnx

from examples.digits import DigitsNet, accuracy, data, macs, train
from spa.frontends.torch import apply_plan, export
from spa.pipeline import prune, save
from spa.selection import Target


def main(epochs: int = 15, finetune_epochs: int = 3, ratio: float = 0.5, log=print) -> dict:
    x_train, y_train, x_test, y_test = data()
    model = DigitsNet()
    train(model, x_train, y_train, epochs)
    figures = {"accuracy_trained": accuracy(model, x_test, y_test)}
    with tempfile.TemporaryDirectory() as tmp:
        full, small = os.path.join(tmp, "trained.onnx"), os.path.join(tmp, "small.onnx")
        export(model, x_train[:2], full)
        result = prune(onnx.load(full), Target(ratio=ratio), criterion="l1")
        save(result.model, small)
        model = apply_plan(model, result.plan, pruned=small, example_inputs=x_test[:4])  # same module, narrowed
        figures.update(macs_full=macs(full), macs_pruned=macs(small))
    figures["accuracy_pruned"] = accuracy(model, x_test, y_test)
    train(model, x_train, y_train, finetune_epochs, lr=1e-3)
    figures["accuracy_finetuned"] = accuracy(model, x_test, y_test)
    log(f"MACs {figures['macs_full']:,} -> {figures['macs_pruned']:,}; test accuracy: trained "
        f"{figures['accuracy_trained']:.3f}, pruned {figures['accuracy_pruned']:.3f}, "
        f"fine-tuned {figures['accuracy_finetuned']:.3f}")
    return figures


if __name__ == "__main__":
    main(epochs=int(sys.argv[1]) if len(sys.argv) > 1 else 15)
