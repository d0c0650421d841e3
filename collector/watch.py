"""``sensormine-collector watch``: subscribe to a prefix's frames and print them decoded.

Frames are binary msgpack (``mosquitto_sub`` prints them as noise); this command decodes each
with the protocol package and prints one line per frame, or one JSON object per line with
``--json``. It subscribes plainly (never to the collectors' shared subscription, so it takes no
batches away from them) with the collector's broker settings and a client id of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.errors import CollectorError
from collector.settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    Settings,
    load_settings,
    mqtt_password,
)
from protocol import (
    Batch,
    Frame,
    GatewayStatus,
    ProtocolError,
    TimeReply,
    TimeRequest,
    TopicKind,
    decode_frame,
    parse_topic,
)
from service.cli import config_option

KINDS = [k.value for k in TopicKind]


def _iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).isoformat(timespec="milliseconds")


def describe(frame: Frame) -> dict[str, Any]:
    """A frame as plain JSON-able values (ids as text, times as ISO 8601)."""
    if isinstance(frame, Batch):
        return {
            "kind": "batch",
            "gateway_id": str(frame.gateway_id),
            "stream": str(frame.stream),
            "seq": frame.seq,
            "created": _iso(frame.created),
            "clock": frame.clock,
            "readings": frame.point_count,
            "series": [
                {
                    "device_id": str(s.device_id),
                    "metric": s.metric,
                    "points": len(s.timestamps),
                    "first": _iso(s.timestamps[0]) if s.timestamps else None,
                    "last_value": s.values[-1] if s.values else None,
                }
                for s in frame.series
            ],
            "events": [
                {"time": _iso(e.time), "kind": e.kind, "severity": e.severity, "message": e.message}
                for e in frame.events
            ],
            "status": [
                {
                    "time": _iso(d.time),
                    "device_id": str(d.device_id),
                    "status": d.status,
                    "reason": d.reason,
                }
                for d in frame.status
            ],
        }
    if isinstance(frame, GatewayStatus):
        return {
            "kind": "status",
            "gateway_id": str(frame.gateway_id),
            "state": frame.state,
            "time": _iso(frame.time),
            "version": frame.version,
            "clock": frame.clock,
        }
    if isinstance(frame, TimeRequest):
        return {"kind": "time_request", "gateway_id": str(frame.gateway_id), "sent": frame.sent}
    if isinstance(frame, TimeReply):
        return {"kind": "time", "sent": frame.sent, "time": _iso(frame.time)}
    return {
        "kind": "ack",
        "stream": str(frame.stream),
        "seq": frame.seq,
        "result": frame.result.value,
        "accepted": frame.accepted,
        "quarantined": frame.quarantined,
        "rejected": frame.rejected,
        "reason": frame.reason,
        "reasons": {k: list(v) for k, v in frame.reasons.items()},
        "time": None if frame.time is None else _iso(frame.time),
    }


def summary(doc: dict[str, Any]) -> str:
    """One line for a described frame."""
    kind = doc["kind"]
    if kind == "batch":
        line = (
            f"batch stream {doc['stream']} seq {doc['seq']}: {doc['readings']} readings in"
            f" {len(doc['series'])} series, created {doc['created']}"
        )
        if doc["events"]:
            line += "; events " + ", ".join(e["kind"] for e in doc["events"])
        if doc["status"]:
            line += "; status " + ", ".join(
                f"{s['device_id']} {s['status']}" + (f" ({s['reason']})" if s["reason"] else "")
                for s in doc["status"]
            )
        return line
    if kind == "status":
        return f"gateway {doc['state']} at {doc['time']}" + (
            f" (version {doc['version']})" if doc["version"] else ""
        )
    if kind == "time_request":
        return f"time request (sent {doc['sent']})"
    if kind == "time":
        return f"time {doc['time']} (answer to {doc['sent']})"
    counts = (
        f"{doc['accepted']} stored, {doc['quarantined']} quarantined, {doc['rejected']} refused"
    )
    return f"ack stream {doc['stream']} seq {doc['seq']}: {doc['result']} ({counts})" + (
        f" reason {doc['reason']}" if doc["reason"] else ""
    )


def watch_filters(
    prefix: str, tenant: uuid.UUID | None, gateway: uuid.UUID | None, kinds: list[str]
) -> list[str]:
    """The topic filters for the chosen tenant, gateway and kinds (``+`` where not chosen)."""
    t = str(tenant) if tenant else "+"
    g = str(gateway) if gateway else "+"
    return [f"{prefix}/v1/{t}/{g}/{k}" for k in kinds]


def _client(settings: Settings) -> mqtt.Client:
    m = settings.mqtt
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"sensormine-watch-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if m.username is not None:
        client.username_pw_set(m.username, mqtt_password(m))
    if m.tls:
        client.tls_set_context(
            ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
        )
    return client


@click.command()
@config_option(
    DEFAULT_CONFIG_PATH,
    "Collector configuration file (TOML): broker address, credentials and prefix.",
    envvar=CONFIG_ENV,
)
@click.option("--prefix", default=None, help="Topic prefix (default: mqtt.prefix).")
@click.option("--tenant", type=click.UUID, default=None, help="Only this tenant's topics.")
@click.option("--gateway", type=click.UUID, default=None, help="Only this gateway's topics.")
@click.option(
    "--kind",
    "kinds",
    type=click.Choice(KINDS),
    multiple=True,
    help="Frame kinds to show (repeatable; default: all).",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Stop after N frames.")
@click.option(
    "--seconds", type=click.FloatRange(min=0.1), default=None, help="Stop after this long."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per frame.")
def watch(
    config_path: Path,
    prefix: str | None,
    tenant: uuid.UUID | None,
    gateway: uuid.UUID | None,
    kinds: tuple[str, ...],
    count: int | None,
    seconds: float | None,
    as_json: bool,
) -> None:
    """Print the frames of a prefix, tenant or gateway, decoded (telemetry, status, acks).

    Subscribes with the collector's broker settings, never to the collectors' shared
    subscription, so it takes nothing away from them. Example:
    sensormine-collector watch --gateway 0b9e... --kind status --kind ack
    """
    try:
        settings = load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    p = prefix or settings.mqtt.prefix
    filters = watch_filters(p, tenant, gateway, list(kinds) or KINDS)
    client = _client(settings)
    done = threading.Event()
    seen = 0
    lock = threading.Lock()

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            click.echo(f"error: broker refused the connection: {reason}", err=True)
            done.set()
            return
        c.subscribe([(f, 1) for f in filters])

    def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        nonlocal seen
        try:
            address = parse_topic(message.topic, p)
            doc: dict[str, Any] = {
                "topic": message.topic,
                "tenant_id": str(address.tenant_id),
                **describe(decode_frame(bytes(message.payload))),
            }
        except ProtocolError as exc:
            doc = {"topic": message.topic, "kind": "undecodable", "error": str(exc)}
        with lock:
            if done.is_set():
                return
            if as_json:
                click.echo(json.dumps(doc))
            elif doc["kind"] == "undecodable":
                click.echo(f"{message.topic}: cannot decode: {doc['error']}")
            else:
                click.echo(f"{message.topic}: {summary(doc)}")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(settings.mqtt.host, settings.mqtt.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise click.ClickException(
            f"cannot reach the broker at {settings.mqtt.host}:{settings.mqtt.port}: {exc}"
        ) from None
    client.loop_start()
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while not done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            done.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        done.set()
        client.disconnect()
        client.loop_stop()
