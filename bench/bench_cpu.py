"""CPU benchmark: normcore vs PyTorch CPU vs plain NumPy, side by side in one process.

    pip install ".[bench]" torch   # torch is optional: its columns are skipped without it
    python bench/bench_cpu.py --threads 2 [--quick] [--dtype float32]

Median milliseconds over repeats (hot cache, after a warm-up), for forward in training
mode (batch statistics + running-stat update where the mode has them), backward (dx,
dweight, dbias) and inference. Absolute times drift on shared machines; read the ratios.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

import normcore as nc

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is an optional comparison
    torch = None

# (label, normcore layer factory, input shape, torch functional, numpy reduce axes)
CASES = [
    ("BN2d NCHW", lambda: nc.BatchNorm2d(64), (32, 64, 56, 56), "batch_norm", (0, 2, 3)),
    ("BN2d", lambda: nc.BatchNorm2d(256), (64, 256, 14, 14), "batch_norm", (0, 2, 3)),
    ("BN1d", lambda: nc.BatchNorm1d(4096), (1024, 4096), "batch_norm", (0,)),
    ("BN2d NHWC", lambda: nc.BatchNorm2d(64, channel_axis=-1), (32, 56, 56, 64), "batch_norm_cl", (0, 1, 2)),
    ("LN", lambda: nc.LayerNorm(768), (8192, 768), "layer_norm", (1,)),
    ("LN", lambda: nc.LayerNorm(4096), (2048, 4096), "layer_norm", (1,)),
    ("GN G=32", lambda: nc.GroupNorm(32, 256), (32, 256, 28, 28), "group_norm", None),
    ("IN", lambda: nc.InstanceNorm2d(64), (16, 64, 64, 64), "instance_norm", (2, 3)),
]


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def numpy_pair(x, axes, kind):
    """Plain NumPy forward/backward (what a user would write), per-channel params."""
    if kind == "group_norm":
        n, c = x.shape[:2]
        view, axes = x.reshape(n, 32, -1), (2,)
    else:
        view = x
    w = np.ones([1 if i in axes else s for i, s in enumerate(view.shape)], x.dtype)

    def forward():
        mean = view.mean(axis=axes, keepdims=True)
        var = view.var(axis=axes, keepdims=True)
        xhat = (view - mean) / np.sqrt(var + 1e-5)
        return xhat, 1 / np.sqrt(var + 1e-5), xhat * w

    xhat, rstd, _ = forward()
    dy = np.ones_like(view)

    def backward():
        g = dy * w
        return rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))

    return forward, backward


def torch_fns(x_np, kind, layer):
    c = layer.weight.shape[0] if layer.weight is not None else x_np.shape[1]
    if kind == "batch_norm_cl":
        x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).contiguous(
            memory_format=torch.channels_last)
    else:
        x = torch.from_numpy(x_np.copy())
    x.requires_grad_(True)
    shape = layer.weight.shape if layer.weight is not None else (c,)
    w = torch.ones(shape, requires_grad=True)
    b = torch.zeros(shape, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    if kind in ("batch_norm", "batch_norm_cl"):
        def fwd(training=True):
            return F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5)
    elif kind == "layer_norm":
        def fwd(training=True):
            return F.layer_norm(x, tuple(shape), w, b, 1e-5)
    elif kind == "group_norm":
        def fwd(training=True):
            return F.group_norm(x, 32, w, b, 1e-5)
    else:
        def fwd(training=True):
            return F.instance_norm(x, None, None, None, None, True, 0.1, 1e-5)
    y = fwd()
    dy = torch.ones_like(y)

    def forward_nograd():
        with torch.no_grad():
            fwd()

    def infer():
        with torch.no_grad():
            fwd(training=False)

    def backward():
        x.grad = w.grad = b.grad = None
        y.backward(dy, retain_graph=True)

    return forward_nograd, backward, (infer if kind.startswith("batch") else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="first three cases, 3 repeats")
    args = p.parse_args()
    cases = CASES[:3] if args.quick else CASES
    repeats = 3 if args.quick else args.repeats
    dtype = np.dtype(args.dtype)
    if torch is not None:
        torch.set_num_threads(args.threads)
        torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    from normcore.kernels import VARIANT
    print(f"normcore {nc.__version__} ({VARIANT} kernels), numpy {np.__version__}, "
          f"torch {torch.__version__ if torch else '-'}; "
          f"{platform.machine()}, {args.threads} threads, {dtype.name}, median of {repeats}, ms")
    print("| case | shape | nc fwd | torch fwd | np fwd | nc bwd | torch bwd | np bwd | nc infer | torch infer "
          "| fwd torch/nc | bwd torch/nc | fwd np/nc |")
    print("|---" * 13 + "|")
    rng = np.random.default_rng(0)
    with threadpool_limits(args.threads, user_api="openmp"), threadpool_limits(1, user_api="blas"):
        for label, make, shape, kind, axes in cases:
            x = rng.standard_normal(shape).astype(dtype)
            layer = make() if dtype == np.float32 else _as64(make)
            y = layer(x)
            dy = np.ones_like(y)
            ours = [median_ms(lambda: layer(x), repeats), median_ms(lambda: layer.backward(dy), repeats)]
            layer.eval()
            ours.append(median_ms(lambda: layer(x), repeats) if kind.startswith("batch") else float("nan"))
            layer.train()
            npf, npb = numpy_pair(x, axes, kind)
            numpy_t = [median_ms(npf, max(3, repeats // 2)), median_ms(npb, max(3, repeats // 2))]
            theirs = [float("nan")] * 3
            if torch is not None:
                tf, tb, ti = torch_fns(x, kind, layer)
                theirs = [median_ms(tf, repeats), median_ms(tb, repeats),
                          median_ms(ti, repeats) if ti else float("nan")]
            print(f"| {label} | {shape} | {ours[0]:.2f} | {theirs[0]:.2f} | {numpy_t[0]:.1f} | {ours[1]:.2f} | "
                  f"{theirs[1]:.2f} | {numpy_t[1]:.1f} | {ours[2]:.2f} | {theirs[2]:.2f} | "
                  f"{theirs[0] / ours[0]:.2f} | {theirs[1] / ours[1]:.2f} | {numpy_t[0] / ours[0]:.1f} |", flush=True)


def _as64(make):
    layer = make()
    state = layer.state_dict()
    kwargs = {"dtype": np.float64}
    # rebuild with the same constructor arguments in float64
    cls = type(layer)
    if isinstance(layer, nc.LayerNorm):
        new = cls(layer.normalized_shape, **kwargs)
    elif isinstance(layer, nc.GroupNorm):
        new = cls(layer.num_groups, layer.num_channels, **kwargs)
    elif hasattr(layer, "channel_axis"):
        new = cls(layer.num_features, channel_axis=layer.channel_axis, **kwargs)
    else:
        new = cls(layer.num_features, **kwargs)
    new.load_state_dict(state)
    return new


if __name__ == "__main__":
    main()
