"""Shared test fixtures: the repository root, the real datasets beside it, and the package
installed from a wheel into a fresh virtualenv (one per test session)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The packaged configs (hydra finds them as pkg://recsys_dpo.conf).
CONF = ROOT / "recsys_dpo" / "conf"


@pytest.fixture(autouse=True)
def environment_restored():
    """Each test starts from the session's environment: an entry point called in-process sets
    process-wide defaults (recsys_dpo.quiet: COLUMNS, MLflow's progress bars)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or a clean skip when the datasets are not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def run_pipeline(
    script: str, *overrides: str, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run a pipelines/ entry point in a subprocess, as a user would from a shell; TimeoutExpired
    after `timeout` seconds."""
    env = {**os.environ, "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bad_input_message(result: subprocess.CompletedProcess) -> str:
    """The error line of a stage that refused its input: exit 2, one line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# Seconds each environment-building fixture took, shown at the end of the session.
BUILD_SECONDS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    for what, seconds in BUILD_SECONDS.items():
        terminalreporter.write_line(f"{what}: built in {seconds:.0f} s")


def _check(cmd: list[str]) -> None:
    # Without PYTHONPATH: a checkout on it would count as the package already installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh virtualenv holding the package as a user installs it: a wheel built from
    this checkout (`pip wheel`), torch pinned first, the other dependencies from the index."""
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ into the source tree.
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "recsys_dpo", src / "recsys_dpo",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    _check([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp)])
    (wheel,) = tmp.glob("recsys_dpo-*.whl")
    venv = tmp / "venv"
    _check([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]
    _check([*pip, "torch==2.13.0"])
    _check([*pip, str(wheel)])
    BUILD_SECONDS["wheel virtualenv (tests/conftest.py::installed)"] = time.monotonic() - started
    return venv / "bin"


def installed_env(bin_dir: Path) -> dict[str, str]:
    """The environment of a user of that virtualenv: its bin/ first on PATH, nothing of the
    checkout importable, the real datasets where they are."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(bin_dir.parent), "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA)}
