"""Training checkpoints on disk: whole or absent, and `last.ckpt` always the latest state.

- `write_atomic` writes `<path>.tmp`, fsyncs it and renames it over `path`: a kill or a full
  disk leaves the previous complete file (or none), never a truncated one. A full disk or a
  read-only directory is bad input (DataError naming the directory), not a crash.
- `AtomicCheckpointIO` is Lightning's checkpoint IO through `write_atomic`; it loads through
  `read_checkpoint`, the one verifying loader, so resuming from a broken file is one message.
- `checkpoint_callbacks`: the best checkpoint by the monitored metric, and `last.ckpt`
  rewritten with the latest state at every epoch end (and every N optimizer steps if asked).
  Lightning's `ModelCheckpoint(monitor=..., save_last=True)` rewrites `last.ckpt` only when a
  new best is saved, so "last" meant "last improvement" and a resumed run lost the epochs
  after it.
"""

import errno
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from recsys_dpo.errors import DataError
from recsys_dpo.training.reference_module import read_checkpoint

LAST = "last"
# A full disk, a quota, a read-only mount or a directory the user cannot write: the user's to
# fix (free space, another paths.runs), so one message rather than a traceback.
UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# A run directory always holds run.json (and its lock) before training, and on a resume the very
# checkpoints these callbacks rewrite: Lightning's "exists and is not empty" is expected here.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be
    opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` whole or not at all (temp file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in UNWRITABLE:
            raise DataError(
                f"{path.parent}: cannot write {path.name} ({err.strerror}); the files already "
                "there are complete. Free some space or fix the permissions (or point "
                "paths.runs elsewhere), then resume with ckpt_path=<run dir>/last.ckpt"
            ) from err
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a truncated checkpoint and loads through the
    project's verifying loader (tensors and plain data only, on the CPU; Lightning moves the
    states to the model's device)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer())

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return read_checkpoint(path)


def checkpoint_callbacks(
    dirpath: Path, monitor: str, every_n_steps: int | None
) -> tuple[ModelCheckpoint, list[ModelCheckpoint]]:
    """(best, latest): the best checkpoint by `monitor` (max), and the callbacks that rewrite
    `<dirpath>/last.ckpt` with the latest state at every epoch end and, when `every_n_steps`
    is set, every that many optimizer steps.

    `last.ckpt` is saved after validation and after the best checkpoint and early stopping
    have updated their state (Lightning runs checkpoint callbacks last, in list order), so a
    run resumed from it carries on exactly where it was. No version counters: a resumed run
    rewrites the files of its own directory instead of adding `-v1` copies.
    """
    best = ModelCheckpoint(
        dirpath=dirpath,
        # No '=' in the name: the path is passed back as a hydra override (reference.ckpt=...).
        filename="best-epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    latest = [ModelCheckpoint(dirpath=dirpath, filename=LAST, enable_version_counter=False)]
    if every_n_steps:
        # A second instance: one ModelCheckpoint saves either per epoch or per N steps.
        latest.append(
            ModelCheckpoint(
                dirpath=dirpath,
                filename=LAST,
                every_n_train_steps=every_n_steps,
                enable_version_counter=False,
            )
        )
    return best, latest
