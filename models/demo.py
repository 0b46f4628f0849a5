"""`make demo`: build the zoo's ResNet-18 in torch, export it to ONNX, prune it with SPA's defaults
at --ratio 0.5 (the budget of removing half of every group's channels), verify the result and print
the before/after table.

Run with ``python -m models.demo [--out DIR] [--ratio R]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from spa.cli import main as spa_main

from . import zoo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None, help="directory for the ONNX files (default: a temp dir)")
    p.add_argument("--ratio", default="0.5")
    args = p.parse_args(argv)
    out_dir = args.out or tempfile.mkdtemp(prefix="spa_demo_")
    os.makedirs(out_dir, exist_ok=True)
    original = os.path.join(out_dir, "resnet18.onnx")
    pruned = os.path.join(out_dir, "resnet18_pruned.onnx")
    print(f"building ResNet-18 (224x224) in torch and exporting it to {original}")
    zoo.export(zoo.build("resnet18", full=True), original, exporter="torchscript", mode="eval")
    print(f"spa prune {original} -o {pruned} --ratio {args.ratio} --report")
    return spa_main(["prune", original, "-o", pruned, "--ratio", args.ratio, "--report", "--repeats", "10"])


if __name__ == "__main__":
    raise SystemExit(main())
