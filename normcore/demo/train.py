"""One training run: mini-batches, forward, softmax cross-entropy, backward, optimizer step."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .nets import build, softmax_cross_entropy
from .optim import SGD, Adam

__all__ = ["RunResult", "train", "evaluate", "inputs_for", "TARGET_ACCURACY", "DIVERGED_LOSS"]

TARGET_ACCURACY = 0.90
# Cross-entropy starts near log(10) = 2.3; a loss this large (or NaN / inf) is divergence.
DIVERGED_LOSS = 1e3


@dataclass
class RunResult:
    variant: str
    lr: float
    epochs: int
    seed: int = 0
    loss: list = field(default_factory=list)          # mean training loss per epoch
    test_accuracy: list = field(default_factory=list)  # test accuracy after each epoch
    diverged_epoch: int | None = None                 # 1-based epoch where it diverged
    seconds: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_epoch is not None

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else float("nan")

    @property
    def epochs_to_target(self) -> int | None:
        for i, acc in enumerate(self.test_accuracy):
            if acc >= TARGET_ACCURACY:
                return i + 1
        return None

    def to_json(self) -> dict:
        out = asdict(self)
        from .report import outcome
        out.update(diverged=self.diverged, final_accuracy=self.final_accuracy,
                   epochs_to_target=self.epochs_to_target, outcome=outcome(self))
        # JSON has no NaN: a diverged loss is recorded as null
        out["loss"] = [v if math.isfinite(v) else None for v in self.loss]
        return out


def inputs_for(variant, x):
    """(n, 64) pixels as the network wants them: flat for MLPs, (n, 1, 8, 8) for CNNs."""
    return x.reshape(-1, 1, 8, 8) if variant.startswith("cnn") else x


def evaluate(net, variant, x, y):
    """Test accuracy and logits in eval mode (running statistics); the net is left in eval."""
    net.eval()
    logits = net.forward(inputs_for(variant, x))
    return float((logits.argmax(axis=1) == y).mean()), logits


def train(variant, lr, data, *, epochs, seed=0, batch_size=64, optimizer="sgd", progress=None):
    """Train a fresh ``variant`` on ``data`` = (x_train, y_train, x_test, y_test).

    Returns ``(result, net)``. A NaN, infinite or exploding loss stops the run and is
    recorded as divergence (``result.diverged_epoch``), not raised.
    """
    x_train, y_train, x_test, y_test = data
    net = build(variant, seed=seed, dtype=x_train.dtype)
    params = net.named_parameters()
    opt = SGD(params, lr) if optimizer == "sgd" else Adam(params, lr)
    rng = np.random.default_rng(seed + 1)
    result = RunResult(variant, lr, epochs, seed)
    start = time.perf_counter()
    with np.errstate(all="ignore"):  # overflow on the way to divergence is what we measure
        for epoch in range(1, epochs + 1):
            net.train()
            order = rng.permutation(len(x_train))
            losses = []
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:  # batch statistics need two samples
                    continue
                loss, dlogits = softmax_cross_entropy(net.forward(inputs_for(variant, x_train[idx])), y_train[idx])
                losses.append(loss)
                if not math.isfinite(loss) or loss > DIVERGED_LOSS:
                    break
                net.zero_grad()
                net.backward(dlogits)
                opt.step()
            epoch_loss = float(np.mean(losses))
            result.loss.append(epoch_loss)
            accuracy, _ = evaluate(net, variant, x_test, y_test)
            result.test_accuracy.append(accuracy)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{epoch_loss:.3g}", test_acc=f"{accuracy:.3f}")
            if not math.isfinite(epoch_loss) or max(losses) > DIVERGED_LOSS \
                    or not all(np.isfinite(p).all() for _, p, _ in params):
                result.diverged_epoch = epoch
                break
    result.seconds = time.perf_counter() - start
    return result, net
