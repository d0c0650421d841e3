"""The modbus input against pymodbus's own server, over TCP and over RTU on a pty pair."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.inputs.base import InputContext
from agent.inputs.modbus import ModbusConfig, ModbusInput
from agent.inputs.modbus.config import FieldConfig
from agent.inputs.modbus.registers import plan_requests
from agent.runtime import InputEmitter, Staging
from protocol import Batch, Series, Value, encode_frame
from tests.inputs.conftest import RecordingEmitter, build_config, load_sample, run_for, stop
from tests.inputs.modbus_peer import (
    EXPECTED,
    FIELDS,
    Behaviour,
    ModbusPeer,
    NullModem,
    free_port,
    start_rtu_server,
    words,
)
from tests.inputs.pymodbustcp_peer import PyModbusTcpPeer

METER = uuid.uuid4()
PROBE = uuid.uuid4()


def tcp_config(port: int, **extra: Any) -> ModbusConfig:
    """A TCP input reading the full known map from unit 1 and one float from unit 2."""
    raw: dict[str, Any] = {
        "type": "modbus",
        "name": "test-modbus",
        "transport": "tcp",
        "host": "127.0.0.1",
        "port": port,
        "interval": "200ms",
        "timeout": "300ms",
        "retries": 0,
        "devices": [
            {"id": str(METER), "name": "meter", "unit": 1, "fields": FIELDS},
            {
                "id": str(PROBE),
                "name": "probe",
                "unit": 2,
                "fields": [{"metric": "temperature", "address": 19, "data_type": "float32"}],
            },
        ],
    }
    raw.update(extra)
    config = build_config("modbus", raw)
    assert isinstance(config, ModbusConfig)
    return config


@pytest.fixture
async def peer() -> AsyncIterator[ModbusPeer]:
    """A running pymodbus TCP server with the known register map."""
    server = ModbusPeer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def test_sample_configuration_loads() -> None:
    """Both stanzas of the commented sample.toml validate."""
    configs = load_sample("modbus")
    assert [c.name for c in configs] == ["energy-meters", "boiler-bus"]
    rtu = configs[1]
    assert isinstance(rtu, ModbusConfig)
    assert rtu.devices[0].timeout == 2.0
    assert rtu.pause == 0.05


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"host": None}, "host"),
        ({"interval": "often"}, "interval"),
        ({"timeout": "0s"}, "timeout"),
        ({"devices": [{"id": str(METER), "name": "m", "unit": 300, "fields": FIELDS}]}, "unit"),
        (
            {
                "devices": [
                    {
                        "id": str(METER),
                        "name": "m",
                        "fields": [{"metric": "x", "address": 0, "data_type": "float32", "bit": 2}],
                    }
                ]
            },
            "bit",
        ),
        ({"baud": 9600}, "baud"),
    ],
)
def test_config_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    """Invalid settings are refused with the offending key in the message."""
    with pytest.raises(ValidationError) as info:
        tcp_config(502, **change)
    assert key in str(info.value)


def test_contiguous_fields_share_a_request_within_the_span() -> None:
    """Adjacent fields are read together; max_span splits, max_gap bridges small holes."""
    fields = [
        FieldConfig(metric="a", address=0, data_type="float32"),
        FieldConfig(metric="b", address=2, data_type="uint16"),
        FieldConfig(metric="c", address=5, data_type="uint16"),
        FieldConfig(metric="d", table="coil", address=3),
        FieldConfig(metric="e", table="coil", address=4),
    ]
    plan = [(r.table, r.address, r.count) for r in plan_requests(fields, 125, 0)]
    assert plan == [("holding", 0, 3), ("holding", 5, 1), ("coil", 3, 2)]
    plan = [(r.table, r.address, r.count) for r in plan_requests(fields, 125, 2)]
    assert plan == [("holding", 0, 6), ("coil", 3, 2)]
    plan = [(r.table, r.address, r.count) for r in plan_requests(fields, 2, 0)]
    assert plan == [("holding", 0, 2), ("holding", 2, 1), ("holding", 5, 1), ("coil", 3, 2)]


async def test_probe_decodes_every_type_and_groups_adjacent_fields(
    peer: ModbusPeer, context: InputContext
) -> None:
    """Every data type, word/byte order, scale and bit field decodes; adjacent fields share."""
    results = await ModbusInput(tcp_config(peer.port), context).probe()
    meter, probe = results
    assert meter.error is None
    assert meter.readings == pytest.approx(EXPECTED)
    assert probe.readings == {"temperature": 21.75}
    unit1 = sorted(
        (fc, address, count) for unit, fc, address, count in peer.behaviour.requests if unit == 1
    )
    # fc 1 coils (0 and 3 are not adjacent, max_gap is 0), 2 discrete inputs, 3 holding
    # registers (0..18 adjacent: one request), 4 input registers
    assert unit1 == [(1, 0, 1), (1, 3, 1), (2, 1, 1), (3, 0, 19), (4, 1, 2)]


async def test_max_span_splits_requests(peer: ModbusPeer, context: InputContext) -> None:
    """With max_span = 8 the 19 holding registers take several requests but decode the same."""
    results = await ModbusInput(tcp_config(peer.port, max_span=8), context).probe()
    assert results[0].readings == pytest.approx(EXPECTED)
    holding = [(a, c) for unit, fc, a, c in peer.behaviour.requests if unit == 1 and fc == 3]
    assert len(holding) > 1
    assert all(count <= 8 for _, count in holding)


async def test_exception_responses_are_errors_with_the_code(
    peer: ModbusPeer, context: InputContext
) -> None:
    """An unmapped address and a device failure come back as errors naming the exception."""
    config = tcp_config(
        peer.port,
        devices=[
            {
                "id": str(METER),
                "name": "meter",
                "fields": [
                    {"metric": "ok", "address": 6, "data_type": "int16"},
                    {"metric": "missing", "address": 500},
                ],
            }
        ],
    )
    [result] = await ModbusInput(config, context).probe()
    # The device answered: the good field is kept, the bad one reported.
    assert result.readings == {"ok": -5}
    assert result.error == "exception 2 (illegal address) reading holding 500..500"

    peer.behaviour.exception = ExcCodes.DEVICE_BUSY
    [result] = await ModbusInput(config, context).probe()
    assert result.readings == {}
    assert "exception 6 (device busy) reading holding 6..6" in (result.error or "")


async def test_silent_device_goes_error_then_online(
    peer: ModbusPeer, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A server that stops answering makes devices `error` (with why); answers bring `online`."""
    task = await run_for(ModbusInput(tcp_config(peer.port), context), emitter)
    try:
        await emitter.wait_for(lambda: emitter.last_status(METER) == ("online", ""))
        peer.behaviour.answering.clear()
        await emitter.wait_for(lambda: (emitter.last_status(METER) or ("",))[0] == "error")
        status = emitter.last_status(METER)
        assert status is not None
        assert "no answer within 0.3s reading" in status[1]
        peer.behaviour.answering.set()
        await emitter.wait_for(lambda: emitter.last_status(METER) == ("online", ""))
        count = len(emitter.values(METER, "f32"))
        await emitter.wait_for(lambda: len(emitter.values(METER, "f32")) > count)
    finally:
        await stop(task)
    assert set(emitter.values(METER, "f32")) == {12.5}
    assert emitter.durations and max(emitter.durations) < 5
    kinds = [e["kind"] for e in emitter.events if e["device_id"] == METER]
    assert kinds[:2] == ["device.error", "device.recovered"]


