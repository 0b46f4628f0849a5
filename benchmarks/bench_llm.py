"""LLM-scale benchmark: `spa analyze` and `spa prune` on a ~1.1B-parameter LLaMA exported to ONNX
with all weights in one external data file. Time and peak memory, plus a per-stage profile.

    python benchmarks/bench_llm.py                      # TinyLlama-1.1B shape (export ~2 min once)
    python benchmarks/bench_llm.py --size small         # same pipeline, 2 layers x 256 (< 1 min)
    python benchmarks/bench_llm.py --keep DIR           # cache the generated model(s) in DIR
    python benchmarks/bench_llm.py --profile all        # + cProfile per stage
    python benchmarks/bench_llm.py --profile tracemalloc  # + tracemalloc too (~35 min on 1b)
    python benchmarks/bench_llm.py --spa-from worktree  # measure the working tree, not a HEAD snapshot

Goal (issue): analyze + prune + write a ~1B LLaMA in under 60 s and under 2.5x the model's size
in RAM on a 2-core machine.

The model. `transformers`' own LlamaForCausalLM, instantiated offline from a LlamaConfig with
random weights (torch.manual_seed(0), no from_pretrained), eager attention, no KV cache, exported
with the TorchScript exporter (torch.onnx.export(dynamo=False), opset 17, dynamic batch and
sequence, inputs input_ids + attention_mask, output logits). That is the graph users get when they
export a Hugging Face LLaMA (RMSNorm as Pow/ReduceMean/Sqrt/Div, SwiGLU, rotary embeddings via
Slice/Neg/Concat, GQA via Expand/Reshape of k and v, untied lm_head), which a hand-written module
would only approximate, and it costs nothing but a pip install: transformers and its small pure
dependencies are installed with `pip install --no-deps --target CACHE/pydeps` (never into the
environment; torch is the one already installed) when `import transformers` fails. The attention
mask input is needed: without it transformers 5 emits aten::diff (packed-sequence detection),
which the TorchScript exporter cannot export.
Exporting 1.1B fp32 parameters (4.4 GB) costs 15-30 s to build the torch model and ~66 s to export,
~110 s in all with the repack and the check (peak RSS 6.1 GiB, 1.5x the model); over 2 GB the exporter writes one file per tensor, so the export is then
repacked, streaming, into ONE external data file `model.onnx.data` (every initializer >= 1 KiB,
4 KiB-aligned; the small shape constants stay inline), checked against the torch logits with
onnxruntime, and cached under CACHE/<size>/ (default /tmp/spa_bench_llm) so reruns skip it.
Generation is reported separately and never counted.

Measurements. Each command runs in its own fresh subprocess under `/usr/bin/time -v` (peak RSS =
ru_maxrss of that process; os.wait4 when /usr/bin/time is missing); the page cache is warm (the
model was just written or read):
  * `python -m spa analyze model.onnx -q --json`
  * `python -m spa prune model.onnx -o pruned.onnx --ratio 0.3 --criterion l1 -q` (the CLI verifies with the
    full onnx checker, strict shape inference and an onnxruntime run before writing)
Model size = model.onnx + model.onnx.data bytes. Parameters before/after are counted from the
initializer dims of both files and split by what reads them (q/k/v/o, gate/up/down, ...).

Profile (`--profile stages`, default): the CLI's stages are called one by one in another
subprocess - spa.graph.load_model, spa.graph.Graph(), spa.groups.analyze, spa.importance.score,
spa.selection.select, spa.rewrite.rewrite, spa.pipeline.save - each with wall time, RSS after it
and its exact peak RSS (VmHWM, reset between stages through /proc/self/clear_refs). The library
calls inside the stages that copy or serialise weights (onnx.load, load_external_data_for_model,
numpy_helper.to_array/from_array, ModelProto.CopyFrom/ByteSize/SerializeToString,
shape_inference, onnx.save_model, checker, onnxruntime session/run) are wrapped and timed, and an
external process samples the worker's RSS every 5 ms (no GIL involved) to give each call's peak.
`--profile all` adds one cProfile run; `--profile tracemalloc` also a tracemalloc run (numpy and
Python allocations per stage, by call site; protobuf's upb arena and onnxruntime are invisible to
it, and it is slow). The worker resets the kernel's RSS high-water mark between stages, so its
process peak is taken as the largest stage peak. spa/ is measured from a `git archive` snapshot of
HEAD (--spa-from) so concurrent edits cannot change the code mid-run; results record the commit and
a hash of spa/*.py.

Writes benchmarks/results/llm.json (one entry per size, merged) and llm_memory_<size>.png.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, git, log, version  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the copy of spa/ being measured: a `git archive` snapshot of a commit (default HEAD, see --spa-from)
# or the working tree; subprocesses get it through SPA_BENCH_SPA_ROOT
SPA_ROOT = os.environ.get("SPA_BENCH_SPA_ROOT") or ROOT
if SPA_ROOT not in sys.path:
    sys.path.insert(0, SPA_ROOT)
SPA_REV = os.environ.get("SPA_BENCH_SPA_REV", "worktree")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
HERE = os.path.abspath(__file__)
# issue 15's goals: seconds and peak RSS / model size of `spa prune --ratio 0.3`
GOALS = {"1b": (45.0, 1.2), "7b": (300.0, 1.3), "small": (60.0, 2.5)}

CONFIGS = {
    # TinyLlama-1.1B: 1,100,048,384 parameters
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False),
    # same pipeline, same ratios (GQA 4:1, intermediate 2.75x hidden), ~18M parameters
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False),
    # Mistral-7B / LLaMA-2-7B-GQA shape in float16, written directly as ONNX by models.llama_onnx
    # (no torch: 7.2B parameters, 14.5 GB of external data streamed to disk in about a minute)
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, dtype="float16"),
}
DIRECT = {"7b"}  # sizes generated by models.llama_onnx rather than exported from transformers
# pure-python (or self-contained wheel) dependencies of transformers, pinned; torch/numpy/etc. are
# taken from the environment
PYDEPS = ["transformers==5.23.0", "huggingface-hub==2.4.0", "tokenizers==0.23.3", "safetensors==0.8.0",
          "tqdm==4.70.1", "httpx2==2.16.2", "truststore==0.10.5", "fsspec==2026.9.0"]
EXPORT_VERSION = 2  # bump to invalidate cached models




def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------
# machine info
# ------------------------------------------------------------------------------------------




def spa_fingerprint() -> str:
    """HEAD plus a hash of spa/*.py as they are on disk now (spa/ is edited while benchmarks run)."""
    import hashlib

    h = hashlib.sha1()
    spa_dir = os.path.join(SPA_ROOT, "spa")
    for name in sorted(os.listdir(spa_dir)):
        if name.endswith(".py"):
            h.update(name.encode())
            h.update(open(os.path.join(spa_dir, name), "rb").read())
    return f"{SPA_REV}+spa:{h.hexdigest()[:10]}"


FINGERPRINTS: set = set()


def machine_info() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_bytes": mem, "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {d: version(d) for d in ("onnx", "onnxruntime", "torch", "numpy", "scipy", "protobuf")},
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty_spa": bool(git("status", "--porcelain", "spa")), "spa_measured": SPA_REV}


# ------------------------------------------------------------------------------------------
# running a command: wall time and peak RSS of a fresh process
# ------------------------------------------------------------------------------------------
def measured(cmd, cwd=None, env=None, timeout=3600) -> dict:
    """Run cmd in a fresh process; wall time, peak RSS (ru_maxrss), user/sys CPU, output."""
    env = dict(os.environ if env is None else env)
    time_bin = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    load = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path, tv_path = (os.path.join(tmp, n) for n in ("out", "err", "time"))
        full = [time_bin, "-v", "-o", tv_path, *cmd] if time_bin else list(cmd)
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(full, cwd=cwd or SPA_ROOT, env=env, stdout=out, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        result = {"cmd": " ".join(cmd), "wall_s": wall, "rc": proc.returncode, "loadavg_1min_before": load,
                  "stdout": open(out_path).read(), "stderr": open(err_path).read()}
        if time_bin and os.path.exists(tv_path):
            tv = open(tv_path).read()
            field = lambda key: re.search(re.escape(key) + r":\s*(\S+)", tv)  # noqa: E731
            result["peak_rss_bytes"] = int(field("Maximum resident set size (kbytes)").group(1)) * 1024
            result["user_s"] = float(field("User time (seconds)").group(1))
            result["sys_s"] = float(field("System time (seconds)").group(1))
            result["rss_source"] = "/usr/bin/time -v"
        else:  # the child itself (no wrapper): its rusage is exact
            result["peak_rss_bytes"] = usage.ru_maxrss * 1024
            result["user_s"], result["sys_s"] = usage.ru_utime, usage.ru_stime
            result["rss_source"] = "os.wait4 rusage"
    return result


def spa_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SPA_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["SPA_BENCH_SPA_ROOT"], env["SPA_BENCH_SPA_REV"] = SPA_ROOT, SPA_REV
    env.setdefault("PYTHONHASHSEED", "0")
    return env


# ------------------------------------------------------------------------------------------
# model generation (not counted)
# ------------------------------------------------------------------------------------------
def ensure_transformers(cache_root: str):
    """A PYTHONPATH entry that makes `import transformers` work, or None if it already does."""
    probe = [sys.executable, "-c", "import transformers"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    target = os.path.join(cache_root, "pydeps")
    env = dict(os.environ, PYTHONPATH=target)
    if subprocess.run(probe, capture_output=True, env=env).returncode != 0:
        log(f"installing {', '.join(PYDEPS)} into {target} (pip --no-deps --target)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, *PYDEPS],
                       check=True)
        subprocess.run(probe, check=True, env=env)
    return target


def generate(size: str, model_dir: str, cache_root: str) -> dict:
    meta_path = os.path.join(model_dir, "meta.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        files_ok = all(os.path.exists(os.path.join(model_dir, f)) for f in ("model.onnx", "model.onnx.data"))
        if files_ok and meta.get("export_version") == EXPORT_VERSION and meta.get("config") == CONFIGS[size]:
            log(f"using cached model {model_dir} (generated {meta['date']})")
            meta["cached"] = True
            return meta
    shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir)
    if size in DIRECT:
        return generate_direct(size, model_dir, meta_path)
    extra = ensure_transformers(cache_root)
    env = dict(os.environ)
    if extra:
        env["PYTHONPATH"] = extra + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log(f"generating the {size} LLaMA in {model_dir} (transformers, TorchScript exporter) ...")
    run = measured([sys.executable, HERE, "--_export-worker", size, model_dir], env=env)
    if run["rc"] != 0:
        sys.stderr.write(run["stdout"] + run["stderr"])
        raise SystemExit(f"model generation failed (rc {run['rc']})")
    meta = json.load(open(meta_path))
    meta.update(generation_wall_s=run["wall_s"], generation_peak_rss_bytes=run["peak_rss_bytes"],
                transformers_from=extra or "environment")
    json.dump(meta, open(meta_path, "w"), indent=1)
    meta["cached"] = False
    log(f"generated in {run['wall_s']:.1f} s (build {meta['build_s']:.1f} s, export {meta['export_s']:.1f} s, "
        f"repack {meta['repack_s']:.1f} s, check {meta['check_s']:.1f} s), peak RSS {gib(run['peak_rss_bytes'])}")
    return meta


def generate_direct(size: str, model_dir: str, meta_path: str) -> dict:
    log(f"generating the {size} LLaMA-shaped model in {model_dir} (models.llama_onnx, no torch) ...")
    code = ("import json, sys; from models.llama_onnx import build; "
            f"json.dump(build(sys.argv[1], {size!r}, dtype={CONFIGS[size]['dtype']!r}), sys.stdout)")
    run = measured([sys.executable, "-c", code, os.path.join(model_dir, "model.onnx")], cwd=ROOT)
    if run["rc"] != 0:
        sys.stderr.write(run["stdout"] + run["stderr"])
        raise SystemExit(f"model generation failed (rc {run['rc']})")
    meta = {"export_version": EXPORT_VERSION, "size": size, "config": CONFIGS[size],
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "source": "models.llama_onnx.build: ONNX graph written directly, deterministic seeded weights",
            "built": json.loads(run["stdout"]), "generation_wall_s": run["wall_s"],
            "generation_peak_rss_bytes": run["peak_rss_bytes"]}
    json.dump(meta, open(meta_path, "w"), indent=1)
    log(f"generated in {run['wall_s']:.1f} s, peak RSS {gib(run['peak_rss_bytes'])}")
    meta["cached"] = False
    return meta


def repack(src_path: str, dst_dir: str, name: str = "model.onnx", threshold: int = 1024, align: int = 4096) -> int:
    """Stream every initializer >= threshold bytes (external, raw or typed) into ONE data file."""
    import onnx
    from onnx import numpy_helper

    src_base = os.path.dirname(os.path.abspath(src_path))
    model = onnx.load(src_path, load_external_data=False)
    data_name = name + ".data"
    typed = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    moved = 0
    with open(os.path.join(dst_dir, data_name), "wb") as out:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                with open(os.path.join(src_base, info["location"]), "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    data = f.read(int(info["length"])) if "length" in info else f.read()
            elif t.HasField("raw_data"):
                if len(t.raw_data) < threshold:
                    continue
                data = t.raw_data
            else:
                arr = numpy_helper.to_array(t)
                if arr.nbytes < threshold or arr.dtype == object:
                    continue
                data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                for f_name in typed:
                    t.ClearField(f_name)
            out.write(b"\0" * ((-out.tell()) % align))
            offset = out.tell()
            out.write(data)
            t.ClearField("raw_data")
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
            moved += 1
    onnx.save_model(model, os.path.join(dst_dir, name))
    return moved


def export_worker(size: str, model_dir: str) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = CONFIGS[size]
    t = time.perf_counter()
    config = LlamaConfig(**cfg, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # a trained checkpoint's RMSNorm weights differ per layer; freshly initialised ones are all 1.0,
    # which the exporter would de-duplicate into ONE initializer shared through Identity nodes
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    n_params = sum(p.numel() for p in model.parameters())
    build_s = time.perf_counter() - t

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    wrapper = Logits(model).eval()
    raw_dir = os.path.join(model_dir, "raw")
    os.makedirs(raw_dir)
    ids = torch.randint(0, cfg["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, torch.ones_like(ids)), os.path.join(raw_dir, "model.onnx"), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "logits": {0: "batch", 1: "sequence"}})
    export_s = time.perf_counter() - t
    raw_files = len(os.listdir(raw_dir))
    t = time.perf_counter()
    moved = repack(os.path.join(raw_dir, "model.onnx"), model_dir)
    shutil.rmtree(raw_dir)
    repack_s = time.perf_counter() - t
    # check: onnxruntime on the repacked file vs torch, other batch/sequence, some masked positions
    t = time.perf_counter()
    ids = torch.randint(0, cfg["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = wrapper(ids, mask).numpy()
    del model, wrapper
    sess = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    deviation = float(np.max(np.abs(got - ref)))
    check_s = time.perf_counter() - t
    if not deviation < 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
        raise SystemExit(f"exported model deviates from torch by {deviation}")
    meta = {"export_version": EXPORT_VERSION, "size": size, "config": cfg,
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "source": "transformers.LlamaForCausalLM(LlamaConfig(**config, attn_implementation='eager', "
                      "use_cache=False)), torch.manual_seed(0), random init, fp32",
            "exporter": "torch.onnx.export(dynamo=False, opset_version=17), dynamic batch and sequence",
            "transformers": transformers.__version__, "torch": torch.__version__, "parameters_torch": n_params,
            "build_s": build_s, "export_s": export_s, "exporter_files": raw_files, "repack_s": repack_s,
            "repacked_tensors": moved, "check_s": check_s, "check_max_abs_deviation_vs_torch": deviation}
    json.dump(meta, open(os.path.join(model_dir, "meta.json"), "w"), indent=1)


# ------------------------------------------------------------------------------------------
# model facts without loading the weights
# ------------------------------------------------------------------------------------------
CATEGORIES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
              "embed_tokens", "norm")
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down", "lm_head": "lm_head", "embed_tokens": "embed", "norm": "norm", "other": "other"}


def model_bytes(path: str) -> dict:
    data = path + ".data"
    onnx_b = os.path.getsize(path)
    data_b = os.path.getsize(data) if os.path.exists(data) else 0
    return {"onnx_bytes": onnx_b, "data_bytes": data_b, "total_bytes": onnx_b + data_b}


def param_census(path: str) -> dict:
    """Parameters by what reads them (from initializer dims, external data untouched)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    readers = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node.name)
    by_cat, shapes = {}, {}
    total = 0
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n
        names = " ".join(readers.get(t.name, [])) + " " + t.name
        cat = next((c for c in CATEGORIES if c in names), "other")
        by_cat[cat] = by_cat.get(cat, 0) + n
        if cat != "other":
            shapes.setdefault(cat, sorted({tuple(t.dims)}))
            if tuple(t.dims) not in shapes[cat]:
                shapes[cat] = sorted(set(shapes[cat]) | {tuple(t.dims)})
    return {"total": total, "by_reader": by_cat, "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
            "nodes": len(model.graph.node), "initializers": len(model.graph.initializer)}


def group_summary(analysis_json: dict, path: str) -> dict:
    """Prunable/frozen groups labelled by the weights they hold, and the (generic) freeze reasons."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    readers = {}
    for node in model.graph.node:
        for x in node.input:
            readers.setdefault(x, []).append(node.name)

    def label(tensor):
        names = " ".join(readers.get(tensor, [])) + " " + tensor
        return next((c for c in CATEGORIES if c in names), "other")

    kinds, reasons = {}, {}
    for g in analysis_json["groups"]:
        weights = {}
        for m in g["members"]:
            if m["weight"]:
                weights.setdefault(label(m["tensor"]), set()).add(m["axis"])
        kind = " ".join(f"{SHORT[c]}[{','.join(map(str, sorted(weights[c])))}]"
                        for c in list(CATEGORIES) + ["other"] if c in weights) or "(no weights)"
        entry = kinds.setdefault(kind, {"groups": 0, "prunable": 0, "channels": 0, "frozen_by": {}})
        entry["groups"] += 1
        entry["prunable"] += int(g["prunable"])
        entry["channels"] = g["channels"]
        for r in g["frozen_by"]:
            generic = re.sub(r"'[^']*'", "'*'", r)
            generic = re.sub(r"axis \d+ of '\*'", "axis * of '*'", generic)
            entry["frozen_by"][generic] = entry["frozen_by"].get(generic, 0) + 1
            reasons[generic] = reasons.get(generic, 0) + 1
    return {"groups": len(analysis_json["groups"]), "prunable_groups": analysis_json["prunable_groups"],
            "by_kind": kinds, "freeze_reasons": reasons}


# ------------------------------------------------------------------------------------------
# workaround for models over 2 GB (applied in benchmark subprocesses only, never to spa/)
# ------------------------------------------------------------------------------------------
WORKAROUND = ("ModelProto.ByteSize replaced, for protos whose inline tensor data is >= 1.5 GB, by an estimate "
              "(sum of inline tensor bytes from dims; no serialisation); exact ByteSize below that")


def patch_bytesize() -> None:
    """upb's ModelProto.ByteSize() serialises the whole message, and raises EncodeError ('Failed to
    serialize proto') over 2 GB. SPA only compares it with thresholds (16 MB, 200 MB, 1.8 GB)."""
    import onnx
    from onnx import helper

    exact = onnx.ModelProto.ByteSize

    def inline_bytes(model):
        total = 0
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                n = 1
                for d in t.dims:
                    n *= d
                try:
                    total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                except Exception:
                    pass
        return total

    def bytesize(self):
        estimate = inline_bytes(self)
        return exact(self) if estimate < 1_500_000_000 else estimate + 1_000_000

    onnx.ModelProto.ByteSize = bytesize


def cli_with_workaround(argv) -> int:
    patch_bytesize()
    from spa.cli import main as spa_main
    return spa_main(argv)


# ------------------------------------------------------------------------------------------
# profile worker: the CLI's stages one by one
# ------------------------------------------------------------------------------------------
SAMPLER = r"""
import json, os, sys, time
pid, out, stop, dt = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
page = os.sysconf("SC_PAGE_SIZE")
path, ts, rs = f"/proc/{pid}/statm", [], []
while not os.path.exists(stop):
    try:
        with open(path) as f:
            r = int(f.read().split()[1]) * page
    except OSError:
        break
    ts.append(time.monotonic()); rs.append(r)
    time.sleep(dt)
json.dump({"t": ts, "rss": rs}, open(out, "w"))
"""


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Recorder:
    """Spans (nested wall-time intervals with RSS at both ends) around wrapped library calls."""

    def __init__(self):
        self.spans, self.depth, self.stage = [], 0, None
        self.agg = {}

    def span(self, name, fn, *a, **k):
        t0, r0 = time.monotonic(), _status("VmRSS")
        self.depth += 1
        try:
            return fn(*a, **k)
        finally:
            self.depth -= 1
            self.spans.append({"name": name, "stage": self.stage, "depth": self.depth, "t0": t0,
                               "t1": time.monotonic(), "rss0": r0, "rss1": _status("VmRSS")})

    def wrap(self, owner, attr, name, aggregate=None):
        orig = getattr(owner, attr)
        rec = self

        def wrapper(*a, **k):
            if aggregate is None:
                return rec.span(name, orig, *a, **k)
            t = time.perf_counter()
            result = orig(*a, **k)
            entry = rec.agg.setdefault((rec.stage, name), [0, 0.0, 0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t
            entry[2] += aggregate(a, k, result)
            return result
        setattr(owner, attr, wrapper)


def _short(path: str) -> str:
    """spa/x.py, onnx/x.py, numpy/... instead of absolute paths."""
    m = re.search(r"/((spa|onnx|numpy|onnxruntime|google|scipy)/.*)$", path)
    return m.group(1) if m else path


def _nbytes(x):
    return int(getattr(x, "nbytes", 0) or 0)


def instrument(rec: Recorder) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import checker, external_data_helper, numpy_helper, shape_inference

    import spa.graph
    import spa.pipeline
    import spa.verify

    rec.wrap(onnx, "load", "onnx.load")
    rec.wrap(onnx, "load_external_data_for_model", "onnx.load_external_data_for_model")
    rec.wrap(external_data_helper, "load_external_data_for_model", "onnx.load_external_data_for_model")
    rec.wrap(onnx, "save_model", "onnx.save_model")
    rec.wrap(shape_inference, "infer_shapes", "shape_inference.infer_shapes")
    rec.wrap(shape_inference, "infer_shapes_path", "shape_inference.infer_shapes_path")
    rec.wrap(checker, "check_model", "checker.check_model(full_check)")
    rec.wrap(onnx.checker, "check_model", "checker.check_model(full_check)")
    for cls_attr in ("CopyFrom", "ByteSize", "SerializeToString"):
        rec.wrap(onnx.ModelProto, cls_attr, f"ModelProto.{cls_attr}")
    rec.wrap(spa.graph, "_without_large_data", "graph._without_large_data")
    rec.wrap(spa.graph, "infer_shapes", "graph.infer_shapes")
    rec.wrap(spa.graph, "_run_with_outputs", "graph._run_with_outputs (ort probe)")
    rec.wrap(spa.graph, "external_tensor_names", "graph.external_tensor_names")
    for optional in ("_symbolic_shapes", "shapes_by_running", "weight_bytes"):  # present in some versions
        if hasattr(spa.graph, optional):
            rec.wrap(spa.graph, optional, f"graph.{optional}")
    rec.wrap(spa.verify, "validate", "verify.validate")
    rec.wrap(spa.pipeline, "validate", "verify.validate")
    rec.wrap(ort.InferenceSession, "__init__", "ort.InferenceSession()")
    rec.wrap(ort.InferenceSession, "run", "ort.InferenceSession.run")
    rec.wrap(numpy_helper, "to_array", "numpy_helper.to_array", aggregate=lambda a, k, r: _nbytes(r))
    rec.wrap(numpy_helper, "from_array", "numpy_helper.from_array", aggregate=lambda a, k, r: _nbytes(a[0]))


def drop_original(state: dict, facts: dict) -> None:
    import gc

    graph, plan = state["graph"], state["plan"]
    consts = graph.consts
    facts.update(consts=len(consts), removed_channels=len(plan.removed_atoms),
                 removed_by_group={str(k): v for k, v in plan.removed_by_group().items()})
    state["plan_json"] = plan.to_json("model.onnx")
    del graph, plan, consts
    for key in ("model", "graph", "analysis", "scores", "plan"):
        state.pop(key, None)
    gc.collect()


def profile_worker(model_path: str, out_dir: str, mode: str, ratio: float, result_path: str,
                   workaround: bool = False) -> None:
    import gc

    import spa.graph
    from spa.graph import Graph, load_model
    from spa.groups import Options, analyze
    from spa.importance import score
    from spa.pipeline import save
    from spa.rewrite import rewrite
    from spa.selection import Target, select

    rec = Recorder()
    sampler = None
    if workaround:
        patch_bytesize()
    if mode == "stages":
        instrument(rec)
        stop = os.path.join(out_dir, "sampler.stop")
        samples = os.path.join(out_dir, "sampler.json")
        sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, str(os.getpid()), samples, stop, "0.005"])
    profiler = None
    if mode == "cprofile":
        import cProfile
        import pstats
    if mode == "tracemalloc":
        import tracemalloc
        tracemalloc.start(8)
        previous = tracemalloc.take_snapshot()

    state, facts = {}, {}
    target = Target(ratio=ratio)
    target.check()
    output = os.path.join(out_dir, "pruned.onnx")
    stages = [
        ("spa.graph.load_model", lambda: state.__setitem__("model", load_model(model_path))),
        ("spa.graph.Graph()", lambda: state.__setitem__("graph", Graph(state["model"]))),
        ("spa.groups.analyze", lambda: state.__setitem__("analysis", analyze(state["graph"], Options()))),
        ("spa.importance.score", lambda: state.__setitem__("scores", score(state["analysis"], "l1", "mean", "mean", 0))),
        ("spa.selection.select", lambda: state.__setitem__("plan", select(state["analysis"], state["scores"], target))),
        ("spa.rewrite.rewrite", lambda: state.__setitem__("pruned", rewrite(state["plan"]))),
        # what spa.cli.run does before verifying: keep the plan as JSON, drop the original model and
        # everything that references it (with upb, one live sub-message keeps a whole model alive)
        ("cli: del original + gc", lambda: drop_original(state, facts)),
        ("spa.pipeline.save", lambda: save(state["pruned"], output,
                                           external=spa.graph.external_tensor_names(model_path))),
    ]
    rows = []
    t_start = time.monotonic()
    for name, fn in stages:
        gc.collect()
        peak_reset = _reset_peak()
        rec.stage = name
        row = {"stage": name, "rss_before": _status("VmRSS"), "t0": time.monotonic()}
        if mode == "cprofile":
            profiler = cProfile.Profile()
            profiler.enable()
        t = time.perf_counter()
        try:
            rec.span(name, fn)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        row["wall_s"] = time.perf_counter() - t
        row["t1"] = time.monotonic()
        if mode == "cprofile":
            profiler.disable()
            stats = pstats.Stats(profiler)
            top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]  # by tottime
            row["top_tottime"] = [{"function": f"{_short(f)}:{line}({fn_})",
                                   "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3)}
                                  for (f, line, fn_), (cc, nc, tt, ct, _) in top]
        row["rss_after"] = _status("VmRSS")
        row["peak_rss"] = _status("VmHWM") if peak_reset else None
        if mode == "tracemalloc":
            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")])
            diff = snap.compare_to(previous, "traceback")
            row["traced_current"], row["traced_peak"] = current, peak
            row["retained_by_site"] = [
                {"size_diff": d.size_diff, "count_diff": d.count_diff,
                 "where": [f"{_short(fr.filename)}:{fr.lineno}" for fr in d.traceback
                           if re.search(r"/(spa|onnx|numpy|onnxruntime)/", fr.filename)][:6]}
                for d in diff[:6] if abs(d.size_diff) > 1 << 20]
            previous = snap
            del snap, diff
        rows.append(row)
        if "error" in row:
            break
    total = time.monotonic() - t_start
    failed = next((r for r in rows if "error" in r), None)
    # what the stages keep alive
    result = {"mode": mode, "workaround": WORKAROUND if workaround else None, "total_s": total, "stages": rows,
              "facts": facts, "failed": failed and {"stage": failed["stage"], "error": failed["error"]},
              "final_peak_rss": _status("VmHWM")}
    if mode == "stages":
        result["spans"] = rec.spans
        result["aggregates"] = [{"stage": s, "call": n, "calls": c, "seconds": t, "bytes": b}
                                for (s, n), (c, t, b) in rec.agg.items()]
        open(stop, "w").close()
        sampler.wait(timeout=60)
        result["samples"] = json.load(open(samples))
    json.dump(result, open(result_path, "w"))


def span_peaks(result: dict) -> None:
    """Attach the sampled peak RSS to every span and stage."""
    import bisect

    t, rss = result["samples"]["t"], result["samples"]["rss"]

    def peak(t0, t1, fallback):
        i, j = bisect.bisect_left(t, t0), bisect.bisect_right(t, t1)
        window = rss[max(i - 1, 0):j + 1]
        return max(window + [fallback]) if window else fallback

    for s in result["spans"]:
        s["peak_sampled"] = peak(s["t0"], s["t1"], max(s["rss0"], s["rss1"]))
    for row in result["stages"]:
        row["peak_sampled"] = peak(row["t0"], row["t1"], row["rss_after"])


def run_profile(model_path: str, work: str, mode: str, ratio: float, workaround: bool) -> dict:
    out_dir = os.path.join(work, f"profile_{mode}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    result_path = os.path.join(out_dir, "result.json")
    before = spa_fingerprint()
    run = measured([sys.executable, HERE, "--_profile-worker", model_path, out_dir, mode, str(ratio), result_path,
                    "1" if workaround else "0"],
                   env=spa_env())
    if run["rc"] != 0:
        sys.stderr.write(run["stdout"][-4000:] + run["stderr"][-4000:])
        raise SystemExit(f"profile ({mode}) failed, rc {run['rc']}")
    result = json.load(open(result_path))
    # clear_refs resets the kernel's high-water mark, so ru_maxrss of the worker only covers its
    # last stage: the process peak is the largest per-stage peak
    stage_peaks = [r.get("peak_rss") or 0 for r in result["stages"]]
    result["process_wall_s"] = run["wall_s"]
    result["process_peak_rss_bytes"] = max([run["peak_rss_bytes"]] + stage_peaks)
    result["spa"] = before if before == spa_fingerprint() else f"CHANGED DURING RUN (from {before})"
    FINGERPRINTS.add(result["spa"])
    if mode == "stages":
        span_peaks(result)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def table(rows, header) -> str:
    widths = [max(len(str(r[k])) for r in rows + [header]) for k in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if k == 0 else str(c).rjust(w)  # noqa: E731
                              for k, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def summarize_stages(result: dict, size_bytes: int) -> str:
    rows = []
    for row in result["stages"]:
        rows.append([row["stage"], f"{row['wall_s']:.2f}", gib(row["rss_after"]),
                     gib(row["peak_rss"]) if row.get("peak_rss") else "-", f"{(row.get('peak_rss') or 0) / size_bytes:.2f}"])
    out = [table(rows, ["stage", "wall s", "RSS after", "peak RSS", "peak/model"])]
    # wrapped calls, merged per (stage, call): count, total time, max sampled peak, RSS change
    merged = {}
    for s in result["spans"]:
        if s["depth"] == 0:
            continue
        key = (s["stage"], s["name"])
        m = merged.setdefault(key, {"calls": 0, "seconds": 0.0, "peak": 0, "delta": 0})
        m["calls"] += 1
        m["seconds"] += s["t1"] - s["t0"]
        m["peak"] = max(m["peak"], s["peak_sampled"])
        m["delta"] += s["rss1"] - s["rss0"]
    rows = [[st, name, m["calls"], f"{m['seconds']:.2f}", gib(m["peak"]), f"{m['delta'] / 2**30:+.2f} GiB"]
            for (st, name), m in merged.items() if m["seconds"] >= 0.05 or abs(m["delta"]) > 50 * 2**20]
    rows += [[a["stage"], a["call"], a["calls"], f"{a['seconds']:.2f}", "-", f"{a['bytes'] / 2**30:.2f} GiB out"]
             for a in result["aggregates"] if a["seconds"] >= 0.05 or a["bytes"] > 50 * 2**20]
    if rows:
        out.append(table(rows, ["stage", "call (nested, wrapped)", "n", "wall s", "peak RSS", "RSS change"]))
    return "\n\n".join(out)


def plot_memory(result: dict, size_bytes: int, path: str, title: str, size: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t, rss = result["samples"]["t"], result["samples"]["rss"]
    if not t:
        return
    t0 = result["stages"][0]["t0"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot([x - t0 for x in t], [r / 2**30 for r in rss], lw=1, color="k")
    colors = plt.cm.tab10.colors
    for k, row in enumerate(result["stages"]):
        ax.axvspan(row["t0"] - t0, row["t1"] - t0, color=colors[k % 10], alpha=0.18,
                   label=f"{row['stage']} ({row['wall_s']:.1f} s)")
    ax.axhline(size_bytes / 2**30, ls=":", color="gray", label="model size")
    ratio = GOALS.get(size, GOALS["small"])[1]
    ax.axhline(ratio * size_bytes / 2**30, ls="--", color="red", label=f"{ratio}x model size (goal)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def use_spa(rev: str, cache_root: str) -> None:
    """Point SPA_ROOT at a `git archive` snapshot of spa/ at rev, or at the working tree."""
    global SPA_ROOT, SPA_REV
    if rev == "worktree":
        SPA_ROOT = ROOT
        SPA_REV = f"worktree@{git('rev-parse', '--short', 'HEAD')}" + ("+dirty" if git("status", "--porcelain", "spa") else "")
        return
    sha = git("rev-parse", "--short", rev)
    if not sha:
        raise SystemExit(f"unknown git revision {rev!r}")
    snapshot = os.path.join(cache_root, f"spa_{sha}")
    if not os.path.isdir(os.path.join(snapshot, "spa")):
        tmp = tempfile.mkdtemp(dir=cache_root)
        archive = subprocess.run(["git", "archive", sha, "spa"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        os.replace(tmp, snapshot)
    SPA_ROOT, SPA_REV = snapshot, sha


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_spa-cli-workaround"]:
        return cli_with_workaround(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(CONFIGS), default="1b")
    p.add_argument("--keep", metavar="DIR", help="cache directory for generated models (default /tmp/spa_bench_llm)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each command (all reported; median used)")
    p.add_argument("--profile", choices=("none", "stages", "all", "tracemalloc"), default="stages",
                   help="stages: per-stage time/RSS (default); all: + cProfile; tracemalloc: + tracemalloc "
                        "(slow: ~35 min on the 1b model, it traces every Python allocation)")
    p.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
    p.add_argument("--spa-from", default="HEAD", metavar="REV",
                   help="git revision of spa/ to measure, exported with `git archive` into the cache (default HEAD: "
                        "committed code, immune to concurrent edits), or 'worktree' for the working tree as it is")
    p.add_argument("--_export-worker", nargs=2, metavar=("SIZE", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--_profile-worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._export_worker:
        export_worker(*args._export_worker)
        return 0
    if args._profile_worker:
        model, out, mode, ratio, result, workaround = args._profile_worker
        profile_worker(model, out, mode, float(ratio), result, workaround == "1")
        return 0

    goal_s, goal_ram = GOALS[args.size]
    cache_root = os.path.abspath(args.keep or "/tmp/spa_bench_llm")
    model_dir = os.path.join(cache_root, args.size)
    os.makedirs(cache_root, exist_ok=True)
    use_spa(args.spa_from, cache_root)
    log(f"measuring spa from {SPA_REV} ({SPA_ROOT})")
    meta = generate(args.size, model_dir, cache_root)
    model_path = os.path.join(model_dir, "model.onnx")
    sizes = model_bytes(model_path)
    size_b = sizes["total_bytes"]
    census = param_census(model_path)
    log(f"model: {census['total']:,} parameters, {census['nodes']} nodes, {census['initializers']} initializers; "
        f"{sizes['onnx_bytes']:,} B .onnx + {sizes['data_bytes']:,} B .onnx.data = {gib(size_b)}")
    work = os.path.join(cache_root, f"{args.size}_work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = spa_env()

    baseline = measured([sys.executable, "-c", "import onnx, onnxruntime, numpy, scipy, spa.cli, spa.pipeline"], env=env)
    log(f"baseline: importing spa/onnx/onnxruntime = {baseline['wall_s']:.2f} s, {baseline['peak_rss_bytes'] / 2**20:.0f} MiB")

    variants = {"stock": run_cli(model_path, work, args, env, size_b, workaround=False)}
    stock = variants["stock"]
    if not (stock["analyze"]["ok"] and stock["prune"]["ok"]):
        log(f"stock SPA failed; measuring again with the benchmark-side workaround: {WORKAROUND}")
        variants["workaround"] = run_cli(model_path, work, args, env, size_b, workaround=True)
    best = next((v for v in variants.values() if v["prune"]["ok"]), None)
    analysis = next((v["analysis"] for v in variants.values() if v.get("analysis")), None)
    groups = group_summary(analysis, model_path) if analysis else None
    pruned = os.path.join(work, "pruned.onnx")
    after = param_census(pruned) if best else None
    pruned_sizes = model_bytes(pruned) if best else None

    profiles = {}
    if args.profile != "none":
        workaround = "workaround" in variants
        modes = {"stages": ["stages"], "all": ["stages", "cprofile"],
                 "tracemalloc": ["stages", "cprofile", "tracemalloc"]}[args.profile]
        for mode in modes:
            log(f"profiling stages ({mode}{', with workaround' if workaround else ''}) ...")
            try:
                profiles[mode] = run_profile(model_path, work, mode, args.ratio, workaround)
            except SystemExit as exc:
                log(f"profile {mode} failed: {exc}")
    if "stages" in profiles:
        plot_memory(profiles["stages"], size_b, os.path.join(RESULTS, f"llm_memory_{args.size}.png"),
                    f"SPA stages on LLaMA {args.size} ({census['total'] / 1e9:.2f}B params, {gib(size_b)}), "
                    f"ratio {args.ratio}, RSS sampled every 5 ms"
                    + (" (ByteSize workaround)" if profiles["stages"].get("workaround") else ""), args.size)

    # ---------------- report ----------------
    print()
    print(f"LLaMA {args.size}: {census['total']:,} parameters, model {size_b:,} bytes ({gib(size_b)}); "
          f"{machine_info()['cores']} cores; ratio {args.ratio}")
    rows = [["generation (not counted)", "-",
             f"{meta.get('generation_wall_s', 0):.1f}" + (" (cached)" if meta.get("cached") else ""),
             gib(meta.get("generation_peak_rss_bytes", 0)), f"{meta.get('generation_peak_rss_bytes', 0) / size_b:.2f}", "-"]]
    for name, v in variants.items():
        for cmd in ("analyze", "prune"):
            r = v[cmd]
            status = ("ok" if r["ok"] else f"FAILED: {r['error']}"[:60])
            goal = "-"
            if cmd == "prune":
                goal = "yes" if r["ok"] and r["median_wall_s"] <= goal_s and r["peak_over_model"] <= goal_ram else "NO"
            rows.append([f"spa {cmd}" + (f" --ratio {args.ratio}" if cmd == "prune" else ""), name,
                         f"{r['median_wall_s']:.1f}", gib(r["median_peak_rss_bytes"]), f"{r['peak_over_model']:.2f}",
                         f"{goal} ({status})"])
    print(table(rows, ["command (fresh process)", "spa", "wall s", "peak RSS", "peak/model",
                       f"goal <={goal_s:.0f}s & <={goal_ram}x"]))
    print(f"  spa code measured: {', '.join(sorted(FINGERPRINTS))}"
          + ("  <-- WARNING: spa/ changed between measurements" if len(FINGERPRINTS) > 1 else ""))
    if "workaround" in variants:
        print(f"  workaround = {WORKAROUND} (benchmark-side monkeypatch; spa/ untouched)")
    if groups:
        print()
        print(f"groups: {groups['groups']}, prunable {groups['prunable_groups']}")
        print("(weights in group: which projections' initializers [axis] carry the group's channels; "
              "MatMul weights are [in, out])")
        rows = [[kind, v["groups"], v["prunable"], v["channels"],
                 "; ".join(f"{n}x {r}" for r, n in v["frozen_by"].items())[:110]] for kind, v in groups["by_kind"].items()]
        print(table(rows, ["weights in group [axis]", "groups", "prunable", "channels", "frozen by"]))
    if after:
        print()
        rows = [[cat, f"{census['by_reader'].get(cat, 0):,}", f"{after['by_reader'].get(cat, 0):,}",
                 str(census["shapes"].get(cat, [""])[0]), str(after["shapes"].get(cat, [""])[0])]
                for cat in list(CATEGORIES) + ["other"] if census["by_reader"].get(cat)]
        rows.append(["total", f"{census['total']:,}", f"{after['total']:,}", "", ""])
        print(table(rows, ["parameters read by", "before", "after", "shape before", "shape after"]))
        print(f"pruned model: {gib(pruned_sizes['total_bytes'])} "
              f"({pruned_sizes['total_bytes'] / size_b:.3f} of the original)")
    for mode, res in profiles.items():
        print()
        print(f"profile ({mode}{', workaround' if res.get('workaround') else ''}): {res['total_s']:.1f} s in stages, "
              f"process peak RSS {gib(res['process_peak_rss_bytes'])} "
              f"({res['process_peak_rss_bytes'] / size_b:.2f}x model)"
              + (f"; FAILED in {res['failed']['stage']}: {res['failed']['error']}" if res.get("failed") else ""))
        if mode == "stages":
            print(summarize_stages(res, size_b))
        elif mode == "cprofile":
            for row in res["stages"]:
                print(f"  {row['stage']} ({row['wall_s']:.2f} s under cProfile)")
                for f in row.get("top_tottime", [])[:6]:
                    print(f"      {f['tottime_s']:8.3f} s self  {f['cumtime_s']:8.3f} s cum  {f['calls']:>8} x {f['function']}")
        else:
            for row in res["stages"]:
                print(f"  {row['stage']}: traced numpy/python peak {gib(row.get('traced_peak', 0))}, "
                      f"retained {gib(row.get('traced_current', 0))}")
                for site in row.get("retained_by_site", [])[:3]:
                    print(f"      {site['size_diff'] / 2**30:+.2f} GiB  {' <- '.join(reversed(site['where'][-4:]))}")

    if not args.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, "llm.json")
        try:
            everything = json.load(open(path))
        except (OSError, ValueError):
            everything = {}
        for res in profiles.values():
            res.pop("samples", None)  # large; the plot keeps the timeline
        previous = everything.get(args.size, {})
        code = lambda fp: str(fp).rsplit("spa:", 1)[-1]  # noqa: E731
        for mode, res in previous.get("profile", {}).items():
            if mode not in profiles and res.get("spa") and {code(res["spa"])} == {code(f) for f in FINGERPRINTS}:
                res["carried_over_from"] = previous.get("date")  # same spa/ code, measured in an earlier run
                profiles[mode] = res
        for v in variants.values():
            v.pop("analysis", None)
        everything[args.size] = {
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
            "command": "python benchmarks/bench_llm.py " + " ".join(argv),
            "spa_code": sorted(FINGERPRINTS),
            "goal": {"seconds": goal_s, "ram_ratio": goal_ram},
            "ratio": args.ratio, "model": {"meta": meta, "path": model_path, **sizes, "parameters": census},
            "baseline_import": {k: baseline[k] for k in ("wall_s", "peak_rss_bytes")},
            "cli": variants, "workaround": WORKAROUND if "workaround" in variants else None,
            "pruned_model": pruned_sizes, "parameters_after": after,
            "groups": groups, "profile": profiles,
        }
        with open(path, "w") as f:
            json.dump(everything, f, indent=1, default=str)
        log(f"wrote {os.path.relpath(path, ROOT)}")
    heads_ok = heads_prunable(analysis, CONFIGS[args.size]["num_hidden_layers"])
    return 0 if stock["prune"]["ok"] and heads_ok else 1


def heads_prunable(analysis_json, layers: int) -> bool:
    """Every decoder layer's KV-head group must be prunable: loudly not, when shape information
    for a large or external-data model loses the head count (it did: an RMSNorm weight over 1 KiB
    broke symbolic shape inference and froze all 22 head groups of the 1.1B model)."""
    heads = [g for g in (analysis_json or {}).get("groups", []) if g.get("kind") == "heads"]
    prunable = sum(bool(g["prunable"]) for g in heads)
    if prunable < layers:
        reasons = sorted({r for g in heads if not g["prunable"] for r in g["frozen_by"]})[:3]
        print(f"FAILED: {prunable} prunable head groups, expected one per layer ({layers}); frozen by: "
              f"{'; '.join(reasons) or 'no head groups found'}", file=sys.stderr)
        return False
    log(f"heads: {prunable} prunable head groups ({layers} layers)")
    return True


def run_cli(model_path, work, args, env, size_b, workaround: bool) -> dict:
    """`spa analyze` and `spa prune`, each in a fresh process, args.repeats times."""
    import statistics

    launcher = [sys.executable, HERE, "--_spa-cli-workaround"] if workaround else [sys.executable, "-m", "spa"]
    label = "spa (workaround)" if workaround else "spa"
    pruned = os.path.join(work, "pruned.onnx")
    out = {"workaround": WORKAROUND if workaround else None}
    for cmd in ("analyze", "prune"):
        runs = []
        for k in range(args.repeats):
            for f in (pruned, pruned + ".data"):
                if os.path.exists(f):
                    os.remove(f)
            argv = ([cmd, model_path, "-q", "--json"] if cmd == "analyze"
                    else [cmd, model_path, "-o", pruned, "--ratio", str(args.ratio), "--criterion", "l1", "-q"])
            before = spa_fingerprint()
            run = measured(launcher + argv, env=env)
            run["spa"] = before if before == spa_fingerprint() else f"CHANGED DURING RUN (from {before})"
            FINGERPRINTS.add(run["spa"])
            run["cmd"] = " ".join(["python", "-m", "spa"] + argv)
            if cmd == "analyze" and run["rc"] == 0:
                out["analysis"] = json.loads(run["stdout"])
            run["stdout"] = run["stdout"][-2000:]
            err = run.pop("stderr").strip().splitlines()
            run["verification"] = next((line for line in err if "verified piece by piece" in line), "whole model")
            run["error"] = err[-1][:300] if run["rc"] != 0 and err else None
            runs.append(run)
            log(f"{label} {cmd} [{k + 1}/{args.repeats}]: {'ok' if run['rc'] == 0 else 'FAILED'} "
                f"{run['wall_s']:.1f} s, peak RSS {gib(run['peak_rss_bytes'])} "
                f"({run['peak_rss_bytes'] / size_b:.2f}x model)"
                + (f"; {run['stdout'].strip()}" if cmd == "prune" and run["rc"] == 0 else "")
                + (f"; {run['error']}" if run["error"] else ""))
            if run["rc"] != 0:
                break
        ok = all(r["rc"] == 0 for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        rss = statistics.median(r["peak_rss_bytes"] for r in runs)
        out[cmd] = {"runs": runs, "ok": ok, "error": next((r["error"] for r in runs if r["error"]), None),
                    "median_wall_s": wall, "median_peak_rss_bytes": rss, "peak_over_model": rss / size_b}
    return out


if __name__ == "__main__":
    sys.exit(main())
