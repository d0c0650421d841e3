"""Input kinds of the agent; each lives in its own folder and registers itself on import."""

from __future__ import annotations

import importlib

# One line per built-in kind: the folder name is the registry key and the config's ``type``.
BUILTINS: tuple[str, ...] = ("simulated", "sysfs", "modbus", "command", "system", "mqtt")

_loaded = False


def load_builtins() -> None:
    """Import the built-in input kinds so that they register themselves (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTINS:
        importlib.import_module(f"agent.inputs.{name}")
