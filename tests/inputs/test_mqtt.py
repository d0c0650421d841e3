"""The mqtt input against the real Mosquitto, with real publishes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from agent.inputs.base import InputContext
from agent.inputs.mqtt import MqttInput, MqttInputConfig
from agent.inputs.mqtt.config import Subscription
from agent.inputs.mqtt.mapping import MessageError, lookup, map_message
from tests.inputs.conftest import RecordingEmitter, build_config, load_sample, run_for, stop
from tests.services import MosquittoBroker

CLIMATE = uuid.uuid4()
GREENHOUSE = uuid.uuid4()
DOOR = uuid.uuid4()
READY = uuid.uuid4()


def publish_now(
    address: tuple[str, int], messages: list[tuple[str, bytes | str]], retain: bool = False
) -> None:
    """Publish ``messages`` with QoS 1 from a client of the test's own and wait for the acks."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}"
    )
    client.connect(*address)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(
    address: tuple[str, int], messages: list[tuple[str, bytes | str]], retain: bool = False
) -> None:
    """``publish_now`` off the event loop."""
    await asyncio.to_thread(publish_now, address, messages, retain)


def config_for(address: tuple[str, int], prefix: str, **extra: Any) -> MqttInputConfig:
    """Tasmota, ESPHome and Zigbee2MQTT style subscriptions under a test-unique prefix."""
    raw: dict[str, Any] = {
        "type": "mqtt",
        "name": "local",
        "host": address[0],
        "port": address[1],
        "client_id": f"input-{prefix}",
        "probe_wait": "3s",
        "reconnect_min": "1s",
        "reconnect_max": "1s",
        "subscriptions": [
            {
                "topic": f"{prefix}/tele/+/SENSOR",
                "device_level": 2,
                "fields": {
                    "temperature": "AM2301.Temperature",
                    "humidity": "AM2301.Humidity",
                },
                "time_path": "Time",
            },
            {
                "topic": f"{prefix}/esphome/+/sensor/+/state",
                "device_level": 2,
                "payload": "plain",
                "metric_level": 4,
            },
            {"topic": f"{prefix}/z2m/+", "device_level": 2, "all_fields": True},
            {"topic": f"{prefix}/ready", "device": "ready", "payload": "plain", "metric": "ready"},
        ],
        "devices": [
            {"id": str(CLIMATE), "name": "climate", "key": "tasmota_1A2B3C"},
            {"id": str(GREENHOUSE), "name": "greenhouse"},
            {"id": str(DOOR), "name": "door"},
            {"id": str(READY), "name": "ready"},
        ],
    }
    raw.update(extra)
    built = build_config("mqtt", raw)
    assert isinstance(built, MqttInputConfig)
    return built


async def until_subscribed(
    address: tuple[str, int], prefix: str, emitter: RecordingEmitter
) -> None:
    """Publish to the ready topic until the input shows it is subscribed (SUBACK is async)."""
    before = len(emitter.values(READY, "ready"))
    for _ in range(50):
        await publish(address, [(f"{prefix}/ready", "1")])
        try:
            await emitter.wait_for(lambda: len(emitter.values(READY, "ready")) > before, within=0.2)
            return
        except AssertionError:
            continue
    raise AssertionError("the input never received the ready message")


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    return f"smtest-{uuid.uuid4().hex[:10]}"


def test_sample_configuration_loads() -> None:
    """The commented sample.toml validates."""
    [config] = load_sample("mqtt")
    assert isinstance(config, MqttInputConfig)
    assert len(config.subscriptions) == 8


@pytest.mark.parametrize(
    ("subscription", "key"),
    [
        ({"topic": "a/#/b", "device_level": 0, "all_fields": True}, "topic"),
        ({"topic": "a/+x", "device_level": 0, "all_fields": True}, "topic"),
        ({"topic": "a/+", "device_level": 1, "device_path": "id", "all_fields": True}, "device"),
        ({"topic": "a/+", "device_level": 5, "all_fields": True}, "device_level"),
        ({"topic": "a/+", "device_level": 1}, "fields"),
        ({"topic": "a/+", "device_level": 1, "payload": "plain"}, "metric"),
        ({"topic": "a/+", "device_level": 1, "fields": {"t": "a..b"}}, "fields"),
        ({"topic": "a/+", "device_level": 1, "all_fields": True, "qos": 2}, "qos"),
    ],
)
def test_config_errors_name_the_key(subscription: dict[str, Any], key: str) -> None:
    """Invalid subscriptions are refused with the offending key in the message."""
    with pytest.raises(ValidationError) as info:
        build_config(
            "mqtt",
            {
                "type": "mqtt",
                "name": "x",
                "subscriptions": [subscription],
                "devices": [{"id": str(uuid.uuid4()), "name": "d"}],
            },
        )
    assert key in str(info.value)