async def test_server_gone_then_back(
    peer: ModbusPeer, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A server that goes away (connection refused) is an error; it reconnects when back."""
    task = await run_for(ModbusInput(tcp_config(peer.port), context), emitter)
    try:
        await emitter.wait_for(lambda: emitter.last_status(PROBE) == ("online", ""))
        await peer.stop()
        await emitter.wait_for(lambda: (emitter.last_status(PROBE) or ("",))[0] == "error")
        await emitter.wait_for(
            lambda: "cannot connect to tcp 127.0.0.1" in (emitter.last_status(PROBE) or ("", ""))[1]
        )
        await peer.start()
        await emitter.wait_for(lambda: emitter.last_status(PROBE) == ("online", ""))
        await emitter.wait_for(lambda: emitter.last_status(METER) == ("online", ""))
    finally:
        await stop(task)


async def test_rtu_over_a_pty_pair(context: InputContext) -> None:
    """RTU framing over real ttys: pymodbus's serial server on one end, the input on the other."""
    modem = NullModem()
    modem.start()
    behaviour = Behaviour()
    server = await start_rtu_server(modem.ports[0], behaviour)
    try:
        config = build_config(
            "modbus",
            {
                "type": "modbus",
                "name": "test-rtu",
                "transport": "rtu",
                "serial_port": modem.ports[1],
                "baudrate": 19200,
                "timeout": "1s",
                "pause": "10ms",
                "devices": [
                    {"id": str(METER), "name": "meter", "unit": 1, "fields": FIELDS},
                    {
                        "id": str(PROBE),
                        "name": "probe",
                        "unit": 2,
                        "fields": [
                            {"metric": "temperature", "address": 19, "data_type": "float32"}
                        ],
                    },
                ],
            },
        )
        assert isinstance(config, ModbusConfig)
        meter, probe = await ModbusInput(config, context).probe()
        assert meter.error is None
        assert meter.readings == pytest.approx(EXPECTED)
        assert probe.readings == {"temperature": 21.75}
        # A device that stops answering on the bus: an error naming the timeout.
        behaviour.answering.clear()
        silent = config.model_copy(
            update={"devices": [config.devices[1].model_copy(update={"timeout": 0.3})]}
        )
        [result] = await ModbusInput(silent, context).probe()
        assert result.readings == {}
        assert result.error == "no answer within 0.3s reading holding 19..20"
    finally:
        behaviour.answering.set()
        await server.shutdown()  # type: ignore[no-untyped-call]
        modem.close()


async def test_rtu_device_that_stops_answering_recovers(
    context: InputContext, emitter: RecordingEmitter
) -> None:
    """On a serial line, silence gives `error`; late answers do not confuse what follows."""
    modem = NullModem()
    modem.start()
    behaviour = Behaviour()
    server = await start_rtu_server(modem.ports[0], behaviour)
    config = build_config(
        "modbus",
        {
            "type": "modbus",
            "name": "test-rtu-run",
            "transport": "rtu",
            "serial_port": modem.ports[1],
            "baudrate": 19200,
            "interval": "200ms",
            "timeout": "300ms",
            "retries": 0,
            "devices": [{"id": str(METER), "name": "meter", "unit": 1, "fields": FIELDS}],
        },
    )
    assert isinstance(config, ModbusConfig)
    task = await run_for(ModbusInput(config, context), emitter)
    try:
        await emitter.wait_for(lambda: emitter.last_status(METER) == ("online", ""))
        behaviour.answering.clear()
        await emitter.wait_for(lambda: (emitter.last_status(METER) or ("",))[0] == "error")
        status = emitter.last_status(METER)
        assert status is not None
        assert status[1].startswith("no answer within 0.3s reading")
        behaviour.answering.set()
        await emitter.wait_for(lambda: emitter.last_status(METER) == ("online", ""))
        count = len(emitter.values(METER, "f64"))
        await emitter.wait_for(lambda: len(emitter.values(METER, "f64")) >= count + 3)
        # `inputs test` beside the running input: the port is locked, nothing is sent.
        [result] = await ModbusInput(config, context).probe()
        assert result.error == (
            f"cannot connect to serial {modem.ports[1]}: missing, not permitted, "
            "or locked by another program (the running agent?)"
        )
    finally:
        await stop(task)
        behaviour.answering.set()
        await server.shutdown()  # type: ignore[no-untyped-call]
        modem.close()
    # Whatever arrived late, no reading was decoded from the wrong registers.
    for metric, expected in EXPECTED.items():
        values = emitter.values(METER, metric)
        assert values == pytest.approx([expected] * len(values)), metric


def single_unit_config(port: int, fields: list[dict[str, Any]], **extra: Any) -> ModbusConfig:
    """A TCP input reading ``fields`` from unit 1."""
    raw: dict[str, Any] = {
        "type": "modbus",
        "name": "independent",
        "host": "127.0.0.1",
        "port": port,
        "interval": "200ms",
        "timeout": "500ms",
        "retries": 0,
        "devices": [{"id": str(METER), "name": "meter", "unit": 1, "fields": fields}],
    }
    raw.update(extra)
    config = build_config("modbus", raw)
    assert isinstance(config, ModbusConfig)
    return config


async def test_uint64_beyond_int64_is_the_device_error_in_probe_and_agent(
    context: InputContext,
) -> None:
    """A uint64 above 2^63 - 1 cannot be carried: `inputs test` and the agent both say so.

    Against pyModbusTCP's server, through the runtime's own emitter: the device is `error`
    with the reason on every cycle (not online with the reading silently refused), the other
    fields are still read, and a scaled uint64 is a float.
    """
    fields = [
        {"metric": "energy", "address": 0, "data_type": "uint64"},
        {"metric": "energy_kwh", "address": 0, "data_type": "uint64", "scale": 0.001},
        {"metric": "ok", "address": 4},
    ]
    reason = (
        "energy: uint64 value 18446744073709551615 is above 9223372036854775807, the largest "
        "integer a reading carries (with a scale other than 1 it is read as a float)"
    )
    with PyModbusTcpPeer([0xFFFF] * 4 + [7]) as device:
        config = single_unit_config(device.port, fields)
        [probed] = await ModbusInput(config, context).probe()
        statuses: dict[uuid.UUID, Any] = {}
        staging = Staging()
        emitter = InputEmitter("independent", staging, statuses)
        task = asyncio.create_task(ModbusInput(config, context).run(emitter))
        try:
            deadline = time.monotonic() + 10
            while sum(1 for row in staging.rows if row[1] == "ok") < 3:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            await stop(task)
    assert reason == probed.error
    assert {"energy_kwh": 18446744073709551.615, "ok": 7} == probed.readings
    assert ("error", reason) == statuses[METER]
    assert 0 == emitter.invalid
    assert {"ok", "energy_kwh"} == {row[1] for row in staging.rows}


async def test_scaled_values_are_what_the_device_meant(context: InputContext) -> None:
    """raw 2315 × 0.01 is 23.15 (not 23.150000000000002), so the wire's decimal codec applies."""
    fields = [
        {"metric": "t1", "address": 0, "scale": 0.01},
        {"metric": "t2", "address": 1, "scale": 0.01},
        {"metric": "v", "address": 2, "scale": 0.1, "offset": -40},
        {"metric": "raw_f", "address": 3, "data_type": "float32"},
        {"metric": "f_2", "address": 3, "data_type": "float32", "decimals": 2},
    ]
    with PyModbusTcpPeer([2315, 2316, 655, *words("f", 21.37)]) as device:
        [probed] = await ModbusInput(single_unit_config(device.port, fields), context).probe()
    assert None is probed.error
    assert {"t1": 23.15, "t2": 23.16, "v": 25.5, "f_2": 21.37} == {
        k: v for k, v in probed.readings.items() if k != "raw_f"
    }
    assert 21.37 != probed.readings["raw_f"]  # a float32 keeps its own precision unless told
    assert abs(21.37 - float(probed.readings["raw_f"])) < 1e-5

    def frame(values: list[Value]) -> bytes:
        series = Series(device_id=METER, metric="t", timestamps=[1, 2], values=values)
        batch = Batch(gateway_id=METER, stream=METER, seq=0, created=1, series=[series])
        return encode_frame(batch, compress=False)

    meant = frame([23.15, 23.16])
    assert meant == frame([probed.readings["t1"], probed.readings["t2"]])
    assert len(meant) < len(frame([2315 * 0.01, 2316 * 0.01]))


async def test_slow_device_keeps_one_reason(context: InputContext) -> None:
    """A device answering after the timeout is `no answer within`, never `connection lost`.

    pymodbus closes the link itself after a few unanswered requests in a row; that used to
    turn the reason into "connection ... lost" and back on every reconnect.
    """
    emitter = RecordingEmitter()
    with PyModbusTcpPeer([2315]) as device:
        device.bank.delay = 0.6
        config = single_unit_config(
            device.port,
            [{"metric": "t", "address": 0}],
            interval="100ms",
            timeout="300ms",
            retries=1,
        )
        task = await run_for(ModbusInput(config, context), emitter)
        try:
            await asyncio.sleep(6)
        finally:
            await stop(task)
    assert [("error", "no answer within 0.3s reading holding 0..0")] == [
        (s, r) for d, s, r in emitter.statuses if d == METER
    ]


async def test_units_behind_one_tcp_gateway(
    context: InputContext, emitter: RecordingEmitter
) -> None:
    """Each device's requests carry its unit id; a unit the gateway does not serve is an error.

    pymodbus's server honours unit ids (pyModbusTCP's answers any), so it stands in for a
    TCP-to-RTU gateway with three slaves.
    """
    units = (1, 2, 3)
    server = ModbusTcpServer(
        [
            SimDevice(
                id=unit,
                simdata=([SimData(0, values=[unit * 100 + 1], datatype=DataType.REGISTERS)]),
            )
            for unit in units
        ],
        address=("127.0.0.1", port := free_port()),
    )
    await server.serve_forever(background=True)
    ids = {unit: uuid.uuid4() for unit in (*units, 9)}
    config = build_config(
        "modbus",
        {
            "type": "modbus",
            "name": "gateway",
            "host": "127.0.0.1",
            "port": port,
            "interval": "200ms",
            "timeout": "300ms",
            "retries": 0,
            "devices": [
                {
                    "id": str(ids[u]),
                    "name": f"unit-{u}",
                    "unit": u,
                    "fields": [{"metric": "v", "address": 0}],
                }
                for u in (*units, 9)
            ],
        },
    )
    task = await run_for(ModbusInput(config, context), emitter)  # type: ignore[arg-type]
    try:
        await emitter.wait_for(
            lambda: (
                all(len(emitter.values(ids[u], "v")) >= 2 for u in units)
                and emitter.last_status(ids[9]) is not None
            )
        )
    finally:
        await stop(task)
        await server.shutdown()  # type: ignore[no-untyped-call]
    for unit in units:
        assert {unit * 100 + 1} == set(emitter.values(ids[unit], "v"))
        assert ("online", "") == emitter.last_status(ids[unit])
    assert [] == emitter.values(ids[9], "v")
    status = emitter.last_status(ids[9])
    assert status is not None and "error" == status[0]
