"""The demo's table, JSON and learning-curve plot."""
from __future__ import annotations

import json
import math

__all__ = ["table", "write_json", "plot"]


def table(results, base_lr):
    """Markdown table: variant x learning rate -> accuracy, epochs to target, divergence, time."""
    from .train import TARGET_ACCURACY
    head = (f"| variant | learning rate | final test accuracy | epochs to {TARGET_ACCURACY:.0%} "
            f"| diverged | outcome | seconds |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        scale = "base" if r.lr == base_lr else f"{r.lr / base_lr:g}x base"
        acc = "-" if r.diverged and not math.isfinite(r.loss[-1]) else f"{r.final_accuracy:.3f}"
        reach = "-" if r.epochs_to_target is None else str(r.epochs_to_target)
        div = f"yes (epoch {r.diverged_epoch})" if r.diverged else "no"
        lines.append(f"| {r.variant} | {r.lr:g} ({scale}) | {acc} | {reach} | {div} | {outcome(r)} "
                     f"| {r.seconds:.1f} |")
    return "\n".join(lines)


def outcome(r):
    """diverged / stuck at chance (10 classes) / reached the target / below the target."""
    from .train import TARGET_ACCURACY
    if r.diverged:
        return "diverged"
    if r.final_accuracy <= CHANCE + 0.1:
        return "stuck near chance"
    return "trained" if r.final_accuracy >= TARGET_ACCURACY else "unstable, below target"


CHANCE = 0.1  # ten balanced classes


def write_json(path, results, extra):
    with open(path, "w") as f:
        json.dump({"runs": [r.to_json() for r in results], **extra}, f, indent=1)


def plot(path, results, base_lr):
    """Training loss (log scale) and test accuracy per epoch; diverged runs end in a black x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r.variant for r in results))
    colors = {v: plt.get_cmap("tab10")(i) for i, v in enumerate(variants)}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 5.5))
    for r in results:
        style = "-" if r.lr == base_lr else "--"
        label = f"{r.variant}, lr {r.lr:g}" + (" (diverged)" if r.diverged else "")
        epochs = list(range(1, len(r.loss) + 1))
        finite = [(e, v) for e, v in zip(epochs, r.loss) if math.isfinite(v) and v > 0]
        if finite:
            ax_loss.plot(*zip(*finite), style, color=colors[r.variant], label=label)
        ax_acc.plot(epochs, r.test_accuracy, style, color=colors[r.variant], label=label)
        if r.diverged:
            last = finite[-1] if finite else (r.diverged_epoch, 1.0)
            ax_loss.plot([last[0]], [last[1]], "x", color="black", markersize=11, markeredgewidth=2.5)
            ax_acc.plot([r.diverged_epoch], [r.test_accuracy[-1]], "x", color="black", markersize=11,
                        markeredgewidth=2.5)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (cross-entropy, log scale)")
    ax_loss.set_title("Training loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0, 1)
    from .train import TARGET_ACCURACY
    ax_acc.axhline(TARGET_ACCURACY, color="gray", linestyle=":", linewidth=1)
    ax_acc.axhline(CHANCE, color="gray", linestyle=":", linewidth=1)
    ax_acc.text(1, TARGET_ACCURACY + 0.01, f"{TARGET_ACCURACY:.0%} target", color="gray", fontsize=8)
    ax_acc.text(1, CHANCE + 0.01, "chance", color="gray", fontsize=8)
    ax_acc.set_title("Test accuracy on held-out digits")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    handles, labels = ax_acc.get_legend_handles_labels()
    title = f"solid: lr {base_lr:g}, dashed: 100x"
    if any(r.diverged for r in results):  # the marker is explained only where it is drawn
        title += ";\nblack x: diverged"
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=8,
               title=title, title_fontsize=8)
    fig.suptitle("normcore demo: networks trained in NumPy on scikit-learn's digits")
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
