"""Every Python block of the README runs as written, on its own, in a fresh interpreter."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_on_its_own(index, tmp_path):
    code = BLOCKS[index]
    if "import cupy" in code:
        from normcore import gpu
        if not gpu.available():
            pytest.skip(f"the GPU block needs CuPy and a device: {gpu.unavailable_reason()}")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"README block {index} failed:\n{code}\n{out.stderr}"
    stated = re.findall(r"^print\(.*\)\n# (.*)$", code, re.M)
    if stated:
        assert out.stdout.split("\n")[:len(stated)] == stated


def test_readme_check_mode_example_is_the_example_file():
    example = (ROOT / "examples" / "test_head_norm.py").read_text()
    assert example in BLOCKS
