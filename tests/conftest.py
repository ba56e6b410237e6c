import os
from pathlib import Path

# Triton kernels are checked on CPU under the interpreter; Triton reads this when it is first imported,
# so it must be set before any test module (or library) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

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
