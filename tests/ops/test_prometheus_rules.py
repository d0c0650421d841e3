"""The shipped Prometheus rules load, fire as their unit tests say, and name real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from collector.observability import CollectorMetrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "sensormine-rules.yml"


def promtool() -> str:
    """The promtool that ``make setup`` put into the virtual environment (or one on PATH)."""
    local = ROOT / ".venv" / "bin" / "promtool"
    found = str(local) if local.exists() else shutil.which("promtool")
    assert found, "promtool is missing: run `make setup` (scripts/setup-promtool)"
    return found


def rule_metrics(prefix: str) -> set[str]:
    """Metric names starting with ``prefix`` that the rules' expressions use."""
    exprs = [line for line in RULES.read_text().splitlines() if "expr:" in line]
    return {m for line in exprs for m in re.findall(rf"\b({prefix}[a-z_]+)", line)}


def test_the_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """`promtool check rules` accepts the file and `promtool test rules` passes."""
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert 0 == check.returncode, check.stdout + check.stderr
    test = subprocess.run(
        [tool, "test", "rules", "sensormine-rules.test.yml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULES.parent,
    )
    assert 0 == test.returncode, test.stdout + test.stderr


def test_every_collector_metric_the_rules_use_is_exported() -> None:
    """A renamed collector metric would leave an alert that never fires: the names must exist."""
    exported = set()
    for family in CollectorMetrics().registry.collect():
        # A labelled family has no samples before its first use: take the family's own names.
        exported.add(family.name)
        if family.type == "counter":
            exported.add(f"{family.name}_total")
    used = rule_metrics("sensormine_collector_")
    assert used, "the rules use collector metrics"
    assert set() == used - exported
