"""The repository's top-level ``kernels/`` folder never shadows an installed ``kernels`` (Note [no shadowing]).

Each check runs a fresh interpreter from the repository root, where the root is first on
``sys.path``, with a stand-in top-level ``kernels`` package in a temporary site directory, and
asserts that the stand-in is what ``import kernels`` gives while ``asyncdiff.kernels`` is still ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    return site


def _run(args: list[str], site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_installed_kernels_wins_from_the_repository_root(stand_in):
    probe = textwrap.dedent(
        """
        import sys, kernels
        assert sys.path[0] in ("", "."), sys.path[:2]   # the root is first, the stand-in after it
        assert getattr(kernels, "STAND_IN", False), kernels.__file__
        import asyncdiff.kernels.pack as pack
        assert pack.__name__ == "asyncdiff.kernels.pack", pack.__name__
        import kernels as again
        assert again is kernels and sys.modules["kernels"] is kernels
        print(kernels.__file__)
        """
    )
    done = _run(["-c", probe], stand_in)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(stand_in)


def test_without_an_installed_kernels_the_name_is_not_found(tmp_path):
    # -S: no site-packages, so the only ``kernels`` in sight is the repository's own folder
    done = _run(["-S", "-c", "import kernels"], tmp_path)
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in done.stderr, done.stderr


@pytest.mark.parametrize("mode", ["prepend", "append", "importlib"])
def test_the_stand_in_wins_under_every_pytest_import_mode(stand_in, tmp_path, mode):
    (tmp_path / "test_probe.py").write_text(
        textwrap.dedent(
            """
            import kernels
            import asyncdiff.kernels.pack

            def test_probe():
                assert getattr(kernels, "STAND_IN", False), kernels.__file__
                assert asyncdiff.kernels.pack.__name__ == "asyncdiff.kernels.pack"
            """
        )
    )
    done = _run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--import-mode={mode}",
         f"--rootdir={ROOT}", str(tmp_path / "test_probe.py")],
        stand_in,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_diffusers_and_transformers_import_from_the_repository_root(tmp_path):
    # With transformers >= 5.25 this imports Hugging Face's kernels, which ours once shadowed.
    probe = "import asyncdiff; from diffusers import DiffusionPipeline; import transformers"
    done = _run(["-c", probe], tmp_path)
    assert done.returncode == 0, done.stderr
