"""Smoke tests proving that the services the suite relies on are real and usable."""

from __future__ import annotations

import queue
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import Batch, Series, TopicKind, build_topic, decode_batch, encode_frame


def test_frame_travels_through_mosquitto(mqtt_address: tuple[str, int]) -> None:
    """A batch frame published with QoS 1 to the local Mosquitto comes back byte for byte."""
    host, port = mqtt_address
    prefix = f"smtest-{uuid.uuid4().hex[:8]}"
    topic = build_topic(prefix, uuid.uuid4(), uuid.uuid4(), TopicKind.TELEMETRY)
    batch = Batch(
        gateway_id=uuid.uuid4(),
        stream=uuid.uuid4(),
        seq=1,
        created=1,
        series=[Series(device_id=uuid.uuid4(), metric="t", timestamps=[1, 2], values=[1.25, 2.5])],
    )
    frame = encode_frame(batch)
    received: queue.Queue[bytes | bytearray] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"smoke-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.on_message = lambda c, u, msg: received.put(msg.payload)
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(True)
    client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topic, qos=1)
    client.connect(host, port)
    client.loop_start()
    try:
        assert subscribed.get(timeout=10)
        client.publish(topic, frame, qos=1).wait_for_publish(timeout=10)
        payload = received.get(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()
    assert frame == payload
    assert batch == decode_batch(payload)


async def test_timescaledb_hypertable_with_binary_copy(scratch_db: str) -> None:
    """A hypertable in a scratch database takes rows by asyncpg binary COPY and returns them."""
    conn = await asyncpg.connect(scratch_db)
    try:
        await conn.execute(
            "CREATE TABLE readings (time timestamptz NOT NULL, device_id uuid NOT NULL, metric text NOT NULL, value double precision)"
        )
        await conn.execute(
            "SELECT create_hypertable('readings', by_range('time', INTERVAL '1 day'))"
        )
        device = uuid.uuid4()
        start = datetime(2026, 1, 1, tzinfo=UTC)
        rows = [(start + timedelta(hours=i), device, "temperature", 20.0 + i) for i in range(72)]
        await conn.copy_records_to_table(
            "readings", records=rows, columns=["time", "device_id", "metric", "value"]
        )
        count, total = await conn.fetchrow(
            "SELECT count(*), sum(value) FROM readings WHERE device_id = $1", device
        )
        chunks = await conn.fetchval("SELECT count(*) FROM show_chunks('readings')")
    finally:
        await conn.close()
    assert 72 == count
    assert sum(20.0 + i for i in range(72)) == total
    assert chunks >= 3
