"""Run every normalization mode, and a user-registered one, through the compiled kernels.

``python -m normcore.selfcheck`` prints, for each mode and dtype, the largest error of the
forward output and of the gradients against the float64 reference, relative to the
largest reference value.
"""
from __future__ import annotations

import argparse

import numpy as np

import normcore as nc
from normcore.reference import reference_backward, reference_forward

CASES = [
    # (mode, input shape, sizes, what it is)
    ("batch_norm", (32, 16, 12, 12), {}, "spatial batch norm, NCHW"),
    ("batch_norm_per_activation", (256, 64), {}, "per-activation batch norm"),
    ("batch_norm_channels_last", (32, 12, 12, 16), {}, "batch norm, NHWC"),
    ("layer_norm", (64, 50, 96), {}, "layer norm over the last axis"),
    ("rms_norm", (64, 50, 96), {}, "RMS norm"),
    ("instance_norm", (16, 8, 20, 20), {}, "instance norm"),
    ("group_norm", (16, 32, 10, 10), {"g": 8}, "group norm, 8 groups"),
    ("channel_norm", (16, 32, 10, 10), {"g": 8}, "channel norm, per-group affine"),
    ("weight_standardize", (64, 32, 3, 3), {}, "weight standardization"),
]


def _register_user_mode():
    # A mode no built-in covers: statistics per (batch, head), parameters per feature.
    name = "demo_per_head"
    if name not in nc.modes():
        nc.register_mode(name, "b t (h d) -> b h", params="(h d)", h=4)
    return name, (8, 10, 64), {}, "user-registered: per (batch, head) over time and features"


def _fresh(kw, extra):
    """Call arguments with private copies of the running statistics (each call updates its own)."""
    return dict(kw, **{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in extra.items()})


def _relative_error(got, want):
    if got is None:
        return None
    scale = max(float(np.abs(want).max()), 1.0)
    return float(np.abs(got.astype(np.float64) - want).max()) / scale


def run(seed: int = 0) -> list[dict]:
    """Forward (training and eval) and backward of every case; return the error rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for mode, shape, sizes, what in CASES + [_register_user_mode()]:
        m = nc.get_mode(mode)
        shapes = nc.param_shapes(m, shape, **sizes)
        for dtype in (np.float32, np.float64):
            x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            kw = dict(sizes)
            if m.params is not None:
                kw["weight"] = rng.standard_normal(shapes["weight"]).astype(dtype)
                kw["bias"] = rng.standard_normal(shapes["weight"]).astype(dtype)
            passes = [("train", {})]
            if m.running_stats is not None:
                stats = {"running_mean": rng.standard_normal(shapes["running_mean"]).astype(dtype),
                         "running_var": rng.uniform(0.5, 2.0, shapes["running_mean"]).astype(dtype)}
                passes = [("train", stats), ("eval", dict(stats, training=False))]
            for label, extra in passes:
                ref = reference_forward(x, mode, **_fresh(kw, extra))
                y, cache = nc.normalize(x, mode, **_fresh(kw, extra))
                dx, dw, db = nc.backward(dy, cache)
                rdx, rdw, rdb = reference_backward(dy, ref)
                rows.append({"mode": mode, "what": what, "dtype": np.dtype(dtype).name, "pass": label,
                             "layout": cache.plan.layout, "y": _relative_error(y, ref.y),
                             "dx": _relative_error(dx, rdx), "dweight": _relative_error(dw, rdw),
                             "dbias": _relative_error(db, rdb)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m normcore.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    args = parser.parse_args(argv)
    rows = run(args.seed)
    header = f"{'mode':28s} {'dtype':8s} {'pass':6s} {'layout (A, C, B)':18s} {'y':>9s} {'dx':>9s} {'dweight':>9s} {'dbias':>9s}"
    print("max |normcore - float64 reference| / max |reference|")
    print(header)
    print("-" * len(header))
    errors = ("y", "dx", "dweight", "dbias")
    for r in rows:
        cells = " ".join(f"{'-':>9s}" if r[k] is None else f"{r[k]:9.1e}" for k in errors)
        print(f"{r['mode']:28s} {r['dtype']:8s} {r['pass']:6s} {str(r['layout']):18s} {cells}")
    worst = {dt: max(r[k] for r in rows for k in errors if r["dtype"] == dt and r[k] is not None)
             for dt in ("float32", "float64")}
    print(f"\n{len(rows)} runs; worst relative error: float32 {worst['float32']:.1e}, float64 {worst['float64']:.1e}")


if __name__ == "__main__":
    main()
