"""The shipper against the real broker, with a test acknowledger playing the collector."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agent.buffer import Buffer, ReadingRow
from agent.settings import GatewaySettings, MqttSettings
from agent.shipper import Shipper, backoff_delay
from protocol import Ack, AckResult, Batch, decode_batch
from tests.agent.conftest import Acknowledger
from tests.waiting import wait_until

DEVICE = uuid.UUID("00000000-0000-4000-8000-0000000000cc")
T0 = 1_700_000_000_000_000


def rows(first: int, n: int) -> list[ReadingRow]:
    """Readings identified by their integer value."""
    return [(DEVICE.bytes, "m", T0 + v, v) for v in range(first, first + n)]


def settings(port: int, prefix: str, **overrides: object) -> MqttSettings:
    """Shipper settings for a test."""
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "topic_prefix": prefix,
        "ack_timeout": 1.0,
        "backlog_rate": 100.0,
        "reconnect_min": 0.1,
        "reconnect_max": 1.0,
    }
    values.update(overrides)
    return MqttSettings.model_validate(values)


async def test_acks_delete_exactly_the_right_batches_and_resends_are_identical(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """Lost ack -> resent identically; duplicate/partial/ok delete; rejected deletes + event;
    acks out of order are matched by seq; an unanswered batch stays and keeps being resent."""
    gateway = GatewaySettings(id=uuid.uuid4(), tenant_id=uuid.uuid4())

    def policy(batch: Batch, seen: int) -> AckResult | None:
        if batch.seq == 0:
            return None if seen == 1 else AckResult.OK  # the first ack is lost
        return {
            1: AckResult.DUPLICATE,
            2: AckResult.REJECTED,
            3: AckResult.PARTIAL,
        }.get(batch.seq)  # 4 and 5 are answered by the test, out of order; 6 never

    ack = acknowledger_factory(*mqtt_address, prefix, policy)
    async with Buffer(tmp_path / "b.db", gateway_id=gateway.id, max_points=10) as buffer:
        await buffer.append(rows(0, 70))
        assert list(range(7)) == await buffer.seal()
        shipper = Shipper(settings(mqtt_address[1], prefix), gateway, buffer)
        task = asyncio.create_task(shipper.run())
        try:
            await wait_until(lambda: all(s in ack.frames for s in range(7)))
            for seq in (5, 4):
                ack.send_ack(
                    gateway.tenant_id,
                    gateway.id,
                    Ack(stream=buffer.stream, seq=seq, result=AckResult.OK, accepted=10),
                )
            await wait_until(lambda: len(ack.frames.get(0, [])) >= 2)
            await wait_until(lambda: len(ack.frames.get(6, [])) >= 3, seconds=10)

            async def remaining() -> list[int]:
                return [b.seq for b in await buffer.batches(limit=100)]

            deadline = time.monotonic() + 10
            while await remaining() != [6]:
                assert time.monotonic() < deadline, await remaining()
                await asyncio.sleep(0.05)
        finally:
            shipper.stop()
            await task
        # Every resend is byte-identical to the first send.
        for seq, frames in ack.frames.items():
            assert {frames[0]} == set(frames), f"seq {seq} was resent with other bytes"
        stats = await buffer.stats()
        assert 60 == stats.delivered
        assert 1 == stats.rejected_batches
        # The rejection travels to the collector as an event in a later batch.
        [seq] = await buffer.seal(force=True)
        [sealed] = await buffer.batches(after=seq - 1, limit=1)
        [event] = decode_batch(sealed.frame).events
        assert ("batch.rejected", 2) == (event.kind, event.attributes["seq"])


async def test_live_batches_overtake_the_backlog(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """With a rate-limited backlog, a batch sealed after connecting is sent at once."""
    gateway = GatewaySettings(id=uuid.uuid4(), tenant_id=uuid.uuid4())
    ack = acknowledger_factory(*mqtt_address, prefix)
    async with Buffer(tmp_path / "b.db", gateway_id=gateway.id, max_points=10) as buffer:
        await buffer.append(rows(0, 1000))
        backlog = await buffer.seal()
        assert 100 == len(backlog)
        shipper = Shipper(settings(mqtt_address[1], prefix, backlog_rate=5.0), gateway, buffer)
        task = asyncio.create_task(shipper.run())
        try:
            await wait_until(lambda: shipper.state == "connected")
            await asyncio.sleep(0.3)
            await buffer.append(rows(5000, 10))
            [live] = await buffer.seal()
            shipper.wake()
            await wait_until(lambda: live in ack.acked, seconds=5)
            # The backlog drains at about 5 batches/s: most of it is still waiting.
            assert len(ack.acked) < 20
            assert 0 in ack.acked
        finally:
            shipper.stop()
            await task


async def test_overflow_drop_event_is_delivered(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """drop_oldest on a tiny buffer: newest readings and the exact dropped count arrive."""
    gateway = GatewaySettings(id=uuid.uuid4(), tenant_id=uuid.uuid4())
    ack = acknowledger_factory(*mqtt_address, prefix)
    rng = random.Random(5)
    async with Buffer(
        tmp_path / "b.db", gateway_id=gateway.id, max_points=40, max_bytes=8192
    ) as buffer:
        for i in range(20):
            await buffer.append(
                [
                    (DEVICE.bytes, "m", T0 + v, v + rng.random() / 2)
                    for v in range(i * 40, i * 40 + 40)
                ]
            )
        stats = await buffer.stats()
        dropped = stats.dropped["drop_oldest"]
        assert dropped > 0
        await buffer.seal(force=True)
        shipper = Shipper(settings(mqtt_address[1], prefix), gateway, buffer)
        task = asyncio.create_task(shipper.run())
        try:
            await wait_until(lambda: buffer.batch_count == 0)
        finally:
            shipper.stop()
            await task
    batches = ack.batches()
    values = sorted(int(v) for b in batches.values() for s in b.series for v in s.values)
    assert list(range(800 - len(values), 800)) == values
    assert 800 - len(values) == dropped
    reported = [
        e.attributes["count"]
        for b in batches.values()
        for e in b.events
        if e.kind == "readings.dropped"
    ]
    assert [dropped] == reported


def test_backoff_is_capped_exponential_with_jitter() -> None:
    """Delays double from the minimum, stay under the cap, and are spread by jitter."""
    delays = [backoff_delay(a, 0.5, 60.0) for a in range(20)]
    assert all(0.25 <= d <= 60.0 for d in delays)
    assert delays[-1] >= 30.0
    spread = {round(backoff_delay(10, 0.5, 60.0), 3) for _ in range(20)}
    assert len(spread) > 1


async def test_a_batch_no_collector_heard_is_sent_again_soon_not_after_the_ack_timeout(
    tmp_path: Path,
    mqtt_address: tuple[str, int],
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """While no collector subscribes (as right after a broker restart, before the collectors
    resubscribe), the broker answers "no matching subscribers"; the batch goes again within
    seconds of a collector subscribing, not one whole ack_timeout later."""
    gateway = GatewaySettings(id=uuid.uuid4(), tenant_id=uuid.uuid4())
    async with Buffer(tmp_path / "b.db", gateway_id=gateway.id, max_points=10) as buffer:
        await buffer.append(rows(0, 10))
        [seq] = await buffer.seal()
        shipper = Shipper(settings(mqtt_address[1], prefix, ack_timeout=60.0), gateway, buffer)
        task = asyncio.create_task(shipper.run())
        try:
            await wait_until(lambda: shipper.sent >= 1)
            await asyncio.sleep(2.0)
            assert shipper.resent >= 1  # sent again while nobody listened, well before 60 s
            ack = acknowledger_factory(*mqtt_address, prefix)
            subscribed = time.monotonic()
            await wait_until(lambda: seq in ack.acked, seconds=10)
            await wait_until(lambda: buffer.batch_count == 0, seconds=5)
            took = time.monotonic() - subscribed
        finally:
            shipper.stop()
            await task
    assert took < 10.0
    assert {ack.frames[seq][0]} == set(ack.frames[seq])
