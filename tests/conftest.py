import os
import sys
from pathlib import Path

# Triton kernels are checked on CPU under the interpreter; Triton reads this when it is first imported,
# so it must be set before any test module (or library) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`-n auto`, the default addopts) each worker gets its share of the cores for torch's
# threads, and so do the CLI processes the tests start (they inherit the variable): two workers each running
# torch on every core would only slow each other down.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    if "torch" in sys.modules:  # a plugin imported torch before this file: its pool is already sized
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The local data mirror (QUANTBENCH_DATA, else ../shared/data next to the checkout), as an absolute path:
    tests start jobs in other working directories, where the README's relative `../shared/data` means nothing."""
    path = Path(os.environ.get("QUANTBENCH_DATA", DEFAULT_MIRROR)).resolve()
    if not (path / "wikitext-2-raw" / "wiki.test.raw").exists():
        pytest.fail(f"data mirror not found at {path}: export QUANTBENCH_DATA=/path/to/shared/data")
    return str(path)


@pytest.fixture()
def tiny():
    from harness.models import tiny_llama

    return tiny_llama(seed=0)
