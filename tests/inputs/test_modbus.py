"""The modbus input against pymodbus's own server, over TCP and over RTU on a pty pair."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError
from pymodbus.constants import ExcCodes

from agent.inputs.base import InputContext
from agent.inputs.modbus import ModbusConfig, ModbusInput
from agent.inputs.modbus.config import FieldConfig
from agent.inputs.modbus.registers import plan_requests
from tests.inputs.conftest import RecordingEmitter, build_config, load_sample, run_for, stop
from tests.inputs.modbus_peer import (
    EXPECTED,
    FIELDS,
    Behaviour,
    ModbusPeer,
    NullModem,
    start_rtu_server,
)

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