def test_mapping_rules() -> None:
    """Paths with indexes, ON/OFF booleans, numeric strings, and problems by kind."""
    document = {"a": {"b": [{"c": 1}, {"c": 2}]}, "POWER": "ON"}
    assert lookup(document, "$.a.b[1].c") == 2
    with pytest.raises(KeyError):
        lookup(document, "a.b[2].c")
    sub = Subscription(topic="t/+", device_level=1, fields={"x": "a.b[0].c", "relay": "POWER"})
    mapped = map_message(sub, "t/dev", b'{"a": {"b": [{"c": 1.5}]}, "POWER": "OFF"}')
    assert (mapped.device_key, mapped.readings) == ("dev", {"x": 1.5, "relay": False})
    with pytest.raises(MessageError) as info:
        map_message(sub, "t/dev", b"{not json")
    assert (info.value.problem, info.value.device_key) == ("malformed", "dev")
    with pytest.raises(MessageError) as info:
        map_message(sub, "t/dev", b'{"other": 1}')
    assert info.value.problem == "missing"
    plain = Subscription(topic="t/+", device_level=1, payload="plain", metric="v")
    assert map_message(plain, "t/dev", b" 21.5 ").readings == {"v": 21.5}
    with pytest.raises(MessageError) as info:
        map_message(plain, "t/dev", b"unavailable")
    assert info.value.problem == "bad_value"


