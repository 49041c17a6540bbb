"""Stage outputs on disk: atomic directories with a manifest written last, one writer each.

Every stage writes into a temporary sibling directory, writes `manifest.json` as its very last
file, then renames the directory into place. A directory without a manifest is incomplete and
`read_manifest` refuses it, so a killed stage never leaves output that looks finished; a
consumer also checks the files against the manifest's hashes (`verify_files`).

Each output has one writer at a time: `stage_lock(out)` holds an exclusive lock on
`<out>.lock` beside it (pid and host inside, for the message a second run gets), checks that
the directory is writable before any work, and removes the temporary directories that killed
runs of the stage left behind. `atomic_dir` takes it itself; stages that compute before they
write (training, evaluation) take it first, so a second identical run stops at once.
"""

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from recsys_dpo.errors import DataError

MANIFEST = "manifest.json"
# Locks this process holds, so a stage that took its output's lock can call atomic_dir on it.
_HELD: dict[Path, int] = {}


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config: Any) -> str:
    """A short stable hash of a JSON-able config: the key for 'is this output up to date?'."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def content_hash(manifest: dict[str, Any]) -> str:
    """The hash of a stage output's content: its config hash and every file's sha256, as its
    manifest records them. Two outputs of one config built from different inputs (a log
    re-read at the same path a day later) differ here, where their config hashes do not."""
    files = {name: f["sha256"] for name, f in manifest["files"].items()}
    return config_hash({"config": manifest["config_hash"], "files": files})


def _write_failure(path: Path, err: OSError) -> DataError:
    return DataError(
        f"{path}: cannot write there ({err.strerror or err}); free some space, fix the "
        "permissions, or point paths.artifacts (or the stage's output setting) elsewhere"
    )


def _write_error(directory: Path) -> OSError | None:
    """Why a small file cannot be created and written in `directory` (made if missing), or
    None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        return err
    return None


def check_writable(directory: str | Path) -> None:
    """DataError unless `directory` can be written: a full disk or a read-only mount fails
    here, before any work, with one message."""
    if (err := _write_error(Path(directory))) is not None:
        raise _write_failure(Path(directory), err) from err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def file_lock(path: Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing, removed on release).

    fcntl.flock, so the kernel releases the lock of a killed process: a lock file left by a
    dead owner is simply taken over. The owner's pid and host are written into the file for
    the message of a process that waited `wait_s` seconds in vain (DataError naming `what`).
    """
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            holder = json.loads(owner) if owner.startswith("{") else {}
            raise DataError(
                f"{what} is in use by another run (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, lock file {path}); wait for it to finish, or use "
                "another output directory"
            ) from None
        # The previous owner may have removed the file between our open and flock: retry then.
        with suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        os.unlink(path)  # before the unlock, so no one locks a file that is going away
        os.close(fd)


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def clean_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary directories of `final` whose writer is gone (a killed run): the
    writer's pid is the first field after the prefix. Those of live processes are kept."""
    removed = []
    for tmp in final.parent.glob(f"{_temp_prefix(final)}*"):
        pid = tmp.name[len(_temp_prefix(final)) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _first_missing(directory: Path) -> Path | None:
    """The outermost ancestor of `directory` (itself included) that does not exist yet."""
    missing = None
    for path in [directory, *directory.parents]:
        if path.exists():
            break
        missing = path
    return missing


def _remove_empty(directory: Path, up_to: Path) -> None:
    """Remove `directory` and its parents up to `up_to` while they are empty."""
    for path in [directory, *directory.parents]:
        try:
            path.rmdir()
        except OSError:  # not empty (another run's output), or already gone
            return
        if path == up_to:
            return


@contextmanager
def stage_lock(out: str | Path) -> Iterator[Path]:
    """Claim the stage output `out` for this process: its parent must be writable (checked
    before any work), no other run may hold `<out>.lock` (DataError naming the owner, no
    waiting), and leftovers of killed runs are removed. Re-entrant within one process. A
    stage that fails leaves no directory it created behind."""
    out = Path(out)
    key = out.parent.resolve() / f"{out.name}.lock"
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield out
        finally:
            _HELD[key] -= 1
        return
    created = _first_missing(out.parent)
    try:
        check_writable(out.parent)
        with file_lock(key, f"the output directory {out}"):
            _HELD[key] = 1
            try:
                clean_stale_temps(out)
                yield out
            finally:
                del _HELD[key]
    except BaseException:
        if created is not None:
            _remove_empty(out.parent, created)
        raise


def _publish_modes(directory: Path) -> None:
    """0755 directories and 0644 files (mkdtemp makes 0700), so a serving process running as
    another user can read the output."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `final` only if the block finishes without error.

    The caller writes its files (the manifest last, see `write_manifest`) into the yielded path.
    On error the temp directory is removed and `final`, if it existed, is left untouched; a full
    disk or read-only mount becomes one DataError. The temp directory's name carries this
    process's pid, so a later run can tell a killed run's leftovers (`clean_stale_temps`).
    """
    final = Path(final)
    with stage_lock(final):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(final)}{os.getpid()}-",
                                        dir=final.parent))  # fmt: skip
        except OSError as err:
            raise _write_failure(final.parent, err) from err
        try:
            yield tmp
            _publish_modes(tmp)
        except BaseException as err:
            # Probed before the partial output is freed: a write that failed because the disk
            # filled up (or went read-only) is reported as that, whatever library raised it.
            cause = _write_error(tmp) if isinstance(err, Exception) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if cause is not None:
                raise _write_failure(final, cause) from err
            raise
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, payload: dict[str, Any]) -> Path:
    """Hash every file in `directory` into the payload and write `manifest.json` last."""
    files = {
        str(p.relative_to(directory)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**payload, "files": files}, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a finished stage directory; DataError if it is missing (incomplete)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (run the stage that writes it first)")
    if not path.is_file():
        raise DataError(
            f"{directory}: no {MANIFEST}, so the directory is incomplete (a stage was killed "
            "or is still writing); re-run the stage that writes it"
        )
    return json.loads(path.read_text())


def verify_files(directory: str | Path, manifest: Mapping[str, Any]) -> None:
    """DataError naming the first file of the manifest that is missing or whose sha256 is not
    the recorded one (a corrupt, truncated or edited output)."""
    directory = Path(directory)
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path}: listed in {directory / MANIFEST} but missing; re-run "
                            "the stage that writes it")  # fmt: skip
        if file_sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: sha256 differs from {directory / MANIFEST} (the file was "
                            "changed or corrupted after the stage wrote it); re-run that stage")  # fmt: skip
