"""Every example in the package's docstrings runs and prints what it says."""
import doctest
import importlib
import pkgutil

import pytest

import normcore

MODULES = sorted(m.name for m in pkgutil.walk_packages(normcore.__path__, "normcore.")
                 if not m.name.endswith("__main__") and not m.name.rsplit(".", 1)[-1].startswith("_kernels"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    if name.startswith("normcore.demo"):
        pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
