"""The layers' NumPy-style docstrings, assembled from one text per parameter and attribute.

Thirteen layers share most of their arguments (``eps``, ``momentum``, ``dtype``, ...);
each argument is explained once here and every layer that takes it shows the same words,
so the conventions cannot drift apart between layers. :func:`document` completes a class's
docstring with its Parameters and Attributes sections.
"""
from __future__ import annotations

import inspect
import textwrap

__all__ = ["document"]

PARAMETERS = {
    "num_features": ("int", "C, the number of channels of the input (its axis ``channel_axis``)."),
    "channels": ("int", "C, the number of channels of the input (axis 1)."),
    "num_groups": ("int", "G, the number of groups the channels are split into; must divide C."),
    "normalized_shape": ("int or tuple of int",
                         "The trailing axes normalized together (e.g. ``768`` or ``(28, 28)``); "
                         "the input's shape must end with it."),
    "eps": ("float, default 1e-5", "Added to the variance before its square root; must be > 0."),
    "eps_rms": ("float or None, default None",
                "Added to the mean square before its square root; None uses the machine "
                "epsilon of ``dtype`` (as torch does)."),
    "momentum": ("float or None, default 0.1",
                 "PyTorch's convention: ``running = (1 - momentum) * running + momentum * batch``. "
                 "A decay-style value d (Keras, Flax, TF: 0.99) is ``momentum = 1 - d``, or pass ``decay=d``. None: the "
                 "cumulative average of all batches seen (``1 / (num_batches_tracked + 1)``)."),
    "decay": ("float or None, default None",
              "The other convention (TF, Keras, Flax, ONNX): ``running = decay * running + (1 - decay) "
              "* batch``, so ``decay=0.99`` is ``momentum=0.01``; give one of the two (both: "
              "ValueError). The layer's ``momentum`` then reads ``1 - decay``; the update uses decay "
              "itself."),
    "affine": ("bool, default True", "Learn a per-channel scale ``weight`` (ones) and shift ``bias`` (zeros)."),
    "affine_off": ("bool, default False", "Learn a per-channel scale ``weight`` and shift ``bias``."),
    "affine_group": ("bool, default True", "Learn a per-group scale ``weight`` and shift ``bias``, shape (G,)."),
    "elementwise_affine": ("bool, default True", "Learn a ``weight`` of shape ``normalized_shape``."),
    "ln_bias": ("bool, default True", "With ``elementwise_affine``, learn a ``bias`` as well."),
    "bias": ("bool, default True (keyword only)",
             "With ``affine``, learn the shift ``bias`` as well; False: a scale alone (no ``bias``, no "
             "``grad_bias``, no ``\"bias\"`` entry in ``state_dict``), as torch's ``bias=False``."),
    "track_running_stats": ("bool, default True",
                            "Keep ``running_mean`` / ``running_var``, updated in training and used "
                            "in eval. False: batch statistics in eval too."),
    "track_running_stats_off": ("bool, default False",
                                "Keep per-channel ``running_mean`` / ``running_var`` (the batch "
                                "average of the per-instance statistics) and use them in eval."),
    "channel_axis": ("{{1, -1}}, default 1",
                     "1: channels first, (N, C, *). -1: channels last, (N, *, C) (NHWC)."),
    "dtype": ("numpy dtype, default float32",
              "The only input dtype accepted: float32, float64, float16 or bfloat16 "
              "(``ml_dtypes.bfloat16``). Another input dtype is a TypeError: nothing is cast "
              "silently."),
    "param_dtype": ("numpy dtype or None, default None",
                    "Dtype of the parameters, their gradients and the running statistics: "
                    "``dtype``, or float32 beside a float16 / bfloat16 ``dtype`` (mixed "
                    "precision, as PyTorch's CPU kernels keep them). None: float32 for the "
                    "half dtypes, ``dtype`` otherwise."),
    "unbiased": ("bool, default True",
                 "``running_var`` receives the unbiased batch variance n/(n-1) (PyTorch); False "
                 "stores the biased one (Flax, Keras, CS231n). The output always uses the biased one."),
    "comm": ("mpi4py communicator or None, default None",
             "The ranks the batch is split across; None: ``MPI.COMM_WORLD`` (mpi4py imported on first use)."),
    "estimate": ("bool, default True",
                 "The batch-norm step is :class:`EstimatedBatchNorm` (normalizes with the updated "
                 "running statistics); False: an ordinary batch norm."),
}

