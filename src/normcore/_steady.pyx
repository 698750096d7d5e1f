# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled call: a route's steps as a program run without Python in between, the
cache record, and a layer's steady-state forward and backward.

A :class:`Program` is a frozen list of steps over numbered registers -- allocate, view,
call a contract entry (by keyword) with registers in some arguments, sum, take -- built once
per call signature by :mod:`normcore.program` from the plan and the route, and run here
for every call of that signature. The kernels are looked up on ``backend.K`` (bound once,
again only when ``K`` is replaced), so a program runs whatever contract the backend holds.

:func:`layer_forward` and :func:`layer_backward` are a layer's warm call in one compiled
function each: the per-call rules a repeated signature still needs (x's type, dtype, shape
and contiguity; the parameters' and running statistics' arrays, their writeability and
overlaps; eps, momentum and the flags unchanged), the lock and the snapshot of the running
statistics, the program, the cache, and backward's gradient accumulation. Anything they
do not cover returns ``None`` and the layer takes its Python path, which rules on it (and
raises what it raises) as for a first call.
"""
import numpy as np

cimport numpy as cnp
from cpython.object cimport PyObject
from libc.string cimport memcpy

cnp.import_array()

cdef object _ndarray = np.ndarray

# The fixed registers every program shares (normcore.program names them from here).
cdef enum:
    R_X = 0          # forward: x in the plan's shape
    R_W = 1          # the weight as the kernels read it (1-D, its own dtype) or None
    R_B = 2
    R_RM = 3         # running statistics (1-D, written in place) or None
    R_RV = 4
    R_EPS = 5
    R_MOMENTUM = 6
    R_KEEP = 7
    R_UNBIASED = 8   # the unbiased running variance: a bool
    R_THREADS = 9
    R_DY = 10        # backward: dy in the plan's shape
    R_DH = 11        # backward's dh in the plan's shape, or None
    R_MEAN = 12      # the statistics the output used, (C,) float64
    R_RSTD = 13
    R_X3 = 14        # x in the canonical layout (what backward reads: h with a residual)
    R_OUT = 15       # y (forward) or dx (backward): the caller's array, or made by the program
    R_DW = 16        # backward: dweight, dbias (P,) float64, or None
    R_DB = 17
    R_RESIDUAL = 18  # forward's residual in the plan's shape, or None
    R_H = 19         # h = x + residual: the caller's h_out, or made by the program
    N_FIXED = 20

REGISTERS = {"x": R_X, "weight": R_W, "bias": R_B, "running_mean": R_RM, "running_var": R_RV,
             "eps": R_EPS, "momentum": R_MOMENTUM, "keep": R_KEEP, "unbiased": R_UNBIASED,
             "threads": R_THREADS, "dy": R_DY, "dh": R_DH, "mean": R_MEAN, "rstd": R_RSTD, "x3": R_X3,
             "out": R_OUT, "dweight": R_DW, "dbias": R_DB, "residual": R_RESIDUAL, "h": R_H}
FIXED_REGISTERS = N_FIXED

cdef enum:
    OP_EMPTY = 0     # reg[out] = empty(shape, dtype)
    OP_ZEROS = 1     # reg[out] = zeros(shape, dtype)
    OP_OUTPUT = 2    # reg[out] = empty(shape, dtype) unless the caller put an array there
    OP_VIEW = 3      # reg[out] = reg[src].reshape(shape), or None when reg[src] is None
    OP_CALL = 4      # K.<entry>(**args), registers in some of them (it returns nothing)
    OP_SUM0 = 5      # reg[out] = reg[src].sum(axis=0), or along ``axis``
    OP_TAKE = 7      # reg[out] = reg[src][index]
    OP_ALIAS = 8     # reg[out] = reg[src]
    OP_PART = 9      # reg[out] = reg[src][item]: one of stacked arrays (a view)

OPS = {"empty": OP_EMPTY, "zeros": OP_ZEROS, "output": OP_OUTPUT, "view": OP_VIEW, "call": OP_CALL,
       "sum0": OP_SUM0, "take": OP_TAKE, "alias": OP_ALIAS, "part": OP_PART}

DEF MAX_ARGS = 24
DEF MAX_DIMS = 8

cdef extern from "Python.h":
    object PySequence_GetItem(object o, Py_ssize_t i)
    # the keyword call without a dict: the entries take every argument by name
    object PyObject_Vectorcall(object callable, PyObject** args, size_t nargsf, object kwnames)

cdef extern from "numpy/arrayobject.h":
    # numpy's declarations type ``out`` as an ndarray, which cannot be NULL (none given)
    object _take "PyArray_TakeFrom"(cnp.ndarray, object, int, void*, cnp.NPY_CLIPMODE)
    object _sum "PyArray_Sum"(cnp.ndarray, int, int, void*)


cdef class Step:
    """One step of a program (see :data:`OPS`): ``out``/``src`` registers, the shape and
    dtype an allocation or view takes, the entry and argument template of a call (an
    ``int`` register number where ``regs`` says so, else the constant itself)."""

    cdef int op, out, src, nd, typenum, nargs, axis
    cdef Py_ssize_t item
    cdef cnp.npy_intp dims[MAX_DIMS]
    cdef int regs[MAX_ARGS]
    cdef readonly object name
    cdef object func
    cdef tuple template
    cdef readonly tuple keywords   # the call's argument names, in the template's order
    cdef object index

    def __init__(self, op, int out, int src=-1, shape=(), dtype=np.float64, name=None, args=(), slots=(),
                 index=None, keywords=(), int axis=0, Py_ssize_t item=0):
        self.op = OPS[op]
        self.out, self.src = out, src
        shape = tuple(shape)
        if len(shape) > MAX_DIMS:
            raise ValueError(f"shape: at most {MAX_DIMS} axes, got {shape}")
        self.nd = len(shape)
        for i, n in enumerate(shape):
            self.dims[i] = n
        self.typenum = np.dtype(dtype).num
        self.name = name
        self.template = tuple(args)
        if len(self.template) > MAX_ARGS:
            raise ValueError(f"args: at most {MAX_ARGS}, got {len(self.template)}")
        self.nargs = len(self.template)
        self.keywords = tuple(keywords)
        if self.op == OP_CALL and len(self.keywords) != self.nargs:
            raise ValueError(f"keywords: one per argument ({self.nargs}), got {len(self.keywords)}")
        self.axis, self.item = axis, item
        for i in range(self.nargs):
            self.regs[i] = -1
        for i, r in slots:
            self.regs[i] = r
        self.index = index

    def __repr__(self):
        return f"<Step {self.op} {self.name or ''} -> {self.out}>"


cdef class Program:
    """Steps run in order over ``nregs`` registers (the first FIXED_REGISTERS are the
    fixed ones, set by the caller)."""

    cdef tuple steps
    cdef readonly int nregs
    cdef object K
    cdef readonly object be
    cdef readonly tuple entries   # the contract entries called, in order

    def __init__(self, be, steps, int nregs):
        self.be = be
        self.steps = tuple(steps)
        self.nregs = nregs
        self.K = None
        self.entries = tuple(s.name for s in self.steps if (<Step>s).op == OP_CALL)

    cdef int _bind(self) except -1:
        cdef Step s
        K = self.be.K
        if K is self.K:
            return 0
        for s in self.steps:
            if s.op == OP_CALL:
                s.func = getattr(K, s.name)
        self.K = K
        return 0

    cdef int run(self, list regs) except -1:
        cdef Step s
        cdef Py_ssize_t i
        cdef int r
        cdef PyObject* argv[MAX_ARGS]
        cdef cnp.PyArray_Dims shape
        self._bind()
        for s in self.steps:
            if s.op == OP_CALL:
                # borrowed: the template and the registers hold every argument for the call
                for i in range(s.nargs):
                    r = s.regs[i]
                    argv[i] = <PyObject*>(s.template[i] if r < 0 else regs[r])
                PyObject_Vectorcall(s.func, argv, 0, s.keywords)  # entries write their OUT arrays
            elif s.op == OP_EMPTY:
                regs[s.out] = cnp.PyArray_EMPTY(s.nd, s.dims, s.typenum, 0)
            elif s.op == OP_OUTPUT:
                if regs[s.out] is None:
                    regs[s.out] = cnp.PyArray_EMPTY(s.nd, s.dims, s.typenum, 0)
            elif s.op == OP_ZEROS:
                regs[s.out] = cnp.PyArray_ZEROS(s.nd, s.dims, s.typenum, 0)
            elif s.op == OP_VIEW:
                a = regs[s.src]
                if a is None:
                    regs[s.out] = None
                else:
                    shape.ptr, shape.len = s.dims, s.nd
                    regs[s.out] = cnp.PyArray_Newshape(<cnp.ndarray>a, &shape, cnp.NPY_CORDER)
            elif s.op == OP_SUM0:
                regs[s.out] = _sum(<cnp.ndarray>regs[s.src], s.axis, cnp.NPY_DOUBLE, NULL)
            elif s.op == OP_TAKE:
                regs[s.out] = _take(<cnp.ndarray>regs[s.src], s.index, 0, NULL, cnp.NPY_RAISE)
            elif s.op == OP_ALIAS:
                regs[s.out] = regs[s.src]
            elif s.op == OP_PART:
                regs[s.out] = PySequence_GetItem(regs[s.src], s.item)
        return 0

    def __call__(self, list regs):
        """Run the steps over ``regs`` (a list of ``nregs``, the fixed registers set)."""
        if len(regs) != self.nregs:
            raise ValueError(f"regs: expected {self.nregs} registers, got {len(regs)}")
        self.run(regs)
        return regs


cdef class Programs:
    """A signature's forward program and its backward programs (without and with dh), and
    what their cache records: built by :func:`normcore.program.programs_for`."""

    cdef readonly Program forward, backward, backward_dh
    cdef readonly object mode, route, dtype, param_dtype, count, counts, be
    cdef readonly bint has_weight, has_bias, stats_grad, small, residual
    cdef readonly Py_ssize_t size
    cdef readonly int mean_reg, rstd_reg
    cdef object __weakref__

    def __init__(self, be, mode, route, dtype, param_dtype, count, counts, has_weight, has_bias, size, small,
                 forward, backward, backward_dh, mean_reg=R_MEAN, rstd_reg=R_RSTD):
        self.be, self.mode, self.route, self.dtype, self.param_dtype = be, mode, route, dtype, param_dtype
        self.count, self.counts, self.has_weight, self.has_bias = count, counts, has_weight, has_bias
        self.stats_grad = route.stats_grad
        self.residual = route.residual is not None
        self.size, self.small = size, small
        self.forward, self.backward, self.backward_dh = forward, backward, backward_dh
        self.mean_reg, self.rstd_reg = mean_reg, rstd_reg

    cdef object threads(self):
        return 1 if self.small else self.be.threads_for(self.size)


cdef class NormCache:
    """What backward needs from one forward call: plan, canonical x, mean and 1/std.

    When x is already C-contiguous in the canonical layout the cache holds x itself, not a
    copy (as autograd frameworks save their inputs): changing x in place between forward
    and backward changes the gradients.
    """

    cdef public object mode, plan
    cdef public object x3          # the input in the canonical layout, plan.kernel_shape
    cdef public object dtype
    cdef public object mean        # (C,) float64 mean used to normalize (0 when not centred)
    cdef public object rstd        # (C,) float64 1 / sqrt(var + eps)
    cdef public object weight      # (P,) weight in its own dtype, or None
    cdef public bint has_weight, has_bias
    # dweight and dbias have the parameters' dtype (x's, or float32 beside a half x)
    cdef public object param_dtype
    cdef public bint stats_grad    # gradients flow through batch statistics
    # elements per group as synchronized ranks agree on them (with a mask: all counted ones)
    cdef public object count
    cdef public object comm        # communicator the statistics were synchronized over
    cdef public object backend     # where x3 and the statistics live
    # (x shape, parameter shape) the caller sees when a form presented the mode's arrays
    # under other shapes (layer norm over k axes: the mode over their product)
    cdef public object view
    # mask=: the mask as the kernels read it (masking.MaskRows), or None
    cdef public object mask
    # (C,) float64 elements of each group behind the statistics (all ranks; where they were
    # masked, the counted ones): what the dx terms divide by
    cdef public object counts
    # the caller's mask (broadcasting to plan.shape) whenever one was given, training or
    # eval: its False positions are not data, and backward leaves them out entirely
    cdef public object not_data
    cdef public object route       # the forward's route: which backward runs
    cdef public object programs    # the signature's Programs when a program ran it, else None

    def __init__(self, mode, plan, x3, dtype, mean, rstd, weight, has_bias, stats_grad, count, comm=None,
                 backend=None, param_dtype=None, route=None):
        if backend is None:
            from .backend import CPU
            backend = CPU
        self.mode, self.plan, self.x3, self.dtype = mode, plan, x3, dtype
        self.mean, self.rstd, self.weight = mean, rstd, weight
        self.has_weight = weight is not None
        self.has_bias = has_bias
        self.param_dtype = dtype if param_dtype is None else param_dtype
        self.stats_grad, self.count, self.comm, self.backend, self.route = stats_grad, count, comm, backend, route

    @property
    def shape(self):
        """Shape of the forward input, and of dy and dx."""
        return self.plan.shape if self.view is None else self.view[0]

    @property
    def saved_mean(self):
        """Per-group mean used by forward, shaped like the statistics axes (float64).

        >>> import numpy as np, normcore
        >>> _, cache = normcore.normalize(np.arange(6, dtype=np.float32).reshape(2, 3), "layer_norm")
        >>> cache.saved_mean.tolist()
        [1.0, 4.0]
        """
        return self.mean.reshape(self.plan.stat_shape)

    @property
    def saved_rstd(self):
        """Per-group inverse standard deviation used by forward (float64), shaped like
        :attr:`saved_mean`."""
        return self.rstd.reshape(self.plan.stat_shape)

    def __reduce__(self):
        # a copy runs its backward on the Python path: programs stay with their process
        state = (self.x3, self.mean, self.rstd, self.weight, self.has_weight, self.has_bias,
                 self.view, self.mask, self.counts, self.not_data)
        return _rebuild_cache, ((self.mode, self.plan, self.dtype, self.param_dtype, self.stats_grad,
                                 self.count, self.comm, self.backend, self.route), state)


def _rebuild_cache(fixed, state):
    cdef NormCache c = NormCache.__new__(NormCache)
    c.mode, c.plan, c.dtype, c.param_dtype, c.stats_grad, c.count, c.comm, c.backend, c.route = fixed
    (c.x3, c.mean, c.rstd, c.weight, c.has_weight, c.has_bias, c.view, c.mask, c.counts,
     c.not_data) = state
    return c


# -- running a signature's programs --------------------------------------------------------

cdef tuple _forward(Programs ps, plan, x, w, b, rm, rv, double eps, double momentum, double keep, bint unbiased,
                    out, residual, h_out):
    """(y, h, cache) of the forward program (x, residual in the plan's shape,
    C-contiguous; h None without a residual)."""
    cdef Program p = ps.forward
    cdef list regs = [None] * p.nregs
    regs[R_X], regs[R_W], regs[R_B], regs[R_RM], regs[R_RV] = x, w, b, rm, rv
    regs[R_EPS], regs[R_MOMENTUM], regs[R_KEEP] = eps, momentum, keep
    regs[R_UNBIASED] = unbiased
    regs[R_THREADS] = ps.threads()
    regs[R_OUT], regs[R_RESIDUAL], regs[R_H] = out, residual, h_out
    p.run(regs)
    cdef NormCache c = NormCache.__new__(NormCache)
    c.mode, c.plan, c.x3, c.dtype = ps.mode, plan, regs[R_X3], ps.dtype
    c.mean, c.rstd, c.weight = regs[ps.mean_reg], regs[ps.rstd_reg], w
    c.has_weight, c.has_bias, c.param_dtype, c.stats_grad = ps.has_weight, ps.has_bias, ps.param_dtype, ps.stats_grad
    c.count, c.counts, c.backend, c.route, c.programs = ps.count, ps.counts, ps.be, ps.route, ps
    return regs[R_OUT], regs[R_H], c


def run_forward(Programs ps, plan, x, w, b, rm, rv, double eps, double momentum, double keep, bint unbiased,
                out=None, residual=None, h_out=None):
    """``(y, cache)`` of one call by its signature's programs, ``(y, h, cache)`` for a
    signature with a residual: x, residual (the plan's shape), out and h_out C-contiguous
    numpy arrays, w, b, rm, rv 1-D and C-contiguous (or None), every rule already
    checked."""
    got = _forward(ps, plan, x, w, b, rm, rv, eps, momentum, keep, unbiased, out, residual, h_out)
    return got if ps.residual else (got[0], got[2])


cdef tuple _backward(NormCache cache, dy, dh, out):
    """(dx, dweight, dbias) of the backward program, dy / dh / dx in the plan's shape,
    dweight / dbias (P,) float64 or None."""
    cdef Programs ps = cache.programs
    cdef Program p = ps.backward if dh is None else ps.backward_dh
    cdef list regs = [None] * p.nregs
    regs[R_DY], regs[R_DH], regs[R_X3] = dy, dh, cache.x3
    regs[R_W], regs[R_MEAN], regs[R_RSTD] = cache.weight, cache.mean, cache.rstd
    regs[R_THREADS] = ps.threads()
    regs[R_OUT] = out
    p.run(regs)
    return regs[R_OUT], regs[R_DW], regs[R_DB]


def run_backward(NormCache cache, dy, dh=None, out=None):
    """``(dx, dweight, dbias)`` of a cache its signature's programs made (``cache.programs``,
    with a backward for ``dh``): dy, dh and out C-contiguous numpy arrays of the plan's
    shape, checked; dweight / dbias (P,) float64, or None."""
    return _backward(cache, dy, dh, out)


# -- a layer's warm call ---------------------------------------------------------------------

cdef inline bint _is_array(a, cnp.PyArray_Descr* descr, int nd, cnp.npy_intp* dims):
    """``a`` is an ndarray (not a subclass) of dtype ``descr``, C-contiguous, shape ``dims``."""
    cdef cnp.ndarray arr
    cdef int i
    if type(a) is not _ndarray:
        return False
    arr = <cnp.ndarray>a
    if cnp.PyArray_DESCR(arr) != descr or cnp.PyArray_NDIM(arr) != nd or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        return False
    for i in range(nd):
        if cnp.PyArray_DIMS(arr)[i] != dims[i]:
            return False
    return True


cdef inline bint _overlap(a, b):
    """Whether two C-contiguous arrays (or None) share a byte."""
    if a is None or b is None:
        return False
    cdef char* p = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char* q = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    return p < q + cnp.PyArray_NBYTES(<cnp.ndarray>b) and q < p + cnp.PyArray_NBYTES(<cnp.ndarray>a)


cdef inline object _flat(a):
    """A C-contiguous parameter as a 1-D view (itself when it is 1-D)."""
    cdef cnp.npy_intp n
    cdef cnp.PyArray_Dims shape
    if a is None or cnp.PyArray_NDIM(<cnp.ndarray>a) == 1:
        return a
    n = cnp.PyArray_SIZE(<cnp.ndarray>a)
    shape.ptr, shape.len = &n, 1
    return cnp.PyArray_Newshape(<cnp.ndarray>a, &shape, cnp.NPY_CORDER)


cdef object _reshaped(a, tuple to):
    return a.reshape(to)


cdef class Memo:
    """What a layer's warm call takes as settled: the Python path ran this layer on an x of
    this shape and dtype with these flags, parameters of these kinds and these eps /
    momentum / decay / unbiased objects, and the signature's programs ran it. Made by
    :func:`remember`; a call that differs in any of these takes the Python path again."""

    cdef Programs ps
    cdef object plan
    cdef object view               # (x shape, parameter shape) the caller sees, or None
    cdef tuple plan_shape
    cdef cnp.PyArray_Descr* descr
    cdef object dtype_ref          # keeps descr alive
    cdef cnp.PyArray_Descr* pdescr    # the parameters' dtype
    cdef object pdtype_ref
    cdef cnp.PyArray_Descr* rdescr    # the running statistics'
    cdef object rdtype_ref
    cdef int nd, pnd, rnd
    cdef cnp.npy_intp dims[MAX_DIMS]
    cdef cnp.npy_intp pdims[MAX_DIMS]
    cdef cnp.npy_intp rdims[MAX_DIMS]
    cdef bint training, has_w, has_b, has_running, update, cumulative, unbiased, estimate_flag
    cdef object eps_obj, momentum_obj, decay_obj, unbiased_obj, track_obj
    cdef double eps, momentum, keep
    cdef object saved_mean, saved_var  # the snapshot's arrays (written under the lock)

    def __init__(self, Programs ps, plan, view, x, training, weight, bias, running_mean, running_var, update,
                 eps_obj, momentum_obj, decay_obj, unbiased_obj, track_obj, double eps, momentum, keep):
        cdef int i
        self.ps, self.plan, self.view = ps, plan, view
        self.plan_shape = tuple(plan.shape)
        dt = x.dtype
        self.dtype_ref, self.descr = dt, <cnp.PyArray_Descr*>dt
        self.nd = x.ndim
        for i in range(self.nd):
            self.dims[i] = x.shape[i]
        given = weight if weight is not None else bias
        pdt = np.dtype(ps.param_dtype) if given is None else given.dtype
        self.pdtype_ref, self.pdescr = pdt, <cnp.PyArray_Descr*>pdt
        pshape = given.shape if given is not None else ()
        self.pnd = len(pshape)
        for i in range(self.pnd):
            self.pdims[i] = pshape[i]
        self.has_w, self.has_b = weight is not None, bias is not None
        self.has_running = running_mean is not None
        rshape = running_mean.shape if running_mean is not None else ()
        rdt = pdt if running_mean is None else running_mean.dtype
        self.rdtype_ref, self.rdescr = rdt, <cnp.PyArray_Descr*>rdt
        self.rnd = len(rshape)
        for i in range(self.rnd):
            self.rdims[i] = rshape[i]
        self.training, self.update = training, update
        self.eps_obj, self.momentum_obj, self.decay_obj = eps_obj, momentum_obj, decay_obj
        self.unbiased_obj, self.track_obj = unbiased_obj, track_obj
        self.unbiased = bool(unbiased_obj)
        self.eps = eps
        self.cumulative = momentum is None
        self.momentum = 0.0 if momentum is None else momentum
        self.keep = 0.0 if keep is None else keep
        if update:
            self.saved_mean = np.empty_like(running_mean)
            self.saved_var = np.empty_like(running_var)


cdef inline bint _param_ok(Memo m, a, bint has):
    if a is None:
        return not has
    return has and _is_array(a, m.pdescr, m.pnd, m.pdims)


cdef inline bint _running_ok(Memo m, a):
    if a is None:
        return not m.has_running
    if not (m.has_running and _is_array(a, m.rdescr, m.rnd, m.rdims)):
        return False
    return not m.update or cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a)


def remember(layer, bint residual, Programs ps, plan, view, x, training, weight, bias, running_mean, running_var,
             update, eps_obj, momentum_obj, decay_obj, unbiased_obj, track_obj, eps, momentum, keep):
    """Keep on ``layer`` the memo its next warm calls check against (see :class:`Memo`),
    one for forward and one for forward_add (``residual``): called by the layer's Python
    path after a call its signature's programs ran."""
    layer.__dict__[_MEMO[residual]] = Memo(ps, plan, view, x, training, weight, bias, running_mean, running_var,
                                            update, eps_obj, momentum_obj, decay_obj, unbiased_obj, track_obj,
                                            eps, momentum, keep)


