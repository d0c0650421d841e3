"""The ``mqtt`` input: subscribes to a local broker and maps device messages to readings.

paho-mqtt runs its network loop on its own thread; every callback hands its arguments to the
event loop with ``call_soon_threadsafe`` and touches nothing else, so all state lives on the
loop and no lock is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from agent.inputs.base import Emitter, InputContext, ProbeResult
from agent.inputs.common import ProblemLog, StatusTracker, now_us, zone
from agent.inputs.mqtt.config import MqttDevice, MqttInputConfig, Subscription
from agent.inputs.mqtt.mapping import MessageError, map_message, topic_device_key
from protocol import Value

log = structlog.get_logger(__name__)

_METRIC = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")


class MqttInput:
    """Listens on the local broker; each matching message becomes readings of its device."""

    def __init__(self, config: MqttInputConfig, context: InputContext) -> None:
        """Build the input; nothing connects until ``run`` or ``probe``."""
        self.name = config.name
        self._config = config
        self._gateway = context.gateway_id
        self._by_key: dict[str, MqttDevice] = {d.match_key: d for d in config.devices}
        self._status = StatusTracker(config.name)
        # messages, readings, and one counter per problem kind (malformed, missing, ...).
        self.counters: Counter[str] = Counter()
        self._problems = ProblemLog("mqtt_input", config.name, counts=self.counters)
        self._zone = zone(config.timezone)
        self._last_seen: dict[uuid.UUID, float] = {}
        self._connected = asyncio.Event()
        self._ever_connected = False
        self._stopping = False
        self._connect_error = ""
        # Devices whose message of the moment failed, with why (filled by _apply).
        self._failed: list[tuple[MqttDevice, str]] = []

    # -- paho plumbing ----------------------------------------------------------------------

    def _client(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[str, bytes], None],
        probing: bool,
    ) -> paho.Client:
        config = self._config
        client_id = config.client_id or f"sensormine-{self._gateway.hex[:8]}-{config.name}"
        if probing:
            # `inputs test` runs beside the agent: reusing its client id would make the broker
            # drop the running agent's session (MQTT client takeover).
            client_id = f"{client_id[:100]}-test-{uuid.uuid4().hex[:8]}"
        client_id = client_id[:128]
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        client.reconnect_delay_set(
            max(1, round(config.reconnect_min)), max(1, round(config.reconnect_max))
        )

        def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                # Subscribing here (on paho's thread) makes every reconnect resubscribe.
                topics: list[tuple[str, int]] = [(s.topic, s.qos) for s in config.subscriptions]
                c.subscribe(topics)
            loop.call_soon_threadsafe(self._on_connect, not reason.is_failure, str(reason))

        def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            loop.call_soon_threadsafe(self._on_disconnect, str(reason))

        def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
            loop.call_soon_threadsafe(deliver, message.topic, bytes(message.payload))

        def on_connect_fail(_c: paho.Client, _u: Any) -> None:
            loop.call_soon_threadsafe(self._on_connect_fail)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.on_connect_fail = on_connect_fail
        return client

    def _on_connect(self, ok: bool, reason: str) -> None:
        if ok:
            log.info("mqtt_input.connected", input=self.name, host=self._config.host)
            self._connect_error = ""
            self._ever_connected = True
            self._connected.set()
        else:
            self._connect_error = f"broker refused the connection: {reason}"
            log.warning("mqtt_input.refused", input=self.name, reason=reason)

    def _on_connect_fail(self) -> None:
        self._connect_error = (
            f"cannot connect to the local broker at {self._config.host}:{self._config.port}"
        )
        log.warning("mqtt_input.connect_failed", input=self.name, host=self._config.host)

    def _on_disconnect(self, reason: str) -> None:
        self._connected.clear()
        if self._stopping:
            log.info("mqtt_input.closed", input=self.name)
            return
        self._connect_error = f"connection to the local broker lost: {reason}"
        log.warning("mqtt_input.disconnected", input=self.name, reason=reason)

    async def _start(
        self, deliver: Callable[[str, bytes], None], probing: bool = False
    ) -> paho.Client:
        self._stopping = False
        client = self._client(asyncio.get_running_loop(), deliver, probing)
        # connect_async + loop_start: paho's thread connects and keeps reconnecting by itself;
        # a broker that is down at start is therefore not an error of the input.
        client.connect_async(self._config.host, self._config.port, round(self._config.keepalive))
        client.loop_start()
        return client

    async def _stop(self, client: paho.Client) -> None:
        self._stopping = True
        client.disconnect()
        # loop_stop joins paho's thread; do the join off the event loop.
        await asyncio.to_thread(client.loop_stop)

    # -- message handling -------------------------------------------------------------------

    def _problem(self, kind: str, message: str, topic: str) -> None:
        self._problems(kind, message, topic=topic)

    def _handle(self, topic: str, payload: bytes) -> list[tuple[MqttDevice, dict[str, Value], int]]:
        """The readings in one message, per device; problems are counted and logged."""
        self.counters["messages"] += 1
        results: list[tuple[MqttDevice, dict[str, Value], int]] = []
        for sub in self._config.subscriptions:
            if not paho.topic_matches_sub(sub.topic, topic):
                continue
            results.extend(self._apply(sub, topic, payload))
        return results

    def _apply(
        self, sub: Subscription, topic: str, payload: bytes
    ) -> list[tuple[MqttDevice, dict[str, Value], int]]:
        # The device first: a message for nobody we know is unknown_device whatever it holds,
        # and a bad message for a known device puts that device in error.
        key = topic_device_key(sub, topic)
        if key is not None and key not in self._by_key:
            self._problem("unknown_device", f"{topic}: no device has key {key!r}", topic)
            return []
        limit = self._config.max_payload_bytes
        if len(payload) > limit:
            reason = f"{topic}: payload of {len(payload)} bytes is larger than max_payload_bytes ({limit})"
            self._problem("too_large", reason, topic)
            if key is not None:
                self._failed.append((self._by_key[key], reason))
            return []
        try:
            mapped = map_message(sub, topic, payload, self._zone)
        except MessageError as exc:
            self._problem(exc.problem, str(exc), topic)
            device = self._by_key.get(exc.device_key or "")
            if device is not None:
                self._failed.append((device, str(exc)))
            return []
        device = self._by_key.get(mapped.device_key)
        if device is None:
            self._problem(
                "unknown_device", f"{topic}: no device has key {mapped.device_key!r}", topic
            )
            return []
        if mapped.missing:
            self._problem("missing", f"{topic}: missing {', '.join(mapped.missing)}", topic)
        readings: dict[str, Value] = {}
        for metric, value in mapped.readings.items():
            if _METRIC.match(metric):
                readings[metric] = value
            else:
                self._problem(
                    "bad_value", f"{topic}: {metric[:40]!r} is not a usable metric name", topic
                )
        stamp = mapped.time_us if mapped.time_us is not None else now_us()
        return [(device, readings, stamp)] if readings else []

    # -- run and probe ----------------------------------------------------------------------

    async def run(self, emit: Emitter) -> None:
        """Listen until cancelled; device statuses follow their messages and the broker link."""

        def deliver(topic: str, payload: bytes) -> None:
            started = time.perf_counter()
            self._failed.clear()
            for device, readings, stamp in self._handle(topic, payload):
                for metric, value in readings.items():
                    emit.reading(device.id, metric, value, stamp)
                    self.counters["readings"] += 1
                self._last_seen[device.id] = time.monotonic()
                self._status.online(emit, device.id)
            for device, reason in self._failed:
                self._status.error(emit, device.id, reason)
            emit.read_duration(time.perf_counter() - started)

        client = await self._start(deliver)
        try:
            await self._watch(emit)
        finally:
            await self._stop(client)

    async def _watch(self, emit: Emitter) -> None:
        """Mark devices `error` while the broker is unreachable or a device has gone quiet."""
        stale_after = self._config.stale_after
        tick = min(1.0, stale_after / 4) if stale_after else 1.0
        started = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self._connected.is_set() and self._connect_error:
                for device in self._config.devices:
                    self._status.error(emit, device.id, self._connect_error)
                continue
            if not stale_after:
                continue
            for device in self._config.devices:
                seen = self._last_seen.get(device.id, started)
                if now - seen > stale_after:
                    self._status.error(emit, device.id, f"no message for {stale_after:g}s")

    async def probe(self) -> list[ProbeResult]:
        """Listen up to ``probe_wait`` until every device has published something."""
        seen: dict[uuid.UUID, dict[str, Value]] = {}
        errors: dict[uuid.UUID, str] = {}
        everyone = asyncio.Event()

        def deliver(topic: str, payload: bytes) -> None:
            self._failed.clear()
            for device, readings, _stamp in self._handle(topic, payload):
                seen.setdefault(device.id, {}).update(readings)
                errors.pop(device.id, None)
            for device, reason in self._failed:
                errors.setdefault(device.id, reason)
            if len(seen) == len(self._config.devices):
                everyone.set()

        client = await self._start(deliver, probing=True)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(everyone.wait(), self._config.probe_wait)
        finally:
            await self._stop(client)
        results = []
        for device in self._config.devices:
            readings = seen.get(device.id, {})
            error = errors.get(device.id)
            if not readings and error is None:
                if self._ever_connected:
                    error = f"no message within {self._config.probe_wait:g}s"
                else:
                    error = self._connect_error or (
                        f"cannot connect to the local broker at "
                        f"{self._config.host}:{self._config.port}"
                    )
            results.append(ProbeResult(device.id, device.name, readings=readings, error=error))
        return results
