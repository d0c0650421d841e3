"""No input delays another: a hung Modbus device and a hung program beside sysfs and system."""

from __future__ import annotations

import asyncio
import itertools
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.buffer import open_store_readonly
from agent.inputs.base import InputContext, kind
from agent.runtime import Runtime
from agent.settings import settings_from_dict
from protocol import decode_batch
from tests.inputs.conftest import RecordingEmitter, run_for, stop
from tests.inputs.test_sysfs import W1_GOOD, write

PROBE = uuid.uuid4()
METER = uuid.uuid4()
UPS = uuid.uuid4()


@pytest.fixture
async def silent_modbus() -> AsyncIterator[int]:
    """A TCP server that accepts Modbus connections and reads requests but never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(1024):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def input_stanzas(tree: Path, modbus_port: int, hung_program: Path) -> list[dict[str, Any]]:
    """A fast sysfs input, a Modbus input on the silent server, a hung program, system."""
    return [
        {
            "type": "sysfs",
            "name": "probes",
            "interval": "100ms",
            "root": str(tree),
            "devices": [
                {"kind": "w1", "id": str(PROBE), "name": "probe", "sensor": "28-0316a2795aff"}
            ],
        },
        {
            "type": "modbus",
            "name": "hung-meter",
            "host": "127.0.0.1",
            "port": modbus_port,
            "interval": "100ms",
            "timeout": "1s",
            "retries": 2,
            "devices": [
                {
                    "id": str(METER),
                    "name": "meter",
                    "fields": [
                        {"metric": "a", "address": 0},
                        {"metric": "b", "table": "input", "address": 0},
                    ],
                }
            ],
        },
        {
            "type": "command",
            "name": "hung-program",
            "command": [sys.executable, str(hung_program)],
            "interval": "100ms",
            "timeout": "1500ms",
            "devices": [{"id": str(UPS), "name": "ups"}],
        },
        {"type": "system", "name": "health", "interval": "200ms"},
    ]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A 1-wire probe in the kernel's format."""
    root = tmp_path / "root"
    write(root, "/sys/bus/w1/devices/28-0316a2795aff/w1_slave", W1_GOOD)
    return root


@pytest.fixture
def hung_program(tmp_path: Path) -> Path:
    """A program that prints nothing and never ends."""
    path = tmp_path / "hang.py"
    path.write_text("import time\ntime.sleep(600)\n")
    return path


async def test_hung_inputs_do_not_delay_sysfs(
    tree: Path, hung_program: Path, silent_modbus: int, emitter: RecordingEmitter
) -> None:
    """While Modbus waits out 3 s per cycle and a program hangs, sysfs keeps its 100 ms beat."""
    context = InputContext(gateway_id=uuid.uuid4(), buffer_path=tree / "buffer.db")
    inputs = [
        kind(raw["type"]).factory(kind(raw["type"]).config_model.model_validate(raw), context)
        for raw in input_stanzas(tree, silent_modbus, hung_program)
    ]
    tasks = [await run_for(item, emitter) for item in inputs]
    try:
        await emitter.wait_for(lambda: emitter.last_status(METER) is not None, within=15)
        await emitter.wait_for(lambda: emitter.last_status(UPS) is not None, within=15)
    finally:
        for task in tasks:
            await stop(task)
    assert emitter.last_status(METER) == ("error", "no answer within 1s reading holding 0..0")
    assert emitter.last_status(UPS) == ("error", "killed after 1.5s (timeout)")
    times = [r.at for r in emitter.readings if r.device_id == PROBE]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # A hung Modbus cycle lasts 3 s (1 s timeout, 2 retries) and the program 1.5 s: sysfs gets
    # about 30 readings meanwhile, and no gap comes anywhere near one Modbus timeout (the bound
    # leaves room for a machine busy with other tests).
    assert len(times) >= 20
    assert max(gaps) < 0.6, max(gaps)
    assert emitter.values(context.gateway_id, "cpu_percent")


async def test_inputs_in_the_real_runtime(
    tmp_path: Path, tree: Path, hung_program: Path, silent_modbus: int
) -> None:
    """In the agent runtime with a real buffer: sysfs readings and every status reach batches."""
    gateway = uuid.uuid4()
    settings = settings_from_dict(
        {
            "gateway": {"id": str(gateway), "tenant_id": str(uuid.uuid4())},
            "buffer": {"path": str(tmp_path / "buffer.db")},
            # No broker: batches stay in the buffer where the test can read them.
            "mqtt": {"port": 1, "reconnect_min": "1s", "reconnect_max": "1s"},
            "runtime": {"drain_timeout": "1s"},
            "batch": {"max_age": "200ms"},
            # No collector gives the time here: seal with the gateway's clock at once.
            "clock": {"max_wait": "0s"},
            "inputs": input_stanzas(tree, silent_modbus, hung_program),
        }
    )
    runtime = Runtime(settings)
    stop_event = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop_event))
    await asyncio.sleep(4.0)
    stop_event.set()
    await asyncio.wait_for(task, 20)

    store = open_store_readonly(tmp_path / "buffer.db")
    frames = [bytes(f) for (f,) in store.conn.execute("SELECT frame FROM batches ORDER BY seq")]
    store.conn.close()
    batches = [decode_batch(f) for f in frames]
    probe_values = [v for b in batches for s in b.series if s.device_id == PROBE for v in s.values]
    assert len(probe_values) >= 25  # ~40 ticks in 4 s at 100 ms, despite the hung inputs
    assert set(probe_values) == {20.687}
    statuses = {(s.device_id, s.status, s.reason) for b in batches for s in b.status}
    assert (PROBE, "online", "") in statuses
    assert (METER, "error", "no answer within 1s reading holding 0..0") in statuses
    assert (UPS, "error", "killed after 1.5s (timeout)") in statuses
    assert (gateway, "online", "") in statuses
    gateway_metrics = {s.metric for b in batches for s in b.series if s.device_id == gateway}
    assert {
        "cpu_percent",
        "memory_used_percent",
        "disk_free_bytes",
        "agent_rss_bytes",
    } <= gateway_metrics
    assert "agent_buffer_readings" in gateway_metrics
    events = {(e.kind, e.device_id) for b in batches for e in b.events}
    assert ("device.error", METER) in events
    assert ("command.failed", None) in events
