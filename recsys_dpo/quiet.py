"""Readable output: third-party noise off, and rich tables whole in a CI log.

`quiet_output()` runs first in every entry point (`recsys_dpo.stage.exits_cleanly_on_bad_input`)
and in every study worker. It drops what the libraries print on every run that tells the user
nothing about theirs: Lightning's litlogger tip and its "GPU available: False" / "TPU
available" / "Seed set to 0" lines, deprecation warnings (a library warning about its own
dependencies), MLflow's pickle and signature warnings on `log_model`, its schema-migration
lines on a fresh sqlite store and its artifact download bars, and faiss's loader lines.
Warnings and errors otherwise pass, and so does every line of this project's own.
`RECSYS_DPO_VERBOSE=1` in the environment leaves all of it on.

With no terminal at all (a CI job, `nohup`, a pipe from a scheduler), rich renders at 80
columns and squeezes every wider table into wrapped cells; `COLUMNS` is then set to
`LOG_COLUMNS` (unless set already), which rich and spawned workers read. Tables do not
expand, so they keep their natural width.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

VERBOSE_ENV = "RECSYS_DPO_VERBOSE"
LOG_COLUMNS = 200

# logger -> the starts of the messages dropped from it.
NOISE = {
    # rank_zero_info goes to whichever of the two modules was imported last.
    **dict.fromkeys(
        ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"),
        ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:"),
    ),
    "lightning.fabric.utilities.seed": ("Seed set to",),
    "mlflow.pyfunc": ("Passing a Python object as `python_model`",
                      "Failed to infer model signature"),  # fmt: skip
    "mlflow.store.db.utils": ("Creating initial MLflow database tables", "Updating database tables"),
}
# Loggers whose INFO lines are all noise: faiss says which CPU build it loaded.
WARNINGS_ONLY = ("faiss.loader", "alembic")


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def quiet_output() -> None:
    """Third-party noise off (unless `RECSYS_DPO_VERBOSE` is set) and the log width set when
    no standard stream is a terminal; calling it again changes nothing."""
    if not any(stream.isatty() for stream in (sys.stdin, sys.stdout, sys.stderr)
               if stream is not None):  # fmt: skip
        os.environ.setdefault("COLUMNS", str(LOG_COLUMNS))
    if verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for category in (DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # torch marks its deprecations FutureWarning (e.g. `LeafSpec`, from inside Lightning).
    warnings.filterwarnings("ignore", message=r"(?s).*\bdeprecated\b", category=FutureWarning)
    for name, starts in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))
    for name in WARNINGS_ONLY:
        logging.getLogger(name).setLevel(logging.WARNING)
