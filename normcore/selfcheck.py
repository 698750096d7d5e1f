"""Run every normalization mode, and a user-registered one, through the compiled kernels.

``python -m normcore.selfcheck`` prints, for each mode, dtype and kind of statistics
(batch or running), the largest error of the forward output and of the gradients against
the float64 reference beside the tolerance the test suite holds them to
(:data:`normcore.testing.TOLERANCE`), and a final PASS or FAIL line; it exits with status 1
when any error is beyond its tolerance.
"""
from __future__ import annotations

import argparse

import numpy as np

import normcore as nc
from normcore.reference import reference_backward, reference_forward, term_scales
from normcore.testing import TOLERANCE

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


def _relative_error(got, want, scale=0.0):
    """max|got - want| / max(1, max|want|, scale): the measure of normcore.testing.assert_close."""
    if got is None:
        return None
    if want.size == 0:
        return 0.0
    scale = max(float(np.abs(want).max()), 1.0, scale)
    return float(np.abs(got.astype(np.float64) - want).max()) / scale


def run(seed: int = 0) -> list[dict]:
    """Forward (batch and running statistics) and backward of every case; return one row
    per case, dtype and statistics, with each error, the tolerance and ``ok``."""
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
            passes = [("batch", {})]
            if m.running_stats is not None:
                stats = {"running_mean": rng.standard_normal(shapes["running_mean"]).astype(dtype),
                         "running_var": rng.uniform(0.5, 2.0, shapes["running_mean"]).astype(dtype)}
                passes = [("batch", stats), ("running", dict(stats, training=False))]
            for label, extra in passes:
                ref = reference_forward(x, mode, **_fresh(kw, extra))
                y, cache = nc.normalize(x, mode, **_fresh(kw, extra))
                dx, dw, db = nc.backward(dy, cache)
                rdx, rdw, rdb = reference_backward(dy, ref)
                terms = term_scales(dy, ref)
                errors = {"y": _relative_error(y, ref.y), "dx": _relative_error(dx, rdx, terms["dx"]),
                          "dweight": _relative_error(dw, rdw, terms["dweight"]),
                          "dbias": _relative_error(db, rdb)}
                tolerance = TOLERANCE[np.dtype(dtype)]
                rows.append({"mode": mode, "what": what, "dtype": np.dtype(dtype).name, "statistics": label,
                             "layout": cache.plan.layout, **errors, "tolerance": tolerance,
                             "ok": all(e is None or e <= tolerance for e in errors.values())})
    return rows


ERRORS = ("y", "dx", "dweight", "dbias")


def report(rows) -> str:
    """The table :func:`main` prints, ending in a PASS or FAIL line."""
    header = (f"{'mode':26s} {'dtype':7s} {'statistics':10s} {'layout (A, C, B)':18s} "
              + " ".join(f"{k + ' error':>13s}" for k in ERRORS) + f" {'tolerance':>9s}  result")
    lines = ["error: max|normcore - float64 reference| / max(1, max|reference|, the magnitude of the",
             "terms that cancel in it), as normcore.testing.assert_close measures it; '-': no such",
             "gradient (the mode has no parameters). statistics: batch (training) or running (eval).",
             "", header, "-" * len(header)]
    for r in rows:
        cells = " ".join(f"{'-':>13s}" if r[k] is None else f"{r[k]:13.1e}" for k in ERRORS)
        lines.append(f"{r['mode']:26s} {r['dtype']:7s} {r['statistics']:10s} {str(r['layout']):18s} {cells} "
                     f"{r['tolerance']:9.0e}  {'ok' if r['ok'] else 'FAIL'}")
    failed = [r for r in rows if not r["ok"]]
    worst = {dt: max(r[k] / r["tolerance"] for r in rows for k in ERRORS if r["dtype"] == dt and r[k] is not None)
             for dt in ("float32", "float64")}
    lines.append("")
    lines.append(f"largest error / tolerance: float32 {worst['float32']:.2f}, float64 {worst['float64']:.2f}")
    lines.append(f"PASS: all {len(rows)} runs within tolerance" if not failed
                 else f"FAIL: {len(failed)} of {len(rows)} runs beyond tolerance")
    return "\n".join(lines)


def main(argv=None):
    """Print the table; return 0 when every run is within tolerance, else 1."""
    parser = argparse.ArgumentParser(prog="python -m normcore.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    args = parser.parse_args(argv)
    rows = run(args.seed)
    print(report(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
