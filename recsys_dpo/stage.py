"""What every stage entry point shares: config to plain data, the checks before any work, and
clean failure on bad input."""

import sys
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from recsys_dpo.errors import DataError
from recsys_dpo.quiet import quiet_output
from recsys_dpo.settings import S, Tracking, validate


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (for manifests, hashes and MLflow)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def data_features(cfg: DictConfig) -> dict[str, Any] | None:
    """The side information `cfg.data.features` reads (a hydra `_target_`, e.g. Coat's
    `read_coat_features`: {"user": frame, "item": frame}), or None when the dataset has none."""
    spec = cfg.data.get("features")
    # _partial_ so the reader's own DataError reaches the caller unwrapped by hydra.
    return None if spec is None else instantiate(spec, _partial_=True)()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{a: {b: 1}} -> {"a.b": 1}: nested settings as dotted keys (config overrides, MLflow
    params)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


def preflight(cfg: DictConfig, schema: type[S]) -> S:
    """The composed config checked against the stage's schema (recsys_dpo.settings), then, when
    the stage tracks, the tracking server probed: a bad setting or a wrong tracking.uri fails in
    seconds, before anything is read, trained or written. DataError otherwise."""
    settings = validate(plain(cfg), schema)
    tracking = getattr(settings, "tracking", None)  # a schema without it: a dict, or none
    if isinstance(tracking, Tracking) and tracking.enabled:
        # Imported here: mlflow takes seconds to import, and prepare.py does not track.
        from recsys_dpo.tracking.mlflow_utils import check_reachable

        check_reachable(tracking.uri)
    return settings


def exits_cleanly_on_bad_input(main: Callable[..., Any]) -> Callable[..., Any]:
    """Every entry point's wrapper: third-party noise off first (`recsys_dpo.quiet`), then a
    DataError's message printed on one line (no traceback, no wrapping at the terminal's width;
    brackets in it are text, not rich markup) and exit with status 2."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_output()
        try:
            return main(*args, **kwargs)
        except DataError as err:
            Console(stderr=True).print(
                f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
            )
            sys.exit(2)

    return wrapper
