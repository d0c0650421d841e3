"""Gateways whose clock is wrong store correct times: a real collector, broker and TimescaleDB.

The agent runs in this process so that its clock component can be shifted
(:class:`agent.clock.ShiftedClock`, the only stand-in: it behaves like a gateway's kernel clock,
unsynchronised after a step); the collector is a real process on the real broker and databases.
A test input emits one reading every 50 ms whose value numbers it; the test notes the true time
(this machine's clock, which the collector also reads) at which each was stamped, and compares
what TimescaleDB stores with it.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.clock import ShiftedClock
from agent.inputs.base import Emitter, InputConfig, InputContext, ProbeResult, register
from agent.inputs.common import now_us
from agent.runtime import Runtime
from agent.settings import settings_from_dict
from protocol import Batch, Event, TopicKind, build_topic, encode_frame
from tests.conftest import drop_database
from tests.e2e.conftest import demo
from tests.services import SYSTEM_PG_DSN, MosquittoBroker

GATEWAY = "demo-gateway-north"
METER = uuid.UUID("bfc2ca86-ddee-4c78-ba0a-c80f5b85b0d5")  # meter-north-main, a power meter
METRIC = "energy"  # a number in [0, 1e9]: the reading's number
EPOCH_1970 = 3_600.0  # 1970-01-01T01:00:00Z: a Raspberry Pi without a battery-backed clock


class TruthConfig(InputConfig):
    """A test input: one numbered reading every ``interval`` seconds."""

    type: Literal["clocktruth"] = "clocktruth"
    interval: float = 0.05
    first: int = 0


class TruthInput:
    """Stamps each reading with the agent's clock and notes the true time beside its number."""

    truth: ClassVar[dict[int, int]] = {}

    def __init__(self, config: TruthConfig, context: InputContext) -> None:
        self.name = config.name
        self.config = config
        self.numbers = itertools.count(config.first)

    async def run(self, emit: Emitter) -> None:
        """Emit until cancelled."""
        while True:
            n = next(self.numbers)
            stamp = now_us()
            TruthInput.truth[n] = time.time_ns() // 1000
            emit.reading(METER, METRIC, float(n), stamp)
            await asyncio.sleep(self.config.interval)

    async def probe(self) -> list[ProbeResult]:
        """Nothing to probe."""
        return []


register("clocktruth", TruthConfig, TruthInput)


class Agent:
    """The in-process agent of one scenario."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Agent:
        self.task = asyncio.create_task(self.runtime.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Databases with the demo registry, a broker of its own (the demo's gateway ids are fixed:
    on a shared broker another run's agent would take over the client id) and a running
    collector, shared by the scenarios."""
    tag = uuid.uuid4().hex[:10]
    workdir = tmp_path_factory.mktemp("clock")
    broker = MosquittoBroker(workdir / "mosquitto")
    broker.start()
    s = demo.LocalSystem(
        workdir / "system",
        mqtt_port=broker.port,
        name=f"smclock_{tag}",
        prefix=f"smclock-{tag}",
        interval="1s",
    )
    try:
        s.prepare()
        s.start_collector()
        yield s
    finally:
        s.kill_everything()
        broker.stop()
        for dsn in (s.metadata_dsn, s.timeseries_dsn):
            asyncio.run(drop_database(SYSTEM_PG_DSN, dsn))


_scenarios = itertools.count()


def agent_settings(system: Any, tmp: Path, first: int, **clock: str) -> Any:
    """The provisioned configuration of the north gateway with the truth input only."""
    data = tomllib.loads((system.state / GATEWAY / "agent.toml").read_text())
    data["buffer"] = {"path": str(tmp / f"buffer-{next(_scenarios)}.db")}
    data["batch"] = {"max_age": "300ms"}
    data["runtime"] = {"drain_timeout": "10s"}
    data["clock"] = clock
    data["inputs"] = [{"type": "clocktruth", "name": "truth", "first": first}]
    return settings_from_dict(data)


