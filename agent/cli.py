"""The ``sensormine-agent`` command line."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from agent import __version__
from agent.backlog import DrainFigures
from agent.buffer import DROP_REASONS, BufferStats, integrity, open_store_readonly
from agent.errors import AgentError, BufferFileError, ConfigError
from agent.inputs.base import InputContext, kind, kinds
from agent.runtime import rss_bytes, store_figures
from agent.settings import (
    DEFAULT_CONFIG_PATH,
    Settings,
    effective_config,
    exposed_credentials,
    load_settings,
)
from protocol import Batch, ProtocolError, decode_batch
from service.cli import config_option
from service.logs import configure_logging

CONFIG_OPTION = config_option(DEFAULT_CONFIG_PATH, "The agent's TOML configuration file.")
BUFFER_OPTION = click.option(
    "--buffer",
    "buffer_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Read this buffer file instead of the one the configuration names.",
)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _settings(config_path: Path) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _buffer_path(config_path: Path, buffer_path: Path | None) -> Path:
    if buffer_path is not None:
        return buffer_path
    return _settings(config_path).buffer.path


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sensormine-agent")
def main() -> None:
    """Sensormine Edge gateway agent: read sensors, buffer every reading on disk, ship to MQTT.

    \b
    Environment:
      SENSORMINE_MQTT_USERNAME   the broker username (overrides mqtt.username)
      SENSORMINE_MQTT_PASSWORD   the broker password, when mqtt.password_file is not set
      CREDENTIALS_DIRECTORY      systemd credentials: mqtt-password
    """


@main.command()
@CONFIG_OPTION
def run(config_path: Path) -> None:
    """Run the agent until SIGTERM or SIGINT, then drain and exit 0.

    On a signal the agent stops its inputs, commits and seals what they reported, waits for
    in-flight acknowledgements up to runtime.drain_timeout and exits. A configuration error
    exits 1 with a message naming the file, the key and the problem.
    """
    settings = _settings(config_path)
    configure_logging(settings.log.level, settings.log.format, stream=sys.stdout)
    from agent.runtime import Runtime

    try:
        runtime = Runtime(settings)
    except ConfigError as exc:
        _fail(f"{config_path}: {exc}")
        return

    async def main_task() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runtime.run(stop)

    try:
        asyncio.run(main_task())
    except AgentError as exc:
        _fail(str(exc))


@main.command("check-config")
@CONFIG_OPTION
@click.option(
    "--user",
    "user",
    default=None,
    metavar="NAME",
    help="Judge access to the files for this account (default: the service's user sensormine"
    " when it exists and you are root, else you).",
)
@click.option(
    "--root",
    "root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=Path("/"),
    show_default=True,
    help="Take the configuration's paths (and the account) from the system image under this"
    " directory, as install-agent --root does.",
)
def check_config(config_path: Path, user: str | None, root: Path) -> None:
    """Validate the configuration and every file it names, then print it with defaults filled
    in and secrets masked.

    Besides the keys, it checks that each file and directory the configuration names exists and
    that the service's user may use it: the configuration file, the buffer's directory
    (writable), the password and TLS files, each input's program, working directory, serial
    port and sysfs files. Errors go to stderr, one per line; warnings too (a serial adapter not
    plugged in, a path the unit's sandbox hides). Exit status 0 when valid, 1 when anything is
    an error.
    """
    from agent.filecheck import check_files, default_account, find_account

    settings = _settings(config_path)
    account = default_account(root) if user is None else find_account(user, root)
    if account is None:
        _fail(f"--user {user}: no such user in {root / 'etc/passwd'}")
        return
    problems = check_files(settings, config_path, account, root)
    for problem in problems:
        click.echo(f"{problem.severity}: {config_path}: {problem}", err=True)
    if any(p.severity == "error" for p in problems):
        click.echo(
            f"{config_path}: files checked as user {account.name} (uid {account.uid}): not valid",
            err=True,
        )
        sys.exit(1)
    try:
        for config in settings.inputs:
            kind(config.type)
        data = effective_config(_on_image(settings, root))
    except (ConfigError, AgentError) as exc:
        _fail(f"{config_path}: {exc}")
        return
    if settings.mqtt.password_file is not None:
        data["mqtt"]["password_file"] = str(settings.mqtt.password_file)  # as written, not rooted
    click.echo(json.dumps(data, indent=2))
    for key, path, mode in exposed_credentials(_on_image(settings, root).mqtt):
        click.echo(
            f"warning: {key}: {path} is readable by other users (mode {mode}):"
            f" chmod 0600 {path} (or 0640 with the service's group)",
            err=True,
        )
    click.echo(
        f"{config_path}: configuration is valid (files checked as user {account.name})", err=True
    )


def _on_image(settings: Settings, root: Path) -> Settings:
    """``settings`` with the password file read from the system image under ``root``."""
    password = settings.mqtt.password_file
    if root == Path("/") or password is None or not password.is_absolute():
        return settings
    mqtt = settings.mqtt.model_copy(update={"password_file": root / password.relative_to("/")})
    return settings.model_copy(update={"mqtt": mqtt})


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="milliseconds")


# What a quarantined reading waits for, by reason code (as docs/protocol.md lists the outcomes;
# the collector's table is the authority, this is only the technician's hint).
_WAITS_FOR = {
    "unknown_gateway": "registration",
    "gateway_disabled": "registration",
    "unknown_device": "registration",
    "device_disabled": "registration",
    "device_gateway_mismatch": "registration",
    "no_schema": "a schema fix",
    "unknown_metric": "a schema fix",
    "type_mismatch": "a schema fix",
    "out_of_range": "a schema fix",
    "not_in_enum": "a schema fix",
    "non_finite": "a schema fix",
    "timestamp_out_of_window": "a clock fix",
    "too_large": "a collector limit",
    "invalid_field": "a collector limit",
    "too_many_points": "a collector limit",
    "internal_error": "a collector fix",
}


def _by_reason(stats: BufferStats, column: int) -> dict[str, int]:
    return {r: counts[column] for r, counts in stats.by_reason.items() if counts[column]}


def _quarantine_line(stats: BufferStats) -> str:
    """E.g. ``in the cloud: 120 (unknown_device 120) — waiting for registration, not stored``."""
    reasons = _by_reason(stats, 0)
    if not stats.quarantined:
        return "0"
    detail = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    waits: list[str] = []
    for reason in sorted(reasons, key=lambda r: -reasons[r]):
        hint = _WAITS_FOR.get(reason, "the cause to be fixed in the cloud")
        if hint not in waits:
            waits.append(hint)
    return (
        f"in the cloud: {stats.quarantined} ({detail or 'no reason given'})"
        f" — waiting for {' or '.join(waits)}, not stored"
    )


DRAIN_FIGURES_STALE = 30.0
"""Seconds after which the running agent's last drain figures no longer count as current."""


def _drain(stats: BufferStats, now: float) -> dict[str, Any]:
    """The running agent's drain figures as ``status`` shows them (``measured`` false when the
    agent has not measured lately: stopped, or an older agent)."""
    figures = DrainFigures.from_json(stats.backlog) if stats.backlog else None
    if figures is None or now - figures.at_us / 1e6 > DRAIN_FIGURES_STALE:
        return {"measured": False, "estimate_s": None, "ack_rate": None, "production_rate": None}
    return {
        "measured": True,
        "measured_at": _iso(figures.at_us),
        "estimate_s": figures.estimate_s,
        "ack_rate": figures.ack_rate,
        "production_rate": figures.production_rate,
        "draining": figures.draining,
    }


def _drain_line(drain: dict[str, Any], readings: int) -> str:
    if not drain["measured"]:
        return "not measured (the agent is not running; it measures while it runs)"
    rates = f"acks {drain['ack_rate']:g}/s, production {drain['production_rate']:g}/s"
    if readings == 0 or drain["estimate_s"] == 0:
        return f"nothing to drain ({rates})"
    if drain["estimate_s"] is None:
        return f"not shrinking: production keeps up with the acks ({rates})"
    return f"{drain['estimate_s']:g} s ({rates})"


def _status_document(stats: BufferStats) -> dict[str, Any]:
    now = time.time()
    oldest_age = None if stats.oldest_us is None else max(0.0, now - stats.oldest_us / 1e6)
    drain = _drain(stats, now)
    return {
        "stream": stats.stream,
        "readings": stats.readings,
        "batches": stats.batches,
        "bytes": stats.bytes,
        "oldest_age_s": None if oldest_age is None else round(oldest_age, 3),
        "dropped": sum(stats.dropped.values()),
        "dropped_by_reason": stats.dropped,
        "produced": stats.produced,
        "delivered": stats.delivered,
        "stored": stats.stored,
        "quarantined": stats.quarantined,
        "quarantined_by_reason": _by_reason(stats, 0),
        "refused": stats.refused,
        "refused_by_reason": _by_reason(stats, 1),
        "rejected_batches": stats.rejected_batches,
        "streams": [
            {
                "stream": str(s.stream),
                "first_seq": s.first_seq,
                "started_at": _iso(s.started_us),
                "reason": s.reason,
            }
            for s in stats.streams
        ],
        "reencoded_batches": stats.reencoded_batches,
        "last_ack_at": _iso(stats.last_ack_us),
        "next_seq": stats.next_seq,
        "estimated_drain_s": drain["estimate_s"],
        "drain": drain,
        "clock": _clock_document(stats),
    }


def _clock_document(stats: BufferStats) -> dict[str, Any] | None:
    clock = stats.clock
    if clock is None:
        return None
    saved = clock["saved_at_us"]
    return {
        "source": clock["source"],
        "trusted": clock["trusted"],
        "error_ms": clock["error_ms"],
        "system_clock_off_s": clock["system_clock_off_s"],
        "saved_at": _iso(saved) if isinstance(saved, int) else None,
    }


@main.command()
@CONFIG_OPTION
@BUFFER_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def status(config_path: Path, buffer_path: Path | None, as_json: bool) -> None:
    """Show what the buffer holds; safe while the agent runs.

    Readings, batches and bytes buffered, age of the oldest reading, last ack time, dropped and
    produced counts, and the time the backlog will take to drain, from the ack and production
    rates the running agent measured over the last minute. Delivered
    readings are split by what the collector did: stored, quarantined in the cloud (durable,
    waiting for a registration or schema fix, not stored yet) and refused, with their reasons.
    The clock line says where the agent's time comes from (the synchronised system clock or the
    collector's, with its error) and how far the system clock is off it.
    """
    if buffer_path is None:
        settings = _settings(config_path)
        buffer_path = settings.buffer.path
    try:
        store = open_store_readonly(buffer_path)
        try:
            stats = store.stats()
        finally:
            store.conn.close()
    except (BufferFileError, sqlite3.Error) as exc:
        _fail(str(exc))
        return
    doc = _status_document(stats)
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"buffer          {buffer_path}")
    renewals = len(stats.streams) - 1
    click.echo(
        f"stream          {doc['stream']}"
        + (f" (renewed {renewals}x; last: {stats.streams[-1].reason})" if renewals > 0 else "")
    )
    click.echo(f"readings        {doc['readings']} ({stats.batches} sealed batches)")
    click.echo(f"bytes           {doc['bytes']}")
    oldest = doc["oldest_age_s"]
    click.echo(f"oldest reading  {'none' if oldest is None else f'{oldest:g} s ago'}")
    click.echo(f"produced        {doc['produced']}")
    click.echo(f"delivered       {doc['delivered']}")
    click.echo(f"  stored        {doc['stored']}")
    click.echo(f"  quarantined   {_quarantine_line(stats)}")
    refused = ", ".join(f"{r} {n}" for r, n in doc["refused_by_reason"].items())
    click.echo(
        f"  refused       {doc['refused']}"
        + (f" ({refused}) — refused by the collector for good" if doc["refused"] else "")
    )
    reasons = ", ".join(f"{k} {v}" for k, v in stats.dropped.items())
    click.echo(f"dropped         {doc['dropped']} ({reasons})")
    click.echo(f"last ack        {doc['last_ack_at'] or 'never'}")
    click.echo(f"drain estimate  {_drain_line(doc['drain'], stats.readings)}")
    click.echo(f"clock           {_clock_line(doc['clock'])}")


