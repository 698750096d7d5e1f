"""GPU benchmark: normcore on CuPy vs PyTorch (cuDNN / native) on the same GPU, one process.

    pip install -e ".[gpu,bench]" && pip install torch      # a CUDA build of torch
    python bench/bench_gpu.py [--repeats 50] [--json out.json] [--quick]

For each case and pass (forward in training mode with the running-statistics update,
backward, inference) it reports the median time over CUDA events with L2 flushed before
every call (a 256 MiB buffer is overwritten), for normcore and torch, timed round-robin;
the torch/normcore ratio; and the ratio to a floor: bytes moved (forward and inference
2x bytes(x), backward 3x) at the device-to-device copy bandwidth measured in the same run.
Absolute times drift with clocks and other tenants: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics

# (label, shape, normcore mode, sizes, torch kind, dtype)
CASES = [
    ("BN2d NCHW", (32, 64, 56, 56), "batch_norm", {}, "bn", "float32"),
    ("BN2d NCHW", (64, 128, 112, 112), "batch_norm", {}, "bn", "float32"),
    ("BN2d NCHW bf16", (64, 128, 112, 112), "batch_norm", {}, "bn", "bfloat16"),
    ("BN2d channels-last", (32, 56, 56, 64), "batch_norm_channels_last", {}, "bn_cl", "float32"),
    ("BN1d", (1024, 4096), "batch_norm", {}, "bn", "float32"),
    ("LN", (8192, 768), "layer_norm", {}, "ln", "float32"),
    ("LN", (16384, 8192), "layer_norm", {}, "ln", "float32"),
    ("LN bf16", (16384, 8192), "layer_norm", {}, "ln", "bfloat16"),
    ("GN G=32", (32, 256, 28, 28), "group_norm", {"g": 32}, "gn", "float32"),
    ("IN affine", (16, 64, 64, 64), "instance_norm", {}, "in", "float32"),
    ("RMS", (8192, 4096), "rms_norm", {}, "rms", "float32"),
]
PASS_BYTES = {"fwd": 2, "bwd": 3, "infer": 2}


def _dtype(name):
    import numpy as np
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _normcore(x, mode, sizes):
    import cupy as cp
    import normcore as nc
    m = nc.get_mode(mode)
    shapes = nc.param_shapes(m, x.shape, **sizes)
    kw = dict(sizes)
    if shapes["weight"] is not None:
        kw.update(weight=cp.ones(shapes["weight"], x.dtype), bias=cp.zeros(shapes["weight"], x.dtype))
        if mode == "rms_norm":
            kw.pop("bias")
    run = {}
    if m.running_stats is not None:
        run = {"running_mean": cp.zeros(shapes["running_mean"], x.dtype), "running_var": cp.ones(shapes["running_mean"], x.dtype)}
    y_out, dx_out = cp.empty_like(x), cp.empty_like(x)
    _, cache = nc.normalize(x, mode, **kw, **run)
    dy = cp.ones_like(x)
    fns = {"fwd": lambda: nc.normalize(x, mode, out=y_out, **kw, **run),
           "bwd": lambda: nc.backward(dy, cache, out=dx_out)}
    if run:
        fns["infer"] = lambda: nc.normalize(x, mode, training=False, out=y_out, **kw, **run)
    return fns


def _torch(x_cp, kind, sizes):
    import torch
    import torch.nn.functional as F
    x = torch.from_dlpack(x_cp) if x_cp.dtype.name != "bfloat16" else \
        torch.from_dlpack(x_cp.view("uint16")).view(torch.bfloat16)
    if kind == "bn_cl":
        x = x.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW channels-last
    x = x.detach().requires_grad_(True)
    c = x.shape[-1] if kind in ("ln", "rms") else x.shape[1]
    w = torch.ones(c, device=x.device, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(c, device=x.device, dtype=x.dtype, requires_grad=True)
    rm = torch.zeros(c, device=x.device, dtype=torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
    rv = torch.ones_like(rm)

    def fwd(training=True):
        if kind in ("bn", "bn_cl"):
            return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
        if kind == "ln":
            return F.layer_norm(x, (c,), w, b, 1e-5)
        if kind == "rms":
            return F.rms_norm(x, (c,), w, 1e-6)
        if kind == "gn":
            return F.group_norm(x, sizes["g"], w, b, 1e-5)
        return F.instance_norm(x, None, None, w, b, True, 0.1, 1e-5)

    y = fwd()
    dy = torch.ones_like(y)

    def bwd():
        x.grad = w.grad = b.grad = None
        y.backward(dy, retain_graph=True)

    def nograd(f):
        def run():
            with torch.no_grad():
                f()
        return run

    fns = {"fwd": nograd(fwd), "bwd": bwd}
    if kind in ("bn", "bn_cl"):
        fns["infer"] = nograd(lambda: fwd(False))
    return fns


def timed(fns, repeats):
    """Median ms per callable with CUDA events, L2 flushed before each call, round-robin."""
    import cupy as cp
    flush = cp.empty(256 << 20, cp.uint8)
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            flush.fill(1)
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            f()
            stop.record()
            stop.synchronize()
            times[k].append(cp.cuda.get_elapsed_time(start, stop))
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="three cases, 10 repeats")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    import cupy as cp
    import numpy as np
    import normcore as nc
    try:
        import torch
    except ImportError:
        torch = None
    cases = CASES[:3] if args.quick else CASES
    repeats = 10 if args.quick else args.repeats
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    header = (f"normcore {nc.__version__}, CuPy {cp.__version__}, torch {torch.__version__ if torch else '-'} "
              f"(cuDNN {torch.backends.cudnn.version() if torch else '-'}), {dev}; CUDA events, L2 flushed, "
              f"median of {repeats}, ms")
    print(header)
    print("| case | shape | dtype | pass | normcore ms | torch ms | torch/nc | floor ms | nc/floor | torch/floor |")
    print("|---" * 10 + "|")
    rows = []
    for label, shape, mode, sizes, kind, dtname in cases:
        dtype = _dtype(dtname)
        x = cp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(dtype)
        fns = {f"nc {k}": f for k, f in _normcore(x, mode, sizes).items()}
        if torch is not None:
            fns.update({f"torch {k}": f for k, f in _torch(x, kind, sizes).items()})
        dst = cp.empty_like(x)
        fns["copy"] = lambda: dst.__setitem__(Ellipsis, x)
        med = timed(fns, repeats)
        bw = 2 * x.nbytes / (med["copy"] * 1e-3)
        for pas in ("fwd", "bwd", "infer"):
            if f"nc {pas}" not in med:
                continue
            floor = PASS_BYTES[pas] * x.nbytes / bw * 1e3
            ours, theirs = med[f"nc {pas}"], med.get(f"torch {pas}")
            row = {"case": label, "shape": list(shape), "dtype": dtname, "pass": pas, "normcore_ms": ours,
                   "torch_ms": theirs, "floor_ms": floor, "copy_TBps": bw / 1e12, "device": dev}
            rows.append(row)
            t = "— | —" if theirs is None else f"{theirs:.3f} | {theirs / ours:.2f}"
            print(f"| {label} | {shape} | {dtname} | {pas} | {ours:.3f} | {t} | {floor:.3f} | {ours / floor:.2f} | "
                  f"{'—' if theirs is None else f'{theirs / floor:.2f}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
