"""SPA demo (placeholder): build the zoo ResNet, export it to ONNX in a temp dir, print the path.

Run with ``python -m models.demo``. The pruning step is added by the ``spa`` side.
"""
from __future__ import annotations

import os
import tempfile

from . import zoo


def main(argv=None) -> str:
    out_dir = tempfile.mkdtemp(prefix="spa_demo_")
    model = zoo.build("resnet18")
    path = zoo.export(model, os.path.join(out_dir, "resnet18.onnx"), exporter="torchscript",
                      mode="eval")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"exported resnet18 (tiny, {n_params} parameters) to {path}")
    # TODO(spa): prune the exported graph and report the size / accuracy trade-off.
    return path


if __name__ == "__main__":
    main()
