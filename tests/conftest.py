"""Shared test fixtures: the repository root and the real datasets beside it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The packaged configs (hydra finds them as pkg://recsys_dpo.conf).
CONF = ROOT / "recsys_dpo" / "conf"


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
