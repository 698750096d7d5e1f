"""From (mode, input shape, sizes) to an immutable plan on the canonical (A, C, B) layout.

Every mode lands on one layout: a C-contiguous (A, C, B) array whose statistics groups are
indexed by ``c`` and reduced over ``a`` and ``b``. Adjacent axes of the same kind merge.
When the kept axes are not adjacent (or parameters sit on the leading reduced axes), the
groups are normalized in place on rows of the trailing reduced axes if those rows are long
enough ("scattered" plans); otherwise the input is transposed to (kept..., reduced...),
i.e. A = 1. Plans are cached by (mode, shape, sizes).
"""
from __future__ import annotations

import enum
import threading
import weakref
from dataclasses import dataclass, fields
from collections import OrderedDict
from functools import cached_property, partial
from math import prod

import numpy as np

from .modes import Mode
from .spec import ELLIPSIS, parse_axes
from .values import axis_size, describe_mode

__all__ = ["Plan", "Strategy", "make_plan", "param_shapes"]

# Rows per block of column reductions, and the most blocks of rows for parameter partials.
# Below this many elements a kernel runs on one thread: the work (tens of microseconds)
# does not repay waking a team, and OpenMP workers busy-waiting after it would compete
# with the caller's BLAS threads between calls (small-batch training interleaves both).
# The planner reads it too: a one-thread input takes the tallest blocks.
GRAIN = 1 << 18

_BLOCK_ROWS = 128
_MIN_BLOCK_ROWS = 64
PARAM_BLOCKS = 16


class Strategy(enum.Enum):
    """How a plan's statistics are computed; resolved once, when the plan is made."""

    GROUPS = "groups"        # A == 1: each group contiguous, statistics and output in one visit
    COLUMNS = "columns"      # B == 1 < A: columns of an (A, C) matrix, reduced in row blocks
    ROWS = "rows"            # contiguous rows of B reduced on their own, merged per group
    SCATTERED = "scattered"  # a group's rows lie apart in x: per-row partials, regrouped


