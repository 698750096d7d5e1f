"""The GPU path. Three kinds of test:

* always: the CUDA sources are shipped and name every kernel the Python side launches;
  importing normcore never imports CuPy; without CuPy the failure is a clear error;
* where ``nvcc`` exists: every kernel template compiles for every storage dtype
  (``nvcc -c``), and where libnvrtc exists (the test extra installs it) the sources
  compile through NVRTC with CuPy's name expressions, so source errors surface without a
  GPU;
* where CuPy sees a GPU: the CPU property suite on CuPy arrays for every mode and a
  user-registered one, GPU against CPU results, device placement and mixing errors,
  half precision, and SyncBatchNorm on CuPy arrays. Skipped elsewhere, with the reason.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normcore as nc
from normcore import gpu
from normcore.reference import reference_backward, reference_forward
from normcore.testing import check_mode, run_ranks

GPU_REASON = gpu.unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"GPU path not testable here: {GPU_REASON}")


# -- everywhere ---------------------------------------------------------------------

def test_cuda_source_defines_every_launched_kernel():
    src = gpu.kernel_source().read_text()
    for family, names in gpu._FAMILIES.items():
        for name in names:
            assert re.search(rf"__global__ void {name}\(", src), f"{family}: {name} missing"
    assert "__global__ void nc_combine_moments(" in src
    assert "#include" not in src  # NVRTC compiles it with no include path


@pytest.mark.slow  # a fresh interpreter or compiler
def test_importing_normcore_does_not_import_cupy():
    code = "import sys, normcore; normcore.BatchNorm2d(3); assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is available here")
def test_without_a_gpu_the_gpu_path_says_why():
    assert not gpu.available()
    with pytest.raises(RuntimeError, match="GPU path cannot run: "):
        gpu.cuda_backend()
    with pytest.raises(RuntimeError, match="GPU path cannot run: "):
        nc.BatchNorm2d(3).to("cuda")
    assert nc.BatchNorm2d(3).device == "cpu"
    with pytest.raises(ValueError, match="^device"):
        nc.BatchNorm2d(3).to("gpu")


def test_cpu_inputs_reject_other_array_types():
    with pytest.raises(TypeError, match=r"^x: expected a numpy.ndarray \(or a cupy.ndarray for the GPU\)"):
        nc.normalize([[1.0, 2.0]], "layer_norm")


@pytest.mark.slow  # a fresh interpreter or compiler
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile_with_nvcc(tmp_path, arch):
    out = subprocess.run(["nvcc", "-c", "-std=c++17", f"-arch={arch}", "-DNORMCORE_INSTANTIATE", *gpu.compile_options(),
                          "-Werror", "all-warnings", "-o", str(tmp_path / "k.o"), str(gpu.kernel_source())],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def _find_nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (test extra) or the system, else None."""
    import ctypes.util
    import glob
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(p for p in glob.glob(os.path.join(root, "**", "libnvrtc.so*"), recursive=True)
                       if "builtins" not in p)
        if found:
            return found[0]
    return ctypes.util.find_library("nvrtc")


def test_cuda_sources_compile_with_nvrtc_as_cupy_does():
    # CuPy compiles kernels.cu at run time with NVRTC (no host headers, templates picked
    # by name expressions): do exactly that, without a GPU.
    import ctypes
    path = _find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(rc, what):
        assert rc == 0, f"{what}: {lib.nvrtcGetErrorString(rc).decode()}"

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), gpu.kernel_source().read_bytes(), b"kernels.cu",
                                 0, None, None), "nvrtcCreateProgram")
    names = gpu.kernel_names()
    for n in names:
        check(lib.nvrtcAddNameExpression(prog, n.encode()), n)
    flags = [b"--std=c++17", b"-arch=compute_90"] + [o.encode() for o in gpu.compile_options()]
    opts = (ctypes.c_char_p * len(flags))(*flags)
    rc = lib.nvrtcCompileProgram(prog, len(flags), opts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lowered = ctypes.c_char_p()
    for n in names:
        check(lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(lowered)), n)
        assert lowered.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


# -- on a GPU -----------------------------------------------------------------------

MODES = [("batch_norm", {}), ("batch_norm_channels_last", {}), ("batch_norm_per_activation", {}),
         ("layer_norm", {}), ("rms_norm", {}), ("instance_norm", {}), ("group_norm", {"g": 2}),
         ("channel_norm", {"g": 2}), ("weight_standardize", {})]


