"""Masked statistics: normcore's forward + backward with mask= against the same call
without a mask (target: masked <= 1.3x unmasked), and against PyTorch CPU (no masked
normalization there: the masked statistics written with tensor operations under autograd,
and F.batch_norm / F.group_norm unmasked), in one process: masked and unmasked normcore
interleaved with each other, then PyTorch's steps interleaved with normcore's masked one.

    pip install -e ".[bench]" && pip install torch==2.13.0
    python bench/bench_mask.py --threads 2 [--repeats 15] [--json out.json]

Cases (float32, weight and bias, training, batch statistics; every call allocates its
outputs): batch norm over (B, T, C) = (64, 512, 256) sequences, channels last, with a
(B, T, 1) mask of random lengths in [T/4, T]; group norm (32 groups) over (32, 256, 28, 28)
with a (N, 1, H, W) mask of a random crop per image; and both with a random mask of x's
own shape of the same density (a byte per element, the costliest layout). One step is the forward and the
backward (dx, dweight, dbias) from a fixed dy; reported with fresh outputs (every call
allocates y and dx) and with y and dx written into kept buffers (out=), which takes the
operating system's page faults on fresh outputs out of the comparison.
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

import normcore as nc

from bench_cpu import interleaved_medians, table_main, torch  # torch: None when absent


def _bn_case():
    rng = np.random.default_rng(0)
    B, T, C = 64, 512, 256
    lengths = rng.integers(T // 4, T + 1, B)
    mask = (np.arange(T)[None, :] < lengths[:, None])[:, :, None]
    return (B, T, C), "batch_norm_channels_last", {}, mask, (0, 1)


def _gn_case():
    rng = np.random.default_rng(1)
    N, C, H, W = 32, 256, 28, 28
    h, w = rng.integers(H // 2, H + 1, N), rng.integers(W // 2, W + 1, N)
    rows, cols = np.arange(H)[None, :, None] < h[:, None, None], np.arange(W)[None, None, :] < w[:, None, None]
    mask = (rows & cols)[:, None]
    return (N, C, H, W), "group_norm", {"g": 32}, mask, None


def _full(make):
    """The same case with a mask of x's shape (a byte per element, random)."""
    def case():
        shape, mode, sizes, mask, axes = make()
        full = np.random.default_rng(3).random(shape) < float(np.broadcast_to(mask, shape).mean())
        return shape, mode, sizes, full, axes
    return case


CASES = [("BatchNorm (B, T, C)", _bn_case), ("GroupNorm g=32", _gn_case),
         ("BatchNorm (B, T, C), mask of x's shape", _full(_bn_case)),
         ("GroupNorm g=32, mask of x's shape", _full(_gn_case))]


def _steps(shape, mode, sizes, mask):
    rng = np.random.default_rng(2)
    x, dy = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
    C = shape[-1] if mode == "batch_norm_channels_last" else shape[1]
    kw = {"weight": np.ones(C, np.float32), "bias": np.zeros(C, np.float32), **sizes}

    def masked():
        y, cache = nc.normalize(x, mode, mask=mask, **kw)
        return nc.backward(dy, cache)

    def unmasked():
        y, cache = nc.normalize(x, mode, **kw)
        return nc.backward(dy, cache)

    # the same with y and dx written into buffers kept between calls (out=, as layers with
    # reuse_buffers do): no page faults of fresh outputs in either
    o_y, o_dx = np.zeros_like(x), np.zeros_like(x)

    def masked_buffers():
        y, cache = nc.normalize(x, mode, mask=mask, out=o_y, **kw)
        return nc.backward(dy, cache, out=o_dx)

    def unmasked_buffers():
        y, cache = nc.normalize(x, mode, out=o_y, **kw)
        return nc.backward(dy, cache, out=o_dx)

    fns = {"masked": masked, "unmasked": unmasked, "masked buffers": masked_buffers,
           "unmasked buffers": unmasked_buffers}
    if torch is not None:
        tx = torch.from_numpy(x).requires_grad_()
        tw, tb = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        tdy, tm = torch.from_numpy(dy), torch.from_numpy(mask.astype(np.float32))

        if mode == "batch_norm_channels_last":
            def torch_masked():
                n = tm.sum((0, 1))
                mean = (tx * tm).sum((0, 1)) / n
                var = (((tx - mean) * tm) ** 2).sum((0, 1)) / n
                y = (tx - mean) * torch.rsqrt(var + 1e-5) * tw + tb
                y.backward(tdy)
                tx.grad = tw.grad = tb.grad = None

            def torch_plain():
                y = torch.nn.functional.batch_norm(tx.reshape(-1, C), None, None, tw, tb, training=True)
                y.backward(tdy.reshape(-1, C))
                tx.grad = tw.grad = tb.grad = None
        else:
            G = sizes["g"]
            N = shape[0]

            def torch_masked():
                xg = tx.reshape(N, G, -1)
                mg = tm.expand(shape).reshape(N, G, -1)
                n = mg.sum(2, keepdim=True)
                mean = (xg * mg).sum(2, keepdim=True) / n
                var = (((xg - mean) * mg) ** 2).sum(2, keepdim=True) / n
                y = ((xg - mean) * torch.rsqrt(var + 1e-5)).reshape(shape) * tw[:, None, None] + tb[:, None, None]
                y.backward(tdy)
                tx.grad = tw.grad = tb.grad = None

            def torch_plain():
                y = torch.nn.functional.group_norm(tx, G, tw, tb)
                y.backward(tdy)
                tx.grad = tw.grad = tb.grad = None

        fns["torch masked"] = torch_masked
        fns["torch unmasked"] = torch_plain
    return fns


