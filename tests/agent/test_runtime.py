"""The runtime in-process: a crashing input never stops another; a full disk is survived."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Literal

from agent.errors import BufferFileError
from agent.inputs.base import Emitter, InputConfig, InputContext, ProbeResult, kinds, register
from agent.runtime import Runtime
from agent.settings import settings_from_dict
from protocol import decode_batch
from tests.agent.conftest import device_ids
from tests.waiting import wait_until


class CrashingConfig(InputConfig):
    """An input kind that exists only in this test module: it raises after one reading."""

    type: Literal["crashing"] = "crashing"


class CrashingInput:
    """Emits one reading, then raises, every time it is started."""

    def __init__(self, config: CrashingConfig, context: InputContext) -> None:
        self.name = config.name
        self.starts = 0

    async def run(self, emit: Emitter) -> None:
        """Emit a reading and fail."""
        self.starts += 1
        emit.reading(uuid.UUID(int=99), "crash", self.starts)
        await asyncio.sleep(0.05)
        raise RuntimeError("sensor bus exploded")

    async def probe(self) -> list[ProbeResult]:
        """Nothing to probe."""
        return []


if "crashing" not in kinds():
    register("crashing", CrashingConfig, CrashingInput)


async def produced(runtime: Runtime) -> int:
    """Readings the runtime's buffer took so far (0 until the runtime opened it)."""
    try:
        return (await runtime.buffer.stats()).produced
    except BufferFileError:
        return 0


def make_settings(tmp_path: Path, prefix: str) -> dict[str, object]:
    """A configuration with a simulated input and a crashing one, and no reachable broker."""
    return {
        "gateway": {"id": str(uuid.uuid4()), "tenant_id": str(uuid.uuid4())},
        "buffer": {"path": str(tmp_path / "buffer.db")},
        "mqtt": {"port": 1, "topic_prefix": prefix, "reconnect_min": "1s", "reconnect_max": "1s"},
        "runtime": {"input_restart_delay": "100ms", "drain_timeout": "1s"},
        "batch": {"max_age": "200ms"},
        # No collector gives the time here: seal with the gateway's clock at once.
        "clock": {"max_wait": "0s"},
        "inputs": [
            {
                "type": "simulated",
                "name": "sim",
                "interval": "50ms",
                "devices": [{"id": str(d), "name": f"d{i}"} for i, d in enumerate(device_ids(2))],
            },
            {"type": "crashing", "name": "bad"},
        ],
    }


async def test_a_crashing_input_never_stops_another(tmp_path: Path, prefix: str) -> None:
    """The crashing input is restarted and reported; the simulated one keeps producing."""
    runtime = Runtime(settings_from_dict(make_settings(tmp_path, prefix)))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    crashing = runtime.inputs[1]
    assert isinstance(crashing, CrashingInput)

    async def crashed_thrice_and_ticked() -> bool:
        # 15 ticks of 2 devices x 4 metrics, and the crashing input's own readings.
        return crashing.starts >= 3 and await produced(runtime) >= 8 * 15 + 3

    await wait_until(crashed_thrice_and_ticked, what="three crashes and 15 ticks of the simulation")
    stop.set()
    await asyncio.wait_for(task, 15)

    from agent.buffer import open_store_readonly

    store = open_store_readonly(tmp_path / "buffer.db")
    frames = [bytes(f) for (f,) in store.conn.execute("SELECT frame FROM batches ORDER BY seq")]
    store.conn.close()
    batches = [decode_batch(f) for f in frames]
    per_metric: dict[str, int] = {}
    for b in batches:
        for s in b.series:
            per_metric[s.metric] = per_metric.get(s.metric, 0) + len(s.values)
    # The simulated input kept ticking despite the other input's crashes.
    assert per_metric["temperature"] >= 2 * 15
    assert per_metric["crash"] == crashing.starts
    crashes = [e for b in batches for e in b.events if e.kind == "input.crashed"]
    assert len(crashes) >= 2
    assert all(e.attributes["input"] == "bad" for e in crashes)
    statuses = [s.status for b in batches for s in b.status]
    assert ["online", "online"] == statuses  # forwarded once per device, not per tick


