"""Build the compiled kernels: Cython sources live in src/normcore, the package in normcore/.

OpenMP is used when the compiler accepts it; without it the kernels still compile and run
on one thread (the prange loops become plain loops).
"""
import glob
import os
import platform
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

# CUDA sources compiled at run time by CuPy (normcore.gpu): shipped inside the package.
CUDA_SOURCES = ["src/normcore/kernels.cu"]


def _openmp_flags(compiler):
    """Return (compile, link) flags for OpenMP if this compiler accepts them, else ([], [])."""
    if sys.platform == "win32":
        return ["/openmp"], []
    flags = ["-fopenmp"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, os.path.join(tmp, "omp"), extra_postargs=flags)
        except Exception:
            print("normcore: the compiler rejected -fopenmp; building single-threaded kernels")
            return [], []
    return flags, flags


def _accepts(compiler, flags):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("int main(void){return 0;}\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=flags)
        except Exception:
            return False
    return True


# The AVX2 and AVX-512 builds of the same kernels; normcore.kernels chooses the widest the
# CPU has at import. No implicit contraction into FMA: the kernels say where they fuse.
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]
# GCC keeps 256-bit vectors on AVX-512 targets unless told to prefer 512
AVX512_FLAGS = AVX2_FLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=512"]
VARIANT_FLAGS = {"_kernels": [], "_kernels_avx2": AVX2_FLAGS, "_kernels_avx512": AVX512_FLAGS}
# Compiled once, for the baseline: the route programs' interpreter and the warm layer call
# (normcore._steady), which call the kernels of whichever build was chosen.
STEADY = "_steady"


class BuildExt(build_ext):
    def build_extensions(self):
        cflags, lflags = _openmp_flags(self.compiler)
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        kept = []
        for ext in self.extensions:
            flags = VARIANT_FLAGS.get(ext.name.rsplit(".", 1)[-1], [])
            if flags and not (x86 and _accepts(self.compiler, flags)):
                print(f"normcore: the compiler or platform does not take {' '.join(flags)}; no {ext.name} build")
                continue
            ext.extra_compile_args += cflags + ["-O3"] + flags
            ext.extra_link_args += lflags
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()


class BuildPy(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "normcore")
        self.mkpath(target)
        for src in CUDA_SOURCES:
            self.copy_file(src, os.path.join(target, os.path.basename(src)))


extensions = [
    Extension(
        f"normcore.{name}",
        [f"src/normcore/{name}.pyx"],
        depends=sorted(glob.glob("src/normcore/*.h")) + ["src/normcore/kernels.pxi"],
        include_dirs=[np.get_include(), "src/normcore"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for name in [*VARIANT_FLAGS, STEADY]
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
