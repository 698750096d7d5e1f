# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The same kernels built with AVX2 and FMA (see kernels.pxi); normcore.kernels picks
this build when the CPU has both but not AVX-512. Implicit contraction is off; the float32
passes fuse where simd.h says, so results may differ from the baseline build's in the last
bits, within the float32 accuracy contract."""
include "kernels.pxi"
