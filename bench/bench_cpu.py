"""CPU benchmark: normcore vs PyTorch CPU vs plain NumPy, interleaved in one process.

    pip install -e ".[bench]" && pip install torch==2.13.0   # torch is optional
    python bench/bench_cpu.py --threads 1,2 [--dtype float32] [--quick] [--json out.json]
    python bench/bench_cpu.py --small [--json out.json]      # small calls, per-call overhead

For every case and pass (forward in training mode with the running-statistics update,
backward, inference) it reports the median milliseconds of normcore (allocating its
output, and writing into a reused ``out=`` buffer), PyTorch and NumPy, timed round-robin so
that machine drift hits all alike (with a 5 ms pause before each call, so that one
library's idle OpenMP threads, still spinning, do not slow the next); the torch/normcore and NumPy/normcore ratios (against
normcore's allocating figure, as torch and NumPy allocate too); and, for the ``out=``
figure, the effective GB/s and the ratio to a bandwidth floor measured in the same run:
bytes moved (forward 3x, backward 5x, inference 2x bytes(x)) at the bandwidth of the faster of a NumPy
copy of x and a copy split over as many threads as the kernels use.
Absolute times drift on shared machines; read the ratios.

``--small`` times what dominates small inputs, the fixed work of a call: a layer's training
forward + backward and its eval forward, float32, one thread, on the shapes of a small
network (a batch of 64 through 128-1024 features), for the normcore layer, the
hand-written NumPy a careful NumPy user would write (one centring pass, the running
statistics updated in place, the closed-form backward, eval as
``(x - rm) * (w / sqrt(rv + eps)) + b``) and torch.nn's module with autograd; interleaved, the minimum over
repeats of the mean of many calls.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import normcore as nc
from normcore.kernels import VARIANT

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # an optional comparison
    torch = None

try:
    from tqdm import tqdm
except ImportError:
    def tqdm(it, **_):
        return it

if "bench_head_norm" not in nc.modes():
    # a user-registered mode: statistics per (batch, head) over time and features
    nc.register_mode("bench_head_norm", "b t (h d) -> b h", params="(h d)", h=12)

# (label, shape, normcore mode, sizes, torch kind, NumPy reduce axes on the (view) shape)
CASES = [
    ("BN2d NCHW", (32, 64, 56, 56), "batch_norm", {}, "bn", (0, 2, 3)),
    ("BN2d", (64, 256, 14, 14), "batch_norm", {}, "bn", (0, 2, 3)),
    ("BN1d", (1024, 4096), "batch_norm", {}, "bn", (0,)),
    ("BN2d NHWC", (32, 56, 56, 64), "batch_norm_channels_last", {}, "bn_cl", (0, 1, 2)),
    ("LN", (8192, 768), "layer_norm", {}, "ln", (1,)),
    ("LN", (2048, 4096), "layer_norm", {}, "ln", (1,)),
    ("GN G=32", (32, 256, 28, 28), "group_norm", {"g": 32}, "gn", None),
    ("IN", (16, 64, 64, 64), "instance_norm", {}, "in", (2, 3)),
    ("user mode b t (h d) -> b h", (64, 128, 768), "bench_head_norm", {}, None, None),
]
PASS_BYTES = {"fwd": 3, "bwd": 5, "infer": 2}  # multiples of bytes(x) a pass must move


def _normcore(x, mode, sizes):
    m = nc.get_mode(mode)
    shapes = nc.param_shapes(m, x.shape, **sizes)
    w = np.ones(shapes["weight"], x.dtype)
    b = np.zeros(shapes["weight"], x.dtype)
    run = {}
    if m.running_stats is not None:
        run = {"running_mean": np.zeros(shapes["running_mean"], x.dtype),
               "running_var": np.ones(shapes["running_mean"], x.dtype)}
    y, cache = nc.normalize(x, mode, weight=w, bias=b, **run, **sizes)
    dy = np.ones_like(y)
    y_out, dx_out = np.empty_like(x), np.empty_like(x)
    fns = {
        "fwd": lambda: nc.normalize(x, mode, weight=w, bias=b, **run, **sizes),
        "fwd out=": lambda: nc.normalize(x, mode, weight=w, bias=b, out=y_out, **run, **sizes),
        "bwd": lambda: nc.backward(dy, cache),
        "bwd out=": lambda: nc.backward(dy, cache, out=dx_out),
    }
    if run:
        fns["infer"] = lambda: nc.normalize(x, mode, weight=w, bias=b, training=False, out=y_out, **run, **sizes)
    return fns


def _torch(x_np, kind, channels, dtype=None, bn_param_dtype=None):
    """torch's passes on a copy of ``x_np``, cast to ``dtype`` when given; batch norm's
    parameters and running statistics in ``bn_param_dtype`` (default x's), as its mixed
    CPU kernels take them."""
    if kind == "bn_cl":
        x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).contiguous(
            memory_format=torch.channels_last)
    else:
        x = torch.from_numpy(x_np.copy())
    if dtype is not None:
        x = x.to(dtype)
    x.requires_grad_(True)
    c = x_np.shape[-1] if kind == "ln" else channels
    dt = bn_param_dtype if bn_param_dtype is not None and kind in ("bn", "bn_cl") else x.dtype
    w, b = torch.ones(c, dtype=dt, requires_grad=True), torch.zeros(c, dtype=dt, requires_grad=True)
    rm, rv = torch.zeros(channels, dtype=dt), torch.ones(channels, dtype=dt)

    def fwd(training=True):
        if kind in ("bn", "bn_cl"):
            return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
        if kind == "ln":
            return F.layer_norm(x, (c,), w, b, 1e-5)
        if kind == "gn":
            return F.group_norm(x, 32, w, b, 1e-5)
        return F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5)

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
    if kind in ("bn", "bn_cl"):
        fns["infer"] = no_grad(lambda: fwd(False))
    return fns


def _numpy(x, axes, kind):
    """What a careful NumPy user writes: one centring pass, then the closed-form backward."""
    view = x.reshape(x.shape[0], 32, -1) if kind == "gn" else x
    axes = (2,) if kind == "gn" else axes
    w = np.ones([1 if i in axes else s for i, s in enumerate(view.shape)], x.dtype)
    mean = view.mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(view.var(axis=axes, keepdims=True) + 1e-5)
    xhat = (view - mean) * rstd
    dy = np.ones_like(view)

    def fwd():  # one centring pass; the scale formed on the statistics, one multiply over x
        xc = view - view.mean(axis=axes, keepdims=True)
        return xc * (w / np.sqrt(np.mean(xc * xc, axis=axes, keepdims=True) + 1e-5))

    def bwd():
        g = dy * w
        return rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))

    return {"fwd": fwd, "bwd": bwd}


def _parallel_copy(x, threads):
    """A copy of x by ``threads`` Python threads (NumPy releases the GIL while copying):
    the bandwidth the floor is measured at, with as many cores as the kernels use."""
    src, dst = x.reshape(-1), np.empty(x.size, x.dtype)
    bounds = np.linspace(0, x.size, threads + 1).astype(int)
    pool = ThreadPoolExecutor(threads)

    def part(i):
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    return lambda: list(pool.map(part, range(threads)))


# Pause before each timed call: OpenMP workers (ours, and PyTorch's own runtime) spin for a
# while after a parallel region, and would steal the cores from whichever library runs next.
PAUSE_S = 0.005


def table_main(doc, rows_of, markdown, repeats=15):
    """The command line of the one-table benchmarks (bench_add, bench_half, bench_mask):
    ``--threads`` (comma-separated), ``--repeats``, ``--json``; prints the build and
    machine, then ``markdown`` of the rows ``rows_of(threads, repeats)`` gives for each
    thread count in turn (and writes them to the JSON file)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", default="2")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--json")
    a = p.parse_args()
    rows = [row for t in a.threads.split(",") for row in rows_of(int(t), a.repeats)]
    print(f"normcore kernels: {VARIANT}; {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__ if torch else 'absent'}")
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def interleaved_medians(fns, repeats):
    """Median ms of each callable, timed round-robin after one warm-up call each, with a
    short pause before every call so that no library's idle spinning threads slow the next."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(case, dtype, threads, repeats):
    label, shape, mode, sizes, kind, axes = case
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    fns = {f"normcore {k}": f for k, f in _normcore(x, mode, sizes).items()}
    if torch is not None and kind is not None:
        channels = shape[-1] if kind in ("bn_cl", "ln") else shape[1]
        fns.update({f"torch {k}": f for k, f in _torch(x, kind, channels).items()})
    if kind is not None:
        fns.update({f"numpy {k}": f for k, f in _numpy(x, axes, kind).items()})
    dst = np.empty_like(x)
    fns["copy"] = lambda: np.copyto(dst, x)
    if threads > 1:
        fns["copy threads"] = _parallel_copy(x, threads)
    med = interleaved_medians(fns, repeats)
    gbps_copy = 2 * x.nbytes / (min(med["copy"], med.get("copy threads", np.inf)) * 1e-3) / 1e9
    rows = []
    for p in ("fwd", "bwd", "infer"):
        ours = med.get(f"normcore {p}")
        if ours is None:
            continue
        reuse = med.get(f"normcore {p} out=", ours)
        floor = PASS_BYTES[p] * x.nbytes / (gbps_copy * 1e9) * 1e3
        theirs, npy = med.get(f"torch {p}"), med.get(f"numpy {p}")
        rows.append({
            "case": label, "shape": list(shape), "dtype": np.dtype(dtype).name, "threads": threads,
            "pass": p, "normcore_ms": ours, "normcore_out_ms": reuse, "torch_ms": theirs, "numpy_ms": npy,
            "torch_over_normcore": theirs / ours if theirs else None,
            "numpy_over_normcore": npy / ours if npy else None,
            "normcore_GBps": PASS_BYTES[p] * x.nbytes / (reuse * 1e-3) / 1e9,
            "floor_ms": floor, "normcore_over_floor": reuse / floor, "copy_GBps": gbps_copy,
        })
    return rows


def markdown(rows):
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)
    out = ["| case | shape | threads | pass | normcore ms (alloc / out=) | torch ms | NumPy ms | torch/nc "
           "| NumPy/nc | nc out= GB/s | floor ms | nc out= / floor |", "|---" * 12 + "|"]
    for r in rows:
        out.append(f"| {r['case']} | {tuple(r['shape'])} | {r['threads']} | {r['pass']} | "
                   f"{r['normcore_ms']:.2f} / {r['normcore_out_ms']:.2f} | {f(r['torch_ms'], '.2f')} | "
                   f"{f(r['numpy_ms'], '.1f')} | {f(r['torch_over_normcore'], '.2f')} | "
                   f"{f(r['numpy_over_normcore'], '.1f')} | {r['normcore_GBps']:.1f} | {r['floor_ms']:.2f} | "
                   f"{r['normcore_over_floor']:.2f} |")
    return "\n".join(out)


SMALL_CASES = [(64, 128), (64, 512), (256, 1024), (64, 16, 8, 8), (64, 32, 4, 4)]


def _numpy_batch_norm(x, momentum=0.1, eps=1e-5):
    """A careful NumPy user's batch norm layer: (train forward + backward, eval forward).

    One centring pass (the variance from the centred x, reused for x̂), the running
    statistics updated in place, the closed-form backward from the two sums it needs, and
    eval as ``(x - rm) * (w / sqrt(rv + eps)) + b`` (the scale formed on C values, not on x).
    """
    C = x.shape[1]
    axes = (0,) if x.ndim == 2 else (0,) + tuple(range(2, x.ndim))
    shape = (1, C) + (1,) * (x.ndim - 2)
    gamma, beta = np.ones(shape, x.dtype), np.zeros(shape, x.dtype)
    rm, rv = np.zeros(shape, x.dtype), np.ones(shape, x.dtype)
    n = x.size // C
    dy = np.ones_like(x)

    def train():
        mu = x.mean(axis=axes, keepdims=True)
        xc = x - mu
        var = np.mean(xc * xc, axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = xc * rstd
        np.multiply(rm, 1 - momentum, out=rm)
        rm[...] += momentum * mu
        np.multiply(rv, 1 - momentum, out=rv)
        rv[...] += (momentum * n / (n - 1)) * var
        y = xhat * gamma + beta
        dbeta = dy.sum(axis=axes)
        dgamma = (dy * xhat).sum(axis=axes)
        dx = (gamma * rstd / n) * (n * dy - dbeta.reshape(shape) - xhat * dgamma.reshape(shape))
        return y, dx, dgamma, dbeta

    def infer():
        return (x - rm) * (gamma / np.sqrt(rv + eps)) + beta

    return train, infer


def _small_fns(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    layer_type = nc.BatchNorm1d if len(shape) == 2 else nc.BatchNorm2d
    layer, frozen = layer_type(shape[1]), layer_type(shape[1]).eval()
    dy = np.ones_like(x)
    fns = {"normcore train": lambda: layer.backward(layer(x)), "normcore eval": lambda: frozen(x)}
    fns["numpy train"], fns["numpy eval"] = _numpy_batch_norm(x)
    if torch is not None:
        t_type = torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d
        module, t_frozen = t_type(shape[1]), t_type(shape[1]).eval()
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def t_train():
            module(xt).backward(dyt)

        def t_eval():
            with torch.no_grad():
                t_frozen(xt)
        fns["torch train"], fns["torch eval"] = t_train, t_eval
    return fns


def min_mean_us(fns, repeats, calls):
    """``{key: µs}``: each function's mean over ``calls`` calls, the minimum over
    ``repeats`` rounds that run the functions in turn (after one warm-up call each)."""
    best = {k: np.inf for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / calls * 1e6)
    return best


def measure_small(repeats=5, calls=2000):
    """Rows of microseconds per call for SMALL_CASES (see the module docstring)."""
    rows = []
    for shape in SMALL_CASES:
        best = min_mean_us(_small_fns(shape), repeats, calls)
        rows.append({"shape": list(shape), "case": "BatchNorm1d" if len(shape) == 2 else "BatchNorm2d",
                     **{k.replace(" ", "_") + "_us": v for k, v in best.items()}})
    return rows


def markdown_small(rows):
    def f(r, k, fmt=".1f"):
        v = r.get(k)
        return "—" if v is None else format(v, fmt)
    out = ["| case | shape | train µs: normcore / NumPy / torch | nc ÷ NumPy | nc ÷ torch "
           "| eval µs: normcore / NumPy / torch | eval nc ÷ NumPy |", "|---" * 7 + "|"]
    for r in rows:
        t = r.get("torch_train_us")
        out.append(f"| {r['case']} | {tuple(r['shape'])} | {f(r, 'normcore_train_us')} / {f(r, 'numpy_train_us')} / "
                   f"{f(r, 'torch_train_us')} | {r['normcore_train_us'] / r['numpy_train_us']:.2f} | "
                   f"{'—' if t is None else format(r['normcore_train_us'] / t, '.2f')} | "
                   f"{f(r, 'normcore_eval_us')} / {f(r, 'numpy_eval_us')} / {f(r, 'torch_eval_us')} | "
                   f"{r['normcore_eval_us'] / r['numpy_eval_us']:.2f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="2", help="comma-separated thread counts, e.g. 1,2")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="three cases, 3 repeats")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--small", action="store_true", help="small calls: layer train and eval, 1 thread")
    args = p.parse_args()
    if args.small:
        header = (f"normcore {nc.__version__} ({VARIANT} kernels), numpy {np.__version__}, "
                  f"torch {torch.__version__ if torch else 'not installed'}; {platform.machine()}, float32, "
                  f"1 thread, interleaved, min over 5 repeats of the mean of 2000 calls, µs per call")
        if torch is not None:
            torch.set_num_threads(1)
        with threadpool_limits(1):
            rows = measure_small()
        print(header)
        print(markdown_small(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "rows": rows}, f, indent=1)
        return
    cases = CASES[:3] if args.quick else CASES
    repeats = 3 if args.quick else args.repeats
    dtype = np.dtype(args.dtype)
    header = (f"normcore {nc.__version__} ({VARIANT} kernels), numpy {np.__version__}, "
              f"torch {torch.__version__ if torch else 'not installed'}; {platform.machine()}, "
              f"{dtype.name}, median of {repeats} interleaved repeats, ms")
    print(header)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        if torch is not None:
            torch.set_num_threads(threads)
        with threadpool_limits(threads, user_api="openmp"), threadpool_limits(1, user_api="blas"):
            for case in tqdm(cases, desc=f"{threads} thread(s)", leave=False):
                rows += measure(case, dtype, threads, repeats)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "openmp": [i for i in threadpool_info() if i["user_api"] == "openmp"],
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
