"""Evaluate a saved demo network in this (fresh) process.

    python -m normcore.demo.checkpoint VARIANT MODEL.npz SEED LOGITS_OUT.npy

Rebuilds ``VARIANT``, loads its parameters and running statistics, evaluates the test
split of ``SEED`` in eval mode, writes the logits and prints ``{"accuracy": ...}``.
"""
import json
import sys

import numpy as np

from .data import load_digits_split
from .nets import build
from .train import evaluate


def main(argv=None):
    variant, model_path, seed, logits_path = (argv or sys.argv[1:])
    _, _, x_test, y_test = load_digits_split(int(seed))
    net = build(variant, dtype=x_test.dtype).load(model_path)
    accuracy, logits = evaluate(net, variant, x_test, y_test)
    np.save(logits_path, logits)
    print(json.dumps({"accuracy": accuracy}))


if __name__ == "__main__":
    main()