def _clock_line(clock: dict[str, Any] | None) -> str:
    if clock is None:
        return "unknown (no reading sealed since this boot)"
    if not clock["trusted"]:
        return (
            "NOT TRUSTED: no NTP and no collector's time yet; readings wait unsealed up to"
            " clock.max_wait (docs/troubleshooting.md, Clock)"
        )
    where = {"system": "the system clock (synchronised)", "collector": "the collector's clock"}
    off = clock["system_clock_off_s"]
    error = f" ± {clock['error_ms']} ms" if clock["error_ms"] is not None else ""
    line = f"from {where.get(clock['source'], clock['source'])}{error}"
    if off is not None and abs(off) >= 0.001:
        line += f"; the system clock is {off:+.3f} s off it"
    return line + f" (saved {clock['saved_at']})"


@main.group()
def buffer() -> None:
    """Inspect the buffer file (forensics); safe while the agent runs."""


def _export_rows(store_path: Path) -> Iterator[dict[str, Any]]:
    store = open_store_readonly(store_path)
    conn = store.conn
    try:
        conn.execute("BEGIN")
        for seq, frame in conn.execute("SELECT seq, frame FROM batches ORDER BY seq"):
            try:
                batch = decode_batch(bytes(frame))
            except ProtocolError as exc:
                yield {"seq": seq, "error": str(exc)}
                continue
            for series in batch.series:
                for ts, value in zip(series.timestamps, series.values, strict=True):
                    yield {
                        "seq": seq,
                        "device_id": str(series.device_id),
                        "metric": series.metric,
                        "time_us": ts,
                        "value": value,
                    }
        boot = "boot" if store.has_boot_column else "NULL"
        # Unsealed readings on the boot clock get the wall time sealing would give them now.
        for device, metric, ts, value, is_bool, on_boot in conn.execute(
            f"SELECT device, metric, ts, value, is_bool, {boot} FROM readings ORDER BY id"
        ):
            yield {
                "seq": None,
                "device_id": str(uuid.UUID(bytes=bytes(device))),
                "metric": metric,
                "time_us": store.wall_time(int(ts), None if on_boot is None else int(on_boot)),
                "value": bool(value) if is_bool else value,
            }
        conn.execute("COMMIT")
    finally:
        conn.close()