@dataclass(frozen=True, eq=False, kw_only=True)
class Plan:
    shape: tuple            # input shape
    elem_shape: tuple       # input shape with parenthesised axes split (a reshape of x)
    perm: tuple | None      # transpose of the elementary view before the kernels; None: none
    layout: tuple           # (A, C, B): statistics group c reduces over a and b
    rows: tuple             # (A, R, S): the same memory, one coefficient set per row r
    stat_shape: tuple       # shape of per-group statistics: kept axes in spec order
    param_shape: tuple | None    # shape of weight and bias; None when the mode has none
    running_shape: tuple | None  # shape of running statistics; None when the mode has none
    count: int              # elements per statistics group, A * B
    # () -> (rg, rp, rc): the index arrays below, built on first use (an input without
    # elements never needs them, and its axis sizes may describe billions of groups)
    indices: object
    param_inner: bool       # parameters run contiguously along S: w[rp[r] + s]
    groups_per_running: int  # groups averaged into one running entry
    rows_per_block: int     # fixed block height of column / parameter reductions
    # Kept axes not adjacent, read in place: rows are the trailing reduced run, a group's
    # rows are scattered, and (A, C, B) is not a view of x. This orders the per-row
    # partial moments (row axes) as (reduced..., kept...), i.e. (partials per group, C).
    scattered: tuple | None = None

    def __reduce__(self):
        # the index recipe is a closure: a pickle (of a cache, of a layer) carries the arrays
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["indices"] = partial(_given, self._index_arrays)
        return _plan_from, (state,)

    @cached_property
    def _index_arrays(self) -> tuple:
        arrays = self.indices()
        for a in arrays:
            if a is not None:
                a.setflags(write=False)
        return arrays

    @property
    def index_bytes(self) -> int:
        """Bytes held by the index arrays once built (0 before)."""
        arrays = self.__dict__.get("_index_arrays", ())
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def rg(self) -> np.ndarray:
        """(R,) statistics group of each row."""
        return self._index_arrays[0]

    @property
    def rp(self) -> np.ndarray | None:
        """(R,) parameter offset of each row (of its first element if inner); None without
        parameters."""
        return self._index_arrays[1]

    @property
    def rc(self) -> np.ndarray | None:
        """(C,) running-statistics entry of each group; None without running statistics."""
        return self._index_arrays[2]

    @cached_property
    def identities(self) -> frozenset:
        """Names of the index arrays (rg, rp, rc) that map entries onto themselves: one
        group per row, one parameter per row, one running entry per group."""
        return frozenset(n for n in ("rg", "rp", "rc")
                         if getattr(self, n) is not None
                         and np.array_equal(getattr(self, n), np.arange(len(getattr(self, n)))))

    @cached_property
    def strategy(self) -> Strategy:
        if self.scattered is not None:
            return Strategy.SCATTERED
        A, C, B = self.layout
        if A == 1 and C > 0:
            return Strategy.GROUPS
        return Strategy.COLUMNS if B == 1 and A > 1 else Strategy.ROWS

    @cached_property
    def kernel_shape(self) -> tuple:
        """The shape the plan's kernels read x in: (A, C) for the column strategy, else
        (A, C, B)."""
        return self.layout[:2] if self.strategy is Strategy.COLUMNS else self.layout

    @cached_property
    def partial_counts(self) -> np.ndarray:
        """Elements behind each partial of the plan's moments kernel: row blocks of the
        column strategy, rows of the rows strategy, a group's rows when scattered."""
        A, C, B = self.layout
        if self.strategy is Strategy.COLUMNS:
            nb = -(-A // self.rows_per_block)
            counts = np.full(nb, float(self.rows_per_block))
            counts[-1] = A - self.rows_per_block * (nb - 1)
        elif self.strategy is Strategy.SCATTERED:
            counts = np.full(self.rows[1] // max(C, 1), float(self.rows[2]))
        else:
            counts = np.full(A, float(B))
        counts.setflags(write=False)
        return counts

    @cached_property
    def param_size(self) -> int:
        """Elements of weight (and bias): P; 0 when the mode has none."""
        return prod(self.param_shape) if self.param_shape is not None else 0

    @cached_property
    def param_blocks(self) -> int:
        """Partial rows of the parameter gradients of the one-visit backward (affine
        parameters along S): groups are cut into blocks of ceil(C / PARAM_BLOCKS)."""
        return -(-self.layout[1] // self.groups_per_block)

    @property
    def groups_per_block(self) -> int:
        """Groups per block of the one-visit backward: at most PARAM_BLOCKS blocks."""
        return max(1, -(-self.layout[1] // PARAM_BLOCKS))


def _given(arrays):
    return arrays


def _plan_from(state):
    return Plan(**state)


def _elementary(mode: Mode, shape: tuple, sizes: dict):
    """Split ``shape`` into named elementary axes; raise ValueError naming what is wrong."""
    parsed = mode.parsed
    fixed = len(parsed.lhs) - (1 if (ELLIPSIS,) in parsed.lhs else 0)
    ndim = len(shape)
    if (ELLIPSIS,) in parsed.lhs:
        if ndim < fixed:
            raise ValueError(f"expected at least {fixed} dimensions, got {ndim}")
    elif ndim != fixed:
        raise ValueError(f"expected {fixed} dimensions, got {ndim}")
    names, dims = [], []  # (sizes' names: checked by make_plan, and by Mode for fixed ones)
    it = iter(shape)
    for group in parsed.lhs:
        if group == (ELLIPSIS,):
            for i in range(ndim - fixed):
                names.append(f"...{i}")
                dims.append(next(it))
            continue
        dim = next(it)
        if len(group) == 1:
            if group[0] in sizes and sizes[group[0]] != dim:
                raise ValueError(f"axis {group[0]} has size {dim}, expected {sizes[group[0]]}")
            names.append(group[0])
            dims.append(dim)
            continue
        known = {n: sizes[n] for n in group if n in sizes}
        unknown = [n for n in group if n not in sizes]
        label = "(" + " ".join(group) + ")"
        if len(unknown) > 1:
            raise ValueError(f"axis {label} needs sizes for all but one of {', '.join(group)}")
        k = prod(known.values())
        if unknown:
            if dim % k:
                given = " * ".join(f"{n}={v}" for n, v in known.items())
                raise ValueError(f"axis {label} of size {dim} is not divisible by {given}")
            known[unknown[0]] = dim // k
        elif k != dim:
            raise ValueError(f"axis {label} has size {dim}, but {' * '.join(map(str, known.values()))} = {k}")
        for n in group:
            names.append(n)
            dims.append(known[n])
    return names, dims


def _kept_flags(mode: Mode, names):
    kept = set(mode.parsed.kept)
    return [(n in kept) or (n.startswith(ELLIPSIS) and ELLIPSIS in kept) for n in names]


def _expand(axes_text, mode, what, allowed, names):
    """Elementary names (ellipsis expanded) and the array shape grouping of an axis list."""
    groups = parse_axes(axes_text, mode.spec, what, allowed)
    out, grouping = [], []
    for g in groups:
        members = []
        for n in g:
            members += [m for m in names if m.startswith(ELLIPSIS)] if n == ELLIPSIS else [n]
        out += members
        grouping.append(members)
    return out, grouping


def _offsets(axes, dims, strides):
    """Flat offsets sum(idx_i * stride_i) over the C-ordered product of ``axes``."""
    total = np.zeros([dims[i] for i in axes] or [1], dtype=np.intp)
    for j, i in enumerate(axes):
        shape = [1] * len(axes)
        shape[j] = dims[i]
        total = total + (np.arange(dims[i], dtype=np.intp) * strides[i]).reshape(shape)
    out = np.ascontiguousarray(total.reshape(-1))
    out.setflags(write=False)
    return out


# Below this many elements per row, in-place rows of scattered groups cost more than one
# transpose of x.
_MIN_ROW = 32


def _in_place_rows(tail, dims, is_param, param_strides):
    """The trailing axes that can serve as rows when scattered groups are normalized in
    place: either the run after the tail's last parameter axis (one parameter per row), or
    the whole tail when its parameters cover it with unit stride (inner rows). Rows must
    hold at least _MIN_ROW elements; () when neither works."""
    tail = list(tail)
    p_ax = [i for i in tail if is_param[i]]
    plain = tail[tail.index(p_ax[-1]) + 1:] if p_ax else tail
    if prod(dims[i] for i in plain) >= _MIN_ROW:
        return tuple(plain)
    big = [i for i in tail if dims[i] > 1]
    inner = p_ax and p_ax == big and param_strides[p_ax[-1]] == 1 and all(
        param_strides[p] == param_strides[q] * dims[q] for p, q in zip(p_ax, p_ax[1:]))
    return tuple(tail) if inner and prod(dims[i] for i in tail) >= _MIN_ROW else ()


def _row_major(flags, dims):
    """Row-major strides over the axes where ``flags`` is true (0 elsewhere)."""
    strides, stride = [0] * len(dims), 1
    for i in reversed(range(len(dims))):
        if flags[i]:
            strides[i] = stride
            stride *= dims[i]
    return strides


def _running_index(running_shape, run_strides, axes, kept, dims):
    """(C,) running-statistics entry of each group."""
    if running_shape is None:
        return None
    return _offsets([i for i in axes if kept[i]], dims, run_strides)


def _groups_per_running(running_shape, C):
    return C // max(prod(running_shape), 1) if running_shape is not None and C else 1


# Plans are cached by (mode, shape, sizes), least recently used first out, bounded by
# count and by the bytes of their index arrays (one integer per row: a layer norm over
# many sequence lengths would otherwise keep gigabytes alive).
PLAN_CACHE_ENTRIES = 4096
PLAN_CACHE_BYTES = 64 << 20
_PLANS: OrderedDict = OrderedDict()  # key -> (plan, its index bytes when cached)
_plan_bytes = 0


# Plans whose index arrays alone pass PLAN_CACHE_BYTES: held weakly, so that while a
# caller keeps one alive (its cache for backward, the loop's previous step) the next call
# of that shape reuses it, and once the caller lets go its arrays are freed.
_LARGE_PLANS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_PLANS_LOCK = threading.RLock()


def _cached_plan(mode: Mode, shape: tuple, sizes: tuple) -> Plan:
    global _plan_bytes
    key = (mode, shape, sizes)
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
        if hit is not None:
            _PLANS.move_to_end(key)
            return hit[0]
        plan = _LARGE_PLANS.get(key)
        if plan is not None:
            return plan
    plan = _make_plan(mode, shape, sizes)
    if prod(shape):  # an input with elements needs the arrays: build them now, counted
        plan._index_arrays
    size = plan.index_bytes
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
        if hit is not None:  # another thread made it meanwhile
            return hit[0]
        if size > PLAN_CACHE_BYTES:
            _LARGE_PLANS[key] = plan
            return plan
        _PLANS[key] = (plan, size)
        _plan_bytes += size
        while len(_PLANS) > PLAN_CACHE_ENTRIES or _plan_bytes > PLAN_CACHE_BYTES:
            _plan_bytes -= _PLANS.popitem(last=False)[1][1]  # oldest first; the plan just made fits
    return plan


def _make_plan(mode: Mode, shape: tuple, sizes: tuple) -> Plan:
    names, dims = _elementary(mode, shape, dict(sizes))
    kept = _kept_flags(mode, names)
    allowed = tuple(mode.parsed.names)
    nd = len(names)

    param_strides = [0] * nd
    param_shape = None
    if mode.params is not None:
        paxes, grouping = _expand(mode.params, mode, "params", allowed, names)
        param_shape = tuple(prod(dims[names.index(m)] for m in g) for g in grouping)
        stride = 1
        for m in reversed(paxes):
            param_strides[names.index(m)] = stride
            stride *= dims[names.index(m)]

    run_strides = [0] * nd
    running_shape = None
    if mode.running_stats is not None:
        raxes, grouping = _expand(mode.running_stats, mode, "running_stats", mode.parsed.kept, names)
        running_shape = tuple(dims[names.index(m)] for m in raxes)
        stride = 1
        for m in reversed(raxes):
            run_strides[names.index(m)] = stride
            stride *= dims[names.index(m)]

    # Segments of the canonical layout: A = leading reduced axes, C = kept run, B = rest.
    # Size-1 axes never matter for memory or indices, so they do not break a run.
    big = [dims[i] > 1 for i in range(nd)]
    is_param = [bool(param_strides[i]) and big[i] for i in range(nd)]
    big_kept = [i for i in range(nd) if kept[i] and big[i]]
    first, last = (big_kept[0], big_kept[-1]) if big_kept else (nd, nd - 1)
    contiguous_run = all(kept[i] or not big[i] for i in range(first, last + 1))
    lead = prod(dims[:first])
    params_reduced = any(is_param[i] and not kept[i] for i in range(nd))
    lead_params = any(is_param[i] for i in range(first))
    scattered = None
    if contiguous_run and not lead_params and not (params_reduced and lead > 1):
        a_axes, c_axes, b_axes = list(range(first)), list(range(first, last + 1)), list(range(last + 1, nd))
    elif _in_place_rows(range(last + 1, nd), dims, is_param, param_strides):
        # Kept axes interleaved with reduced ones (e.g. "b t (h d) -> b h"): rather than
        # transposing x, normalize rows of trailing reduced axes where they lie.
        s_axes = list(_in_place_rows(range(last + 1, nd), dims, is_param, param_strides))
        row_axes = list(range(nd - len(s_axes)))
        stat_strides = _row_major(kept, dims)

        def indices():
            return (_offsets(row_axes, dims, stat_strides),
                    None if param_shape is None else _offsets(row_axes, dims, param_strides),
                    _running_index(running_shape, run_strides, row_axes, kept, dims))
        R, S = prod(dims[i] for i in row_axes), prod(dims[i] for i in s_axes)
        C = prod(dims[i] for i in range(nd) if kept[i])
        scattered = tuple([i for i in row_axes if not kept[i]] + [i for i in row_axes if kept[i]])
        per_running = _groups_per_running(running_shape, C)
        return Plan(shape=tuple(shape), elem_shape=tuple(dims), perm=None,
                    layout=(1, C, R * S // max(C, 1)), rows=(1, R, S),
                    stat_shape=tuple(dims[i] for i in range(nd) if kept[i]),
                    param_shape=param_shape, running_shape=running_shape,
                    count=R * S // max(C, 1), indices=indices,
                    param_inner=any(is_param[i] for i in s_axes),
                    groups_per_running=per_running, rows_per_block=max(1, -(-R // PARAM_BLOCKS)),
                    scattered=scattered)
    else:  # transpose to (kept, reduced): A = 1
        a_axes = []
        c_axes = [i for i in range(nd) if kept[i]]
        b_axes = [i for i in range(nd) if not kept[i]]

    # Rows of the elementwise passes. Parameters on reduced axes either run contiguously
    # along the end of B (layer norm: "inner" rows) or are constant along its end (group
    # norm: one weight per row); B's axes are reordered only if neither holds as given.
    split = 0  # B's leading axes that become rows
    param_inner = False
    if params_reduced:
        p_ax = [i for i in b_axes if is_param[i]]
        n_ax = [i for i in b_axes if not is_param[i]]
        inner_ok = all(param_strides[p] == param_strides[q] * dims[q] for p, q in zip(p_ax, p_ax[1:])) \
            and param_strides[p_ax[-1]] == 1
        if b_axes == p_ax + n_ax and prod(dims[i] for i in n_ax) > 1:
            pass
        elif inner_ok:
            b_axes, param_inner = n_ax + p_ax, True
        else:
            b_axes = p_ax + n_ax
        split = len(n_ax) if param_inner else len(p_ax)
    order = tuple(a_axes + c_axes + b_axes)
    perm = None if order == tuple(range(nd)) else order
    A, C, B = (prod(dims[i] for i in axes) for axes in (a_axes, c_axes, b_axes))
    row_axes, s_axes = c_axes + b_axes[:split], b_axes[split:]
    R, S = prod(dims[i] for i in row_axes), prod(dims[i] for i in s_axes)

    def indices():
        return (np.repeat(np.arange(C, dtype=np.intp), R // C if C else 0),
                None if param_shape is None else _offsets(row_axes, dims, param_strides),
                _running_index(running_shape, run_strides, c_axes, [True] * nd, dims))
    per_running = _groups_per_running(running_shape, C)

    stat_shape = tuple(dims[i] for i in range(nd) if kept[i])
    if A > 1 and B == 1:
        # Column blocks: up to _BLOCK_ROWS rows (the one-pass tile moments lose at most
        # log2(rows) bits). Inputs that run on one thread (below GRAIN) take the tallest
        # blocks; larger ones at least 16 blocks where A allows, for parallelism, but no
        # block under _MIN_BLOCK_ROWS rows (short blocks re-read their accumulators per
        # row: (256, 1024) moments took 117 us in blocks of 16, 75 in blocks of 64).
        # Either way the blocks follow the shape, never the thread count.
        tall = A if A * C < GRAIN else max(min(A, _MIN_BLOCK_ROWS), -(-A // 16))
        rows_per_block = max(1, min(_BLOCK_ROWS, tall))
    else:
        # blocks of rows for parameter partials: at most PARAM_BLOCKS partial rows
        rows_per_block = max(1, -(-R // PARAM_BLOCKS))
    return Plan(shape=tuple(shape), elem_shape=tuple(dims), perm=perm, layout=(A, C, B),
                rows=(A, R, S), stat_shape=stat_shape, param_shape=param_shape,
                running_shape=running_shape, count=A * B, indices=indices, param_inner=param_inner,
                groups_per_running=per_running, rows_per_block=rows_per_block)


def make_plan(mode: Mode, shape, sizes=None) -> Plan:
    """Return the cached :class:`Plan` for ``mode`` on an input of ``shape``.

    Raises ValueError (without the spec; callers add it) when the shape does not fit.

    >>> from normcore.modes import get_mode
    >>> make_plan(get_mode("batch_norm"), (8, 3, 4, 4)).layout
    (8, 3, 16)
    """
    if not sizes and type(shape) is tuple:
        return _cached_plan(mode, shape, mode.sizes)  # mode.sizes is sorted already
    merged = dict(mode.sizes)
    names = mode.parsed.names
    for k, v in (sizes or {}).items():
        if k not in names or k == ELLIPSIS:
            # the keywords a call takes beyond its own are axis sizes: any other name is a
            # misspelt or unsupported argument, reported as Python reports one
            raise TypeError(f"unexpected keyword argument {k!r} ({describe_mode(mode)} has no axis "
                            f"{k!r}; the extra keywords are axis sizes: {', '.join(n for n in names if n != ELLIPSIS)})")
        size = axis_size(k, v)
        if k in merged and merged[k] != size:
            raise ValueError(f"sizes: {k}={size} conflicts with {k}={merged[k]} fixed by "
                             f"{describe_mode(mode)}")
        merged[k] = size
    return _cached_plan(mode, tuple(int(s) for s in shape), tuple(sorted(merged.items())))


def param_shapes(mode, x_shape, **sizes) -> dict:
    """Shapes of the arrays a mode takes beside x: ``{"weight": ..., "bias": ...,
    "running_mean": ..., "running_var": ...}``, None where the mode has none.

    >>> param_shapes("group_norm", (8, 6, 5), g=3)["weight"]
    (6,)
    >>> param_shapes("instance_norm", (8, 6, 5))["running_mean"]
    (6,)
    """
    from .modes import get_mode
    m = get_mode(mode)
    try:
        plan = make_plan(m, tuple(x_shape), sizes)
    except ValueError as e:
        if str(e).startswith("sizes:"):  # the sizes, not the shape, are wrong
            raise
        raise ValueError(f"x_shape: {e} ({m.spec!r}, shape {tuple(x_shape)})") from None
    return {"weight": plan.param_shape, "bias": plan.param_shape,
            "running_mean": plan.running_shape, "running_var": plan.running_shape}

