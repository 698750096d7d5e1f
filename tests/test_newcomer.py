"""What a new user meets first: optional dependencies that say what to install, a source
checkout that says how to build it, selfcheck's verdict, the demo's argument checks, reprs."""
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import normcore as nc
from normcore import selfcheck

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python(code, cwd, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env))


def test_testing_without_hypothesis_keeps_run_ranks_and_names_the_extra(tmp_path):
    out = _python("import sys; sys.modules['hypothesis'] = None\n"
                  "import normcore.testing as t\n"
                  "print(t.run_ranks(2, lambda comm: comm.Get_rank()))\n"
                  "t.assert_close([1.0], [1.0], 'float32', 'y')\n"
                  "try:\n    t.check_mode\nexcept ModuleNotFoundError as e:\n    print(e)\n", tmp_path)
    assert out.returncode == 0, out.stderr
    ranks, message = out.stdout.splitlines()
    assert ranks == "[0, 1]"
    assert "needs Hypothesis" in message and 'pip install "normcore[testing]"' in message


def test_check_mode_on_cuda_without_cupy_says_how_to_get_it():
    from normcore import gpu
    if gpu.available():
        pytest.skip("this machine has a GPU")
    from normcore.testing import check_mode
    with pytest.raises(RuntimeError, match=r"normcore\[gpu\]|CUDA device"):
        check_mode("layer_norm", backend="cuda")


def test_source_checkout_without_kernels_says_how_to_build_them(tmp_path):
    shutil.copytree(ROOT / "normcore", tmp_path / "normcore",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    (tmp_path / "src" / "normcore").mkdir(parents=True)
    shutil.copy(ROOT / "src" / "normcore" / "kernels.pxi", tmp_path / "src" / "normcore")
    site = os.path.dirname(os.path.dirname(np.__file__))  # numpy, without the editable hook
    out = subprocess.run([sys.executable, "-S", "-c", "import normcore"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=site))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "compiled kernels" in last and "pip install -e ." in last and "circular" not in last


def test_selfcheck_passes_and_fails_by_its_tolerances(monkeypatch, capsys):
    assert selfcheck.main([]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("PASS")
    monkeypatch.setattr(selfcheck, "TOLERANCE", {np.dtype(np.float32): 1e-12, np.dtype(np.float64): 1e-20})
    assert selfcheck.main([]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("FAIL") and " FAIL" in out


@pytest.mark.parametrize("argv, message", [(["--epochs", "0"], "--epochs"), (["--epochs", "-3"], "--epochs"),
                                           (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr")])
def test_demo_refuses_bad_arguments(argv, message, capsys, tmp_path):
    from normcore.demo import main
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "out")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_without_its_extra_says_so_before_writing(tmp_path):
    out = _python("import sys; sys.modules['sklearn'] = None\nfrom normcore.demo import main\n"
                  "sys.exit(main(['--out', 'out']))", tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert 'pip install "normcore[demo]"' in out.stderr and "scikit-learn" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer, text", [
    (nc.BatchNorm1d(64), "BatchNorm1d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"),
    (nc.BatchNorm2d(8, momentum=None, channel_axis=-1, dtype=np.float64, unbiased=False),
     "BatchNorm2d(8, eps=1e-05, momentum=None, affine=True, track_running_stats=True, channel_axis=-1, "
     "dtype=float64, unbiased=False)"),
    (nc.LayerNorm(8, bias=False), "LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=False)"),
    (nc.RMSNorm([2, 4]), "RMSNorm((2, 4), eps=None, elementwise_affine=True)"),
    (nc.GroupNorm(2, 4, eps=1e-3), "GroupNorm(2, 4, eps=0.001, affine=True)"),
    (nc.InstanceNorm2d(3, affine=True), "InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=True, "
                                        "track_running_stats=False)"),
    (nc.BatchChannelNorm(4, 2, estimate=False), "BatchChannelNorm(4, 2, eps=1e-05, momentum=0.1, estimate=False)"),
])
def test_repr_shows_the_arguments(layer, text):
    import copy
    import pickle
    assert repr(layer) == text
    assert repr(pickle.loads(pickle.dumps(layer))) == repr(copy.deepcopy(layer)) == text


@pytest.mark.parametrize("name", [n for n in nc.layers.__all__])
def test_layer_docstrings_have_parameters_attributes_and_a_backward_example(name):
    cls = getattr(nc, name)
    doc = cls.__doc__
    for section in ("Parameters\n----------", "Attributes\n----------", "Examples\n--------"):
        assert section in doc, (name, section)
    assert ".backward(" in doc
    assert "Initialize self" not in (cls.__init__.__doc__ or "Initialize self")
