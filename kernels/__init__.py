"""Pack/transfer routines, imported as ``asyncdiff.kernels`` (the package-dir mapping of pyproject.toml).

Note [no shadowing]
~~~~~~~~~~~~~~~~~~~
This folder sits at the top of the repository, and whenever the repository root is on ``sys.path``
(``python -m pytest``, ``python -c``, ``python -m benchmarks...`` run from there) Python's path
finder sees it as a top-level package ``kernels`` before site-packages. Hugging Face has a package
of that name, which transformers (>= 5.25) and diffusers import: ours would shadow it.

A folder without ``__init__.py`` would lose to an installed package by Python's own rule (a
regular package beats a namespace portion), but setuptools' editable finder cannot map a
namespace package inside a regular one (``asyncdiff.kernels`` is then not found at all). So this
file stays, and when it is executed under any name but ``asyncdiff.kernels`` it hands the name
over: it imports that name again with the repository root left out of ``sys.path`` and puts the
result in its own place in ``sys.modules``, which the import statement then returns (the
replacement that ``importlib`` documents). Without another ``kernels`` installed, that import
fails as it would without this folder. Nothing here imports anything but the standard library.
The library's doctests are collected under their ``asyncdiff.*`` names (tests/test_doctests.py),
never from these folders' paths. tests/test_layout.py fails if the shadowing comes back.
"""

if __name__ != "asyncdiff.kernels":  # Note [no shadowing]
    import importlib
    import os
    import sys

    def _hand_over(name: str) -> None:
        root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        saved = list(sys.path)
        sys.path[:] = [p for p in saved if os.path.realpath(p or os.curdir) != root]
        del sys.modules[name]
        try:
            importlib.import_module(name)  # theirs lands in sys.modules[name]; the import returns it
        finally:
            sys.path[:] = saved

    _hand_over(__name__)
