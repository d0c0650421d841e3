"""The ``sensormine-collector`` console script: says which installation is missing what.

The collector's dependencies are the distribution's ``collector`` extra; a gateway installs the
agent only, yet gets this script too (one distribution, one set of scripts). Without this check
it would end in a ``ModuleNotFoundError`` traceback.
"""

from __future__ import annotations

import importlib.util
import sys

# Import name -> distribution, for every requirement of the `collector` extra.
COLLECTOR_MODULES = {
    "asyncpg": "asyncpg",
    "jsonschema": "jsonschema",
    "cryptography": "cryptography",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "plotly": "plotly",
}


def missing_modules() -> list[str]:
    """The collector's dependencies this interpreter cannot import, by distribution name."""
    return [
        dist
        for module, dist in COLLECTOR_MODULES.items()
        if importlib.util.find_spec(module) is None
    ]


def main() -> None:
    """Run the collector's command line, or exit 1 naming the missing dependencies."""
    missing = missing_modules()
    if missing:
        sys.stderr.write(
            f"error: this installation has the agent only: the collector also needs"
            f" {', '.join(missing)}. Install it with: pip install 'sensormine[collector]' (in a checkout: pip install '.[collector]')\n"
        )
        sys.exit(1)
    from collector.cli import main as cli

    cli()