@needs_gpu
@pytest.mark.parametrize("name, sizes", MODES, ids=[m for m, _ in MODES])
def test_gpu_properties(name, sizes):
    check_mode(name, max_examples=15, backend="cuda", **sizes)


@needs_gpu
def test_gpu_user_registered_mode():
    if "gpu_head_norm" not in nc.modes():
        nc.register_mode("gpu_head_norm", "b t (h d) -> b h", params="(h d)", h=2)
    check_mode("gpu_head_norm", max_examples=15, backend="cuda")


@needs_gpu
@pytest.mark.parametrize("mode, shape, sizes", [
    ("batch_norm", (8, 16, 33, 17), {}), ("batch_norm_channels_last", (600, 70), {}),
    ("layer_norm", (37, 1000), {}), ("group_norm", (4, 32, 9, 9), {"g": 8}), ("instance_norm", (3, 5, 300), {}),
])
def test_gpu_matches_cpu(mode, shape, sizes):
    import cupy
    rng = np.random.default_rng(3)
    x = 5 + rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    p = nc.param_shapes(mode, shape, **sizes)["weight"]
    w, b = rng.standard_normal(p).astype(np.float32), rng.standard_normal(p).astype(np.float32)
    y, cache = nc.normalize(x, mode, weight=w, bias=b, **sizes)
    grads = nc.backward(dy, cache)
    gy, gcache = nc.normalize(cupy.asarray(x), mode, weight=cupy.asarray(w), bias=cupy.asarray(b), **sizes)
    assert isinstance(gy, cupy.ndarray)
    ggrads = nc.backward(cupy.asarray(dy), gcache)
    np.testing.assert_allclose(cupy.asnumpy(gy), y, rtol=0, atol=2e-6 * max(1, np.abs(y).max()))
    for g, c in zip(ggrads, grads, strict=True):
        assert isinstance(g, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=0, atol=2e-5 * max(1, np.abs(c).max()))


@needs_gpu
def test_gpu_float32_at_offset_1e4():
    import cupy
    rng = np.random.default_rng(4)
    x = (1e4 + rng.standard_normal((16, 8, 64))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    y, cache = nc.normalize(cupy.asarray(x), "batch_norm", weight=cupy.asarray(w), bias=cupy.asarray(w))
    dx, dw, db = nc.backward(cupy.asarray(dy), cache)
    ref = reference_forward(x, "batch_norm", weight=w, bias=w)
    for got, want in zip((y, dx, dw, db), (ref.y, *reference_backward(dy, ref)), strict=True):
        got = cupy.asnumpy(got).astype(np.float64)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


@needs_gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_gpu_half_precision_accumulates_in_float32(dtype_name):
    import cupy
    if dtype_name == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(np.float16)
    rng = np.random.default_rng(5)
    x = (3 + rng.standard_normal((64, 512))).astype(dtype)
    y, cache = nc.normalize(cupy.asarray(x), "layer_norm")
    ref = reference_forward(x.astype(np.float64), "layer_norm")
    unit = 2.0 ** -(8 if dtype_name == "bfloat16" else 11)  # one rounding of y
    assert np.abs(cupy.asnumpy(y).astype(np.float64) - ref.y).max() <= 4 * unit * np.abs(ref.y).max()


@needs_gpu
def test_gpu_mixing_host_and_device_arrays_raises():
    import cupy
    x = cupy.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match=r"^weight: expected a cupy.ndarray like x"):
        nc.normalize(x, "batch_norm", weight=np.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"^weight: expected a numpy.ndarray like x"):
        nc.normalize(np.ones((4, 3), np.float32), "batch_norm", weight=cupy.ones(3, np.float32))
    with pytest.raises(TypeError, match=r"^weight: expected a cupy.ndarray like x"):
        nc.BatchNorm1d(3)(x)  # the layer's parameters are still on the host
    _, cache = nc.normalize(x, "batch_norm")
    with pytest.raises(TypeError, match=r"^dy: expected a cupy.ndarray like x"):
        nc.backward(np.ones((4, 3), np.float32), cache)


