"""The demo's table, verdict, JSON and learning-curve plot, aggregated over seeds."""
from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["group", "table", "verdict", "write_json", "plot", "outcome"]

CHANCE = 0.1  # ten balanced classes


def outcome(r):
    """diverged / stuck at chance (10 classes) / reached the target / below the target."""
    from .train import TARGET_ACCURACY
    if r.diverged:
        return "diverged"
    if r.final_accuracy <= CHANCE + 0.1:
        return "stuck near chance"
    return "trained" if r.final_accuracy >= TARGET_ACCURACY else "below target"


def group(results):
    """``{(variant, lr): [runs over seeds]}`` in the order the runs were made."""
    groups = {}
    for r in results:
        groups.setdefault((r.variant, r.lr), []).append(r)
    return groups


def _spread(values, fmt):
    """``mean (min-max)``; the value alone for one seed or when all seeds agree."""
    lo, hi = min(values), max(values)
    mean = fmt.format(float(np.mean(values)))
    if len(values) == 1 or fmt.format(lo) == fmt.format(hi):
        return mean
    return f"{mean} ({fmt.format(lo)}-{fmt.format(hi)})"


def _outcomes(runs):
    """One outcome when every seed agrees, else each outcome with its count."""
    counts = {}
    for r in runs:
        counts[outcome(r)] = counts.get(outcome(r), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{name} {n}/{len(runs)}" for name, n in counts.items())


def _rate(lr, base_lr):
    return "base" if lr == base_lr else f"{lr / base_lr:g}x"


def table(results, base_lr):
    """Markdown table, one row per variant and rate, each figure over that row's seeds:
    final test accuracy (mean, and min-max when the seeds differ), epochs to the target
    (over the seeds that reached it), how many seeds reached it and diverged, outcome,
    seconds per run."""
    from .train import TARGET_ACCURACY
    groups = group(results)
    seeds = max(len(runs) for runs in groups.values())
    over = "" if seeds == 1 else f", mean (min-max) over {seeds} seeds"
    reached_over = "" if seeds == 1 else " (seeds that reached it)"
    head = (f"| variant | learning rate | final test accuracy{over} | epochs to {TARGET_ACCURACY:.0%}{reached_over} "
            f"| reached {TARGET_ACCURACY:.0%} | diverged | outcome | seconds |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for (variant, lr), runs in groups.items():
        n = len(runs)
        finite = [r.final_accuracy for r in runs if not (r.diverged and not math.isfinite(r.loss[-1]))]
        acc = _spread(finite, "{:.3f}") if finite else "-"
        reached = [r.epochs_to_target for r in runs if r.epochs_to_target is not None]
        reach = _spread(reached, "{:.1f}" if n > 1 else "{:.0f}") if reached else "-"
        diverged = [r.diverged_epoch for r in runs if r.diverged]
        div = f"{len(diverged)}/{n}" + (f" (epoch {', '.join(map(str, diverged))})" if diverged else "")
        seconds = float(np.mean([r.seconds for r in runs]))
        lines.append(f"| {variant} | {lr:g} ({_rate(lr, base_lr)}) | {acc} | {reach} | {len(reached)}/{n} "
                     f"| {div} | {_outcomes(runs)} | {seconds:.1f} |")
    return "\n".join(lines)


def _plain(variant):
    """The network without normalization that ``variant`` adds to (``cnn+bn`` -> ``cnn``)."""
    return variant.split("+", 1)[0]


def verdict(results, base_lr):
    """What the measured runs show, worded from them: which variants trained (every seed
    ended at or above the target) at each rate, and how many epochs the normalized
    variants took to reach the target against their plain counterpart."""
    from .train import TARGET_ACCURACY
    groups = group(results)
    rates = list(dict.fromkeys(lr for _, lr in groups))
    seeds = max(len(runs) for runs in groups.values())
    every = " on every seed" if seeds > 1 else ""
    lines = [f"Verdict ({seeds} seed{'s' if seeds > 1 else ''}, {results[0].epochs} epochs per run):"]
    for lr in rates:
        rows = {v: runs for (v, rate), runs in groups.items() if rate == lr}
        trained = [v for v, runs in rows.items() if all(outcome(r) == "trained" for r in runs)]
        failed = [f"{v} ({_outcomes(runs)})" for v, runs in rows.items() if v not in trained]
        said = f"- lr {lr:g} ({_rate(lr, base_lr)}): trained{every}: {', '.join(trained) or 'none'}."
        if failed:
            said += f" Did not: {', '.join(failed)}."
        lines.append(said)
        pairs = [(v, _plain(v)) for v in rows if _plain(v) != v and _plain(v) in rows]
        if pairs:
            lines.append(f"  Epochs to {TARGET_ACCURACY:.0%}{', mean over seeds' if seeds > 1 else ''}: "
                         + "; ".join(_reach_comparison(rows[v], v, rows[p], p) for v, p in pairs) + ".")
    return "\n".join(lines)


def _reach_comparison(runs, variant, plain_runs, plain):
    """``cnn+bn 2.0 vs cnn 4.0 (2x as fast)``, or how many seeds reached the target."""
    def epochs(runs):
        reached = [r.epochs_to_target for r in runs if r.epochs_to_target is not None]
        if len(reached) == len(runs):
            return float(np.mean(reached)), f"{np.mean(reached):.1f}"
        return None, f"reached it on {len(reached)} of {len(runs)} seeds" if len(runs) > 1 else "never reached it"

    mean, said = epochs(runs)
    plain_mean, plain_said = epochs(plain_runs)
    if not any(r.epochs_to_target for r in runs + plain_runs):
        return f"neither {variant} nor {plain} reached it"
    text = f"{variant} {said} vs {plain} {plain_said}"
    if mean is not None and plain_mean is not None:
        ratio = plain_mean / mean
        text += " (as soon)" if abs(ratio - 1) < 0.05 else (
            f" ({ratio:.2g}x sooner)" if ratio > 1 else f" ({1 / ratio:.2g}x later)")
    return text


def write_json(path, results, extra):
    with open(path, "w") as f:
        json.dump({"runs": [r.to_json() for r in results], **extra}, f, indent=1)


def _band(series):
    """Per epoch: mean, min and max over the runs still going (a diverged run stops)."""
    length = max(len(s) for s in series)
    epochs, mean, lo, hi = [], [], [], []
    for e in range(length):
        values = [s[e] for s in series if e < len(s) and math.isfinite(s[e])]
        if values:
            epochs.append(e + 1)
            mean.append(float(np.mean(values)))
            lo.append(min(values))
            hi.append(max(values))
    return epochs, mean, lo, hi


def _label_ends(ax, ends):
    """Label each curve at its end: below it (above it near chance, where the panel is
    empty), on a white box so that a line running under it does not hide it, and kept
    apart when two curves end at about the same accuracy."""
    wanted = sorted(((y - 0.08 if y > 0.3 else y + 0.08), text, color, x, y) for y, text, color, x in ends)
    placed = []
    for y_text, text, color, x, y in reversed(wanted):  # from the top down
        if placed and y_text > placed[-1] - 0.08:
            y_text = placed[-1] - 0.08
        y_text = min(max(y_text, 0.04), 0.97)
        placed.append(y_text)
        ax.annotate(text, (x, y), xytext=(x, y_text), ha="right", va="center", fontsize=8, color=color,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def plot(path, results, base_lr):
    """One panel per network (small multiples): test accuracy per epoch at the base rate and
    at 100 times it -- the mean over seeds as a line, the min-max over seeds as a band --
    each labelled at its end, a black x where a run diverged; the training loss below it on
    a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    from .train import TARGET_ACCURACY
    groups = group(results)
    variants = list(dict.fromkeys(v for v, _ in groups))
    seeds = max(len(runs) for runs in groups.values())
    cols = min(4, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.6 * cols, 5.0 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.6] * rows})
    colors = {"base": "tab:blue", "high": "tab:orange"}
    diverged_any = False
    for i, variant in enumerate(variants):
        ax_acc, ax_loss = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        ends = []
        for (v, lr), runs in groups.items():
            if v != variant:
                continue
            key = "base" if lr == base_lr else "high"
            epochs, mean, lo, hi = _band([r.test_accuracy for r in runs])
            ax_acc.plot(epochs, mean, color=colors[key], linewidth=1.8)
            if len(runs) > 1:
                ax_acc.fill_between(epochs, lo, hi, color=colors[key], alpha=0.25, linewidth=0)
            ends.append((mean[-1], f"lr {lr:g}: {mean[-1]:.2f}", colors[key], epochs[-1]))
            losses = [[v if v > 0 else math.nan for v in r.loss] for r in runs]
            epochs, mean, lo, hi = _band(losses)
            if epochs:
                ax_loss.plot(epochs, mean, color=colors[key], linewidth=1.4)
                if len(runs) > 1:
                    ax_loss.fill_between(epochs, lo, hi, color=colors[key], alpha=0.25, linewidth=0)
            for r in runs:
                if r.diverged:
                    diverged_any = True
                    ax_acc.plot([r.diverged_epoch], [r.test_accuracy[-1]], "x", color="black",
                                markersize=10, markeredgewidth=2.5)
        _label_ends(ax_acc, ends)
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
    if seeds > 1:
        handles.append(Patch(color="gray", alpha=0.35, label=f"line: mean, band: min-max over {seeds} seeds"))
    if diverged_any:  # the marker is explained only where it is drawn
        handles.append(plt.Line2D([], [], color="black", marker="x", linestyle="", label="diverged"))
    fig.legend(handles=handles, loc="upper right", fontsize=9, ncol=len(handles))
    fig.suptitle("normcore demo: networks trained in NumPy on scikit-learn's digits", x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
