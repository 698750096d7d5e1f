"""Half-precision benchmark: normcore float16 / bfloat16 vs normcore float32 vs PyTorch CPU
bfloat16 and float16, interleaved in one process.

    pip install -e ".[bench]" ml_dtypes && pip install torch==2.13.0
    python bench/bench_half.py --threads 2 [--repeats 15] [--json out.json]

The memory-bound passes of the half-precision targets: batch norm NCHW in training (batch
statistics, running-statistics update, output) and in eval, and layer norm's forward;
backward for reference. Parameters and running statistics are float32 beside the half
inputs (normcore's layer default, PyTorch's mixed CPU kernels), float32 beside float32.
NumPy: the mean/var code a NumPy user writes (bench_cpu), on the half array. Reported:
median ms of each, and the ratios half / normcore float32 (target <= 0.7), torch / normcore
(target >= 1.0) and numpy / normcore for the same half dtype.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
from threadpoolctl import threadpool_limits

import normcore as nc

from bench_cpu import _numpy, _torch, interleaved_medians, table_main, torch  # torch: None when absent

# (label, shape, normcore mode, torch kind, NumPy reduce axes)
CASES = [("BN2d NCHW", (32, 64, 56, 56), "batch_norm", "bn", (0, 2, 3)),
         ("LN", (8192, 768), "layer_norm", "ln", (1,))]
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


def measure(label, shape, mode, kind, axes, threads, repeats):
    x32 = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    fns = {}
    for name, dt in DTYPES.items():
        for p, f in _normcore(x32.astype(dt), mode).items():
            fns[(f"normcore {name}", p)] = f
    for name in ("float16", "bfloat16"):  # what a NumPy user writes, on the half array
        for p, f in _numpy(x32.astype(DTYPES[name]), axes, kind).items():
            fns[(f"numpy {name}", p)] = f
    if torch is not None:
        for name, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
            for p, f in _torch(x32, kind, shape[1], dtype=tdt, bn_param_dtype=torch.float32).items():
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
            for lib in ("torch", "numpy"):
                if (f"{lib} {name}", p) in t:
                    row[f"{lib} {name} ms"] = t[(f"{lib} {name}", p)]
                    row[f"{lib} / normcore {name}"] = t[(f"{lib} {name}", p)] / ms
        rows.append(row)
    return rows


def markdown(rows):
    head = ("| case | shape | pass | thr | nc f32 ms | nc f16 ms | f16/f32 | torch f16 / nc | numpy f16 / nc | "
            "nc bf16 ms | bf16/f32 | torch bf16 / nc | numpy bf16 / nc |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    nan = float("nan")
    for r in rows:
        out.append(f"| {r['case']} | {tuple(r['shape'])} | {r['pass']} | {r['threads']} | "
                   f"{r['normcore float32 ms']:.2f} | {r['normcore float16 ms']:.2f} | {r['float16 / float32']:.2f} | "
                   f"{r.get('torch / normcore float16', nan):.2f} | {r.get('numpy / normcore float16', nan):.1f} | "
                   f"{r['normcore bfloat16 ms']:.2f} | {r['bfloat16 / float32']:.2f} | "
                   f"{r.get('torch / normcore bfloat16', nan):.2f} | {r.get('numpy / normcore bfloat16', nan):.1f} |")
    return "\n".join(out)


def main():
    table_main(__doc__, lambda threads, repeats: [row for case in CASES for row in measure(*case, threads, repeats)],
               markdown)


if __name__ == "__main__":
    main()
