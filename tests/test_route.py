"""The route of a call signature (normcore.route): what it lists is what runs, and the list
for every built-in mode is kept in tests/route_snapshot.txt, so a route change is a diff.

Regenerate the snapshot after an intended change with
``NORMCORE_WRITE_ROUTES=1 pytest tests/test_route.py`` and review the diff.
"""
import os
from pathlib import Path

import numpy as np
import pytest

import normcore
from normcore import backend, gpu
from normcore.route import Capabilities
from layer_cases import _OneRank

SNAPSHOT = Path(__file__).parent / "route_snapshot.txt"

# (mode, shape, sizes): every built-in mode, and batch norm in each of its plan strategies
CASES = [
    ("batch_norm", (8, 6), {}),                       # columns
    ("batch_norm", (4, 3, 5, 6), {}),                 # rows
    ("batch_norm_channels_last", (4, 5, 3), {}),
    ("batch_norm_per_activation", (8, 6), {}),
    ("layer_norm", (4, 5, 6), {}),
    ("rms_norm", (4, 6), {}),
    ("instance_norm", (4, 3, 5, 6), {}),
    ("group_norm", (4, 6, 5), {"g": 3}),
    ("channel_norm", (4, 6, 5), {"g": 3}),
    ("weight_standardize", (6, 3, 2, 2), {}),
]

VARIANTS = ["train", "train, no parameters", "eval", "estimate", "mask", "eval, mask", "residual", "residual, mask",
            "dh", "dh, mask", "comm", "comm, mask"]


class _Recorder:
    """A kernel contract that records the entries called on it, in order."""

    def __init__(self, K):
        self._K, self.calls = K, []

    def __getattr__(self, name):
        f = getattr(self._K, name)
        if not callable(f):
            return f

        def call(*args, **kwargs):
            self.calls.append(name + (" (mask)" if kwargs.get("mask") is not None else ""))
            return f(*args, **kwargs)
        return call


def _applies(mode, variant):
    m = normcore.get_mode(mode)
    if variant in ("eval", "estimate", "eval, mask") and m.running_stats is None:
        return False
    if variant == "train, no parameters" and m.params is None:
        return False
    if variant.startswith("comm"):
        first = m.parsed.lhs[0]
        return not any(a in m.parsed.kept for a in first)
    return True


def _run(mode, shape, sizes, variant):
    """(route, kernel calls of forward + backward) of one variant on the current backend."""
    m = normcore.get_mode(mode)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kw = dict(sizes)
    pshape = normcore.param_shapes(mode, shape, **sizes)
    if m.params is not None and variant != "train, no parameters":
        kw["weight"] = np.ones(pshape["weight"], np.float32)
        kw["bias"] = np.zeros(pshape["weight"], np.float32)
    if m.running_stats is not None:
        kw["running_mean"] = np.zeros(pshape["running_mean"], np.float32)
        kw["running_var"] = np.ones(pshape["running_mean"], np.float32)
    kw["training"] = not variant.startswith("eval")
    kw["estimate"] = variant == "estimate"
    if "mask" in variant:
        mask = np.ones(shape, bool)
        mask.flat[::7] = False
        kw["mask"] = mask
    if variant.startswith("comm"):
        kw["comm"] = _OneRank()
    be = normcore.checks.backend_of(x)
    rec = be.K = _Recorder(be.K)
    try:
        if variant.startswith("residual"):
            y, _, cache = normcore.add_normalize(x, x.copy(), mode, **kw)
        else:
            y, cache = normcore.normalize(x, mode, **kw)
        forward = list(rec.calls)
        rec.calls.clear()
        normcore.backward(np.ones_like(y), cache, dh=np.ones_like(y) if variant.startswith("dh") else None)
        backward = list(rec.calls)
    finally:
        be.K = rec._K
    return cache, {"forward": forward, "backward": backward}


def _lines(backend_name):
    lines = []
    for mode, shape, sizes in CASES:
        for variant in VARIANTS:
            if not _applies(mode, variant):
                continue
            cache, called = _run(mode, shape, sizes, variant)
            listed = cache.route.kernels(cache.plan, dh=variant.startswith("dh"))
            # what the route lists is what ran (the exchanges are not kernels)
            for phase in ("forward", "backward"):
                assert [k for k in listed[phase] if not k.startswith("(")] == called[phase], \
                    (mode, shape, variant, phase)
            # (program: the call ran as the signature's programs, normcore.program)
            lines.append(f"{backend_name:4} {mode} {shape} [{variant}]: forward {' '.join(listed['forward'])}"
                         f" | backward {' '.join(listed['backward'])}"
                         + (" | program" if cache.programs is not None else ""))
    return lines


def _check_snapshot(lines, backend_name):
    kept = SNAPSHOT.read_text().splitlines() if SNAPSHOT.exists() else []
    others = [ln for ln in kept if not ln.startswith(f"{backend_name:4} ")]
    if os.environ.get("NORMCORE_WRITE_ROUTES"):
        SNAPSHOT.write_text("\n".join(sorted(others + lines, key=lambda ln: ln.split(" ", 1)[0])) + "\n")
        return
    mine = [ln for ln in kept if ln.startswith(f"{backend_name:4} ")]
    assert lines == mine, "the routes changed: review, then regenerate (see this module's docstring)"


def test_the_cpu_routes_run_what_they_list_and_match_the_snapshot():
    _check_snapshot(_lines("cpu"), "cpu")


def test_the_cuda_routes_run_what_they_list_and_match_the_snapshot(emulated_gpu):
    _check_snapshot(_lines("cuda"), "cuda")


def test_capabilities_are_read_from_the_backend():
    assert Capabilities.of(backend.CPU) == Capabilities()
    cuda = Capabilities.of(gpu.CudaBackend)
    assert not cuda.masked_sums and not cuda.fused_backward


def test_one_signature_resolves_its_route_once(monkeypatch):
    from normcore import signature
    calls = []
    real = signature.resolve
    monkeypatch.setattr(signature, "resolve", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = np.random.default_rng(1).standard_normal((5, 7, 3)).astype(np.float32)  # a new signature
    for _ in range(3):
        normcore.normalize(x, "layer_norm")
    assert len(calls) == 1
    normcore.add_normalize(x, x, "layer_norm")  # a residual is another signature
    assert len(calls) == 2


@pytest.mark.slow  # a fresh interpreter
def test_the_spec_registry_planner_and_router_import_without_the_compiled_kernels():
    import subprocess
    import sys
    code = ("import sys, types; pkg = types.ModuleType('normcore'); "
            f"pkg.__path__ = [{str(Path(normcore.__file__).parent)!r}]; sys.modules['normcore'] = pkg; "
            "import normcore.spec, normcore.modes, normcore.plan, normcore.route; "
            "from normcore.plan import make_plan; make_plan(normcore.modes.get_mode('group_norm'), (2, 8, 3), {'g': 4}); "
            "print(sorted(m for m in sys.modules if m.startswith('normcore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernels" not in out.stdout and "backend" not in out.stdout, out.stdout