async def stored(system: Any, first: int, last: int) -> dict[int, int]:
    """Reading number -> stored time (µs since the epoch) for numbers in [first, last]."""
    conn = await asyncpg.connect(system.timeseries_dsn)
    try:
        rows = await conn.fetch(
            "SELECT value, (extract(epoch FROM time) * 1000000)::bigint AS t FROM readings"
            " WHERE device_id = $1 AND metric = $2 AND value BETWEEN $3 AND $4",
            METER,
            METRIC,
            float(first),
            float(last),
        )
    finally:
        await conn.close()
    return {int(r["value"]): int(r["t"]) for r in rows}


async def quarantine_messages(system: Any) -> list[str]:
    """The messages of the meter's quarantined readings."""
    conn = await asyncpg.connect(system.timeseries_dsn)
    try:
        rows = await conn.fetch("SELECT message FROM quarantine WHERE device_id = $1", METER)
    finally:
        await conn.close()
    return [str(r["message"]) for r in rows]


async def quarantined_points(system: Any) -> dict[str, int]:
    """Quarantined readings by reason, with the message of each reason."""
    conn = await asyncpg.connect(system.timeseries_dsn)
    try:
        rows = await conn.fetch(
            "SELECT reason, sum(points) AS n FROM quarantine WHERE device_id = $1 GROUP BY reason",
            METER,
        )
    finally:
        await conn.close()
    return {r["reason"]: int(r["n"]) for r in rows}


async def run_scenario(
    system: Any, tmp: Path, first: int, clock: ShiftedClock, seconds: float, step_at: float = -1
) -> tuple[int, list[int], Runtime]:
    """Run the agent with ``clock`` for ``seconds`` (stepping it by 3 h at ``step_at``); return
    how many readings it made, the error of each stored one (µs) and the runtime."""
    runtime = Runtime(agent_settings(system, tmp, first), clock=clock)
    async with Agent(runtime):
        started = time.monotonic()
        if step_at >= 0:
            await asyncio.sleep(step_at)
            clock.step(3 * 3600)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
    numbers = [n for n in TruthInput.truth if first <= n < first + 1_000_000]
    assert numbers, "the input made no readings"
    last = max(numbers)
    times: dict[int, int] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        times = await stored(system, first, last)
        if len(times) == len(numbers):
            break
        await asyncio.sleep(0.3)
    assert sorted(numbers) == sorted(times), "every reading is stored once"
    errors = [times[n] - TruthInput.truth[n] for n in sorted(numbers)]
    return len(numbers), errors, runtime


def assert_ordered(times: dict[int, int]) -> None:
    """Readings taken one after another are stored one after another: no step backwards."""
    ordered = [times[n] for n in sorted(times)]
    assert all(b > a for a, b in itertools.pairwise(ordered))


@pytest.mark.parametrize(
    ("name", "shift"),
    [("1970", EPOCH_1970 - time.time()), ("2 days behind", -2 * 86400.0), ("1 hour ahead", 3600.0)],
)
async def test_a_gateway_without_ntp_stores_correct_times(
    system: Any, tmp_path: Path, name: str, shift: float
) -> None:
    """A gateway whose clock is wrong and never synchronised (no NTP reaches it) but that reaches
    the collector: every reading is stored within ±1 s of the true time."""
    first = {"1970": 1_000_000, "2 days behind": 2_000_000, "1 hour ahead": 3_000_000}[name]
    clock = ShiftedClock(shift, synchronised=False)
    count, errors, runtime = await run_scenario(system, tmp_path, first, clock, seconds=6.0)
    worst = max(abs(e) for e in errors)
    print(f"clock {name}: {count} readings, largest error {worst / 1000:.1f} ms")
    assert worst <= 1_000_000, f"{name}: largest error {worst} µs"
    assert "collector" == runtime.timebase.offset().source
    assert_ordered(await stored(system, first, first + count))


async def test_a_clock_stepped_by_3_hours_mid_run(system: Any, tmp_path: Path) -> None:
    """A synchronised clock stepped by +3 h mid-run (``date -s``): the readings before and after
    the step are stored at their true times, in order: no negative delta, no overlap."""
    first = 4_000_000
    clock = ShiftedClock(0.0, synchronised=True)
    count, errors, runtime = await run_scenario(
        system, tmp_path, first, clock, seconds=7.0, step_at=3.0
    )
    worst = max(abs(e) for e in errors)
    print(f"clock stepped +3 h: {count} readings, largest error {worst / 1000:.1f} ms")
    assert worst <= 1_000_000, f"largest error {worst} µs"
    status = runtime.timebase.status()
    assert "collector" == status["source"]
    assert abs(float(status["system_clock_off_s"]) - 3 * 3600) < 1.0  # type: ignore[arg-type]
    assert_ordered(await stored(system, first, first + count))


