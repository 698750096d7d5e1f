# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Kernels built for the baseline instruction set of the platform (see kernels.pxi)."""
include "kernels.pxi"
