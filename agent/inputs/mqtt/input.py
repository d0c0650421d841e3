"""The ``mqtt`` input: subscribes to a local broker and maps device messages to readings.

paho-mqtt runs on the agent's event loop, without a thread of its own (paho's "external event
loop" mode, as aiomqtt uses it): the socket is read every ``read_interval`` on the buffer
commit's beat (``Emitter.every_commit``), up to ``READ_BATCH`` packets per loop step while it holds more, and
a visible loop reconnects with back-off. Measured at 50 messages/s, paho's own thread cost
about 0.2 ms of CPU per message in wake-ups alone, and waking on every readable socket not much
less: more than everything else the input does with a message. Messages wait in a bounded queue
that a drain turns into readings ``DRAIN_BATCH`` at a time, yielding in between, so a flood
cannot starve the buffer commit and the shipper on the same loop; under overload the queue
fills and QoS 0 messages beyond ``max_pending`` are dropped here and counted.

Delivery guarantee: the session on the site broker is persistent (a fixed client id, no clean
start, a session expiry) and subscriptions default to QoS 1. QoS 1 messages are acknowledged
(PUBACK, in arrival order, as MQTT requires) only after the runtime has committed their readings
to the buffer (``Emitter.after_commit``), so whatever a device published with QoS 1 survives an
agent crash or restart on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.inputs.base import Emitter, InputContext, ProbeResult
from agent.inputs.common import ProblemLog, StatusTracker, now_us, zone
from agent.inputs.mqtt.config import MqttDevice, MqttInputConfig, Subscription
from agent.inputs.mqtt.mapping import MessageError, TopicFilter, map_message, topic_device_key
from protocol import Value

log = structlog.get_logger(__name__)

_METRIC = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")
# Packets read per readable event, and messages turned into readings per loop step; reading
# more than is drained is what lets an overloaded input drop (and count) at its own queue
# instead of leaving the broker to drop silently.
READ_BATCH = 512
DRAIN_BATCH = 256
# Messages one read must find for the stream to count as busy (read whenever readable), and
# the run of small reads after which it is read on the beat again.
BUSY_READ = 200
QUIET_READS = 50
# How often `inputs test` reads the socket (the running input reads on the commit's beat).
READ_INTERVAL = 0.05
# How long a stopping input waits for its last readings to be committed before it
# disconnects; what is not acknowledged by then is sent again by the broker after a restart.
STOP_ACK_WAIT = 5.0

# A message as read: topic, payload, packet id, QoS, arrival time (µs).
Received = tuple[str, bytes | bytearray, int, int, int]
Results = list[tuple[MqttDevice, dict[str, Value], int]]


class MqttInput:
    """Listens on the local broker; each matching message becomes readings of its device."""

    def __init__(self, config: MqttInputConfig, context: InputContext) -> None:
        """Build the input; nothing connects until ``run`` or ``probe``."""
        self.name = config.name
        self._config = config
        self._gateway = context.gateway_id
        self._by_key: dict[str, MqttDevice] = {d.match_key: d for d in config.devices}
        self._routes: list[tuple[TopicFilter, Subscription]] = [
            (TopicFilter(sub.topic), sub) for sub in config.subscriptions
        ]
        self._status = StatusTracker(config.name)
        # messages, readings, dropped (overload), and one counter per problem kind.
        self.counters: Counter[str] = Counter()
        self._problems = ProblemLog("mqtt_input", config.name, counts=self.counters)
        self._zone = zone(config.timezone)
        self._last_seen: dict[uuid.UUID, float] = {}
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._ever_connected = False
        self._stopping = False
        self._connect_error = ""
        # Devices whose message of the moment failed, with why (filled by _apply).
        self._failed: list[tuple[MqttDevice, str]] = []
        self._pending: deque[Received] = deque()
        self._drain_scheduled = False
        self._read = 0  # messages read so far (tells the reader when a read found nothing)
        self._reading = False  # a read goes on at the loop's next step
        self._chain_start = 0
        self._busy = False  # a busy stream: read on every readable event, not on the beat
        self._quiet_reads = 0
        self._dropped_seen = 0
        # QoS 1 messages handled but not acknowledged yet: (sequence, packet id, qos).
        self._unacked: deque[tuple[int, int, int]] = deque()
        self._unacked_ids: set[int] = set()
        self._sequence = 0
        self._ack_waiting = False
        self._client_now: paho.Client | None = None

    # -- paho plumbing ----------------------------------------------------------------------

    def _client(
        self, loop: asyncio.AbstractEventLoop, drain: Callable[[], None], probing: bool
    ) -> paho.Client:
        config = self._config
        client_id = config.client_id or f"sensormine-{self._gateway.hex[:8]}-{config.name}"
        persistent = config.session_expiry > 0 and not probing
        if probing:
            # `inputs test` runs beside the agent: reusing its client id would make the broker
            # drop the running agent's session (MQTT client takeover).
            client_id = f"{client_id[:100]}-test-{uuid.uuid4().hex[:8]}"
        client_id = client_id[:128]
        v5 = config.mqtt_version == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            # MQTT 5 takes clean_start at connect instead.
            clean_session=None if v5 else not persistent,
            # Acknowledged after the buffer commit; `inputs test` stores nothing to wait for.
            manual_ack=not probing,
        )
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        pending = self._pending
        limit = config.max_pending

        def on_connect(c: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                topics: list[tuple[str, int]] = [(s.topic, s.qos) for s in config.subscriptions]
                c.subscribe(topics)
            present = bool(getattr(flags, "session_present", False))
            self._on_connect(not reason.is_failure, str(reason), present)

        def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self._on_disconnect(str(reason))

        def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
            self._read += 1
            qos = message.qos
            if qos == 0 and len(pending) >= limit:
                # Overload: more than the loop can turn into readings. QoS 0 has no way back
                # to the broker, so it is dropped here and counted; QoS 1 is bounded by the
                # broker's in-flight window (max_in_flight) and always kept.
                self.counters["dropped"] += 1
                return
            pending.append((message.topic, message.payload, message.mid, qos, now_us()))
            if not self._drain_scheduled:
                self._drain_scheduled = True
                loop.call_soon(drain)

        # The socket, watched by the event loop. Registration may happen on the thread that
        # connects (see _keep_connected): from there it goes through call_soon_threadsafe.
        loop_thread = threading.get_ident()

        def on_loop(function: Callable[..., object], *args: Any) -> None:
            if threading.get_ident() == loop_thread:
                function(*args)
            else:
                loop.call_soon_threadsafe(function, *args)

        def watch(sock: socket.socket, _c: paho.Client) -> None:
            self._busy = False  # a new socket: on the beat until it proves busy
            if self._stopping:
                sock.close()  # a connect that finished after the input stopped

        def on_socket_open(c: paho.Client, _u: Any, sock: Any) -> None:
            on_loop(watch, sock, c)

        def on_socket_close(_c: paho.Client, _u: Any, sock: Any) -> None:
            on_loop(self._forget_socket, loop, sock)

        def on_socket_register_write(c: paho.Client, _u: Any, sock: Any) -> None:
            on_loop(loop.add_writer, sock, c.loop_write)

        def on_socket_unregister_write(_c: paho.Client, _u: Any, sock: Any) -> None:
            on_loop(self._stop_writing, loop, sock)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.on_socket_open = on_socket_open
        client.on_socket_close = on_socket_close
        client.on_socket_register_write = on_socket_register_write
        client.on_socket_unregister_write = on_socket_unregister_write
        return client

    def _read_some(self, client: paho.Client) -> bool:
        """Read what the socket holds, up to READ_BATCH packets; whether more may be waiting."""
        for _ in range(READ_BATCH):
            before = self._read
            if client.loop_read() != paho.MQTT_ERR_SUCCESS or self._read == before:
                return False
        return True

    def _read_now(self, client: paho.Client, going_on: bool = False) -> None:
        """Read the socket; while it holds more, go on at the loop's next step (one chain)."""
        if self._reading and not going_on:
            return  # a read is already going on; a second chain would starve the drain
        if not going_on:
            self._chain_start = self._read
        self._reading = client.socket() is not None and self._read_some(client)
        if self._reading:
            asyncio.get_running_loop().call_soon(self._read_now, client, True)
        elif self._read - self._chain_start >= BUSY_READ:
            # A busy stream: from now on read whenever the socket is readable, or it fills
            # between beats and the broker has to hold (and, beyond its limits, silently drop)
            # what the input would have taken or counted.
            self._watch_readable(client, True)

    def _watch_readable(self, client: paho.Client, on: bool) -> None:
        sock = client.socket()
        if on == self._busy or sock is None:
            return
        loop = asyncio.get_running_loop()
        self._busy = on
        self._quiet_reads = 0
        if on:
            loop.add_reader(sock, self._readable, client)
        else:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock)

    def _readable(self, client: paho.Client) -> None:
        """Busy mode: read what arrived; after a run of small reads, back to the beat."""
        before = self._read
        self._read_some(client)
        if self._read - before >= BUSY_READ // 8:
            self._quiet_reads = 0
            return
        self._quiet_reads += 1
        if self._quiet_reads >= QUIET_READS:
            self._watch_readable(client, False)

    async def _poll(self, client: paho.Client) -> None:
        """Read the socket every READ_INTERVAL (``inputs test``, which has no commit beat)."""
        while True:
            self._read_now(client)
            await asyncio.sleep(READ_INTERVAL)

    @staticmethod
    def _forget_socket(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock)
            loop.remove_writer(sock)

    @staticmethod
    def _stop_writing(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_writer(sock)

    def _on_connect(self, ok: bool, reason: str, session_present: bool = False) -> None:
        if ok:
            log.info(
                "mqtt_input.connected",
                input=self.name,
                host=self._config.host,
                session_present=session_present,
            )
            if not session_present and self._unacked:
                # A new session: the broker forgot the unacknowledged messages (their readings
                # are staged already), and their packet ids mean nothing any more.
                self._unacked.clear()
                self._unacked_ids.clear()
            self._connect_error = ""
            self._ever_connected = True
            self._disconnected.clear()
            self._connected.set()
        else:
            self._connect_error = f"broker refused the connection: {reason}"
            log.warning("mqtt_input.refused", input=self.name, reason=reason)

    def _on_disconnect(self, reason: str) -> None:
        self._connected.clear()
        self._disconnected.set()
        if self._stopping:
            log.info("mqtt_input.closed", input=self.name)
            return
        if not self._connect_error:
            self._connect_error = f"connection to the local broker lost: {reason}"
        log.warning("mqtt_input.disconnected", input=self.name, reason=reason)

    async def _start(self, drain: Callable[[], None], probing: bool = False) -> paho.Client:
        self._stopping = False
        self._pending.clear()
        self._drain_scheduled = False
        client = self._client(asyncio.get_running_loop(), drain, probing)
        config = self._config
        properties = None
        clean_start: bool | Literal[3] = paho.MQTT_CLEAN_START_FIRST_ONLY
        if config.mqtt_version == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.ReceiveMaximum = config.max_in_flight
            if not probing and config.session_expiry > 0:
                properties.SessionExpiryInterval = round(config.session_expiry)
                clean_start = False
            else:
                clean_start = True
        # Only remembers the parameters; _keep_connected connects.
        client.connect_async(
            config.host,
            config.port,
            round(config.keepalive),
            clean_start=clean_start,
            properties=properties,
        )
        self._client_now = client
        return client

    async def _keep_connected(self, client: paho.Client) -> None:
        """Connect, and reconnect with back-off whenever the connection is lost, until cancelled.

        A broker that is down is not an error of the input: its devices are `error` meanwhile
        (see _watch) and the input keeps trying.
        """
        config = self._config
        delay = config.reconnect_min
        while True:
            self._disconnected.clear()
            try:
                # The TCP connect may block (an unreachable host): off the event loop.
                await asyncio.to_thread(client.reconnect)
            except (OSError, ValueError) as exc:
                self._connect_error = (
                    f"cannot connect to the local broker at {config.host}:{config.port}"
                )
                log.warning(
                    "mqtt_input.connect_failed", input=self.name, host=config.host, error=str(exc)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, config.reconnect_max)
                continue
            await self._disconnected.wait()
            if self._ever_connected and self._connect_error.startswith("connection to"):
                delay = config.reconnect_min
            await asyncio.sleep(delay)
            delay = min(delay * 2, config.reconnect_max)

    async def _stop(self, client: paho.Client) -> None:
        self._stopping = True
        if self._connected.is_set():
            client.disconnect()
            # The loop writes what is queued (the last acknowledgements, then DISCONNECT)
            # and paho closes the socket.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), 2.0)
        sock = client.socket()
        if sock is not None:
            self._forget_socket(asyncio.get_running_loop(), sock)  # type: ignore[arg-type]
            with contextlib.suppress(OSError):
                sock.close()
        self._client_now = None

    # -- message handling -------------------------------------------------------------------

    def _problem(self, kind: str, message: str, topic: str) -> None:
        self._problems(kind, message, topic=topic)

    def _handle(self, topic: str, payload: bytes | bytearray, arrival: int) -> Results:
        """The readings in one message, per device; problems are counted and logged."""
        self.counters["messages"] += 1
        results: Results = []
        levels = topic.split("/")
        for topic_filter, sub in self._routes:
            if topic_filter.matches(topic, levels):
                results.extend(self._apply(sub, topic, payload, levels, arrival))
        return results

    def _apply(
        self,
        sub: Subscription,
        topic: str,
        payload: bytes | bytearray,
        levels: list[str],
        arrival: int,
    ) -> Results:
        # The device first: a message for nobody we know is unknown_device whatever it holds,
        # and a bad message for a known device puts that device in error.
        key = topic_device_key(sub, topic, levels)
        if key is not None and key not in self._by_key:
            self._problem("unknown_device", f"{topic}: no device has key {key!r}", topic)
            return []
        limit = self._config.max_payload_bytes
        if len(payload) > limit:
            reason = (
                f"{topic}: payload of {len(payload)} bytes is larger than "
                f"max_payload_bytes ({limit})"
            )
            self._problem("too_large", reason, topic)
            if key is not None:
                self._failed.append((self._by_key[key], reason))
            return []
        try:
            mapped = map_message(sub, topic, payload, self._zone, levels)
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
            if metric in sub.fields or _METRIC.match(metric):
                readings[metric] = value
            else:
                self._problem(
                    "bad_value", f"{topic}: {metric[:40]!r} is not a usable metric name", topic
                )
        stamp = mapped.time_us if mapped.time_us is not None else arrival
        return [(device, readings, stamp)] if readings else []

    def _report_dropped(self, emit: Emitter) -> None:
        """Once a second at most: an event (to the collector) and a log line with the count."""
        dropped = self.counters["dropped"]
        if dropped != self._dropped_seen:
            fresh = dropped - self._dropped_seen
            self._dropped_seen = dropped
            message = (
                f"{fresh} QoS 0 messages dropped: more than max_pending "
                f"({self._config.max_pending}) waiting to be read"
            )
            # The log line is rate-limited; the event carries every count.
            self._problems.counts["overload"] += fresh - 1
            self._problems("overload", message, topic="", dropped_total=dropped)
            emit.event(
                "mqtt_input.overload",
                message,
                severity="warning",
                attributes={"dropped": fresh, "dropped_total": dropped},
            )

    # -- acknowledgements -------------------------------------------------------------------

    def _ack_up_to(self, emit: Emitter, sequence: int) -> None:
        """Acknowledge, in arrival order, every QoS 1 message handled up to ``sequence``."""
        self._ack_waiting = False
        client = self._client_now
        unacked = self._unacked
        if client is None or not self._connected.is_set():
            # Kept: the broker sends them again on the resumed session, they are recognised
            # by their packet ids and acknowledged after the next commit.
            return
        while unacked and unacked[0][0] <= sequence:
            _seq, mid, qos = unacked.popleft()
            self._unacked_ids.discard(mid)
            client.ack(mid, qos)
        self._request_ack(emit)

    def _request_ack(self, emit: Emitter) -> None:
        if self._unacked and not self._ack_waiting:
            self._ack_waiting = True
            last = self._unacked[-1][0]
            emit.after_commit(lambda: self._ack_up_to(emit, last))

    # -- run and probe ----------------------------------------------------------------------

    async def run(self, emit: Emitter) -> None:
        """Listen until cancelled; device statuses follow their messages and the broker link."""
        pending = self._pending
        status = self._status
        last_seen = self._last_seen
        failed = self._failed
        counters = self.counters
        unacked = self._unacked
        unacked_ids = self._unacked_ids
        loop = asyncio.get_running_loop()

        def drain() -> None:
            self._drain_scheduled = False
            if self._stopping:
                return  # not handled, not acknowledged: the broker sends it again
            started = time.perf_counter()
            handled = 0
            while pending and handled < DRAIN_BATCH:
                topic, payload, mid, qos, arrival = pending.popleft()
                handled += 1
                if qos and mid in unacked_ids:
                    # Sent again after a reconnect, but its readings are staged already and its
                    # acknowledgement is queued behind the buffer commit.
                    continue
                failed.clear()
                for device, readings, stamp in self._handle(topic, payload, arrival):
                    device_id = device.id
                    for metric, value in readings.items():
                        emit.reading(device_id, metric, value, stamp)
                    counters["readings"] += len(readings)
                    last_seen[device_id] = time.monotonic()
                    status.online(emit, device_id)
                for device, reason in failed:
                    status.error(emit, device.id, reason)
                if qos:
                    self._sequence += 1
                    unacked.append((self._sequence, mid, qos))
                    unacked_ids.add(mid)
            self._request_ack(emit)
            emit.read_duration(time.perf_counter() - started)
            if pending and not self._drain_scheduled:
                # More waiting: yield to the other tasks of the loop, then go on.
                self._drain_scheduled = True
                loop.call_soon(drain)

        client = await self._start(drain)
        connection = asyncio.create_task(self._keep_connected(client))
        # The socket is read on the commit's beat: no wake-ups of its own, and what is read
        # goes into that commit. Measured at 50 messages/s, waking for every readable socket
        # (or on a timer of its own) cost several times more CPU than reading the messages.
        interval = self._config.read_interval
        next_read = 0.0

        def beat() -> None:
            nonlocal next_read
            now = loop.time()
            if self._busy:
                return  # read on readable events meanwhile
            if now >= next_read:
                # A little early rather than a whole commit interval late.
                next_read = now + interval * 0.9
                self._read_now(client)

        stop_reading = emit.every_commit(beat)
        try:
            await self._watch(emit, client)
        finally:
            stop_reading()
            self._watch_readable(client, False)
            await self._finish(client, emit)
            connection.cancel()
            await asyncio.gather(connection, return_exceptions=True)

    async def _finish(self, client: paho.Client, emit: Emitter) -> None:
        """Stop taking messages, acknowledge what was committed, then disconnect."""
        self._stopping = True
        if self._unacked:
            committed = asyncio.get_running_loop().create_future()
            last = self._unacked[-1][0]

            def acked() -> None:
                self._ack_up_to(emit, last)
                if not committed.done():
                    committed.set_result(None)

            self._ack_waiting = True
            emit.after_commit(acked)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(committed, STOP_ACK_WAIT)
        await self._stop(client)

    async def _watch(self, emit: Emitter, client: paho.Client) -> None:
        """Keep the link alive; mark devices `error` while the broker is unreachable or a
        device has gone quiet; report overload drops."""
        stale_after = self._config.stale_after
        tick = min(1.0, stale_after / 4) if stale_after else 1.0
        started = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            client.loop_misc()  # keepalive pings, and a dead link noticed
            self._report_dropped(emit)
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
        pending = self._pending

        def drain() -> None:
            self._drain_scheduled = False
            while pending:
                topic, payload, _mid, _qos, arrival = pending.popleft()
                self._failed.clear()
                for device, readings, _stamp in self._handle(topic, payload, arrival):
                    seen.setdefault(device.id, {}).update(readings)
                    errors.pop(device.id, None)
                for device, reason in self._failed:
                    errors.setdefault(device.id, reason)
            if len(seen) == len(self._config.devices):
                everyone.set()

        client = await self._start(drain, probing=True)
        connection = asyncio.create_task(self._keep_connected(client))
        poller = asyncio.create_task(self._poll(client))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(everyone.wait(), self._config.probe_wait)
        finally:
            await self._stop(client)
            for task in (connection, poller):
                task.cancel()
            await asyncio.gather(connection, poller, return_exceptions=True)
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