def measure(label, make, threads, repeats):
    shape, mode, sizes, mask, _ = make()
    fns = _steps(shape, mode, sizes, mask)
    with threadpool_limits(threads):
        if torch is not None:
            torch.set_num_threads(threads)
        # the target pair interleaved on its own (PyTorch's steps allocate hundreds of MB
        # each, which changes what the next call finds in the allocator), then PyTorch's
        # two beside normcore's masked step
        t = interleaved_medians({k: fns[k] for k in ("masked", "unmasked", "masked buffers", "unmasked buffers")},
                                repeats)
        if torch is not None:
            t2 = interleaved_medians({k: fns[k] for k in ("masked", "torch masked", "torch unmasked")}, repeats)
            t.update({k: t2[k] for k in ("torch masked", "torch unmasked")})
            t["masked (beside torch)"] = t2["masked"]
    row = {"case": label, "shape": list(shape), "mask shape": list(mask.shape),
           "counted": float(np.broadcast_to(mask, shape).mean()), "threads": threads, "dtype": "float32",
           "masked ms": t["masked"], "unmasked ms": t["unmasked"], "masked / unmasked": t["masked"] / t["unmasked"],
           "masked buffers ms": t["masked buffers"], "unmasked buffers ms": t["unmasked buffers"],
           "buffers: masked / unmasked": t["masked buffers"] / t["unmasked buffers"]}
    for k in ("torch masked", "torch unmasked"):
        if k in t:
            row[f"{k} ms"] = t[k]
    if "torch masked" in t:
        row["torch masked / masked"] = t["torch masked"] / t["masked (beside torch)"]
    return row


def markdown(rows):
    out = ["| case | shape | mask | counted | threads | masked ms | unmasked ms | masked / unmasked | "
           "with out= buffers: masked ms | unmasked ms | masked / unmasked | "
           "torch masked ms | torch unmasked ms | torch masked / masked |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {tuple(r['shape'])} | {tuple(r['mask shape'])} | {r['counted']:.2f} | "
                   f"{r['threads']} | {r['masked ms']:.2f} | {r['unmasked ms']:.2f} | "
                   f"{r['masked / unmasked']:.2f} | {r['masked buffers ms']:.2f} | {r['unmasked buffers ms']:.2f} | "
                   f"{r['buffers: masked / unmasked']:.2f} | {r.get('torch masked ms', float('nan')):.2f} | "
                   f"{r.get('torch unmasked ms', float('nan')):.2f} | "
                   f"{r.get('torch masked / masked', float('nan')):.2f} |")
    return "\n".join(out)


def main():
    table_main(__doc__, lambda threads, repeats: [measure(label, make, threads, repeats) for label, make in CASES],
               markdown)


if __name__ == "__main__":
    main()
