"""What backward needs from one forward call (:class:`NormCache`), and how a form presents a
call made on reshaped arrays under the caller's shapes (:func:`viewed`)."""
from __future__ import annotations

# compiled, so that the warm call builds one without Python in between (normcore._steady)
from ._steady import NormCache

__all__ = ["NormCache", "viewed"]


def viewed(y, cache, x_shape, param_shape, out=None):
    """(y, cache) of a call made on reshaped arrays, presented under the caller's shapes:
    y and dx get ``x_shape``, dweight and dbias ``param_shape``; ``out`` (the caller's,
    given) is returned as y."""
    cache.view = (tuple(x_shape), tuple(param_shape))
    return (y.reshape(x_shape) if out is None else out), cache
