"""Every argument rule of normcore, once, with one message per rule.

Each function checks one rule and raises ``TypeError`` (wrong kind of value) or
``ValueError`` (right kind, wrong value) with a message that names the argument and quotes
what was expected and what came. The public functions, the forms and the layers all call
these; an input array is checked once per public call, at the entry it came through.
Nothing here computes or writes anything.
"""
from __future__ import annotations


import numpy as np

from .backend import CPU, backend_of, is_half
from .values import (DEFAULT_MOMENTUM, _default_momentum, axis_size, describe_mode, divides,  # noqa: F401
                     eps, min_ndim, momentum, positive_int, running_rate, trailing_shape, type_name)

__all__ = ["array", "param", "param_dtypes", "same_dtype", "positive_int", "axis_size", "divides", "eps", "momentum", "running_rate",
           "DEFAULT_MOMENTUM", "out", "apart", "disjoint",
           "min_ndim", "describe_mode", "type_name"]


def array(name, a, dtype=None, be=None):
    """``a`` must be a float array of backend ``be`` (by default the one ``a`` selects:
    NumPy on the CPU, CuPy on the GPU) and, when given, of ``dtype``; returns the backend.

    >>> array("x", np.zeros(3, np.float32)).name
    'cpu'
    """
    if dtype is not None and be is not None and type(a) is be.array_type and a.dtype == dtype:
        return be  # the common case: x's backend and dtype given, and matched
    if be is None:
        be = backend_of(a)
        if type(a) is be.array_type and a.dtype in be.dtypes:
            return be  # the common case: an array of the backend's own type and dtypes
        if not isinstance(a, be.array_type):
            raise TypeError(f"{name}: expected a numpy.ndarray (or a cupy.ndarray for the GPU), "
                            f"got {type_name(a)}")
    elif not isinstance(a, be.array_type):
        if be.name == "cuda":
            move = "; move it with cupy.asarray"
        elif type(a).__module__.split(".")[0] == "cupy":
            move = "; move it with cupy.asnumpy"
        else:  # a list, a scalar, another library's array
            move = "; convert it with numpy.asarray"
        raise TypeError(f"{name}: expected a {be.array_name} like x (x is on the {be.place}), "
                        f"got {type_name(a)}{move}")
    _not_masked_array(name, a, be, f"pass {name}.filled(...) or the unmasked values")
    if not be.accepts(a.dtype):
        # every storage dtype, whether or not ml_dtypes (bfloat16's provider) is imported yet
        raise TypeError(f"{name}: expected {STORAGE_NAMES} on the {be.place}, got dtype {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match x's dtype {dtype}")
    return be


def _not_masked_array(name, a, be, advice):
    """A numpy.ma array is refused: its own mask would be ignored."""
    if type(a) is not be.array_type and isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: masked arrays are not supported (their own mask would be ignored); {advice}")


_F32 = np.dtype(np.float32)


STORAGE_NAMES = "float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16)"


def param_dtypes(dtype):
    """The dtypes a weight, bias or running statistic may have beside an x of ``dtype``:
    x's own, and float32 beside a half-precision x (mixed precision, as PyTorch's CPU
    kernels take them).

    >>> [d.name for d in param_dtypes(np.dtype(np.float16))]
    ['float16', 'float32']
    """
    return (dtype, _F32) if is_half(dtype) else (dtype,)


def param(name, a, shape, dtype, be):
    """An optional array argument (weight, bias, running statistic) of ``shape`` on ``be``,
    of a dtype :func:`param_dtypes` allows beside x's ``dtype``; None passes."""
    if a is None or (type(a) is be.array_type and a.dtype == dtype and a.shape == shape):
        return  # absent, or the common case
    allowed = param_dtypes(dtype)
    if len(allowed) == 1:
        array(name, a, dtype, be)
    else:
        if isinstance(a, be.array_type) and a.dtype not in allowed:
            raise TypeError(f"{name}: expected x's dtype {dtype} or float32, got dtype {a.dtype}")
        array(name, a, None, be)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")


