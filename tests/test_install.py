"""The fresh-install guard: none of our import names is provided by another installed distribution.

transformers 5.25 made Hugging Face's `kernels` distribution a hard dependency and imports it by that name; our
kernels package was then called `kernels/`, so `from kernels import CUDAProperties` inside transformers found
ours and every command failed (issue 41). The package is `qkernels/` now; these tests fail the day any
distribution we install claims one of our top-level names again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN_DISTRIBUTION = "quantbench"


def our_top_level_packages() -> list[str]:
    """The import names this project installs: the `include` patterns of setuptools' package discovery."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in patterns})


def shadowing_distributions(names: list[str]) -> dict[str, list[str]]:
    """For each of `names`, the installed distributions other than ours that provide a module of that name
    (`importlib.metadata.packages_distributions()`: top_level.txt or the files a distribution's RECORD lists)."""
    provided = packages_distributions()
    found = {}
    for name in names:
        others = sorted({dist for dist in provided.get(name, []) if dist.lower() != OWN_DISTRIBUTION})
        if others:
            found[name] = others
    return found


def test_every_package_in_the_checkout_is_declared():
    """A new top-level package must be added to pyproject's include list, so the guard below checks it too."""
    on_disk = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests")
    assert on_disk == our_top_level_packages()


def test_no_installed_distribution_shares_our_import_names():
    clashes = shadowing_distributions(our_top_level_packages())
    assert not clashes, (
        f"installed distributions provide modules named like ours: {clashes}; rename our package "
        "(README: why the kernels folder is not called kernels/)"
    )


def test_guard_names_a_planted_distribution(tmp_path, monkeypatch):
    """The guard can fail: a fake distribution in a temporary site directory claiming `qkernels` is named."""
    dist_info = tmp_path / "impostor_kernels-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor-kernels\nVersion: 1.0\n")
    (dist_info / "top_level.txt").write_text("qkernels\n")
    (dist_info / "RECORD").write_text("qkernels/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert shadowing_distributions(our_top_level_packages()) == {"qkernels": ["impostor-kernels"]}


def test_dependencies_and_our_packages_import_together_from_the_checkout():
    """`python -c` from the repository root puts the checkout first on sys.path, as `python -m harness` does:
    transformers, lm-eval and our packages import side by side, and a distribution named `kernels` (if
    transformers pulled it in) resolves to its own files, not to a folder of ours."""
    code = (
        "import importlib.util, transformers, lm_eval, harness, methods, qkernels\n"
        "from transformers import LlamaForCausalLM\n"
        "import harness.runner, qkernels.bench\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"assert spec is None or not spec.origin.startswith({str(ROOT)!r} + '/kernels'), spec.origin\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("name", ["harness", "methods", "qkernels"])
def test_our_names_resolve_to_the_checkout(name):
    import importlib

    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(ROOT / name)


def test_import_contracts_hold():
    """import-linter's contracts (pyproject.toml): harness -> methods -> qkernels, nothing upward, and no import
    cycle between sibling modules (lazy imports inside functions count)."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
