"""The mode registry: a normalization mode is an axis spec plus where its parameters live.

Built-in modes are registered at import with the same public :func:`register_mode` that
users call, and every mode runs on the same compiled kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .values import axis_size
from .spec import ELLIPSIS, SpecError, parse_axes, parse_spec

__all__ = ["Mode", "register_mode", "modes", "get_mode"]


@dataclass(frozen=True)
class Mode:
    """An immutable normalization mode. Build one with :func:`register_mode` or directly.

    ``Mode("n c ... -> c", params="c", running_stats=True)`` is spatial batch norm: the
    statistics are kept per channel and reduced over N and every trailing axis, the
    affine parameters have shape (C,), and running statistics have shape (C,).
    """

    spec: str
    # Axes of the affine parameters, in the spec's left-hand order ("(g k)" merges into
    # one parameter axis); None: the mode takes no weight or bias.
    params: str | None = None
    # True: x is centred by its mean; False: RMS-style scaling by sqrt(mean(x^2)), no centring.
    center: bool = True
    # Axes of the running statistics: None (none), or a subset of the statistics axes.
    # A subset shorter than the statistics axes averages the per-group statistics over
    # the other kept axes (instance norm keeps running stats per channel, not per sample).
    running_stats: str | None = None
    # Axis sizes fixed by the mode (e.g. groups); others can be given per call, a fixed one
    # only with its fixed value.
    sizes: tuple[tuple[str, int], ...] = ()
    name: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.spec, str):
            raise TypeError(f"spec: expected a str such as 'n c ... -> c', got {type(self.spec).__name__} "
                            f"{self.spec!r}")
        sizes = self.sizes
        if isinstance(sizes, dict):  # as a caller writes them; kept as sorted pairs (hashable)
            sizes = tuple(sorted(sizes.items()))
        elif not (isinstance(sizes, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in sizes)):
            raise TypeError(f"sizes: expected a dict of axis sizes such as {{'g': 32}}, got "
                            f"{type(sizes).__name__} {sizes!r}")
        object.__setattr__(self, "sizes", sizes)
        parsed = parse_spec(self.spec)
        names = tuple(n for n in parsed.names)
        if all(n in parsed.kept for n in names):
            raise SpecError(f"spec {self.spec!r}: reduces no axis (every input axis is kept), so every "
                            "output would be 0; name the statistics axes on the right of '->'")
        if self.params is not None:
            if not isinstance(self.params, str):
                raise TypeError(f"params: expected a str of axis names or None, got {type(self.params).__name__}")
            groups = parse_axes(self.params, self.spec, "params", names)
            batch = parsed.lhs[0]  # kept, the leading axis is the batch (one statistic per sample)
            if batch != (ELLIPSIS,) and any(n in parsed.kept for n in batch) \
                    and any(n in batch for g in groups for n in g):
                raise SpecError(f"spec {self.spec!r}: params {self.params!r} include the leading axis "
                                f"{' '.join(batch)!r}, kept as the batch (statistics per sample), whose size "
                                "changes from call to call; parameters live on the other axes")
        if self.running_stats is not None:
            if not isinstance(self.running_stats, str):
                raise TypeError("running_stats: expected True, False or a str of statistics axes")
            groups = parse_axes(self.running_stats, self.spec, "running_stats", parsed.kept)
            if any(len(g) > 1 for g in groups):
                raise SpecError(f"spec {self.spec!r}: running_stats axes cannot be parenthesised")
            if not self.center:
                raise ValueError("running_stats: only centred modes keep running statistics")
        if not isinstance(self.center, bool):
            raise TypeError(f"center: expected a bool, got {type(self.center).__name__}")
        for axis, size in self.sizes:
            _check_size(axis, size, parsed)

    @property
    def parsed(self):
        return parse_spec(self.spec)

    def __repr__(self):
        label = f"{self.name!r}, " if self.name else ""
        return (f"Mode({label}{self.spec!r}, params={self.params!r}, center={self.center}, "
                f"running_stats={self.running_stats!r}, sizes={dict(self.sizes)})")


def _check_size(axis, size, parsed):
    if axis not in parsed.names or axis == ELLIPSIS:
        raise ValueError(f"sizes: axis {axis!r} is not in spec {parsed.text!r}")
    axis_size(axis, size)


_REGISTRY: dict[str, Mode] = {}


def register_mode(name, spec, *, params=None, center=True, running_stats=False, **sizes) -> Mode:
    """Register a normalization mode under ``name`` and return it.

    Parameters
    ----------
    name : str
        Key for :func:`normcore.normalize`. Must not be registered already.
    spec : str
        ``"<input axes> -> <statistics axes>"``, e.g. ``"n c ... -> c"``.
    params : str or None
        Axes of weight and bias, e.g. ``"c"`` (shape (C,)) or ``"(g k)"`` (one merged
        axis). None: the mode has no affine parameters.
    center : bool
        Subtract the mean (True) or only scale by the root mean square (False, RMS norm).
    running_stats : bool or str
        True keeps running statistics on all statistics axes, a str on a subset of them.
    **sizes : int
        Fixed axis sizes, e.g. ``g=32``. A call may give the axis sizes left open; giving a
        fixed one a different value is a ValueError (a call cannot re-size a mode).

    Example
    -------
    >>> import numpy as np, normcore
    >>> m = normcore.register_mode("per_row_doc", "r col -> r", params="col")
    >>> y, cache = normcore.normalize(np.ones((2, 3), np.float32), "per_row_doc")
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"name: mode {name!r} is already registered")
    if running_stats is True:
        running_stats = " ".join(parse_spec(spec).kept) if isinstance(spec, str) else spec
    elif running_stats is False:
        running_stats = None
    mode = Mode(spec, params=params, center=center, running_stats=running_stats,
                sizes=tuple(sorted(sizes.items())), name=name)
    _REGISTRY[name] = mode
    return mode


def modes() -> dict[str, Mode]:
    """All registered modes by name (built-ins first, in registration order).

    >>> modes()["batch_norm"].spec
    'n c ... -> c'
    """
    return dict(_REGISTRY)


def get_mode(mode) -> Mode:
    """Return the :class:`Mode` for a registered name or a :class:`Mode` instance.

    >>> get_mode("group_norm").params
    '(g k)'
    """
    if isinstance(mode, Mode):
        return mode
    if not isinstance(mode, str):
        raise TypeError(f"mode: expected a registered name or a Mode, got {type(mode).__name__}")
    try:
        return _REGISTRY[mode]
    except KeyError:
        raise ValueError(f"mode: unknown mode {mode!r}; registered: {', '.join(_REGISTRY)}") from None


# Built-in modes, through the public call.
register_mode("batch_norm", "n c ... -> c", params="c", running_stats=True)
register_mode("batch_norm_channels_last", "n ... c -> c", params="c", running_stats=True)
register_mode("batch_norm_per_activation", "n d -> d", params="d", running_stats=True)
register_mode("layer_norm", "... d -> ...", params="d")
register_mode("rms_norm", "... d -> ...", params="d", center=False)
register_mode("instance_norm", "n c ... -> n c", params="c", running_stats="c")
register_mode("group_norm", "n (g k) ... -> n g", params="(g k)")
register_mode("channel_norm", "n (g k) ... -> n g", params="g")
register_mode("weight_standardize", "o ... -> o")