_MEMO = ("_steady", "_steady_add")


def forget(layer, bint residual):
    """Drop ``layer``'s memo for forward or forward_add (its next such call takes the
    Python path)."""
    layer.__dict__.pop(_MEMO[residual], None)


def layer_forward(layer, x, residual=None):
    """A layer's forward of ``x`` (no mask), or with ``residual`` its forward_add, when its
    memo covers the call: y (or (y, h)), with the cache kept for this thread's backward,
    the running statistics and ``num_batches_tracked`` updated as the Python path does
    (under the layer's lock, put back if anything interrupts it); ``None`` otherwise,
    having changed nothing."""
    cdef dict d = layer.__dict__
    memo = d.get(_MEMO[residual is not None])
    if memo is None:
        return None
    cdef Memo m = <Memo>memo
    if not _is_array(x, m.descr, m.nd, m.dims):
        return None
    if residual is not None and not _is_array(residual, m.descr, m.nd, m.dims):
        return None
    if (d.get("training") is True) != m.training:
        return None
    w, b = d.get("weight"), d.get("bias")
    rm, rv = d.get("running_mean"), d.get("running_var")
    if not (_param_ok(m, w, m.has_w) and _param_ok(m, b, m.has_b) and _running_ok(m, rm) and _running_ok(m, rv)):
        return None
    if d.get("eps") is not m.eps_obj or d.get("momentum") is not m.momentum_obj or \
            d.get("decay") is not m.decay_obj or d.get("unbiased") is not m.unbiased_obj or \
            d.get("track_running_stats") is not m.track_obj or layer.reuse_buffers:
        return None
    if m.update and (_overlap(rm, rv) or _overlap(rm, x) or _overlap(rv, x) or _overlap(rm, w) or _overlap(rv, w)
                     or _overlap(rm, b) or _overlap(rv, b) or _overlap(rm, residual) or _overlap(rv, residual)):
        return None  # the Python path names the overlap
    xv, rv_ = x, residual
    if m.view is not None:
        xv = _reshaped(x, m.plan_shape)
        if residual is not None:
            rv_ = _reshaped(residual, m.plan_shape)
    wf, bf = _flat(w), _flat(b)
    cdef tuple got
    cdef NormCache c
    tls = d["_tls"]
    if not m.update:
        got = _forward(m.ps, m.plan, xv, wf, bf, rm, rv, m.eps, m.momentum, m.keep, m.unbiased, None, rv_, None)
    else:
        lock = d["_lock"]
        lock.acquire()
        try:
            nbt = d["num_batches_tracked"]
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>m.saved_mean), cnp.PyArray_DATA(<cnp.ndarray>rm),
                   cnp.PyArray_NBYTES(<cnp.ndarray>rm))
            memcpy(cnp.PyArray_DATA(<cnp.ndarray>m.saved_var), cnp.PyArray_DATA(<cnp.ndarray>rv),
                   cnp.PyArray_NBYTES(<cnp.ndarray>rv))
            try:
                if m.cumulative:  # as the Python path: 1 / (num_batches_tracked + 1), keep = 1 - it
                    momentum = 1.0 / (nbt + 1)
                    got = _forward(m.ps, m.plan, xv, wf, bf, rm, rv, m.eps, momentum, 1.0 - momentum, m.unbiased,
                                   None, rv_, None)
                else:
                    got = _forward(m.ps, m.plan, xv, wf, bf, rm, rv, m.eps, m.momentum, m.keep, m.unbiased, None,
                                   rv_, None)
                layer.num_batches_tracked = nbt + 1
            except BaseException:
                memcpy(cnp.PyArray_DATA(<cnp.ndarray>rm), cnp.PyArray_DATA(<cnp.ndarray>m.saved_mean),
                       cnp.PyArray_NBYTES(<cnp.ndarray>rm))
                memcpy(cnp.PyArray_DATA(<cnp.ndarray>rv), cnp.PyArray_DATA(<cnp.ndarray>m.saved_var),
                       cnp.PyArray_NBYTES(<cnp.ndarray>rv))
                layer.num_batches_tracked = nbt
                raise
        finally:
            lock.release()
    c = <NormCache>got[2]
    y, h = got[0], got[1]
    if m.view is not None:
        c.view = m.view
        y = _reshaped(y, m.view[0])
        if h is not None:
            h = _reshaped(h, m.view[0])
    tls.cache = c
    tls.consumed = False
    return y if residual is None else (y, h)