@needs_gpu
def test_gpu_layers_train_on_the_device_and_save_to_the_host(tmp_path):
    import cupy
    x = np.random.default_rng(6).standard_normal((8, 3, 5, 5)).astype(np.float32)
    cpu_bn, gpu_bn = nc.BatchNorm2d(3), nc.BatchNorm2d(3).cuda()
    assert gpu_bn.device == "cuda" and isinstance(gpu_bn.running_mean, cupy.ndarray)
    gpu_bn.reuse_buffers = True
    for _ in range(2):
        y, gy = cpu_bn(x), gpu_bn(cupy.asarray(x))
        cpu_bn.backward(np.ones_like(y))
        gpu_bn.backward(cupy.ones_like(gy))
    np.testing.assert_allclose(cupy.asnumpy(gpu_bn.running_var), cpu_bn.running_var, rtol=1e-6)
    np.testing.assert_allclose(cupy.asnumpy(gpu_bn.grad_weight), cpu_bn.grad_weight, rtol=1e-5, atol=1e-5)
    gpu_bn.save(tmp_path / "bn.npz")
    back = nc.BatchNorm2d(3).load(tmp_path / "bn.npz")
    np.testing.assert_array_equal(back.running_mean, cupy.asnumpy(gpu_bn.running_mean))
    assert gpu_bn.cpu().device == "cpu"


@needs_gpu
def test_gpu_sync_batch_norm_stages_statistics_through_the_host():
    import cupy
    x = np.random.default_rng(7).standard_normal((7, 4, 6)).astype(np.float32)

    def rank(comm):
        bn = nc.SyncBatchNorm(4, comm=comm).cuda()
        part = x[:3] if comm.Get_rank() == 0 else x[3:]
        return cupy.asnumpy(bn(cupy.asarray(part)))

    out = run_ranks(2, rank)
    for r in out:
        if isinstance(r, Exception):
            raise r
    np.testing.assert_allclose(np.concatenate(out), nc.BatchNorm1d(4)(x), atol=2e-6)


@needs_gpu
def test_gpu_results_are_reproducible():
    import cupy
    x = cupy.asarray(np.random.default_rng(8).standard_normal((64, 32, 40)).astype(np.float32))
    a, _ = nc.normalize(x, "batch_norm")
    b, _ = nc.normalize(x, "batch_norm")
    assert bool((a == b).all())


@pytest.mark.skipif(os.environ.get("NORMCORE_REQUIRE_GPU") != "1", reason="set NORMCORE_REQUIRE_GPU=1 on GPU machines")
def test_gpu_is_required_here():
    assert GPU_REASON is None, GPU_REASON


def _fake_cupy_array():
    """An object that looks like a cupy.ndarray to normcore's dispatch (type name and
    module), for checking the host-side errors without CuPy."""
    cls = type("ndarray", (), {"__module__": "cupy._core.core", "dtype": np.dtype(np.float32),
                               "shape": (3,), "ndim": 1})
    return cls()


def test_a_device_array_beside_host_arrays_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^weight: expected a numpy.ndarray like x \(x is on the CPU\), "
                                        r"got cupy.ndarray; move it with cupy.asnumpy"):
        nc.normalize(np.ones((4, 3), np.float32), "batch_norm", weight=_fake_cupy_array())


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is available here")
def test_a_device_input_without_a_gpu_says_why():
    with pytest.raises(RuntimeError, match="GPU path cannot run: "):
        nc.normalize(_fake_cupy_array(), "batch_norm")


def _cuda_text(name):
    return (gpu.kernel_source().parent / name).read_text() if name != "launch.cpp" else \
        (Path(__file__).parent / "cuda_emu" / "launch.cpp").read_text()


def test_kernel_name_lists_agree():
    # The kernels are named in four places: the __global__ definitions and the nvcc
    # instantiation list in kernels.cu, normcore.gpu's families, and the emulator's launch
    # table. A kernel added to one and not the others fails here, not on a GPU.
    src = _cuda_text("kernels.cu")
    defined = set(re.findall(r"__global__ void (nc_\w+)\(", src))
    instantiated = set(re.findall(r"template __global__ void (nc_\w+)<T>", src)) | {"nc_combine_moments"}
    families = {k for ks in gpu._FAMILIES.values() for k in ks} | {"nc_combine_moments"}
    emulated = set(re.findall(r"NC_ENTRY\((nc_\w+), T, tag\)", _cuda_text("launch.cpp"))) | \
        set(re.findall(r't\["(nc_\w+)"\]', _cuda_text("launch.cpp")))
    assert defined == instantiated == families == emulated, (defined, instantiated, families, emulated)


