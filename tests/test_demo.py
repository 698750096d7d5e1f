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


def test_command_line_quick_subset_writes_table_png_and_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(["--variants", "mlp,mlp+bn", "--epochs", "2", "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| mlp+bn | 0.01 (base) |" in out and "logits bit-identical: yes" in out
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in results["runs"]] == ["mlp", "mlp", "mlp+bn", "mlp+bn"]
    assert results["checkpoint"]["logits_identical"] is True


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for option in ("--quick", "--out", "--epochs", "--seed"):
        assert option in out