@pytest.fixture
async def silent_collector(system: Any) -> AsyncIterator[Any]:
    """The shared collector stopped for the test, started again afterwards."""
    system.collectors["demo-collector-1"].stop()
    try:
        yield system
    finally:
        if system.collectors["demo-collector-1"].process is None:
            system.start_collector()


async def test_readings_sealed_before_a_trusted_time_are_never_dropped(
    silent_collector: Any, tmp_path: Path
) -> None:
    """A gateway at 1970 with no collector answering for longer than clock.max_wait seals its
    readings with its wall clock, marked untrusted: once a collector is back they are
    quarantined as timestamp_out_of_window with that explanation (replayable); readings taken after the collector's time arrived are stored
    at their true times."""
    system = silent_collector
    first = 5_000_000
    clock = ShiftedClock(EPOCH_1970 - time.time(), synchronised=False)
    runtime = Runtime(agent_settings(system, tmp_path, first, max_wait="1s"), clock=clock)
    async with Agent(runtime):
        await asyncio.sleep(3.0)
        early = [n for n in TruthInput.truth if first <= n < first + 1_000_000]
        assert runtime.buffer.store.batch_count > 0  # sealed, untrusted, waiting for delivery
        system.start_collector()
        await asyncio.sleep(4.0)
    numbers = [n for n in TruthInput.truth if first <= n < first + 1_000_000]
    assert runtime.buffer.store.counters["produced"] == len(numbers)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        times = await stored(system, first, max(numbers))
        held = await quarantined_points(system)
        if len(times) + held.get("timestamp_out_of_window", 0) == len(numbers):
            break
        await asyncio.sleep(0.3)
    assert len(numbers) == len(times) + held.get("timestamp_out_of_window", 0)
    assert held.get("timestamp_out_of_window", 0) >= len(early) // 2
    assert all(abs(t - TruthInput.truth[n]) <= 1_000_000 for n, t in times.items())
    listing = system.collector_cli("quarantine", "list")
    assert "timestamp_out_of_window" in listing
    assert any("did not trust" in m for m in await quarantine_messages(system))


async def test_status_and_doctor_name_a_gateway_whose_clock_is_off(system: Any) -> None:
    """A gateway whose batches say they were created an hour ahead (an agent of the first
    release, which knows nothing of the collector's time, on a wrong clock): the skew is
    measured per gateway, and ``status`` and ``doctor`` name the gateway."""
    south = uuid.UUID("e25b6abc-f37f-44f7-af2c-c0ad78586bcf")
    config = tomllib.loads((system.state / GATEWAY / "agent.toml").read_text())
    tenant = uuid.UUID(config["gateway"]["tenant_id"])
    topic = build_topic(system.prefix, tenant, south, TopicKind.TELEMETRY)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=str(south),
        protocol=mqtt.MQTTv5,
    )
    client.connect(system.mqtt_host, system.mqtt_port)
    client.loop_start()
    try:
        stream, now = uuid.uuid4(), time.time_ns() // 1000
        for seq in range(3):
            frame = encode_frame(
                Batch(
                    gateway_id=south,
                    stream=stream,
                    seq=seq,
                    created=now + 3_600_000_000,
                    events=[Event(time=now, kind="clock.test", message="first release")],
                )
            )
            client.publish(topic, frame, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 20
        line = f"  demo-gateway-south ({south}): batches created "
        while line not in (status := system.collector_cli("status")):
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.3)
    finally:
        client.loop_stop()
        client.disconnect()
    assert "s ahead of the collector's clock" in status
    doctor = await asyncio.to_thread(
        subprocess.run,
        [
            str(demo.BIN / "sensormine-collector"),
            "doctor",
            "--config",
            str(system.collector_config()),
        ],
        capture_output=True,
        text=True,
        env=system.env,
    )
    assert 1 == doctor.returncode  # something needs attention: that gateway's clock
    assert "clock skew: demo-gateway-south" in doctor.stdout
