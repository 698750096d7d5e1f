"""float32 accuracy at large offsets: normcore and PyTorch against the float64 floor.

    python bench/accuracy.py [--offsets 0,1e2,1e3,1e4] [--json out.json]

Inputs are x = offset + N(0, 1) in float32, with random weight and bias. "Exact" is
float64 math on those same float32 inputs. The floor is what a careful float32 kernel
cannot avoid: float64 math whose only shortcut is the mean rounded to float32, with the
result rounded to float32. Each cell is max |result - exact| / max |exact| for y, dx,
dweight, dbias; the ratio columns divide by the floor's error (<= 1: at or below it).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import normcore as nc

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

# (label, shape, normcore call, reduce axes on the view, param axis, view for the math)
CASES = [
    ("BN2d NCHW", (16, 8, 12, 12), "batch_norm", {}),
    ("BN2d NHWC", (16, 12, 12, 8), "batch_norm_channels_last", {}),
    ("BN1d", (256, 64), "batch_norm", {}),
    ("LN", (256, 96), "layer_norm", {}),
    ("GN G=4", (8, 16, 10, 10), "group_norm", {"g": 4}),
    ("IN", (8, 8, 16, 16), "instance_norm", {}),
]


def _geometry(mode, shape, sizes):
    """(view shape, reduce axes, param index shape) of the mode on ``shape``."""
    n = shape[0]
    if mode == "group_norm":
        g = sizes["g"]
        return (n, g, shape[1] // g, int(np.prod(shape[2:]))), (2, 3), "c"
    if mode == "batch_norm_channels_last":
        return (int(np.prod(shape[:-1])), shape[-1]), (0,), "last"
    if mode == "layer_norm":
        return shape, (len(shape) - 1,), "last"
    if mode == "instance_norm":
        return (n, shape[1], int(np.prod(shape[2:]))), (2,), "c"
    return (n, shape[1], int(np.prod(shape[2:])) if len(shape) > 2 else 1), (0, 2), "c"


def _math(x, dy, w, b, mode, sizes, mean_dtype):
    """float64 forward/backward; the mean rounded to ``mean_dtype`` (the floor) or not."""
    view, axes, where = _geometry(mode, x.shape, sizes)
    xv, dv = x.astype(np.float64).reshape(view), dy.astype(np.float64).reshape(view)
    pshape = [1] * len(view)
    if where == "last":
        pshape[-1] = view[-1]
    elif mode == "group_norm":
        pshape[1:3] = view[1:3]
    else:
        pshape[1] = view[1]
    wv, bv = w.astype(np.float64).reshape(pshape), b.astype(np.float64).reshape(pshape)
    mean = xv.mean(axis=axes, keepdims=True).astype(mean_dtype).astype(np.float64)
    var = ((xv - xv.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(var + 1e-5)
    xhat = (xv - mean) * rstd
    y = xhat * wv + bv
    g = dv * wv
    dx = rstd * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    red = tuple(i for i in range(len(view)) if pshape[i] == 1)
    dw, db = (dv * xhat).sum(axis=red).reshape(-1), dv.sum(axis=red).reshape(-1)
    return [a.reshape(x.shape) if a.size == x.size else a for a in (y, dx, dw, db)]


def _torch(x, dy, w, b, mode, sizes):
    xt = torch.tensor(np.moveaxis(x, -1, 1) if mode == "batch_norm_channels_last" else x, requires_grad=True)
    if mode == "batch_norm_channels_last":
        xt = xt.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True) if x.ndim == 4 else xt
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    if mode.startswith("batch_norm"):
        y = F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    elif mode == "layer_norm":
        y = F.layer_norm(xt, (x.shape[-1],), wt, bt, 1e-5)
    elif mode == "group_norm":
        y = F.group_norm(xt, sizes["g"], wt, bt, 1e-5)
    else:
        y = F.instance_norm(xt, weight=wt, bias=bt, use_input_stats=True, eps=1e-5)
    dyt = torch.tensor(np.moveaxis(dy, -1, 1) if mode == "batch_norm_channels_last" else dy)
    y.backward(dyt)
    back = (lambda a: np.moveaxis(a, 1, -1)) if mode == "batch_norm_channels_last" else (lambda a: a)
    return [back(y.detach().numpy()), back(xt.grad.numpy()), wt.grad.numpy(), bt.grad.numpy()]


def _err(got, exact):
    return float(np.abs(np.asarray(got, np.float64) - exact).max() / np.abs(exact).max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--offsets", default="0,1e2,1e3,1e4")
    p.add_argument("--json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    names = ("y", "dx", "dweight", "dbias")
    for label, shape, mode, sizes in CASES:
        for offset in (float(o) for o in args.offsets.split(",")):
            x = (offset + rng.standard_normal(shape)).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            pshape = nc.param_shapes(mode, shape, **sizes)["weight"]
            w = rng.standard_normal(pshape).astype(np.float32)
            b = rng.standard_normal(pshape).astype(np.float32)
            exact = _math(x, dy, w, b, mode, sizes, np.float64)
            floor = [a.astype(np.float32) for a in _math(x, dy, w, b, mode, sizes, np.float32)]
            y, cache = nc.normalize(x, mode, weight=w, bias=b, **sizes)
            ours = [y, *nc.backward(dy, cache)]
            theirs = _torch(x, dy, w, b, mode, sizes) if torch is not None else None
            row = {"case": label, "offset": offset}
            for i, name in enumerate(names):
                e_floor = _err(floor[i], exact[i])
                row[name] = {"floor": e_floor, "normcore": _err(ours[i], exact[i]),
                             "torch": _err(theirs[i], exact[i]) if theirs else None}
            rows.append(row)
    print("float32, x = offset + N(0, 1); error = max|result - exact| / max|exact|; ratio = error / floor error")
    print("| case | offset | " + " | ".join(f"{n} floor | {n} nc (ratio) | {n} torch (ratio)" for n in names) + " |")
    print("|---|---|" + "---|" * 12)
    for r in rows:
        cells = []
        for n in names:
            c = r[n]
            t = "—" if c["torch"] is None else f"{c['torch']:.1e} ({c['torch'] / c['floor']:.2g})"
            cells.append(f"{c['floor']:.1e} | {c['normcore']:.1e} ({c['normcore'] / c['floor']:.2g}) | {t}")
        print(f"| {r['case']} | {r['offset']:g} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
