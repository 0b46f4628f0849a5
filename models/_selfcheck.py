"""Self-check of the model zoo: every model x exporter x mode exports, passes
``onnx.checker.check_model(full_check=True)`` and matches torch in onnxruntime at batch 1 and 3.

    python -m models._selfcheck                 # everything (eval, train, eval_bn)
    python -m models._selfcheck resnet18 yolo   # some models
    python -m models._selfcheck --modes eval train --exporters dynamo --ops

Also usable from pytest (``pytest models/_selfcheck.py``): one parametrised test per combo.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import zoo


def graph_facts(path: str) -> dict:
    """Op types and a few structural facts worth knowing about an exported file."""
    import onnx

    m = onnx.load(path)
    g = m.graph
    inits = {i.name for i in g.initializer}
    const_out = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    reshape_const = reshape_computed = 0
    for n in g.node:
        if n.op_type == "Reshape":
            if n.input[1] in inits or n.input[1] in const_out:
                reshape_const += 1
            else:
                reshape_computed += 1
    bn_train = sum(1 for n in g.node if n.op_type == "BatchNormalization" and any(
        a.name == "training_mode" and a.i == 1 for a in n.attribute))
    return {
        "ops": Counter(n.op_type for n in g.node),
        "initializers": len(g.initializer),
        "constant_nodes": sum(n.op_type == "Constant" for n in g.node),
        "reshape_const": reshape_const,
        "reshape_computed": reshape_computed,
        "bn_training_mode": bn_train,
        "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
                   for i in g.input],
        "outputs": [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
                    for o in g.output],
    }


def check_one(name: str, exporter: str, mode: str, outdir: str) -> dict:
    model = zoo.build(name)
    path = str(Path(outdir) / f"{name}-{exporter}-{mode}.onnx")
    t0 = time.perf_counter()
    zoo.export(model, path, exporter=exporter, mode=mode)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = zoo.verify_export(path, model, exporter=exporter, mode=mode)
    t_verify = time.perf_counter() - t0
    facts = graph_facts(path)
    n_bn_modules = sum(isinstance(m, zoo._BN_TYPES) for m in model.modules())
    if mode != "eval":
        assert facts["ops"].get("BatchNormalization", 0) == n_bn_modules, (
            f"{name}/{exporter}/{mode}: {facts['ops'].get('BatchNormalization', 0)} BN nodes, "
            f"{n_bn_modules} BN modules")
    for _, dims in facts["inputs"] + facts["outputs"]:
        assert isinstance(dims[0], str), f"{name}/{exporter}/{mode}: batch axis not dynamic"
    return dict(name=name, exporter=exporter, mode=mode, t_export=t_export, t_verify=t_verify,
                err=res["max_abs_err"], bn_modules=n_bn_modules, **facts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=list(zoo.ZOO))
    ap.add_argument("--exporters", nargs="+", default=list(zoo.EXPORTERS))
    ap.add_argument("--modes", nargs="+", default=list(zoo.MODES))
    ap.add_argument("--ops", action="store_true", help="print the op types of every export")
    args = ap.parse_args(argv)
    failures = []
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        print(f"{'model':13s} {'exporter':11s} {'mode':8s} {'export_s':>8s} {'verify_s':>8s} "
              f"{'max_err':>8s} {'nodes':>5s} {'BN':>3s} {'init':>4s} {'Const':>5s} "
              f"{'Rshp c/d':>8s}")
        for name in args.names:
            for exporter in args.exporters:
                for mode in args.modes:
                    try:
                        r = check_one(name, exporter, mode, d)
                    except Exception as e:  # noqa: BLE001 - report and continue
                        failures.append((name, exporter, mode, repr(e)[:500]))
                        print(f"{name:13s} {exporter:11s} {mode:8s} FAILED: {repr(e)[:300]}")
                        continue
                    ops = r["ops"]
                    print(f"{name:13s} {exporter:11s} {mode:8s} {r['t_export']:8.2f} "
                          f"{r['t_verify']:8.2f} {r['err']:8.1e} {sum(ops.values()):5d} "
                          f"{ops.get('BatchNormalization', 0):3d} {r['initializers']:4d} "
                          f"{r['constant_nodes']:5d} "
                          f"{r['reshape_const']:>3d}/{r['reshape_computed']:<3d}")
                    if args.ops:
                        print("    " + " ".join(f"{k}:{v}" for k, v in sorted(ops.items())))
                    sys.stdout.flush()
    print(f"total {time.perf_counter() - total:.1f}s, {len(failures)} failures")
    for f in failures:
        print("FAIL", *f)
    return 1 if failures else 0


try:  # optional pytest entry point
    import pytest

    @pytest.mark.parametrize("mode", zoo.MODES)
    @pytest.mark.parametrize("exporter", zoo.EXPORTERS)
    @pytest.mark.parametrize("name", list(zoo.ZOO))
    def test_zoo_export(name, exporter, mode, tmp_path):
        check_one(name, exporter, mode, str(tmp_path))
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    sys.exit(main())