def same_dtype(name_a, a, name_b, b):
    """Two arrays the kernels read as a pair (weight and bias, the running statistics)
    share one dtype; either may be absent."""
    if a is not None and b is not None and a.dtype != b.dtype:
        raise TypeError(f"{name_a}/{name_b}: expected one dtype for both, got {a.dtype} and {b.dtype}")


def like_x(name, a, shape, dtype, be):
    """``a`` (a residual, an incoming dh) must be an array of x's backend, dtype and shape
    (``shape``: the forward input's); elementwise partners are not broadcast.

    >>> like_x("residual", np.zeros((2, 3), np.float32), (2, 3), np.dtype(np.float32), CPU)
    """
    array(name, a, dtype, be)
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected x's shape {tuple(shape)}, got {a.shape}")


def mask(a, shape, be):
    """``mask=`` must be a boolean array of x's backend whose shape broadcasts to x's
    ``shape`` by NumPy's rules (a (B, T, 1) mask for a (B, T, C) x).

    >>> mask(np.ones((2, 1), bool), (2, 3), CPU)
    """
    if not isinstance(a, be.array_type):
        move = " (move it with cupy.asarray)" if be.name == "cuda" else ""
        raise TypeError(f"mask: expected a boolean {be.array_name} like x, got {type_name(a)}{move}")
    _not_masked_array("mask", a, be, "pass a plain boolean array, e.g. mask=~m.mask or mask=m.filled(False)")
    if a.dtype != np.bool_:
        raise TypeError(f"mask: expected a boolean array (True: counted in the statistics), got dtype {a.dtype}"
                        "; compare first, e.g. mask=lengths_mask > 0")
    try:
        fits = np.broadcast_shapes(a.shape, tuple(shape)) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"mask: shape {a.shape} does not broadcast to x's shape {tuple(shape)}")


def out(a, shape, dtype, inputs, be=CPU, name="out"):
    """``out=`` (or another output argument ``name``) must be a writeable C-contiguous
    array of the result's shape and dtype that shares no memory with ``inputs`` (backward
    reads x after forward has written y); a call that also writes other arrays checks all
    its overlaps with :func:`disjoint` instead."""
    if not isinstance(a, be.array_type):
        raise TypeError(f"{name}: expected a {be.array_name} like x, got {type_name(a)}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match the result's dtype {dtype}")
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    if not (a.flags.c_contiguous and getattr(a.flags, "writeable", True)):
        raise ValueError(f"{name}: must be C-contiguous and writeable")
    for other_name, other in inputs.items():
        if be.xp.may_share_memory(a, other):
            raise ValueError(f"{name}: must not share memory with {other_name}")


def apart(*arrays) -> bool:
    """Whether the arrays given (None entries skipped) are distinct objects that each own
    their memory, so that none can overlap another: the common case, which then needs no
    memory test (:func:`disjoint` decides the others).

    >>> a, b = np.zeros(3), np.zeros(3)
    >>> apart(a, None, b), apart(a, a), apart(a, a[1:])
    (True, False, False)
    """
    seen = set()
    for a in arrays:
        if a is not None:
            if a.base is not None or id(a) in seen:
                return False
            seen.add(id(a))
    return True


def disjoint(written, read, be=CPU):
    """No array a call writes shares memory with another array it writes or reads:
    ``written`` and ``read`` map argument names to arrays (None entries skipped), e.g.
    "out: must not share memory with running_var". Two distinct arrays that own their
    memory cannot overlap, so the common case costs no memory test."""
    writes = [(n, a) for n, a in written.items() if a is not None]
    reads = [(n, a) for n, a in read.items() if a is not None]
    for i, (name, a) in enumerate(writes):
        for other, b in writes[i + 1:] + reads:
            if a is b:
                raise ValueError(f"{name}: must not be the same array as {other} (it is written)")
            if a.base is None and b.base is None:
                continue
            if be.xp.may_share_memory(a, b):
                raise ValueError(f"{name}: must not share memory with {other} (it is written)")