ATTRIBUTES = {
    "weight": ("ndarray of shape {p} or None", "The scale (ones at construction); None without affine."),
    "bias": ("ndarray of shape {p} or None", "The shift (zeros at construction); None without it."),
    "grad_weight": ("ndarray like weight, or None",
                    "dL/dweight, summed with ``+=`` over backward calls until :meth:`zero_grad`."),
    "grad_bias": ("ndarray like bias, or None", "dL/dbias, accumulated like ``grad_weight``."),
    "running_mean": ("ndarray of shape {r} or None", "Running mean (zeros at construction); None when not tracked."),
    "running_var": ("ndarray of shape {r} or None", "Running variance (ones at construction)."),
    "num_batches_tracked": ("int or None", "Training batches seen (None when not tracked)."),
    "training": ("bool", "True after :meth:`train` (the default), False after :meth:`eval`."),
    "reuse_buffers": ("bool, default False",
                      "True: forward and backward write into arrays the layer keeps while the input "
                      "shape repeats (no allocation per call; each call overwrites the last result)."),
    "batch_norm": ("EstimatedBatchNorm or batch norm layer", "The first step; state keys ``batch_norm.*``."),
    "channel_norm": ("ChannelNorm", "The second step; state keys ``channel_norm.*``."),
}

# Paragraphs several layers share, named by ``document(notes=...)``.
NOTES = {
    "batch_statistics": (
        "In training (``layer.train()``, the default) the output uses each channel's batch mean "
        "and biased batch variance, and ``running_mean`` / ``running_var`` are updated (see "
        "``momentum`` and ``unbiased``); training needs more than one value per channel. In eval "
        "(``layer.eval()``) the output uses the running statistics; a layer built with "
        "``track_running_stats=False`` has none and uses the batch statistics in eval too, as "
        "torch's layers do (``normcore.normalize(..., training=False)`` without running "
        "statistics does the same, where ``torch.nn.functional.batch_norm`` raises)."),
}

COMMON_NOTES = (
    "``layer(x)`` is ``layer.forward(x)``: it returns y (x's shape and dtype) and keeps what "
    "``layer.backward(dy)`` needs; backward returns dx and adds the parameter gradients into "
    "``grad_weight`` / ``grad_bias``. ``y, h = layer.forward_add(x, residual)`` normalizes "
    "``h = x + residual`` (:func:`normcore.add_normalize`), and ``layer.backward(dy, dh=dh)`` "
    "then returns the gradient with respect to h. ``layer(x, mask=m)`` (a boolean array "
    "broadcasting to x) takes the statistics over the elements where m is True only, and "
    "backward uses the same mask (:func:`normcore.normalize`). ``state_dict()`` / ``load_state_dict()`` and "
    "``save(path)`` / ``load(path)`` (``.npz``) hold the parameters and running statistics; "
    "``.cuda()`` / ``.cpu()`` move them (CuPy inputs then).")


def _entries(names, table, fmt):
    lines = []
    for name in names:
        key, _, shown = name.partition("=")
        shown = shown or key
        kind, text = table[key]
        lines.append(f"{shown} : {kind.format(**fmt)}")
        lines.append(textwrap.fill(text.format(**fmt), 88, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False, break_long_words=False))
    return "\n".join(lines)


def _paragraph(text):
    return textwrap.fill(text, 88, break_on_hyphens=False, break_long_words=False)


def document(*, params, attributes, notes=(), param_shape="(C,)", running_shape="(C,)"):
    """Class decorator: insert Parameters and Attributes sections, from the shared texts,
    before the Examples section of the class docstring (which holds the summary, what is
    particular to the layer, and a forward + backward example).

    ``params`` / ``attributes`` name entries of :data:`PARAMETERS` / :data:`ATTRIBUTES`;
    ``"key=shown"`` shows an entry under another name; ``notes`` name paragraphs of
    :data:`NOTES`, placed after the class's own text. The ``__init__`` gets a docstring
    pointing to the class's, instead of Python's generic one.
    """
    fmt = {"p": param_shape, "r": running_shape}

    def decorate(cls):
        doc = inspect.cleandoc(cls.__doc__)
        head, marker, example = doc.partition("\nExamples\n--------\n")
        if not marker:
            raise ValueError(f"{cls.__name__}: the docstring needs an Examples section")
        shared = "\n\n".join(_paragraph(text) for text in [NOTES[n] for n in notes] + [COMMON_NOTES])
        cls.__doc__ = (f"{head.rstrip()}\n\n{shared}\n\n"
                       f"Parameters\n----------\n{_entries(params, PARAMETERS, fmt)}\n\n"
                       f"Attributes\n----------\n{_entries(attributes, ATTRIBUTES, fmt)}\n\n"
                       f"Examples\n--------\n{example.strip()}\n")
        init = cls.__dict__.get("__init__")
        if init is not None:
            init.__doc__ = f"Build a {cls.__name__}; the parameters are described in ``help({cls.__name__})``."
        elif cls.__init__.__doc__ is None:  # inherited from a private base of several layers
            cls.__init__.__doc__ = "Build the layer; the parameters are described in the class docstring."
        return cls
    return decorate
