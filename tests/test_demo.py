"""The main demonstration: real training runs on scikit-learn's digits (the demo extra)."""
import json

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo needs the demo extra (scikit-learn)")

from normcore.demo import checkpoint_round_trip, main  # noqa: E402
from normcore.demo.data import load_digits_split  # noqa: E402
from normcore.demo.nets import build, softmax_cross_entropy  # noqa: E402
from normcore.demo.train import train  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


def test_mlp_with_batchnorm_learns_digits(digits):
    result, _ = train("mlp+bn", 0.01, digits, epochs=5, seed=0)
    assert not result.diverged
    assert result.final_accuracy >= 0.93, result.test_accuracy
    assert result.loss[-1] < result.loss[0] / 5


def test_divergence_is_reported_not_raised(digits):
    result, _ = train("mlp", 1e3, digits, epochs=3, seed=0)
    assert result.diverged and result.diverged_epoch == 1
    json.dumps(result.to_json())  # NaN-free JSON


# Estimated batch norm (inside mlp+bcn) updates its running statistics on every training
# forward and by design passes no gradient through them, so it is checked in eval mode.
@pytest.mark.parametrize("variant, training", [("mlp+bn", True), ("mlp+bcn", False), ("cnn+bn+ws", True)])
def test_whole_network_gradient_matches_central_differences(variant, training):
    rng = np.random.default_rng(0)
    if variant.startswith("cnn"):
        net = build(variant, seed=1, dtype=np.float64)
        x = rng.standard_normal((4, 1, 8, 8))
    else:
        net = build(variant, seed=1, dtype=np.float64, sizes=(5, 16, 16, 3))
        x = rng.standard_normal((6, 5))
    labels = rng.integers(0, 3, len(x))
    net.train(training)

    def loss():
        return softmax_cross_entropy(net.forward(x), labels)[0]

    _, dlogits = softmax_cross_entropy(net.forward(x), labels)
    net.zero_grad()
    dx = net.backward(dlogits)
    checks = [("x", x, dx)] + [(name, p, g.copy()) for name, p, g in net.named_parameters()]
    h = 1e-6
    for name, array, grad in checks:
        flat = array.reshape(-1)
        picks = rng.choice(flat.size, size=min(flat.size, 12), replace=False)
        for i in picks:
            old = flat[i]
            flat[i] = old + h
            up = loss()
            flat[i] = old - h
            down = loss()
            flat[i] = old
            numeric = (up - down) / (2 * h)
            assert abs(numeric - grad.reshape(-1)[i]) <= 1e-6 + 1e-5 * abs(numeric), (name, i)


def test_checkpoint_reloads_bit_identically_in_a_fresh_process(digits, tmp_path):
    _, net = train("cnn+bn", 0.01, digits, epochs=2, seed=0)
    check = checkpoint_round_trip(net, "cnn+bn", 0, str(tmp_path))
    assert check["logits_identical"]
    assert check["accuracy"] == check["fresh_accuracy"] > 0.8


def test_command_line_subset_over_two_seeds_writes_table_verdict_png_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(["--variants", "mlp,mlp+bn", "--epochs", "2", "--seeds", "2", "--seed", "3",
                 "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "seeds 3-4" in out and "mean (min-max) over 2 seeds" in out
    assert "| mlp+bn | 0.01 (base) |" in out and "logits bit-identical: yes" in out
    assert "Verdict (2 seeds, 2 epochs per run):" in out and "mlp+bn" in out.split("Verdict")[1]
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    runs = [(r["variant"], r["seed"]) for r in results["runs"]]
    assert runs == [("mlp", 3), ("mlp", 3), ("mlp+bn", 3), ("mlp+bn", 3),
                    ("mlp", 4), ("mlp", 4), ("mlp+bn", 4), ("mlp+bn", 4)]
    assert results["seeds"] == [3, 4] and results["checkpoint"]["logits_identical"] is True
    # seeds differ in split, initialisation and batches: the curves are not copies
    first = [r["test_accuracy"] for r in results["runs"] if r["seed"] == 3]
    second = [r["test_accuracy"] for r in results["runs"] if r["seed"] == 4]
    assert first != second


@pytest.mark.parametrize("argv, epochs, seeds", [([], 30, [0, 1, 2]), (["--quick"], 8, [0]),
                                                 (["--seeds", "2", "--seed", "5"], 30, [5, 6]),
                                                 (["--quick", "--seeds", "3"], 8, [0, 1, 2])])
def test_seeds_default_to_three_for_the_full_run_and_one_for_quick(argv, epochs, seeds, monkeypatch, tmp_path):
    import normcore.demo as demo
    seen = {}

    class Stop(Exception):
        pass

    def record(variants, base_lr, n_epochs, run_seeds, **kwargs):
        seen.update(epochs=n_epochs, seeds=run_seeds)
        raise Stop

    monkeypatch.setattr(demo, "run_experiments", record)
    with pytest.raises(Stop):
        demo.main(argv + ["--out", str(tmp_path)])
    assert seen == {"epochs": epochs, "seeds": seeds}


def _run(variant, lr, accuracies, seed=0, diverged_epoch=None):
    from normcore.demo.train import RunResult
    return RunResult(variant, lr, len(accuracies), seed, loss=[1.0] * len(accuracies),
                     test_accuracy=list(accuracies), diverged_epoch=diverged_epoch)


def test_table_and_verdict_are_worded_from_the_measurements():
    from normcore.demo.report import table, verdict
    results = []
    for seed, shift in ((0, 0.0), (1, 0.01)):
        results += [_run("mlp", 0.01, [0.5, 0.7, 0.85, 0.91 + shift], seed),  # 90 % at epoch 4
                    _run("mlp", 1.0, [0.1, 0.1, 0.1, 0.1], seed),
                    _run("mlp+bn", 0.01, [0.8, 0.92 + shift, 0.95, 0.96], seed),  # at epoch 2
                    _run("mlp+bn", 1.0, [0.3, 0.6, 0.8 + shift, 0.93] if seed else [0.9, 0.9, 0.95, 0.97], seed)]
    text = table(results, 0.01)
    assert "| mlp | 0.01 (base) | 0.915 (0.910-0.920) | 4.0 | 2/2 | 0/2 | trained |" in text
    assert "| mlp | 1 (100x) | 0.100 | - | 0/2 | 0/2 | stuck near chance |" in text
    assert "| mlp+bn | 1 (100x) | 0.950 (0.930-0.970) | 2.5 (1.0-4.0) | 2/2 |" in text
    said = verdict(results, 0.01)
    assert "- lr 0.01 (base): trained on every seed: mlp, mlp+bn." in said
    assert "mlp+bn 2.0 vs mlp 4.0 (2x sooner)" in said
    assert "- lr 1 (100x): trained on every seed: mlp+bn. Did not: mlp (stuck near chance)." in said
    assert "mlp+bn 2.5 vs mlp reached it on 0 of 2 seeds" in said
    # a seed that diverges is counted, and the variant no longer 'trained on every seed'
    results[-1] = _run("mlp+bn", 1.0, [0.3, 0.2], 1, diverged_epoch=2)
    said = verdict(results, 0.01)
    assert "Did not: mlp (stuck near chance), mlp+bn (trained 1/2; diverged 1/2)." in said
    assert "| 1/2 | 1/2 (epoch 2) | trained 1/2; diverged 1/2 |" in table(results, 0.01)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for option in ("--quick", "--out", "--epochs", "--seed"):
        assert option in out
