"""Shared fixtures: ``emulated_gpu`` runs the GPU path's CUDA kernels on the host; and
which tests are ``slow`` (``pytest -m "not slow"`` leaves them out): Hypothesis tests,
the emulator's, the MPI, demo, README and fresh-interpreter modules, and tests marked so
by hand (subprocesses, compilers, real signals).

kernels.cu is compiled with g++ against tests/cuda_emu/emu.h (each CUDA thread a
coroutine, real barriers and warp shuffles) and driven through the very same
``normcore.gpu.CudaKernels`` launch code and backend-generic orchestration, with NumPy
arrays standing in for CuPy ones. It checks the kernels' indexing, reductions and
partial-result contracts on machines without a GPU; it does not replace running on one
(memory model, NVRTC, CuPy itself).
"""
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normcore.checks
import normcore.layer_base
import normcore.norm_layer
from normcore import gpu
from normcore.backend import Backend

EMU = Path(__file__).parent / "cuda_emu"

# the test modules import their shared cases (layer_cases.py) from this folder
sys.path.insert(0, str(Path(__file__).parent))


class EmulatedCuda(Backend):
    name = "cuda"
    place = "GPU"
    fused_forward = gpu.CudaBackend.fused_forward
    fused_backward = gpu.CudaBackend.fused_backward
    masked_groups = gpu.CudaBackend.masked_groups
    masked_sums = gpu.CudaBackend.masked_sums

    def __init__(self, lib):
        super().__init__()
        self.K = gpu.CudaKernels(self._lookup)
        self._lib = lib
        self.launches = 0
        self.launched = set()  # kernel names
        self.dtypes = gpu.storage_dtypes()

    def threads_for(self, size):
        return 1

    def _lookup(self, family, name, dtype_name):
        full = name if family == "merge" else f"{name}<{gpu._CTYPES[dtype_name]}>"

        def launch(grid, block, args):
            words = []
            for a in args:
                if isinstance(a, np.ndarray):
                    # RawKernel passes bare pointers: the orchestration must hand over
                    # C-contiguous arrays of the kernel's types
                    assert a.flags.c_contiguous, f"{full}: non-contiguous argument"
                    assert a.dtype.itemsize in (2, 4, 8) or a.dtype == np.uint8, f"{full}: argument of dtype {a.dtype}"
                    words.append(a.ctypes.data)
                else:
                    assert isinstance(a, np.int64), f"{full}: scalar {a!r} is not an int64"
                    words.append(int(a))
            grid, block = tuple(grid) + (1,), tuple(block) + (1,)
            rc = self._lib.nc_emu_launch(full.encode(), grid[0], grid[1], block[0], block[1], len(words),
                                         (ctypes.c_uint64 * len(words))(*words))
            assert rc == 0, f"unknown kernel {full} or bad argument count"
            self.launches += 1
            self.launched.add(name)
        return launch


@pytest.fixture(scope="session")
def emulated_cuda_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: the host emulation of the CUDA kernels needs it")
    out = tmp_path_factory.mktemp("cuda_emu") / "libncemu.so"
    src_dir = Path(gpu.kernel_source()).parent
    subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{EMU}", f"-I{src_dir}", *gpu.compile_options(),
                    str(EMU / "emu_main.cpp"), "-o", str(out)], check=True, timeout=300)
    lib = ctypes.CDLL(str(out))
    lib.nc_emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                                  ctypes.c_uint, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
    lib.nc_emu_launch.restype = ctypes.c_int
    return lib


@pytest.fixture
def emulated_gpu(emulated_cuda_lib, monkeypatch):
    """NumPy arrays computed by the CUDA kernels (host emulation); yields the backend."""
    be = EmulatedCuda(emulated_cuda_lib)
    pick = lambda a: be  # noqa: E731
    monkeypatch.setattr(normcore.checks, "backend_of", pick)
    monkeypatch.setattr(normcore.norm_layer, "backend_of", pick)
    monkeypatch.setattr(normcore.layer_base, "backend_of", pick)
    yield be


# whole modules of property runs, MPI launches, fresh interpreters and the demo
_SLOW_MODULES = {"test_properties.py", "test_gpu_emulated.py", "test_mpi.py", "test_demo.py", "test_readme.py",
                 "test_newcomer.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fn = getattr(item, "obj", None)
        if (item.path.name in _SLOW_MODULES or getattr(fn, "is_hypothesis_test", False)
                or {"emulated_gpu", "emulated_cuda_lib"} & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)
