"""2:4 speed on a GPU: the zeros `spa sparsify --pattern 2:4` writes, run with PyTorch's semi-structured
sparse tensors (cuSPARSELt and CUTLASS kernels) against the same layers dense.

    python benchmarks/bench_sparse_speed.py              # needs a CUDA GPU with 2:4 sparse tensor cores
    python benchmarks/bench_sparse_speed.py --quick      # fewer sizes
    python benchmarks/bench_sparse_speed.py --out DIR    # JSON and plot into DIR (default benchmarks/results)

Masks: `spa.sparsity.layer_mask` with the pattern `parse_pattern("2:4")`, on the ONNX MatMul weight
[K, N] (the groups of 4 run along K, the contracted axis), transposed to the torch Linear weight
[N, K]; each masked weight passes `spa.sparsity.conforms`. Weights and inputs are random (speed does
not depend on the values), fp16.

Sections:
  linear   one Linear, y = x W^T, for the MiniLM MLP (384 -> 1536, 1536 -> 384), the BERT-base MLP
           (768 <-> 3072) and a 7B-LLM MLP (4096 <-> 11008), at 128 to 65536 tokens;
  mlp      the MiniLM-sized MLP block Linear(384, 1536) -> GELU -> Linear(1536, 384);
  encoder  an encoder of MiniLM's shape (transformers BertModel: 6 layers, 384 wide, 12 heads,
           1536 MLP; random weights, sdpa attention) with every encoder Linear at 2:4, batch x 128
           tokens.
Each case: median time (triton.testing.do_bench, else CUDA events) of dense and of each sparse
kernel, measured twice (the spread is printed: a difference smaller than it is noise), the speedup
dense / sparse, and the relative error of the sparse output against the dense layer with the same
masked weights (fp16: under 1e-2 expected). Without a CUDA device the JSON says "not measured" and
why; nothing is estimated.

Writes DIR/sparse_speed.json and DIR/sparse_speed.png, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, ROOT, git, log  # noqa: E402

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from spa.layers import Layer  # noqa: E402
from spa.sparsity import conforms, layer_mask, parse_pattern  # noqa: E402

PATTERN = parse_pattern("2:4")
ONNX_MATMUL_WEIGHT = Layer(node=0, weight="W", in_axis=0, activation="x", kind="dense_t")
LINEARS = {  # name: (in, out)
    "MiniLM MLP up 384->1536": (384, 1536),
    "MiniLM MLP down 1536->384": (1536, 384),
    "BERT-base MLP up 768->3072": (768, 3072),
    "BERT-base MLP down 3072->768": (3072, 768),
    "7B LLM MLP up 4096->11008": (4096, 11008),
    "7B LLM MLP down 11008->4096": (11008, 4096),
}
TOKENS = (128, 1024, 8192, 65536)
QUICK_TOKENS = (128, 8192)
ENCODER_BATCHES = (1, 32, 256)
SEQUENCE = 128


def spa_2_4_weight(n_in: int, n_out: int, rng) -> np.ndarray:
    """A random ONNX MatMul weight [K=n_in, N=n_out] with SPA's 2:4 mask, as a torch Linear weight [N, K]."""
    w = rng.standard_normal((n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
    w = w * layer_mask(w, ONNX_MATMUL_WEIGHT, PATTERN)
    assert conforms(w, ONNX_MATMUL_WEIGHT, PATTERN)
    return np.ascontiguousarray(w.T)


def sparse_kernels(torch):
    """name -> function(dense 2:4 weight) -> semi-structured weight; those this torch has."""
    kernels = {}
    for name, cls in (("cusparselt", "SparseSemiStructuredTensorCUSPARSELT"),
                      ("cutlass", "SparseSemiStructuredTensorCUTLASS")):
        found = getattr(torch.sparse, cls, None)
        if found is not None:
            kernels[name] = found.from_dense
    return kernels


def timer(torch):
    try:
        from triton.testing import do_bench
        return "triton.testing.do_bench (median)", lambda fn: float(do_bench(fn, warmup=25, rep=150, return_mode="median"))
    except Exception:
        return "CUDA events (median of 100)", lambda fn: _event_median(torch, fn)


def _event_median(torch, fn, reps=100):
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def relative_error(torch, got, want) -> float:
    got, want = got.double(), want.double()
    return float(torch.linalg.norm(got - want) / torch.linalg.norm(want))


def graphed(torch, fn):
    """fn captured in a CUDA graph: its replay, without the per-call CPU work of eager PyTorch."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _times(torch, measure, fn) -> dict:
    """Median ms, measured twice, eager and replayed from a CUDA graph."""
    out = {"ms": [measure(fn), measure(fn)]}
    try:
        replay = graphed(torch, fn)
        out["graph_ms"] = [measure(replay), measure(replay)]
    except Exception as e:
        out["graph_error"] = _error(e)
    return out


def _error(e) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def compare(torch, measure, dense_fn, sparse_fns: dict) -> dict:
    """Times (ms, twice each; eager and CUDA graph), speedups and errors of dense_fn and each sparse
    function."""
    with torch.inference_mode():
        want = dense_fn()
        dense = _times(torch, measure, dense_fn)
        row = {"dense_ms": dense["ms"], "dense_graph_ms": dense.get("graph_ms")}
        for name, fn in sparse_fns.items():
            try:
                err = relative_error(torch, fn(), want)
            except Exception as e:  # a kernel that refuses a shape or a GPU is a result, not a crash
                row[name] = {"error": _error(e)}
                continue
            r = _times(torch, measure, fn)
            r.update(relative_error=err, speedup=float(np.median(dense["ms"]) / np.median(r["ms"])))
            if "graph_ms" in r and dense.get("graph_ms"):
                r["graph_speedup"] = float(np.median(dense["graph_ms"]) / np.median(r["graph_ms"]))
            row[name] = r
    return row


def linear_section(torch, measure, kernels, tokens, rng) -> list:
    F = torch.nn.functional
    rows = []
    for name, (n_in, n_out) in LINEARS.items():
        weight = torch.from_numpy(spa_2_4_weight(n_in, n_out, rng)).half().cuda()
        sparse = per_kernel(kernels, lambda make: make(weight))
        for t in tokens:
            x = torch.randn(t, n_in, device="cuda", dtype=torch.half)
            row = compare(torch, measure, lambda: F.linear(x, weight), calls(sparse, lambda w: F.linear(x, w)))
            row.update(section="linear", case=name, tokens=t, flops=2.0 * t * n_in * n_out)
            rows.append(row)
            log(_row_line(row))
    return rows


def per_kernel(kernels: dict, build) -> dict:
    """name -> build(make) for each sparse kernel, or the exception it raised (a kernel that refuses
    a GPU or a shape is a result, not a crash)."""
    built = {}
    for name, make in kernels.items():
        try:
            built[name] = build(make)
        except Exception as e:
            built[name] = e
    return built


def calls(built: dict, run) -> dict:
    """name -> a function that runs `run` on what `per_kernel` built, or raises what building it raised."""
    return {name: _raiser(value) if isinstance(value, Exception) else (lambda value=value: run(value))
            for name, value in built.items()}


def _raiser(e):
    def fn():
        raise e
    return fn


def mlp_section(torch, measure, kernels, tokens, rng) -> list:
    F = torch.nn.functional
    up = torch.from_numpy(spa_2_4_weight(384, 1536, rng)).half().cuda()
    down = torch.from_numpy(spa_2_4_weight(1536, 384, rng)).half().cuda()
    b_up = torch.randn(1536, device="cuda", dtype=torch.half) * 0.01
    b_down = torch.randn(384, device="cuda", dtype=torch.half) * 0.01

    def block(w1, w2, x):
        return F.linear(F.gelu(F.linear(x, w1, b_up)), w2, b_down)

    rows = []
    packed = per_kernel(kernels, lambda make: (make(up), make(down)))
    for t in tokens:
        x = torch.randn(t, 384, device="cuda", dtype=torch.half)
        row = compare(torch, measure, lambda: block(up, down, x), calls(packed, lambda p: block(p[0], p[1], x)))
        row.update(section="mlp", case="MiniLM MLP block 384->1536->384 (GELU)", tokens=t,
                   flops=2.0 * t * 2 * 384 * 1536)
        rows.append(row)
        log(_row_line(row))
    return rows


def encoder_section(torch, measure, kernels, batches, rng) -> list:
    try:
        from transformers import BertConfig, BertModel
    except Exception as e:
        return [{"section": "encoder", "error": f"transformers unavailable: {e}"}]
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = BertModel(config).half().cuda().eval()
    linears = [m for m in dense.encoder.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:  # the same SPA 2:4 masks in the dense model, so both compute one function
        n_out, n_in = m.weight.shape
        m.weight.data = torch.from_numpy(spa_2_4_weight(n_in, n_out, rng)).half().cuda()
    models = per_kernel(kernels, lambda make: _sparse_copy(torch, dense, make))
    rows = []
    for b in batches:
        ids = torch.randint(1000, 30000, (b, SEQUENCE), device="cuda")
        row = compare(torch, measure, lambda: dense(input_ids=ids).last_hidden_state,
                      calls(models, lambda m: m(input_ids=ids).last_hidden_state))
        row.update(section="encoder", case=f"MiniLM-shaped encoder ({len(linears)} Linears at 2:4)",
                   tokens=b * SEQUENCE, batch=b)
        rows.append(row)
        log(_row_line(row))
    return rows


def _sparse_copy(torch, dense, make):
    """A copy of the encoder with every Linear weight made a semi-structured sparse tensor by `make`."""
    sparse = copy.deepcopy(dense)
    for m in (m for m in sparse.encoder.modules() if isinstance(m, torch.nn.Linear)):
        m.weight = torch.nn.Parameter(make(m.weight.data), requires_grad=False)
    return sparse


def _row_line(row) -> str:
    parts = [f"{row['case']} x{row['tokens']}: dense {_us(row['dense_ms'])} (graph {_us(row['dense_graph_ms'])})"]
    for k in ("cusparselt", "cutlass"):
        r = row.get(k)
        if r is None:
            continue
        parts.append(f"{k} " + (r["error"] if "error" in r else
                                 f"{_us(r['ms'])} ({r['speedup']:.2f}x), graph {_us(r.get('graph_ms'))} "
                                 f"({r.get('graph_speedup', float('nan')):.2f}x), err {r['relative_error']:.1e}"))
    return "; ".join(parts)


def _us(ms) -> str:
    return f"{np.median(ms) * 1e3:.1f} us" if ms else "-"


def environment(torch) -> dict:
    env = {"torch": torch.__version__, "git": git("rev-parse", "--short", "HEAD"),
           "date": _dt.datetime.now().isoformat(timespec="minutes")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}")
        try:
            env["cusparselt"] = torch.backends.cusparselt.version()
        except Exception:
            env["cusparselt"] = None
    return env


def markdown(rows) -> str:
    """cuSPARSELt against dense, eager and from a CUDA graph; kernels that failed on every row are
    named below the table with their error."""
    lines = ["| case | tokens | dense (us) | 2:4 (us) | speedup | dense, graph (us) | 2:4, graph (us) | speedup, graph |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    timed = [r for r in rows if "dense_ms" in r]
    for row in timed:
        r = row.get("cusparselt") or {"error": "absent"}
        cells = [row["case"], str(row["tokens"]), _us(row["dense_ms"]).split()[0]]
        if "error" in r:
            cells += ["error", "-", _us(row["dense_graph_ms"]).split()[0], "error", "-"]
        else:
            graph = r.get("graph_speedup")
            cells += [_us(r["ms"]).split()[0], f"{r['speedup']:.2f}x", _us(row["dense_graph_ms"]).split()[0],
                      _us(r.get("graph_ms")).split()[0], f"{graph:.2f}x" if graph else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for kernel in ("cusparselt", "cutlass"):
        errors = {r[kernel]["error"] for r in timed if "error" in (r.get(kernel) or {})}
        if errors and len(errors) == 1 and all("error" in (r.get(kernel) or {}) for r in timed):
            lines.append(f"\n{kernel}: {errors.pop()}")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = [c for c in dict.fromkeys(r["case"] for r in rows if "dense_ms" in r)]
    fig, ax = plt.subplots(figsize=(9, 5))
    for case in cases:
        mine = [r for r in rows if r.get("case") == case and "graph_speedup" in (r.get("cusparselt") or {})]
        if mine:
            ax.plot([r["tokens"] for r in mine], [r["cusparselt"]["graph_speedup"] for r in mine], marker="o", label=case)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (rows of the dense input)")
    ax.set_ylabel("dense time / 2:4 time (cuSPARSELt, CUDA graphs)")
    ax.set_title("SPA 2:4 zeros on PyTorch semi-structured sparse tensors, fp16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _not_measured(path, result) -> int:
    """Without a GPU nothing is measured; a saved GPU measurement is kept, not overwritten."""
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    if saved and saved.get("measured"):
        log(f"no CUDA device on this machine: 2:4 speed not measured; {path} keeps the measurement of "
            f"{saved['environment'].get('date')} on {saved['environment'].get('gpu')}")
        return 0
    result.update(measured=False, reason="no CUDA device on this machine: 2:4 speed not measured")
    log(result["reason"])
    _write(path, result)
    log(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--sections", default="linear,mlp,encoder")
    args = ap.parse_args(argv)
    import torch
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sparse_speed.json")
    result = {"environment": environment(torch)}
    if not torch.cuda.is_available():
        return _not_measured(path, result)
    kernels = sparse_kernels(torch)
    timing, measure = timer(torch)
    result.update(measured=True, timing=timing, kernels=sorted(kernels), rows=[])
    rng = np.random.default_rng(0)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    sections = {"linear": lambda: linear_section(torch, measure, kernels, tokens, rng),
                "mlp": lambda: mlp_section(torch, measure, kernels, tokens, rng),
                "encoder": lambda: encoder_section(torch, measure, kernels, ENCODER_BATCHES, rng)}
    for name in args.sections.split(","):
        try:
            result["rows"] += sections[name]()
        except Exception:
            result["rows"].append({"section": name, "error": traceback.format_exc()[-2000:]})
            log(f"{name} failed:\n{result['rows'][-1]['error']}")
        _write(path, result)
    print(markdown(result["rows"]))
    try:
        plot(result["rows"], os.path.join(args.out, "sparse_speed.png"))
    except Exception as e:
        log(f"no plot: {e}")
    _write(path, result)
    log(f"wrote {path}")
    return 0


def _write(path, result) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
