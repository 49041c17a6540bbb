"""Shared test fixtures: the repository root and the real datasets beside it; tiny pipeline
runs, the package installed from a wheel into a fresh virtualenv, and the one fresh serving
virtualenv, each built once per session."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
# The real datasets: beside the checkout, or where RECSYS_DPO_SHARED_DATA says (a worktree).
SHARED_DATA = Path(os.environ.get("RECSYS_DPO_SHARED_DATA", ROOT.parent / "shared" / "data"))
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


def composed(name: str, prepared: Path, root: Path, *overrides: str) -> DictConfig:
    """Config `name` of recsys_dpo/conf composed as its command would, on the prepared dataset
    `prepared`, artifacts under `root`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=[
            f"paths.artifacts={root}", f"paths.prepared={prepared}", *overrides])  # fmt: skip


def bad_input_message(result: subprocess.CompletedProcess) -> str:
    """The error line of a stage that refused its input: exit 2, one line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def report(config: pytest.Config, line: str) -> None:
    """A measured figure printed in the test output, past pytest's capture (never asserted:
    the box is shared)."""
    with config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        config.pluginmanager.get_plugin("terminalreporter").write_line(f"[measured] {line}")


def _tiny_run(tmp: Path, *overrides: str) -> dict:
    """A tiny pipelines/run.py run (test_pipeline's settings) under `tmp`: its
    pipeline_result.json, plus "tmp"."""
    from test_pipeline import run

    done = run(tmp, "job", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads((tmp / "job" / "pipeline_result.json").read_text()), "tmp": tmp}


@pytest.fixture(scope="session")
def untracked_run(tmp_path_factory) -> dict:
    """An untracked tiny pipeline run, seen policy `remove` (the default)."""
    return _tiny_run(tmp_path_factory.mktemp("untracked"), "tracking.enabled=false")


@pytest.fixture(scope="session")
def registered_run(tmp_path_factory) -> dict:
    """A tiny pipeline run tracked in a sqlite store ("uri"), which registers the bundle as an
    MLflow model, under `eval.seen=keep`: on this repeat-consumption log the evaluated top-K
    then holds items of the users' histories, so a server that removed them would differ."""
    tmp = tmp_path_factory.mktemp("registered")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return {**_tiny_run(tmp, f"tracking.uri={uri}", "eval.seen=keep"), "uri": uri}


@pytest.fixture(scope="session")
def serving_venv(request, registered_run, tmp_path_factory) -> Path:
    """ONE fresh virtualenv for every environment test of the session: the packages of the
    registered model's own requirements.txt (downloaded from the registry), nothing else, so
    no recsys_dpo. Its directory."""
    import mlflow

    name = registered_run["registered"].split("/")[0]
    mlflow.set_tracking_uri(registered_run["uri"])
    requirements = mlflow.artifacts.download_artifacts(
        f"models:/{registered_run['registered']}/requirements.txt",
        dst_path=str(tmp_path_factory.mktemp("requirements")),
    )
    venv = tmp_path_factory.mktemp("venv") / name
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", requirements],
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    report(request.config, f"serving venv built in {time.monotonic() - start:.0f} s "
           f"({Path(requirements).read_text().split()})")  # fmt: skip
    return venv


def venv_env(venv: Path) -> dict[str, str]:
    """The environment of a process of `venv`: its bin first on PATH (mlflow models serve
    starts uvicorn from there), no PYTHONPATH (so nothing of this checkout is importable)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv)}  # fmt: skip


def _check(cmd: list[str]) -> None:
    # Without PYTHONPATH: a checkout on it would count as the package already installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])


@pytest.fixture(scope="session")
def installed(request, tmp_path_factory) -> Path:
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
    report(request.config, f"wheel virtualenv built in {time.monotonic() - started:.0f} s")
    return venv / "bin"


def installed_env(bin_dir: Path) -> dict[str, str]:
    """The environment of a user of that virtualenv: its bin/ first on PATH, nothing of the
    checkout importable, the real datasets where they are."""
    return {**venv_env(bin_dir.parent), "RECSYS_DPO_SHARED_DATA": str(SHARED_DATA)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float, what: str,
                  log: Path | None = None) -> None:  # fmt: skip
    """Poll `url` until it answers 2xx; fail if `proc` exits first (with the tail of `log`) or
    `seconds` pass."""
    import requests

    deadline = time.monotonic() + seconds
    while True:
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        assert proc.poll() is None, log.read_text()[-3000:] if log else f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not come up in {seconds:.0f} s"
        time.sleep(0.5)
