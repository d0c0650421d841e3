"""Benchmark: what a gateway downloads and keeps on disk for the agent.

Builds the wheels of the distribution's core (what ``scripts/build-bundle`` puts in the agent's
bundle) and, as the baseline in the same run, of the core with the ``collector`` extra (what a
gateway installed before the extras were split), installs each into a fresh virtual environment
offline, and prints wheel count, wheelhouse bytes and installed bytes with their ratio. Needs
the package index to build the wheels. Target: the agent's venv at most 0.75 of the baseline's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]


def _size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _measure(work: Path, requirement: str, name: str) -> tuple[int, int, int]:
    """(wheels, wheelhouse bytes, installed venv bytes) for ``requirement``."""
    wheels = work / f"{name}-wheels"
    quiet = ["--disable-pip-version-check", "-q"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", *quiet, "--wheel-dir", str(wheels), requirement],
        check=True,
    )
    venv = work / f"{name}-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", *quiet]
    # As scripts/install-agent does: no setuptools in the gateway's venv, wheels only.
    subprocess.run([*pip, "uninstall", "-y", "setuptools"], check=True, capture_output=True)
    spec = "sensormine[collector]" if name == "baseline" else "sensormine"
    subprocess.run(
        [*pip, "install", "--no-index", "--find-links", str(wheels), spec],
        check=True,
    )
    return len(list(wheels.glob("*.whl"))), _size(wheels), _size(venv)


@click.command()
def main() -> None:
    """Print the agent's install size against the core-plus-collector baseline."""
    with tempfile.TemporaryDirectory(prefix="sm-size-") as tmp:
        work = Path(tmp)
        # Built from a copy, as build-bundle does, so that the checkout gets no build/ left.
        source = work / "src"
        for part in ("protocol", "agent", "collector"):
            shutil.copytree(
                REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__")
            )
        for file in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / file, source / file)
        base = _measure(work, f"{source}[collector]", "baseline")
        agent = _measure(work, str(source), "agent")
    print(f"{'':<22}{'wheels':>8}{'wheelhouse MB':>16}{'venv MB':>10}")
    for label, (count, wheelhouse, venv) in (
        ("core + collector", base),
        ("agent (core)", agent),
    ):
        print(f"{label:<22}{count:>8}{wheelhouse / 1e6:>16.1f}{venv / 1e6:>10.1f}")
    print(
        f"ratio agent/baseline: wheelhouse {agent[1] / base[1]:.2f}, venv {agent[2] / base[2]:.2f}"
    )


if __name__ == "__main__":
    main()
