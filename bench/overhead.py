"""The fixed cost of a warm layer call: its time with every kernel replaced by a no-op.

    python bench/overhead.py [--repeats 7] [--calls 3000]

For each small case of ``bench_cpu.py --small`` (float32, one thread) it times, interleaved
in one process, a BatchNorm layer's training forward, its backward and its eval forward,
first with the real kernels and then with ``CPU.K`` replaced by a contract whose entries
return at once: the second figure is what a call costs above its kernels' own time (the
checks, the route's steps, the allocations, the cache and the layer's state), the first
minus the second what the kernels take.
"""
from __future__ import annotations

import argparse
import inspect
import platform

import numpy as np

import normcore as nc
from normcore.backend import CPU, Kernels
from bench_cpu import SMALL_CASES, min_mean_us  # this script's folder is on sys.path


class _NoOps:
    """Every kernel entry of ``K`` as a function that does nothing (constants kept)."""

    def __init__(self, K):
        self._K = K

    def __getattr__(self, name):  # once per name: the entry is kept as an attribute
        value = getattr(self._K, name)
        if callable(value):
            value = _nothing(name)
        setattr(self, name, value)
        return value


def _nothing(name):
    """A no-op taking the entry's keyword arguments as declared (no dict built per call,
    as the compiled entries build none): what remains is the call itself."""
    params = inspect.signature(getattr(Kernels, name)).parameters
    spec = ", ".join(p.name if p.default is p.empty else f"{p.name}=None" for p in list(params.values())[1:])
    scope = {}
    exec(f"def noop(*, {spec}):\n    return None", scope)
    return scope["noop"]


def _fns(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    layer_type = nc.BatchNorm1d if len(shape) == 2 else nc.BatchNorm2d
    train, frozen = layer_type(shape[1]), layer_type(shape[1]).eval()
    dy = np.ones_like(x)
    train(x)
    train.backward(dy, retain_graph=True)  # a cache to run backward on, kept

    def forward():
        train(x)

    def backward():
        train.backward(dy, retain_graph=True)

    def evaluate():
        frozen(x)
    return {"train forward": forward, "backward": backward, "eval forward": evaluate}


def measure(repeats, calls):
    rows = []
    for shape in SMALL_CASES:
        fns = _fns(shape)
        real = min_mean_us(fns, repeats, calls)
        K = CPU.K
        CPU.K = _NoOps(K)
        try:  # the buffers hold whatever memory held: their casts may overflow, unread
            with np.errstate(all="ignore"):
                fixed = min_mean_us(fns, repeats, calls)
        finally:
            CPU.K = K
        rows += [{"shape": shape, "pass": p, "total_us": real[p], "fixed_us": fixed[p]} for p in fns]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=3000)
    args = p.parse_args()
    nc.set_num_threads(1)
    print(f"normcore {nc.__version__} ({nc.kernels.VARIANT} kernels), numpy {np.__version__}; "
          f"{platform.machine()}, float32, 1 thread, min over {args.repeats} repeats of the mean of "
          f"{args.calls} calls, µs per call")
    print("| shape | pass | total µs | fixed µs (kernels no-ops) | kernels µs |\n|---|---|---|---|---|")
    for r in measure(args.repeats, args.calls):
        print(f"| {tuple(r['shape'])} | {r['pass']} | {r['total_us']:.1f} | {r['fixed_us']:.1f} | "
              f"{r['total_us'] - r['fixed_us']:.1f} |")


if __name__ == "__main__":
    main()