def test_cuda_backend_implements_the_kernel_contract():
    from normcore.backend import Kernels
    declared = {n for n in vars(Kernels) if not n.startswith("_")}
    assert declared <= {n for n in dir(nc.kernels.K) if not n.startswith("_")}
    optional = set() if gpu.CudaBackend.fused_backward else {"backward_groups"}
    assert declared - optional <= {n for n in dir(gpu.CudaKernels) if not n.startswith("_")}
    # a mask is an optional argument of the entries that read it, never an entry of its own
    for kernels in (Kernels, nc.kernels.K, gpu.CudaKernels):
        assert not [n for n in dir(kernels) if "masked" in n], kernels
    src = _cuda_text("kernels.cu")
    assert "#define NC_COL_TILE" not in src  # the tile constants come from gpu.compile_options()


def test_every_backend_takes_the_contract_entries_by_the_same_names():
    # keyword-only entries, the same names and defaults on the CPU kernels, the CUDA
    # backend and the shared composites: a swapped or misspelt argument is an error
    import inspect
    from normcore.backend import Kernels
    from normcore.composites import Composites

    def params(f, skip_self):
        ps = list(inspect.signature(f).parameters.values())[1 if skip_self else 0:]
        assert all(p.kind is p.KEYWORD_ONLY for p in ps), f
        return [(p.name, p.default) for p in ps]
    optional = set() if gpu.CudaBackend.fused_backward else {"backward_groups"}
    for name in (n for n in vars(Kernels) if not n.startswith("_")):
        want = params(getattr(Kernels, name), True)
        assert params(getattr(nc.kernels.K, name), False) == want, name
        if name not in optional:
            assert params(getattr(gpu.CudaKernels, name), True) == want, name
        if name in vars(Composites):
            assert params(getattr(Composites, name), True) == want, name
    assert {"normalize_cols", "normalize_running", "backward_cols"} <= set(vars(Composites))


# -- GPU launch geometry (no GPU needed) ------------------------------------------------------

RNG = np.random.default_rng(12)


def test_every_launch_stays_within_the_device_grid_limits():
    from normcore import gpu
    seen = []
    kernels = gpu.CudaKernels(lambda family, name, dtype: lambda grid, block, args: seen.append((name, grid, block)))
    S, R = 2 ** 25, 1  # a layer norm over 33.5M elements: ceil(S / 256) > 65535
    x = np.empty((1, R, S), np.float32)  # never touched: the launches only read shapes
    mean = np.empty(R)
    rp, w = np.zeros(R, np.intp), np.empty(S)
    kernels.sums_inner(dy=x, x=x, row_mean=mean, row_rstd=mean, rp=rp, weight=w, rows_per_block=1,
                       row_sums=np.empty((2, R)), part_grads=np.empty((2, 1, S)), threads=1)
    kernels.dx_inner(dy=x, x=x, row_mean=mean, row_rstd=mean, rp=rp, weight=w, group_means=np.empty((2, R)), dx=x,
                     threads=1)
    wide = np.empty((3, 2 ** 24), np.float32)
    p = np.empty((1, 2 ** 24))
    kernels.moments_cols(x=wide, rows_per_block=3, part_mean=p, part_m2=p, threads=1)
    kernels.sums_cols(dy=wide, x=wide, row_mean=np.empty(2 ** 24), rows_per_block=3, sum_dy=p, sum_dy_xc=p, threads=1)
    assert seen
    for name, grid, block in seen:
        grid = tuple(grid) + (1, 1)
        assert 1 <= grid[0] < 2 ** 31 and 1 <= grid[1] <= 65535, (name, grid)
        assert 1 <= np.prod(block) <= 1024, (name, block)


def test_capped_grids_still_cover_every_element(emulated_gpu, monkeypatch):
    # with the grid's y extent capped at 1, the kernels stride over what it leaves out
    from normcore import gpu
    monkeypatch.setattr(gpu, "_MAX_GRID_Y", 1)
    for mode, shape in (("layer_norm", (5, 700)), ("batch_norm_channels_last", (9, 300))):
        x = RNG.standard_normal(shape)
        w = RNG.standard_normal(shape[-1])
        y, cache = nc.normalize(x, mode, weight=w, bias=np.zeros_like(w))
        dy = RNG.standard_normal(shape)
        monkeypatch.setattr(gpu, "_MAX_GRID_Y", 65535)
        with monkeypatch.context() as m:
            m.setattr(normcore_checks(), "backend_of", lambda a: nc.backend.CPU)
            want_y, want_cache = nc.normalize(x, mode, weight=w, bias=np.zeros_like(w))
            want = nc.backward(dy, want_cache)
        monkeypatch.setattr(gpu, "_MAX_GRID_Y", 1)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
        for a, b in zip(nc.backward(dy, cache), want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def normcore_checks():
    from normcore import checks
    return checks
