# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The same kernels built with AVX2 and FMA (see kernels.pxi); normcore.kernels picks
this build when the CPU has both. Floating-point contraction is off, so both builds give
bitwise identical results."""
include "kernels.pxi"
