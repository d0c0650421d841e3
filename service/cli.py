"""Options both command lines share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def config_option(default: Path, help_text: str, envvar: str | None = None) -> Callable[[F], F]:
    """``--config FILE`` (into ``config_path``): the program's configuration file."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=default,
        show_default=True,
        envvar=envvar,
        help=help_text,
    )
