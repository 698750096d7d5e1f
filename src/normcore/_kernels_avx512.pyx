# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The same kernels built with AVX-512 (F, BW, VL) and 512-bit vectors (see kernels.pxi);
normcore.kernels picks this build when the CPU has them. Results may differ from the other
builds in the last bits, within the float32 accuracy contract (README, Numerics); within
this build they do not depend on the thread count."""
include "kernels.pxi"