@buffer.command("export")
@CONFIG_OPTION
@BUFFER_OPTION
@click.option(
    "--format", "fmt", type=click.Choice(["ndjson", "csv"]), default="ndjson", show_default=True
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Default: stdout.",
)
def buffer_export(
    config_path: Path, buffer_path: Path | None, fmt: str, output: Path | None
) -> None:
    """Write every buffered reading (sealed batches, then unsealed) as NDJSON or CSV.

    Columns: seq (null for readings not yet sealed), device_id, metric, time_us, value.
    """
    path = _buffer_path(config_path, buffer_path)
    out = output.open("w", newline="") if output else sys.stdout
    try:
        rows = _export_rows(path)
        if fmt == "ndjson":
            for row in rows:
                out.write(json.dumps(row) + "\n")
        else:
            writer = csv.DictWriter(
                out, fieldnames=["seq", "device_id", "metric", "time_us", "value", "error"]
            )
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    except (BufferFileError, sqlite3.Error) as exc:
        _fail(str(exc))
    finally:
        if output:
            out.close()


@buffer.command("verify")
@CONFIG_OPTION
@BUFFER_OPTION
def buffer_verify(config_path: Path, buffer_path: Path | None) -> None:
    """Check the buffer: SQLite integrity, every stored frame decodes with its own seq and stream.

    Exit status 0 when everything is sound, 1 with the problems listed otherwise.
    """
    path = _buffer_path(config_path, buffer_path)
    try:
        store = open_store_readonly(path)
    except BufferFileError as exc:
        _fail(str(exc))
        return
    problems: list[str] = []
    conn = store.conn
    try:
        result = integrity(conn)
        if result != "ok":
            problems.append(f"integrity_check: {result}")
        batches = 0
        stream_column = "NULL" if store.legacy else "stream"
        for seq, frame, count, stream in conn.execute(
            f"SELECT seq, frame, readings, {stream_column} FROM batches"
        ):
            batches += 1
            try:
                batch: Batch = decode_batch(bytes(frame))
            except ProtocolError as exc:
                problems.append(f"batch {seq}: frame does not decode: {exc}")
                continue
            if batch.seq != seq:
                problems.append(f"batch {seq}: frame carries seq {batch.seq}")
            expected = uuid.UUID(stream) if stream else store.stream
            if batch.stream != expected:
                problems.append(
                    f"batch {seq}: frame carries stream {batch.stream}, the table says {expected}"
                )
            if not store.knows_stream(batch.stream):
                problems.append(f"batch {seq}: stream {batch.stream} is not one of the file's")
            if batch.point_count != count:
                problems.append(f"batch {seq}: {batch.point_count} readings, table says {count}")
        if batches and store.counters["next_seq"] <= int(
            conn.execute("SELECT MAX(seq) FROM batches").fetchone()[0]
        ):
            problems.append("next_seq is not above the highest stored seq")
        stats = store.stats()
        dropped = sum(stats.dropped[r] for r in DROP_REASONS)
        if stats.produced != stats.delivered + stats.readings + dropped:
            problems.append(
                f"counts disagree: produced {stats.produced} != delivered {stats.delivered}"
                f" + buffered {stats.readings} + dropped {dropped}"
            )
    except sqlite3.Error as exc:
        problems.append(f"sqlite: {exc}")
    finally:
        conn.close()
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        sys.exit(1)
    click.echo(f"{path}: ok ({batches} batches, stream {store.stream})")


