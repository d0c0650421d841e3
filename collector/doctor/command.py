"""The ``sensormine-collector doctor`` command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from collector.errors import CollectorError
from collector.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_settings
from service.cli import config_option

from .probes import examine
from .render import render


@click.command("doctor")
@config_option(DEFAULT_CONFIG_PATH, "Collector configuration file (TOML).", envvar=CONFIG_ENV)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--broker-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for the broker's CONNACK.",
)
def doctor(config_path: Path, as_json: bool, broker_timeout: float) -> None:
    """Report on the databases, the lifecycle jobs and the broker; exit 1 if something needs attention.

    Shows the TimescaleDB edition, hypertables with chunk counts and sizes, the storage layout
    move if one is pending, retention and compression as configured and as last applied,
    TimescaleDB's own background jobs with their failures, the collector's lifecycle jobs,
    rollups, ingest lag, ledger size, rejects by reason over the last 24 h, the quarantine,
    gateways whose clocks are off beyond validation.clock_tolerance and broker connectivity. Every problem is listed under NEEDS ATTENTION.
    """
    try:
        settings = load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    report = asyncio.run(examine(settings, broker_timeout=broker_timeout)).as_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(render(report))
    if report["problems"]:
        raise SystemExit(1)