cdef inline bint _grad_ok(g, cnp.PyArray_Descr* descr, shape):
    """A gradient accumulator ``+=`` takes as the Python path does: an ndarray of the
    parameters' dtype and shape, C-contiguous and writeable."""
    if type(g) is not _ndarray:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>g
    return (cnp.PyArray_DESCR(a) == descr and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISWRITEABLE(a)
            and g.shape == shape)


cdef void _accumulate(g, d) noexcept:
    """g += d in g's dtype (float32 or float64), d (n,) float64: d rounded to g's dtype
    first, then added, as ``g += d.astype(g.dtype)``."""
    cdef Py_ssize_t i, n = cnp.PyArray_SIZE(<cnp.ndarray>g)
    cdef double* src = <double*>cnp.PyArray_DATA(<cnp.ndarray>d)
    cdef float* f
    cdef double* e
    if cnp.PyArray_TYPE(<cnp.ndarray>g) == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(<cnp.ndarray>g)
        for i in range(n):
            f[i] = f[i] + <float>src[i]
    else:
        e = <double*>cnp.PyArray_DATA(<cnp.ndarray>g)
        for i in range(n):
            e[i] = e[i] + src[i]


def layer_backward(layer, dy, dh, bint retain_graph):
    """A layer's backward (dy, and dh or None) for a forward its memo ran: dx, with the
    parameter gradients added to grad_weight / grad_bias and the cache consumed as the
    Python path does (one step under the layer's lock); ``None`` otherwise, having changed
    nothing."""
    cdef dict d = layer.__dict__
    tls = d.get("_tls")
    if tls is None:
        return None
    cache = tls.cache
    if type(cache) is not NormCache:
        return None
    cdef NormCache c = <NormCache>cache
    if c.programs is None or layer.reuse_buffers:
        return None
    cdef Programs ps = <Programs>c.programs
    if dh is not None and ps.backward_dh is None:
        return None
    cdef cnp.PyArray_Descr* descr = <cnp.PyArray_Descr*>ps.dtype
    shape = c.plan.shape if c.view is None else c.view[0]
    if type(dy) is not _ndarray or cnp.PyArray_DESCR(<cnp.ndarray>dy) != descr or \
            not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>dy) or dy.shape != shape:
        return None
    if dh is not None and (type(dh) is not _ndarray or cnp.PyArray_DESCR(<cnp.ndarray>dh) != descr or
                           not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>dh) or dh.shape != shape):
        return None
    gw, gb = d.get("grad_weight"), d.get("grad_bias")
    cdef cnp.dtype pdt = c.param_dtype
    cdef cnp.PyArray_Descr* pdescr = <cnp.PyArray_Descr*>pdt
    if pdt.type_num != cnp.NPY_FLOAT32 and pdt.type_num != cnp.NPY_FLOAT64:
        return None
    pshape = c.plan.param_shape if c.view is None else c.view[1]
    if c.has_weight and not _grad_ok(gw, pdescr, pshape) or c.has_bias and not _grad_ok(gb, pdescr, pshape):
        return None
    if c.view is not None:
        dy = _reshaped(dy, c.plan.shape)
        if dh is not None:
            dh = _reshaped(dh, c.plan.shape)
    dx, dw, db = _backward(c, dy, dh, None)
    lock = d["_lock"]
    lock.acquire()
    try:
        if c.has_weight:
            _accumulate(gw, dw)
        if c.has_bias:
            _accumulate(gb, db)
        if not retain_graph and tls.cache is c:
            tls.cache = None
            tls.consumed = True
    finally:
        lock.release()
    return dx if c.view is None else _reshaped(dx, c.view[0])
