"""Stage outputs on disk: atomic directories with a manifest written last.

Every stage writes into a temporary sibling directory, writes `manifest.json` as its very last
file, then renames the directory into place. A directory without a manifest is incomplete and
`read_manifest` refuses it, so a killed stage never leaves output that looks finished.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys_dpo.errors import DataError

MANIFEST = "manifest.json"


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


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory that replaces `final` only if the block finishes without error.

    The caller writes its files (the manifest last, see `write_manifest`) into the yielded path.
    On error the temp directory is removed and `final`, if it existed, is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