async def test_messages_become_readings(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """Tasmota JSON, ESPHome plain values and Zigbee2MQTT objects map to their devices."""
    mqtt_input = MqttInput(config_for(mqtt_address, prefix, timezone="UTC"), context)
    task = await run_for(mqtt_input, emitter)
    try:
        await until_subscribed(mqtt_address, prefix, emitter)
        await publish(
            mqtt_address,
            [
                (
                    f"{prefix}/tele/tasmota_1A2B3C/SENSOR",
                    '{"Time":"2026-05-01T12:00:00","AM2301":{"Temperature":21.4,"Humidity":40.1}}',
                ),
                (f"{prefix}/esphome/greenhouse/sensor/soil_moisture/state", "37.5"),
                (f"{prefix}/esphome/greenhouse/sensor/fan/state", "ON"),
                (
                    f"{prefix}/z2m/door",
                    '{"contact": false, "battery": 90, "linkquality": 120, "update": {"state": "idle"}, "label": "x"}',
                ),
            ],
        )
        await emitter.wait_for(lambda: bool(emitter.values(DOOR, "battery")))
        await emitter.wait_for(lambda: bool(emitter.values(GREENHOUSE, "fan")))
    finally:
        await stop(task)
    assert emitter.values(CLIMATE, "temperature") == [21.4]
    assert emitter.values(CLIMATE, "humidity") == [40.1]
    [climate] = [r for r in emitter.readings if r.device_id == CLIMATE and r.metric == "humidity"]
    assert climate.time_us == 1_777_636_800_000_000  # 2026-05-01T12:00:00Z
    assert emitter.values(GREENHOUSE, "soil_moisture") == [37.5]
    assert emitter.values(GREENHOUSE, "fan") == [True]
    door = {r.metric: r.value for r in emitter.readings if r.device_id == DOOR}
    assert door == {"contact": False, "battery": 90, "linkquality": 120}
    assert emitter.last_status(CLIMATE) == ("online", "")
    assert emitter.durations


async def test_malformed_and_missing_are_counted_not_fatal(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """Malformed JSON, missing fields and unknown devices are counted; the input keeps going."""
    mqtt_input = MqttInput(config_for(mqtt_address, prefix), context)
    task = await run_for(mqtt_input, emitter)
    try:
        await until_subscribed(mqtt_address, prefix, emitter)
        await publish(
            mqtt_address,
            [
                (f"{prefix}/tele/tasmota_1A2B3C/SENSOR", '{"AM2301": {"Temperature": 21.4'),
                (f"{prefix}/tele/tasmota_1A2B3C/SENSOR", '{"DS18B20": {"Temperature": 19.0}}'),
                (
                    f"{prefix}/tele/tasmota_1A2B3C/SENSOR",
                    '{"AM2301": {"Temperature": 22.0, "Humidity": 50}}',
                ),
                (f"{prefix}/tele/unknown_plug/SENSOR", '{"AM2301": {"Temperature": 1.0}}'),
                (f"{prefix}/esphome/greenhouse/sensor/soil/state", "unavailable"),
                (f"{prefix}/z2m/door", "[1, 2, 3]"),
            ],
        )
        await emitter.wait_for(lambda: mqtt_input.counters["malformed"] >= 2)
        await emitter.wait_for(lambda: mqtt_input.counters["bad_value"] >= 1)
        await emitter.wait_for(lambda: (emitter.last_status(DOOR) or ("",))[0] == "error")
        # A good message brings a device that sent garbage back to online.
        await publish(mqtt_address, [(f"{prefix}/z2m/door", '{"contact": true}')])
        await emitter.wait_for(lambda: emitter.last_status(DOOR) == ("online", ""))
    finally:
        await stop(task)
    counters = mqtt_input.counters
    assert (counters["malformed"], counters["missing"], counters["unknown_device"]) == (2, 1, 1)
    assert emitter.values(CLIMATE, "temperature") == [22.0]
    assert emitter.values(DOOR, "contact") == [True]
    # The climate sensor went error (malformed, missing) and back online with its good message.
    climate = [s for d, s, _ in emitter.statuses if d == CLIMATE]
    assert climate[0] == "error"
    assert climate[-1] == "online"


async def test_probe_reports_what_each_device_sent(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext
) -> None:
    """probe collects retained state; a silent device is reported as such."""
    await publish(
        mqtt_address,
        [
            (f"{prefix}/z2m/door", '{"contact": true, "battery": 80}'),
            (f"{prefix}/esphome/greenhouse/sensor/soil/state", "41"),
        ],
        retain=True,
    )
    try:
        results = {
            r.device_name: r
            for r in await MqttInput(
                config_for(mqtt_address, prefix, probe_wait="1s"), context
            ).probe()
        }
    finally:
        # Clear the retained messages so nothing is left on the shared broker.
        await publish(
            mqtt_address,
            [(f"{prefix}/z2m/door", b""), (f"{prefix}/esphome/greenhouse/sensor/soil/state", b"")],
            retain=True,
        )
    assert results["door"].readings == {"contact": True, "battery": 80}
    assert results["greenhouse"].readings == {"soil": 41.0}
    assert results["climate"].error == "no message within 1s"


async def test_probe_without_a_broker(prefix: str, context: InputContext) -> None:
    """With nothing listening, probe says the broker cannot be reached."""
    from tests.inputs.modbus_peer import free_port

    config = config_for(("127.0.0.1", free_port()), prefix, probe_wait="500ms")
    results = await MqttInput(config, context).probe()
    assert all((r.error or "").startswith("cannot connect to the local broker") for r in results)


async def test_broker_restart(
    private_broker: MosquittoBroker, prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """Devices go `error` while the broker is down; paho reconnects and messages flow again."""
    address = ("127.0.0.1", private_broker.port)
    mqtt_input = MqttInput(config_for(address, prefix), context)
    task = await run_for(mqtt_input, emitter)
    try:
        await until_subscribed(address, prefix, emitter)
        await asyncio.to_thread(private_broker.stop)
        await emitter.wait_for(
            lambda: "local broker lost" in (emitter.last_status(READY) or ("", ""))[1]
        )
        await asyncio.to_thread(private_broker.start)
        await until_subscribed(address, prefix, emitter)
        await emitter.wait_for(lambda: emitter.last_status(READY) == ("online", ""))
        await publish(address, [(f"{prefix}/z2m/door", '{"contact": false}')])
        await emitter.wait_for(lambda: emitter.values(DOOR, "contact") == [False])
    finally:
        await stop(task)


async def test_silent_device_goes_stale(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A device with no message for stale_after goes `error`; its next message restores it."""
    config = config_for(mqtt_address, prefix, stale_after="400ms")
    task = await run_for(MqttInput(config, context), emitter)
    try:
        await until_subscribed(mqtt_address, prefix, emitter)
        await publish(mqtt_address, [(f"{prefix}/z2m/door", '{"contact": true}')])
        await emitter.wait_for(lambda: emitter.last_status(DOOR) == ("online", ""))
        await emitter.wait_for(
            lambda: emitter.last_status(DOOR) == ("error", "no message for 0.4s")
        )
        await publish(mqtt_address, [(f"{prefix}/z2m/door", '{"contact": false}')])
        await emitter.wait_for(lambda: emitter.last_status(DOOR) == ("online", ""))
    finally:
        await stop(task)


async def test_probe_beside_the_running_input_does_not_take_its_session(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """`inputs test` next to a running agent uses its own client id: the agent stays connected."""
    config = config_for(mqtt_address, prefix, probe_wait="500ms")
    task = await run_for(MqttInput(config, context), emitter)
    try:
        await until_subscribed(mqtt_address, prefix, emitter)
        await MqttInput(config, context).probe()
        await asyncio.sleep(0.3)
        await publish(mqtt_address, [(f"{prefix}/z2m/door", '{"contact": true}')])
        await emitter.wait_for(lambda: emitter.values(DOOR, "contact") == [True])
    finally:
        await stop(task)
    assert [s for _, s, _ in emitter.statuses if s == "error"] == []


def mosquitto_pub(address: tuple[str, int], topic: str, payload: str, retain: bool = False) -> None:
    """Publish with Mosquitto's own command-line client (QoS 1), a device side of its own."""
    argv = ["mosquitto_pub", "-h", address[0], "-p", str(address[1]), "-q", "1", "-t", topic]
    argv += ["-r"] if retain else []
    if payload:
        argv += ["-m", payload]
    else:
        argv += ["-n"]
    subprocess.run(argv, check=True, timeout=10)


async def test_oversized_payload_puts_its_device_in_error(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A payload over max_payload_bytes on a known device's topic is that device's error.

    The device is matched before the size is checked, so the running input puts it in `error`
    and `inputs test` names the size instead of "no message within".
    """
    big = '{"contact": true, "note": "' + "x" * 200 + '"}'
    config = config_for(mqtt_address, prefix, max_payload_bytes=128, probe_wait="2s")
    mqtt_input = MqttInput(config, context)
    task = await run_for(mqtt_input, emitter)
    try:
        await until_subscribed(mqtt_address, prefix, emitter)
        await asyncio.to_thread(mosquitto_pub, mqtt_address, f"{prefix}/z2m/door", big)
        await emitter.wait_for(lambda: (emitter.last_status(DOOR) or ("",))[0] == "error")
    finally:
        await stop(task)
    reason = (
        f"{prefix}/z2m/door: payload of {len(big)} bytes is larger than max_payload_bytes (128)"
    )
    assert ("error", reason) == emitter.last_status(DOOR)
    assert 1 == mqtt_input.counters["too_large"]
    assert 0 == mqtt_input.counters["malformed"]
    await asyncio.to_thread(mosquitto_pub, mqtt_address, f"{prefix}/z2m/door", big, True)
    try:
        results = {r.device_name: r for r in await MqttInput(config, context).probe()}
    finally:
        await asyncio.to_thread(mosquitto_pub, mqtt_address, f"{prefix}/z2m/door", "", True)
    assert reason == results["door"].error


async def test_zigbee2mqtt_shapes_from_mosquitto_pub(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """The bridge topic is unknown_device whatever it holds; all_fields keeps "state": "ON"."""
    mqtt_input = MqttInput(config_for(mqtt_address, prefix), context)
    task = await run_for(mqtt_input, emitter)
    try:
        await until_subscribed(mqtt_address, prefix, emitter)
        for topic, payload in [
            (f"{prefix}/z2m/bridge", "online"),
            (
                f"{prefix}/z2m/door",
                '{"state":"ON","contact":false,"update":{"state":"idle"},"label":"x"}',
            ),
            (f"{prefix}/esphome/greenhouse/sensor/window/state", "yes"),
        ]:
            await asyncio.to_thread(mosquitto_pub, mqtt_address, topic, payload)
        await emitter.wait_for(lambda: bool(emitter.values(GREENHOUSE, "window")))
        await emitter.wait_for(lambda: bool(emitter.values(DOOR, "contact")))
    finally:
        await stop(task)
    assert 1 == mqtt_input.counters["unknown_device"]
    assert 0 == mqtt_input.counters["missing"]
    assert {"state": True, "contact": False} == {
        r.metric: r.value for r in emitter.readings if r.device_id == DOOR
    }
    assert [True] == emitter.values(GREENHOUSE, "window")


async def test_iso_time_without_a_zone_needs_the_input_timezone(
    mqtt_address: tuple[str, int], prefix: str, context: InputContext
) -> None:
    """Tasmota's zone-less "Time" is refused with a clear error unless `timezone` is set."""
    payload = '{"Time":"2026-05-01T12:00:00","AM2301":{"Temperature":21.4,"Humidity":40.1}}'
    topic = f"{prefix}/tele/tasmota_1A2B3C/SENSOR"
    outcomes: dict[str | None, RecordingEmitter] = {}
    for tz in (None, "Europe/Berlin"):
        emitter = RecordingEmitter()
        mqtt_input = MqttInput(config_for(mqtt_address, prefix, timezone=tz), context)
        task = await run_for(mqtt_input, emitter)
        try:
            await until_subscribed(mqtt_address, prefix, emitter)
            await asyncio.to_thread(mosquitto_pub, mqtt_address, topic, payload)
            await emitter.wait_for(lambda e=emitter: e.last_status(CLIMATE) is not None)  # type: ignore[misc]
        finally:
            await stop(task)
        outcomes[tz] = emitter
    status, reason = outcomes[None].last_status(CLIMATE) or ("", "")
    assert "error" == status
    assert "Time: time '2026-05-01T12:00:00' has no zone offset; set the input's timezone" in reason
    assert [] == outcomes[None].values(CLIMATE, "temperature")
    [berlin] = [r for r in outcomes["Europe/Berlin"].readings if r.metric == "temperature"]
    assert 1_777_629_600_000_000 == berlin.time_us  # 12:00 CEST = 10:00Z


def test_timezone_must_be_an_iana_name(mqtt_address: tuple[str, int]) -> None:
    """An unknown zone name is a configuration error naming the key."""
    with pytest.raises(ValidationError) as info:
        config_for(mqtt_address, "x", timezone="Mars/Olympus")
    assert "timezone" in str(info.value)
    assert "not an IANA time zone name" in str(info.value)


async def test_overload_drops_at_the_input_and_counts_every_message(
    private_broker: MosquittoBroker, prefix: str, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A QoS 0 burst beyond max_pending: what is not taken is dropped here, and counted.

    Every message published is either a reading or in the `dropped` count (and the
    mqtt_input.overload events sum to it): nothing is lost silently, and the input goes on.
    """
    address = ("127.0.0.1", private_broker.port)
    config = config_for(address, prefix, max_pending=100, max_in_flight=100)
    raw = config.model_dump()
    for sub in raw["subscriptions"]:
        sub["qos"] = 0
    mqtt_input = MqttInput(MqttInputConfig.model_validate(raw), context)
    task = await run_for(mqtt_input, emitter)
    burst = 3000
    try:
        await until_subscribed(address, prefix, emitter)
        await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-c",
                "import sys, paho.mqtt.client as m\n"
                "c = m.Client(m.CallbackAPIVersion.VERSION2)\n"
                "c.connect(sys.argv[1], int(sys.argv[2]))\n"
                f"infos = [c.publish(sys.argv[3], '{{\"contact\": true}}', qos=0) for _ in range({burst})]\n"
                "c.loop_start(); [i.wait_for_publish(30) for i in infos]; c.disconnect(); c.loop_stop()\n",
                *map(str, address),
                f"{prefix}/z2m/door",
            ],
            check=True,
            timeout=60,
        )
        await emitter.wait_for(
            lambda: len(emitter.values(DOOR, "contact")) + mqtt_input.counters["dropped"] >= burst,
            within=30,
        )
        # Events are reported once a second.
        await emitter.wait_for(
            lambda: (
                sum(
                    e["attributes"]["dropped"]
                    for e in emitter.events
                    if e["kind"] == "mqtt_input.overload"
                )
                == mqtt_input.counters["dropped"]
            ),
            within=5,
        )
        await publish(address, [(f"{prefix}/z2m/door", '{"contact": false}')])
        await emitter.wait_for(lambda: emitter.values(DOOR, "contact")[-1] is False)
    finally:
        await stop(task)
    dropped = mqtt_input.counters["dropped"]
    assert dropped > 0
    assert burst == len(emitter.values(DOOR, "contact")) - 1 + dropped


@pytest.mark.parametrize("version", ["5", "3.1.1"])
async def test_the_session_keeps_what_is_published_while_the_input_is_away(
    private_broker: MosquittoBroker, prefix: str, context: InputContext, version: str
) -> None:
    """With either MQTT version the broker keeps QoS 1 messages for the stopped input's session."""
    address = ("127.0.0.1", private_broker.port)
    config = config_for(address, prefix, mqtt_version=version)
    first = RecordingEmitter()
    task = await run_for(MqttInput(config, context), first)
    try:
        await until_subscribed(address, prefix, first)
    finally:
        await stop(task)
    await publish(address, [(f"{prefix}/z2m/door", '{"contact": true, "battery": 77}')])
    second = RecordingEmitter()
    task = await run_for(MqttInput(config, context), second)
    try:
        await second.wait_for(lambda: bool(second.values(DOOR, "battery")))
    finally:
        await stop(task)
    assert [77] == second.values(DOOR, "battery")
