"""Half-precision benchmark: normcore float16 / bfloat16 vs normcore float32 vs PyTorch CPU
bfloat16 and float16, interleaved in one process.

    pip install -e ".[bench]" ml_dtypes && pip install torch==2.13.0
    python bench/bench_half.py --threads 2 [--repeats 15] [--json out.json]

The memory-bound passes of the half-precision targets: batch norm NCHW in training (batch
statistics, running-statistics update, output) and in eval, and layer norm's forward;
backward for reference. Parameters and running statistics are float32 beside the half
inputs (normcore's layer default, PyTorch's mixed CPU kernels), float32 beside float32.
Reported: median ms of each, and the ratios half / normcore float32 (target <= 0.7) and
torch / normcore for the same half dtype (target >= 1.0).
"""
from __future__ import annotations

import argparse
import json
import platform

import ml_dtypes
import numpy as np
from threadpoolctl import threadpool_limits

import normcore as nc
from normcore.kernels import VARIANT

from bench_cpu import interleaved_medians

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

CASES = [("BN2d NCHW", (32, 64, 56, 56), "batch_norm"), ("LN", (8192, 768), "layer_norm")]
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _normcore(x, mode):
    C = x.shape[1] if mode == "batch_norm" else x.shape[-1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    fns = {}
    if mode == "batch_norm":
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        fns["fwd"] = lambda: nc.normalize(x, mode, weight=w, bias=b, running_mean=rm, running_var=rv)
        fns["infer"] = lambda: nc.normalize(x, mode, weight=w, bias=b, running_mean=rm, running_var=rv,
                                            training=False)
        _, cache = fns["fwd"]()
    else:
        fns["fwd"] = lambda: nc.normalize(x, mode, weight=w, bias=b)
        _, cache = fns["fwd"]()
    dy = np.ones_like(x)
    fns["bwd"] = lambda: nc.backward(dy, cache)
    return fns


def _torch(x32, mode, dtype):
    x = torch.from_numpy(x32).to(dtype).requires_grad_(True)
    C = x.shape[1] if mode == "batch_norm" else x.shape[-1]
    w = torch.ones(C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)

    def fwd(training=True):
        if mode == "batch_norm":
            return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
        return F.layer_norm(x, (C,), w.to(dtype), b.to(dtype), 1e-5)

    y = fwd()
    dy = torch.ones_like(y)

    def no_grad(f):
        def run():
            with torch.no_grad():
                f()
        return run

    def bwd():
        x.grad = w.grad = b.grad = None
        y.backward(dy, retain_graph=True)

    fns = {"fwd": no_grad(fwd), "bwd": bwd}
    if mode == "batch_norm":
        fns["infer"] = no_grad(lambda: fwd(False))
    return fns


def measure(label, shape, mode, threads, repeats):
    x32 = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    fns = {}
    for name, dt in DTYPES.items():
        for p, f in _normcore(x32.astype(dt), mode).items():
            fns[(f"normcore {name}", p)] = f
    if torch is not None:
        for name, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            for p, f in _torch(x32, mode, tdt).items():
                fns[(f"torch {name}", p)] = f
    with threadpool_limits(threads):
        if torch is not None:
            torch.set_num_threads(threads)
        t = interleaved_medians(fns, repeats)
    rows = []
    for p in ("fwd", "infer", "bwd"):
        if ("normcore float32", p) not in t:
            continue
        row = {"case": label, "shape": list(shape), "pass": p, "threads": threads,
               "normcore float32 ms": t[("normcore float32", p)]}
        for name in ("float16", "bfloat16"):
            ms = t[(f"normcore {name}", p)]
            row[f"normcore {name} ms"] = ms
            row[f"{name} / float32"] = ms / t[("normcore float32", p)]
            if (f"torch {name}", p) in t:
                row[f"torch {name} ms"] = t[(f"torch {name}", p)]
                row[f"torch / normcore {name}"] = t[(f"torch {name}", p)] / ms
        rows.append(row)
    return rows


def markdown(rows):
    head = ("| case | shape | pass | thr | nc f32 ms | nc f16 ms | f16/f32 | torch f16 / nc | nc bf16 ms | "
            "bf16/f32 | torch bf16 / nc |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['case']} | {tuple(r['shape'])} | {r['pass']} | {r['threads']} | "
                   f"{r['normcore float32 ms']:.2f} | {r['normcore float16 ms']:.2f} | {r['float16 / float32']:.2f} | "
                   f"{r.get('torch / normcore float16', float('nan')):.2f} | {r['normcore bfloat16 ms']:.2f} | "
                   f"{r['bfloat16 / float32']:.2f} | {r.get('torch / normcore bfloat16', float('nan')):.2f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="2")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json")
    a = p.parse_args()
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        for case in CASES:
            rows += measure(*case, threads, a.repeats)
    print(f"normcore kernels: {VARIANT}; {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__ if torch else 'absent'}")
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
