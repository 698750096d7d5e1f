"""Fused residual add + normalize: normcore.add_normalize + backward(dh=) against the same
work unfused (NumPy's h = x + r, normcore's normalize and backward, NumPy's dx + dh), and
against PyTorch CPU (h = x + r, F.layer_norm / F.rms_norm, autograd for both inputs),
interleaved in one process.

    pip install -e ".[bench]" && pip install torch==2.13.0
    python bench/bench_add.py --threads 2 [--repeats 15] [--json out.json]

One step is the forward and the backward of a pre-norm transformer block's residual
junction: y, h from (x, r); then the gradient of h from dy (through the norm) and dh (the
residual stream's), which is also the gradient of x and of r. float32, weight (and bias
for layer norm) of ones and zeros; every call allocates its outputs. Reported: median ms
of each and the ratios unfused / fused (target >= 1.3) and torch / fused; and the same
two steps writing into buffers kept between calls (y, h and dx through out= and h_out=;
the unfused h and dx + dh through NumPy's out=), which takes the operating system's page
faults on fresh outputs out of the comparison.
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

import normcore as nc

from bench_cpu import interleaved_medians, table_main, torch  # torch: None when absent

CASES = [("LayerNorm", (8192, 768), "layer_norm"), ("RMSNorm", (8192, 4096), "rms_norm")]


def _steps(shape, mode):
    rng = np.random.default_rng(0)
    x, r, dy, dh = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    D = shape[-1]
    kw = {"weight": np.ones(D, np.float32)}
    if mode == "layer_norm":
        kw["bias"] = np.zeros(D, np.float32)
    else:
        kw["eps"] = float(np.finfo(np.float32).eps)

    def fused():
        y, h, cache = nc.add_normalize(x, r, mode, **kw)
        return nc.backward(dy, cache, dh=dh)

    def unfused():
        h = x + r
        y, cache = nc.normalize(h, mode, **kw)
        dx, dw, db = nc.backward(dy, cache)
        return dx + dh, dw, db

    # the same with out= buffers kept between calls (as layers with reuse_buffers do): no
    # page faults of fresh outputs
    o_h, o_y, o_dx, o_sum = (np.zeros_like(x) for _ in range(4))

    def fused_buffers():
        y, h, cache = nc.add_normalize(x, r, mode, out=o_y, h_out=o_h, **kw)
        return nc.backward(dy, cache, dh=dh, out=o_dx)

    def unfused_buffers():
        np.add(x, r, out=o_h)
        y, cache = nc.normalize(o_h, mode, out=o_y, **kw)
        dx, dw, db = nc.backward(dy, cache, out=o_dx)
        return np.add(dx, dh, out=o_sum), dw, db

    fns = {"fused": fused, "unfused": unfused, "fused buffers": fused_buffers, "unfused buffers": unfused_buffers}
    if torch is not None:
        tx, tr = (torch.from_numpy(a).requires_grad_() for a in (x, r))
        tw = torch.ones(D, requires_grad=True)
        tb = torch.zeros(D, requires_grad=True)
        tdy, tdh = torch.from_numpy(dy), torch.from_numpy(dh)

        def torch_step():
            h = tx + tr
            if mode == "layer_norm":
                y = torch.nn.functional.layer_norm(h, (D,), tw, tb)
            else:
                y = torch.nn.functional.rms_norm(h, (D,), tw, kw["eps"])
            torch.autograd.backward([y, h], [tdy, tdh])
            tx.grad = tr.grad = tw.grad = tb.grad = None

        fns["torch"] = torch_step
    return fns


def measure(label, shape, mode, threads, repeats):
    with threadpool_limits(threads):
        if torch is not None:
            torch.set_num_threads(threads)
        t = interleaved_medians(_steps(shape, mode), repeats)
    row = {"case": label, "shape": list(shape), "threads": threads, "dtype": "float32",
           "fused ms": t["fused"], "unfused ms": t["unfused"], "unfused / fused": t["unfused"] / t["fused"],
           "fused buffers ms": t["fused buffers"], "unfused buffers ms": t["unfused buffers"],
           "buffers: unfused / fused": t["unfused buffers"] / t["fused buffers"]}
    if "torch" in t:
        row["torch ms"] = t["torch"]
        row["torch / fused"] = t["torch"] / t["fused"]
    return row


def markdown(rows):
    out = ["| case | shape | threads | fused ms | unfused ms | unfused / fused | with out= buffers: fused ms | "
           "unfused ms | unfused / fused | torch ms | torch / fused |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {tuple(r['shape'])} | {r['threads']} | {r['fused ms']:.2f} | "
                   f"{r['unfused ms']:.2f} | {r['unfused / fused']:.2f} | {r['fused buffers ms']:.2f} | "
                   f"{r['unfused buffers ms']:.2f} | {r['buffers: unfused / fused']:.2f} | "
                   f"{r.get('torch ms', float('nan')):.2f} | {r.get('torch / fused', float('nan')):.2f} |")
    return "\n".join(out)


def main():
    table_main(__doc__, lambda threads, repeats: [measure(*case, threads, repeats) for case in CASES], markdown)


if __name__ == "__main__":
    main()
