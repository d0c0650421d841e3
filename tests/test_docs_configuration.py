"""docs/configuration.md is generated from the settings models and the example files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current() -> None:
    """Every model key is shown in its example file, and the page matches the code (else: make config-reference)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert (0, "") == (result.returncode, result.stderr)


def test_every_key_is_explained() -> None:
    """No key in the reference is left without an explanation."""
    rows = [
        line
        for line in (ROOT / "docs" / "configuration.md").read_text().splitlines()
        if line.startswith("| `")
    ]
    assert len(rows) > 150
    assert [] == [row for row in rows if row.rstrip().endswith("|  |")]
