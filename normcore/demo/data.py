"""The handwritten digits shipped inside scikit-learn (1,797 8x8 images, 10 classes)."""
from __future__ import annotations

import numpy as np

__all__ = ["load_digits_split"]


def load_digits_split(seed=0, test_fraction=0.3, dtype=np.float32):
    """Return ``(x_train, y_train, x_test, y_test)``: pixels scaled to [0, 1], shape (n, 64).

    The split is stratified and fixed by ``seed``, so another process gets the same one.

    >>> x_train, y_train, x_test, y_test = load_digits_split()
    >>> x_train.shape, x_test.shape
    ((1257, 64), (540, 64))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # the demo extra
        raise ImportError('the demo needs scikit-learn: pip install "normcore[demo]"') from None
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target)
    return x_train, y_train, x_test, y_test