async def test_agent_survives_a_full_disk_and_resumes(tmp_path: Path, prefix: str) -> None:
    """SQLITE_FULL in the running agent: readings wait in memory up to buffer.hold_readings,
    beyond that they are counted as dropped; writing resumes and the held readings land."""
    data = make_settings(tmp_path, prefix)
    data["inputs"] = data["inputs"][:1]  # type: ignore[index]
    data["inputs"][0]["interval"] = "10ms"  # type: ignore[index]
    data["buffer"]["hold_readings"] = 500  # type: ignore[index]
    runtime = Runtime(settings_from_dict(data))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    buffer = runtime.buffer

    async def ticked() -> bool:
        return await produced(runtime) >= 8 * 20

    await wait_until(ticked, what="20 ticks written before the disk fills")
    pages = int((await buffer.query("PRAGMA page_count"))[0][0])
    await buffer.set_max_page_count(pages)

    async def dropping() -> bool:
        return (await buffer.stats()).dropped["disk_full"] > 100

    await wait_until(dropping, what="readings beyond buffer.hold_readings dropped")
    full = await buffer.stats()
    assert 0 < full.held_readings <= 500
    assert not task.done()
    await buffer.set_max_page_count(1_000_000)
    before = full.produced

    async def resumed_writing() -> bool:
        stats = await buffer.stats()
        return stats.produced - before >= 8 * 20 and stats.held_readings == 0

    await wait_until(resumed_writing, what="the held readings written and 20 more ticks")
    resumed = await buffer.stats()
    stop.set()
    await asyncio.wait_for(task, 15)
    assert resumed.produced - before >= 8 * 20  # 2 devices x 4 metrics, 20 ticks
    assert 0 == resumed.held_readings
    assert resumed.dropped["disk_full"] >= full.dropped["disk_full"]
    assert resumed.produced == resumed.readings + resumed.delivered + sum(resumed.dropped.values())


def test_invalid_readings_are_refused_with_one_event_each() -> None:
    """Readings that protocol v1 cannot carry are refused; the rest of the batch is unharmed."""
    from agent.runtime import InputEmitter, Staging

    staging = Staging()
    emit = InputEmitter("sensor", staging, {})
    device = uuid.UUID(int=5)
    emit.reading(device, "ok", 1.5)
    emit.reading(device, "", 1.0)
    emit.reading(device, "big", 2**70)
    emit.reading(device, "big", 2**70)
    emit.reading(device, "obj", [1, 2])  # type: ignore[arg-type]
    emit.reading(device, "late", 1, time_us=-5)
    rows, notes = staging.take()
    assert [(device.bytes, "ok", 1.5)] == [(r[0], r[1], r[3]) for r in rows]
    assert 5 == emit.invalid
    assert 4 == len(notes)  # one event per device and metric, not one per reading


async def test_cancelled_commit_keeps_every_staged_reading(tmp_path: Path, prefix: str) -> None:
    """SIGTERM cancels the committer while its commit awaits the notes write (issue 11, defect
    6): the readings it took from staging still reach the buffer, none is lost or uncounted."""
    import threading

    from agent.runtime import InputEmitter

    data = make_settings(tmp_path, prefix)
    data["inputs"] = []
    data["buffer"]["commit_interval"] = "10ms"  # type: ignore[index]
    runtime = Runtime(settings_from_dict(data))
    buffer = runtime.buffer
    await buffer.open()
    try:
        # Keep the buffer's SQLite thread busy: the commit's notes write has to wait behind it.
        gate = threading.Event()
        blocker = asyncio.create_task(buffer._run(gate.wait, 30))
        emit = InputEmitter("sensor", runtime.staging, {})
        device = uuid.UUID(int=7)
        for v in range(500):
            emit.reading(device, "m", v, time_us=1_700_000_000_000_000 + v)
        emit.event("test.event", "staged with the readings")
        committer = asyncio.create_task(runtime._commit_loop())
        for _ in range(1000):
            if not runtime.staging.rows:
                break
            await asyncio.sleep(0.005)
        assert [] == runtime.staging.rows, "the commit never took the staged rows"
        await asyncio.sleep(0.05)
        committer.cancel()  # what Runtime.run does on SIGTERM
        gate.set()
        await asyncio.gather(committer, return_exceptions=True)
        await blocker
        await runtime._commit(final=True)
        stats = await buffer.stats()
        frames = [b.frame for b in await buffer.batches(limit=100)]
    finally:
        await buffer.close()
    values = sorted(int(v) for f in frames for s in decode_batch(f).series for v in s.values)  # type: ignore[call-overload]
    assert (500, 500, 0) == (stats.produced, stats.readings, sum(stats.dropped.values()))
    assert list(range(500)) == values
    kinds = [e.kind for f in frames for e in decode_batch(f).events]
    assert ["test.event"] == kinds
