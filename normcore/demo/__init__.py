"""normcore's main demonstration: real networks trained in NumPy on real digits.

``python -m normcore.demo`` trains MLPs (no normalization, BatchNorm1d, LayerNorm,
BatchChannelNorm) and CNNs (no normalization, BatchNorm2d, BatchNorm2d with weight
standardization) on scikit-learn's handwritten digits, each at a base learning rate and
at 100 times it, once per seed (three by default); prints a table (final test accuracy,
epochs to 90 %, divergence, time: mean and range over the seeds) and a verdict worded from
those measurements; saves a trained CNN, reloads it in a fresh process and checks that its evaluation is
bit-identical; and writes a PNG of the learning curves and a JSON of the results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from .data import load_digits_split
from .nets import VARIANTS, build
from .report import plot, table, verdict, write_json
from .train import evaluate, train

__all__ = ["main", "run_experiments", "checkpoint_round_trip"]


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the demo extra; run without bars
        return None
    return tqdm(total=total, desc=desc, leave=False, ncols=100)


def run_experiments(variants, base_lr, epochs, seeds, progress=True, optimizer="sgd"):
    """Each variant at ``base_lr`` and ``100 * base_lr``, once per seed in ``seeds``.

    A seed fixes the train/test split, the initialisation and the order of the batches.
    Returns the RunResults (seed by seed) and the nets of the first seed, keyed by
    ``(variant, lr)``.
    """
    results, nets = [], {}
    for seed in seeds:
        data = load_digits_split(seed)
        for variant in variants:
            for lr in (base_lr, 100 * base_lr):
                bar = _progress(epochs, f"{variant:10s} lr {lr:g} seed {seed}", progress)
                result, net = train(variant, lr, data, epochs=epochs, seed=seed, optimizer=optimizer,
                                    progress=bar)
                if bar is not None:
                    bar.close()
                results.append(result)
                if seed == seeds[0]:
                    nets[(variant, lr)] = net
                status = f"diverged at epoch {result.diverged_epoch}" if result.diverged \
                    else f"test accuracy {result.final_accuracy:.3f}"
                print(f"seed {seed}  {variant:10s} lr {lr:<6g} {status} ({result.seconds:.1f} s)", flush=True)
    return results, nets


def checkpoint_round_trip(net, variant, seed, directory):
    """Save ``net``, evaluate it here and in a fresh process; return the comparison.

    The fresh process rebuilds the variant, loads the ``.npz`` and evaluates the test split
    with the running statistics; its logits must equal ours bit for bit.
    """
    _, _, x_test, y_test = load_digits_split(seed)
    path = os.path.join(directory, f"{variant}.npz")
    net.save(path)
    accuracy, logits = evaluate(net, variant, x_test, y_test)
    logits_path = os.path.join(directory, f"{variant}_fresh_logits.npy")
    # The fresh process imports the same normcore as this one, whatever its working directory.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "normcore.demo.checkpoint", variant, os.path.abspath(path),
                          str(seed), os.path.abspath(logits_path)],
                         capture_output=True, text=True, env=env, cwd=os.path.abspath(directory))
    if out.returncode:
        raise RuntimeError(f"the fresh evaluation process failed:\n{out.stderr}")
    fresh_accuracy = json.loads(out.stdout)["accuracy"]
    fresh_logits = np.load(logits_path)
    return {"variant": variant, "path": path, "accuracy": accuracy, "fresh_accuracy": fresh_accuracy,
            "logits_identical": bool(np.array_equal(logits, fresh_logits) and logits.dtype == fresh_logits.dtype)}


def _at_least_one(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_rate(text):
    value = float(text)
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite learning rate > 0, got {text}")
    return value


def _missing_extras():
    """The demo extra's packages this environment lacks (tqdm is optional: no bars)."""
    import importlib.util
    missing = []
    for module, name in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # blocked in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m normcore.demo",
        description="Train MLPs and CNNs in NumPy on scikit-learn's digits, with and without "
                    "normcore's normalization layers, at a base and a 100x learning rate.")
    parser.add_argument("--quick", action="store_true", help="fewer epochs (under a minute on 2 cores)")
    parser.add_argument("--epochs", type=_at_least_one, default=None, help="epochs per run (default 30, --quick 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first seed (each seed fixes the split, initialisation and batches)")
    parser.add_argument("--seeds", type=_at_least_one, default=None,
                        help="number of seeds, from --seed upward (default 3, --quick 1)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="SGD with momentum 0.9 (default) or Adam")
    parser.add_argument("--lr", type=_positive_rate, default=None,
                        help="base learning rate (default 0.01 for SGD, 0.001 for Adam); runs use it and 100x it")
    parser.add_argument("--out", default="normcore_demo_out", help="directory for the PNG, JSON and checkpoint")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (8 if args.quick else 30)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.seed, args.seed + n_seeds))
    if args.lr is None:
        args.lr = 0.01 if args.optimizer == "sgd" else 0.001
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    missing = _missing_extras()
    if missing:  # before anything is written
        parser.exit(2, f"python -m normcore.demo needs {' and '.join(missing)}, which "
                       f"{'is' if len(missing) == 1 else 'are'} not installed: pip install \"normcore[demo]\"\n")
    os.makedirs(args.out, exist_ok=True)

    train_n, test_n = (len(part) for part in load_digits_split(args.seed)[::2])
    optimizer = "SGD with momentum 0.9" if args.optimizer == "sgd" else "Adam"
    which = f"seed {seeds[0]}" if n_seeds == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
    print(f"digits: {train_n} training and {test_n} test images; {epochs} epochs per run, "
          f"{optimizer}, batch 64, {which}")
    results, nets = run_experiments(variants, args.lr, epochs, seeds, progress=not args.no_progress,
                                    optimizer=args.optimizer)
    print()
    print(table(results, args.lr))
    print()
    print(verdict(results, args.lr))

    extra = {"epochs": epochs, "seeds": seeds, "base_lr": args.lr, "optimizer": args.optimizer}
    # the checkpoint is most telling for a net with running statistics: prefer one
    tracked = [v for v in variants if any(k.endswith("running_mean") for k in nets[(v, args.lr)].state_dict())]
    ckpt_variant = "cnn+bn" if "cnn+bn" in tracked else (tracked or variants)[0]
    check = checkpoint_round_trip(nets[(ckpt_variant, args.lr)], ckpt_variant, seeds[0], args.out)
    extra["checkpoint"] = check
    how = ("trained with batch statistics, saved" if tracked else "saved")
    evaluated = "evaluated with its running statistics" if tracked else "evaluated"
    print(f"\ncheckpoint: {ckpt_variant} (seed {seeds[0]}) {how} to {check['path']}, reloaded in a fresh process and "
          f"{evaluated}: test accuracy {check['accuracy']:.4f} here, {check['fresh_accuracy']:.4f} there; "
          f"logits bit-identical: {'yes' if check['logits_identical'] else 'NO'}")

    png = os.path.join(args.out, "learning_curves.png")
    plot(png, results, args.lr)
    json_path = os.path.join(args.out, "results.json")
    write_json(json_path, results, extra)
    print(f"\nlearning curves: {png}\nresults: {json_path}")
    return 0 if check["logits_identical"] else 1


__all__ += ["VARIANTS", "build"]
