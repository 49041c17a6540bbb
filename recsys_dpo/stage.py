"""What every stage entry point shares: config to plain data, and clean failure on bad input."""

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape

from recsys_dpo.errors import DataError


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (for manifests, hashes and MLflow)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def exits_cleanly_on_bad_input(main: Callable[..., Any]) -> Callable[..., Any]:
    """Print a DataError's message on one line (no traceback, no wrapping at the terminal's
    width; brackets in it are text, not rich markup) and exit with status 2."""

    @wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except DataError as err:
            Console(stderr=True).print(
                f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
            )
            sys.exit(2)

    return wrapper
