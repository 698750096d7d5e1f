"""SyncBatchNorm under a real MPI launch: tests/mpi/sync_check.py on 2 and 3 processes.

Needs mpi4py and an MPI launcher (``pip install mpi4py mpich``, part of the test extra).
Skipped when they are missing, unless NORMCORE_REQUIRE_MPI=1 (set in CI), where a missing
MPI is a failure rather than a silent skip."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "mpi" / "sync_check.py"


def _mpiexec():
    # the launcher installed beside this Python (a venv's bin/) first, then PATH
    return shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))


def _require_mpi():
    missing = []
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing.append("mpi4py")
    launcher = _mpiexec()
    if launcher is None:
        missing.append("mpiexec")
    if missing:
        why = f"{' and '.join(missing)} not installed (pip install mpi4py mpich)"
        if os.environ.get("NORMCORE_REQUIRE_MPI") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return launcher


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_under_mpiexec(ranks):
    launcher = _require_mpi()
    run = subprocess.run([launcher, "-n", str(ranks), sys.executable, str(SCRIPT)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{ranks} ranks: OK" in run.stdout, run.stdout + run.stderr
