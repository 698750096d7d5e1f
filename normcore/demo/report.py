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
    """One panel per network (small multiples): test accuracy per epoch at the base rate and
    at 100 times it, each curve labelled at its end, a black x where a run diverged; the
    training loss of both runs below it on a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .train import TARGET_ACCURACY
    variants = list(dict.fromkeys(r.variant for r in results))
    cols = min(4, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.6 * cols, 5.0 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.6] * rows})
    colors = {"base": "tab:blue", "high": "tab:orange"}
    diverged_any = False
    for i, variant in enumerate(variants):
        ax_acc, ax_loss = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        for r in (r for r in results if r.variant == variant):
            key = "base" if r.lr == base_lr else "high"
            epochs = list(range(1, len(r.test_accuracy) + 1))
            ax_acc.plot(epochs, r.test_accuracy, color=colors[key], linewidth=1.8)
            ax_acc.annotate(f"lr {r.lr:g}: {r.final_accuracy:.2f}", (epochs[-1], r.test_accuracy[-1]),
                            xytext=(-4, -12 if key == "base" else 5), textcoords="offset points",
                            ha="right", fontsize=8, color=colors[key])
            finite = [(e, v) for e, v in zip(epochs, r.loss) if math.isfinite(v) and v > 0]
            if finite:
                ax_loss.plot(*zip(*finite), color=colors[key], linewidth=1.4)
            if r.diverged:
                diverged_any = True
                ax_acc.plot([r.diverged_epoch], [r.test_accuracy[-1]], "x", color="black", markersize=10,
                            markeredgewidth=2.5)
        ax_acc.set_title(variant, fontsize=11)
        ax_acc.set_ylim(0, 1.02)
        ax_acc.axhline(TARGET_ACCURACY, color="gray", linestyle=":", linewidth=1)
        ax_acc.axhline(CHANCE, color="gray", linestyle=":", linewidth=1)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("epoch")
        if i % cols == 0:
            ax_acc.set_ylabel(f"test accuracy\n(dotted: {TARGET_ACCURACY:.0%}, chance)")
            ax_loss.set_ylabel("training loss")
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    for j in range(len(variants), rows * cols):  # unused panels
        axes[2 * (j // cols), j % cols].axis("off")
        axes[2 * (j // cols) + 1, j % cols].axis("off")
    handles = [plt.Line2D([], [], color=colors["base"], label=f"lr {base_lr:g} (base)"),
               plt.Line2D([], [], color=colors["high"], label=f"lr {100 * base_lr:g} (100x)")]
    if diverged_any:  # the marker is explained only where it is drawn
        handles.append(plt.Line2D([], [], color="black", marker="x", linestyle="", label="diverged"))
    fig.legend(handles=handles, loc="upper right", fontsize=9, ncol=len(handles))
    fig.suptitle("normcore demo: networks trained in NumPy on scikit-learn's digits", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