@main.group()
def inputs() -> None:
    """List input kinds and configured inputs; test one against its devices."""


@inputs.command("list")
@CONFIG_OPTION
def inputs_list(config_path: Path) -> None:
    """List the input kinds this agent knows and the inputs the configuration sets up."""
    click.echo("kinds:")
    for name, k in sorted(kinds().items()):
        doc = (k.config_model.__doc__ or "").strip().splitlines()
        click.echo(f"  {name:<12} {doc[0] if doc else ''}")
    if not config_path.exists() and config_path == DEFAULT_CONFIG_PATH:
        return
    settings = _settings(config_path)
    click.echo("configured:")
    for config in settings.inputs:
        click.echo(f"  {config.name:<20} type={config.type}")


@inputs.command("test")
@CONFIG_OPTION
@click.argument("name")
def inputs_test(config_path: Path, name: str) -> None:
    """Build the configured input NAME, read each of its devices once and print the result.

    Nothing is written to the buffer. Exit status 1 if any device answered with an error.
    """
    settings = _settings(config_path)
    configure_logging(settings.log.level, settings.log.format)
    matches = [c for c in settings.inputs if c.name == name]
    if not matches:
        known = ", ".join(c.name for c in settings.inputs) or "none"
        _fail(f"{config_path}: no input named {name!r} (configured: {known})")
    config = matches[0]
    context = InputContext(
        gateway_id=settings.gateway.id,
        buffer_path=settings.buffer.path,
        stats=lambda: _buffer_figures(settings.buffer.path),
    )
    try:
        instance = kind(config.type).factory(config, context)
        results = asyncio.run(instance.probe())
    except Exception as exc:
        _fail(f"input {name}: {exc}")
        return
    failed = False
    for result in results:
        click.echo(f"{result.device_name} ({result.device_id})")
        if result.error is not None:
            failed = True
            click.echo(f"  error: {result.error}")
        for metric, value in result.readings.items():
            click.echo(f"  {metric} = {json.dumps(value, ensure_ascii=False)}")
    sys.exit(1 if failed else 0)


def _buffer_figures(path: Path) -> dict[str, float]:
    """The agent's own figures (``agent_*`` of the system input) from the buffer file, as the
    running agent would report them now; link_up is 0 (``inputs test`` does not connect)."""
    if not path.exists():
        return store_figures_empty()
    try:
        store = open_store_readonly(path)
    except BufferFileError:
        return store_figures_empty()
    try:
        return store_figures(store, link_up=False)
    finally:
        store.conn.close()


def store_figures_empty() -> dict[str, float]:
    """The figures of an agent whose buffer file does not exist yet."""
    return {
        "buffer_readings": 0.0,
        "buffer_held_readings": 0.0,
        "buffer_batches": 0.0,
        "buffer_bytes": 0.0,
        "dropped": 0.0,
        "produced": 0.0,
        "rss_bytes": float(rss_bytes()),
        "link_up": 0.0,
    }
