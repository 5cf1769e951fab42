"""The docstring examples of the library, run under the modules' real names (``asyncdiff.*``).

pytest's ``--doctest-modules`` names a module by its file's path, so the top-level folders mapped
into the package (``engine/``, ``kernels/``...) would be imported a second time as top-level
packages (Note [no shadowing] in ``kernels/__init__.py``); here each module is imported as
``asyncdiff.<package>.<module>``, the one copy the library uses.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

# the packages pyproject.toml installs (the mapped folders are not below asyncdiff.__path__)
PACKAGES = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def _module_names() -> list[str]:
    found = []
    for package in PACKAGES:
        found.append(package)
        path = importlib.import_module(package).__path__
        found += [f"{package}.{info.name}" for info in pkgutil.iter_modules(path) if not info.ispkg]
    return sorted(found)


MODULES = _module_names()


def test_every_library_folder_is_walked():
    assert {"asyncdiff.engine.schedule", "asyncdiff.partition.trace", "asyncdiff.kernels.pack",
            "asyncdiff.adapters.registry", "asyncdiff.models.sd", "asyncdiff.generate"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    if not tests:
        return
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
