"""Reading unit files and checking them with ``systemd-analyze`` against a scratch root.

``systemd-analyze verify`` insists that every ``ExecStart=`` binary exists and that the units
a service depends on (``sysinit.target``, ...) can be loaded. PID 1 here is not systemd, so the
checks run with ``--root DIR``: a scratch root that holds the host's own unit library, our
units under ``/etc/systemd/system`` and the installed (or stand-in) programs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
UNITS = (
    "sensormine-agent.service",
    "sensormine-collector.service",
    "sensormine-collector@.service",
    "sensormine-api.service",
)
HOST_UNIT_LIBRARY = next(
    (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
    Path("/usr/lib/systemd/system"),
)
MAX_EXPOSURE = 2.5
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def systemd_analyze() -> str:
    """Path of ``systemd-analyze`` (``make setup`` installs it)."""
    found = shutil.which("systemd-analyze")
    if found is None:
        raise RuntimeError("systemd-analyze is not installed; run scripts/setup-services")
    return found


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each a mapping of key to all its values in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None:
            raise ValueError(f"{path}: {raw!r} comes before any [section]")
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: {raw!r} is not key=value")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """Seconds in a systemd time span such as ``40s``, ``5min`` or ``1min 30s``."""
    units = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def make_scratch_root(root: Path) -> Path:
    """Give ``root`` the host's unit library so that ``verify --root`` can load dependencies."""
    library = root / "usr/lib/systemd/system"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(HOST_UNIT_LIBRARY, library, symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True, exist_ok=True)
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``unit`` as installed under ``root``."""
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", f"--root={root}", unit],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def exposure(root: Path, unit: str) -> tuple[float, str]:
    """The overall exposure ``systemd-analyze security --offline=yes`` gives ``unit``, and its report."""
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", f"--root={root}", unit],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    match = _EXPOSURE.search(result.stdout + result.stderr)
    if match is None:
        raise AssertionError(
            f"no exposure level in the report of {unit}:\n{result.stdout}\n{result.stderr}"
        )
    return float(match.group(1)), result.stdout
