"""Before/after: this checkout's normcore against another build of it, interleaved in one
process (separate runs drift 10-40 % on a shared machine; calls alternating do not).

    git worktree add /tmp/before <commit> && (cd /tmp/before && python setup.py build_ext --inplace)
    python bench/ab.py /tmp/before --threads 1,2
    python bench/ab.py /tmp/before --small      # the small calls of bench_cpu.py --small
    python bench/ab.py /tmp/before --masked-add # a padded batch through the residual stream
    python bench/ab.py /tmp/before --cases "BN1d,LN" --repeats 31   # a second run of some cases

The other checkout's package is copied under another name (its imports are relative), so
both load side by side. For each large case and pass it prints the median milliseconds of
the other build and of this one, and their ratio (above 1: this checkout is faster).
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import normcore
from bench_cpu import SMALL_CASES, min_mean_us  # this script's folder is on sys.path

CASES = [("BN2d NCHW", (32, 64, 56, 56), "batch_norm", {}), ("BN2d", (64, 256, 14, 14), "batch_norm", {}),
         ("BN1d", (1024, 4096), "batch_norm", {}), ("BN2d NHWC", (32, 56, 56, 64), "batch_norm_channels_last", {}),
         ("LN", (8192, 768), "layer_norm", {}), ("LN", (2048, 4096), "layer_norm", {}),
         ("GN G=32", (32, 256, 28, 28), "group_norm", {"g": 32}), ("IN", (16, 64, 64, 64), "instance_norm", {})]


def load_other(checkout: str):
    """The package of another built checkout, imported as ``normcore_other``."""
    src = Path(checkout) / "normcore"
    if not any(src.glob("_kernels*.so")) and not any(src.glob("_kernels*.pyd")):
        raise SystemExit(f"{src}: no compiled kernels; run 'python setup.py build_ext --inplace' there")
    root = Path(tempfile.mkdtemp())
    shutil.copytree(src, root / "normcore_other")
    sys.path.insert(0, str(root))
    return importlib.import_module("normcore_other")


def _calls(nc, x, mode, sizes):
    m = nc.get_mode(mode)
    plan = nc.plan.make_plan(m, x.shape, sizes)  # both builds have it
    w, b = np.ones(plan.param_shape, x.dtype), np.zeros(plan.param_shape, x.dtype)
    run = {}
    if m.running_stats is not None:
        run = {"running_mean": np.zeros(plan.running_shape, x.dtype),
               "running_var": np.ones(plan.running_shape, x.dtype)}
    y, cache = nc.normalize(x, mode, weight=w, bias=b, **run, **sizes)
    dy = np.ones_like(y)
    calls = {"fwd": lambda: nc.normalize(x, mode, weight=w, bias=b, **run, **sizes),
             "bwd": lambda: nc.backward(dy, cache)}
    if run:
        calls["infer"] = lambda: nc.normalize(x, mode, weight=w, bias=b, training=False, **run, **sizes)
    return calls


# padded sequences through a residual stream: (batch, tokens, features), the last quarter of
# the tokens masked out; add_normalize then backward with dh, into kept buffers
MASKED_ADD_CASES = [("LN masked + residual", (64, 128, 768), "layer_norm", {}),
                    ("LN masked + residual", (16, 512, 1024), "layer_norm", {}),
                    ("GN masked + residual", (32, 64, 28 * 28), "group_norm", {"g": 8})]


def _masked_add_calls(nc, x, mode, sizes):
    rng = np.random.default_rng(1)
    r, dy, dh = (rng.standard_normal(x.shape).astype(x.dtype) for _ in range(3))
    mask = np.ones(x.shape[:2] + (1,), bool)
    mask[:, x.shape[1] * 3 // 4:] = False
    P = x.shape[1] if mode == "group_norm" else x.shape[-1]
    w, b = np.ones(P, x.dtype), np.zeros(P, x.dtype)
    y, h, dx = (np.empty_like(x) for _ in range(3))

    def step():
        _, _, cache = nc.add_normalize(x, r, mode, weight=w, bias=b, mask=mask, out=y, h_out=h, **sizes)
        nc.backward(dy, cache, dh=dh, out=dx)
    return {"fwd+bwd": step}


def small(other, repeats=7, calls=1000):
    """Layer training step (forward + backward) and eval forward of both builds, float32,
    1 thread, alternating: the minimum over ``repeats`` of the mean of ``calls`` calls, µs."""
    print(f"other: {other.__file__}; this: {normcore.__file__}; float32, 1 thread, min over {repeats} "
          f"alternating repeats of the mean of {calls} calls, µs")
    print("| layer | shape | pass | other µs | this µs | other ÷ this |\n|---|---|---|---|---|---|")
    for shape in SMALL_CASES:
        name = "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d"
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        fns = {}
        for who, nc in (("other", other), ("this", normcore)):
            layer, frozen = getattr(nc, name)(shape[1]), getattr(nc, name)(shape[1]).eval()
            fns[(who, "train")] = lambda layer=layer: layer.backward(layer(x))
            fns[(who, "eval")] = lambda frozen=frozen: frozen(x)
        best = min_mean_us(fns, repeats, calls)
        for step in ("train", "eval"):
            a, b = best[("other", step)], best[("this", step)]
            print(f"| {name} | {shape} | {step} | {a:.1f} | {b:.1f} | {a / b:.2f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="a built checkout of normcore to compare against")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--small", action="store_true", help="small layer calls, 1 thread")
    p.add_argument("--masked-add", action="store_true", help="masked add_normalize + backward with dh")
    p.add_argument("--cases", default="", help="comma-separated labels (or shapes) to run, e.g. 'BN1d,LN' "
                                                "(a second run of the cases below 0.95)")
    args = p.parse_args()
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    other = load_other(args.other)
    if args.small:
        with threadpool_limits(1):
            small(other)
        return
    print(f"other: {other.__file__}; this: {normcore.__file__}; float32, median of {args.repeats} "
          "interleaved calls (5 ms pause before each), ms")
    print("| case | shape | threads | pass | other ms | this ms | other ÷ this |\n|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        with threadpool_limits(threads, user_api="openmp"):
            for label, shape, mode, sizes in (MASKED_ADD_CASES if args.masked_add else CASES):
                if wanted and not any(w == label or w == str(shape) for w in wanted):
                    continue
                x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                make = _masked_add_calls if args.masked_add else _calls
                fns = {(who, k): f for who, nc in (("other", other), ("this", normcore))
                       for k, f in make(nc, x, mode, sizes).items()}
                for f in fns.values():
                    f()
                times = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, f in fns.items():
                        time.sleep(0.005)
                        t0 = time.perf_counter()
                        f()
                        times[k].append((time.perf_counter() - t0) * 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                for step in ("fwd", "bwd", "infer", "fwd+bwd"):
                    if ("this", step) in med:
                        a, b = med[("other", step)], med[("this", step)]
                        print(f"| {label} | {shape} | {threads} | {step} | {a:.2f} | {b:.2f} | {a / b:.2f} |",
                              flush=True)


if __name__ == "__main__":
    main()
