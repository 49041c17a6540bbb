"""Stage outputs are never half-written and readable by everyone: a kill -9 mid-prepare leaves
a temporary directory that the next run of the stage removes (a live writer's is kept); outputs
are 0755 / 0644; a read-only or full output directory stops prepare and evaluate with exit 2,
one message and nothing written. The disk tests mount a small tmpfs and so run as root only."""

import importlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from test_train_cli import SMALL, config, result

from recsys_dpo.artifacts import atomic_dir, read_manifest
from recsys_dpo.stage import exits_cleanly_on_bad_input
from recsys_dpo.training.run import train_reference

TMP_GLOB = ".synthetic.tmp-*"


def entry_point(name: str):
    """The stage recsys_dpo/commands/<name>.py as its command line runs it: exit 2 with one
    message on bad input."""
    return exits_cleanly_on_bad_input(importlib.import_module(f"recsys_dpo.commands.{name}").run)


def modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode))
            for p in [root, *root.rglob("*")]}  # fmt: skip


def test_stage_outputs_are_0755_dirs_and_0644_files(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "data.txt").write_text("x")
        fd, _ = tempfile.mkstemp(dir=tmp)  # 0600, as tempfile makes them
        os.close(fd)
    assert modes(tmp_path / "out") == {("dir", 0o755), ("file", 0o644)}


def prepare_cmd(artifacts: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipelines" / "prepare.py"), f"paths.artifacts={artifacts}",
            "progress=false", *overrides]  # fmt: skip


def test_kill_during_prepare_leaves_a_temp_dir_the_next_run_removes(tmp_path):
    prepared = tmp_path / "prepared"
    killed = subprocess.Popen(prepare_cmd(tmp_path, "data.reader.n_users=4000"), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(prepared.glob(TMP_GLOB)):
        assert killed.poll() is None, killed.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    [left] = prepared.glob(TMP_GLOB)
    assert not (prepared / "synthetic").exists()
    # A temporary directory of a writer that is still alive (another host's view aside).
    live = subprocess.Popen(["sleep", "300"])
    try:
        kept = prepared / f".synthetic.tmp-{live.pid}-inflight"
        kept.mkdir()
        done = subprocess.run(prepare_cmd(tmp_path, "data.reader.n_users=100",
                                          "data.reader.n_items=30"),
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert not left.exists()
        assert kept.is_dir()
    finally:
        live.kill()
        live.wait()
    read_manifest(prepared / "synthetic")


@pytest.fixture
def tmpfs(tmp_path) -> Iterator:
    """mount(options) -> a fresh tmpfs directory; unmounted afterwards. Root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(directory: Path) -> None:
    """Write until the filesystem is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def disk(tmpfs, case: str) -> tuple[Path, str]:
    """(a directory on a tmpfs in that state, the error it gives)."""
    if case == "read-only":
        return tmpfs("ro,size=1m"), "Read-only file system"
    point = tmpfs("size=16k")
    if case == "full":
        fill(point)
    return point, "No space left on device"


def assert_one_clean_message(capsys, excinfo, where: Path, reason: str) -> None:
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    message = " ".join(err.split())  # rich may wrap the line
    assert str(where) in message and reason in message, err


def leftovers(point: Path) -> list[Path]:
    """Files, and temporary directories, the failed stage left on the disk."""
    return [p for p in point.rglob("*")
            if p.name != "filler" and (p.is_file() or ".tmp-" in p.name)]  # fmt: skip


@pytest.mark.parametrize("case", ["read-only", "full", "fills up while writing"])
def test_prepare_on_a_read_only_or_full_disk(tmpfs, tmp_path, capsys, case):
    point, reason = disk(tmpfs, case)
    cfg = config("config", tmp_path, "progress=false", f"paths.prepared={point}/synthetic")
    with pytest.raises(SystemExit) as excinfo:
        entry_point("prepare")(cfg)
    assert_one_clean_message(capsys, excinfo, point, reason)
    assert leftovers(point) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """(artifacts dir with a prepared dataset, a reference checkpoint trained on it)."""
    root = tmp_path_factory.mktemp("trained")
    entry_point("prepare")(config("config", root, "progress=false"))
    cfg = config("train_reference", root, "model.n_layers=1", "model.n_heads=1", *SMALL)
    return root, result(train_reference(cfg))["last_ckpt"]


@pytest.mark.parametrize("case", ["read-only", "full", "fills up while writing"])
def test_evaluate_on_a_read_only_or_full_disk(trained, tmpfs, capsys, case):
    root, ckpt = trained
    point, reason = disk(tmpfs, case)
    cfg = config("config", root, "progress=false", f"eval.ckpt='{ckpt}'",
                 f"reference.ckpt='{ckpt}'", "eval.n_resamples=50", "eval.k=[5]",
                 f"eval.out_dir={point}/eval")  # fmt: skip
    with pytest.raises(SystemExit) as excinfo:
        entry_point("evaluate")(cfg)
    assert_one_clean_message(capsys, excinfo, point, reason)
    assert leftovers(point) == []
