"""The shipper: sends sealed batches to the broker and deletes them when the collector acks.

One paho-mqtt client per connection, its network loop in paho's own thread; callbacks reach
asyncio only through ``call_soon_threadsafe``. The reconnect loop is ours (paho's automatic
reconnect is off) so that the delay is capped exponential backoff with jitter.

Delivery: a window of up to ``window`` batches is in flight; each waits for the collector's ack
frame on the gateway's ack topic, matched by (stream, seq): acks for any stream that still has
batches in the buffer count, not only the current one. Every result but ``conflict`` is final
and deletes the batch: ``ok``, ``duplicate``, ``partial`` and ``quarantined`` (what the collector
quarantined is durable in the cloud and replayable there), ``rejected`` also records a
``batch.rejected`` event. Quarantined and refused readings are logged as ``batch.quarantined``
and ``batch.refused`` warnings, at most once per reason per minute with the counts since the
last line. ``conflict`` (the collector holds this key with other content: the buffer was rolled
back) makes the buffer start a new stream and re-encode that batch, which then goes out as a new
batch. A batch without an ack after ``ack_timeout`` is sent again (the stored frame, byte for
byte), and after a reconnect everything not acked is sent again. An ack whose delete a full disk
prevents is final all the same: the batch is never sent again, its delete is retried.

When the broker answers a publish with MQTT 5's "no matching subscribers" (0x10), no collector
is subscribed: the batch reached nobody, and waiting a whole ``ack_timeout`` for an ack that
cannot come would stall the gateway. That happens after a broker restart, which keeps sessions
but not shared subscriptions until each collector subscribes again, typically a few seconds
after the agents are back. Such a batch is sent again after ``NO_SUBSCRIBER_RETRY`` seconds,
doubling up to ``ack_timeout`` while the broker keeps saying so (``link.no_collector`` is logged
once per stretch).

A broker that sees this gateway's client id connect again drops the older connection (MQTT 5
reason 0x8E, "session taken over", where the broker says so; Mosquitto before 2.0.15 only closes
the socket). Two agents with one gateway id (a cloned SD card or configuration) would otherwise
knock each other off every second and ship two buffers under one id. The shipper treats 0x8E,
or ``TAKEOVER_SESSIONS`` sessions in a row that the broker ended within
``SHORT_SESSION`` seconds, as a takeover: it logs ``link.taken_over`` with what to check and
waits ``TAKEOVER_BACKOFF`` seconds (doubling up to ``TAKEOVER_BACKOFF_MAX``) before the next
attempt instead of fighting.

After ``NO_ACK_HINT_AFTER`` ack timeouts in a row on a connected link with no ack in between,
``link.no_acks`` says that no collector acknowledges on this topic prefix and what to check
(collector running, same ``topic_prefix``, gateway registered, broker ACL).

Two lanes share the window. On connect, the highest seq in the buffer marks the end of the
*backlog*; batches sealed after that are *live*. Live batches go out as soon as they are sealed;
backlog batches go out oldest first, at most ``backlog_rate`` per second and never in the last
free slot of the window, which stays reserved for live data. So after hours offline the
current readings arrive within a second or two while the backlog drains behind them.

Time: every ack of a batch that says how its times were taken carries the collector's clock.
With the boot-clock time the batch was first sent and the time the ack arrived, that is one
round trip for the timebase (:mod:`agent.clock`), which estimates the offset to the collector's
clock from them. While that estimate is missing or imprecise (and then every few minutes without
acks) the shipper also asks for the time directly: a ``time_request`` frame at QoS 0, answered
at once by a collector with a ``time`` frame. Status frames carry the timebase's wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from agent import clock as clocks
from agent.buffer import AckOutcome, Buffer, SealedBatch
from agent.settings import GatewaySettings, MqttSettings, mqtt_password, mqtt_username
from protocol import (
    Ack,
    AckResult,
    Backlog,
    GatewayStatus,
    ProtocolError,
    TimeReply,
    TimeRequest,
    TopicKind,
    build_topic,
    decode_frame,
    encode_frame,
)

log = structlog.get_logger("agent.shipper")

LinkState = Literal["connecting", "connected", "disconnected"]
NO_SUBSCRIBER_RETRY = 0.5
"""Seconds before a batch the broker delivered to nobody is sent again (doubling)."""
_NO_MATCHING_SUBSCRIBERS = 0x10
CONNACK_TIMEOUT = 15.0
OUTCOME_LOG_INTERVAL = 60.0
_SESSION_TAKEN_OVER = 0x8E
SHORT_SESSION = 10.0
"""Seconds: a session the broker ends sooner than this counts towards a suspected takeover."""
TAKEOVER_SESSIONS = 3
"""Short sessions in a row that count as a takeover where the broker does not say 0x8E."""
TAKEOVER_BACKOFF = 30.0
TAKEOVER_BACKOFF_MAX = 600.0
NO_ACK_HINT_AFTER = 3
"""Ack timeouts in a row (no ack in between) before ``link.no_acks`` explains what to check."""


class LinkDown(Exception):
    """The connection to the broker failed or was lost."""


@dataclass(slots=True)
class TakeoverWatch:
    """Tells a session taken over by another client with this gateway's id from a lost link."""

    short_sessions: int = 0
    takeovers: int = 0

    def session_ended(self, lasted: float, taken_over: bool) -> bool:
        """Record how a session ended; ``True`` when it looks taken over (back off now)."""
        if taken_over:
            self.short_sessions = 0
            return True
        if lasted >= SHORT_SESSION:
            self.short_sessions = 0
            self.takeovers = 0
            return False
        self.short_sessions += 1
        if self.short_sessions >= TAKEOVER_SESSIONS:
            self.short_sessions = 0
            return True
        return False

    def backoff(self) -> float:
        """Seconds to wait after a takeover: doubling with each one in a row, with jitter."""
        ceiling = min(TAKEOVER_BACKOFF_MAX, TAKEOVER_BACKOFF * 2 ** min(self.takeovers, 16))
        self.takeovers += 1
        return random.uniform(ceiling * 0.75, ceiling)


@dataclass(slots=True)
class InFlight:
    """A batch sent and not yet acknowledged."""

    seq: int
    frame: bytes
    readings: int
    sent_at: float
    live: bool
    sends: int = 1
    stream: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    # Set when the broker said nobody subscribes: send again at this time (monotonic).
    resend_at: float | None = None
    unheard: int = 0
    # Boot-clock time of the first send: any ack of this batch was sent after it.
    first_sent_boot: int | None = None


class OutcomeLog:
    """Warnings about readings the collector did not store: one line per kind and reason at most
    every ``interval`` seconds, carrying the counts since the previous line."""

    def __init__(
        self,
        interval: float = OUTCOME_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = log,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.log = logger
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._last: dict[tuple[str, str], float] = {}

    def add(self, outcome: AckOutcome) -> None:
        """Count the quarantined and refused readings of one settled batch, per reason."""
        for reason, (quarantined, refused) in outcome.reasons.items():
            for kind, n in (("quarantined", quarantined), ("refused", refused)):
                if n:
                    counts = self._counts.setdefault((kind, reason), [0, 0])
                    counts[0] += n
                    counts[1] += 1
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Log what is due (everything with ``force``)."""
        now = self.clock()
        for key in list(self._counts):
            last = self._last.get(key)
            if not force and last is not None and now - last < self.interval:
                continue
            readings, batches = self._counts.pop(key)
            self._last[key] = now
            kind, reason = key
            self.log.warning(
                f"batch.{kind}",
                reason=reason,
                readings=readings,
                batches=batches,
                since_s=None if last is None else round(now - last, 1),
                hint="kept in the collector's quarantine, replayable; not stored yet"
                if kind == "quarantined"
                else "refused by the collector for good",
            )


def backoff_delay(attempt: int, minimum: float, maximum: float) -> float:
    """Capped exponential backoff with jitter: uniformly within [½, 1] of ``min·2^attempt``."""
    ceiling = min(maximum, minimum * (2 ** min(attempt, 32)))
    return random.uniform(ceiling / 2, ceiling)


class Shipper:
    """Delivers the buffer's sealed batches over MQTT until stopped."""

    def __init__(
        self,
        settings: MqttSettings,
        gateway: GatewaySettings,
        buffer: Buffer,
        *,
        version: str = "",
        timebase: clocks.Timebase | None = None,
    ) -> None:
        self.settings = settings
        self.timebase = timebase if timebase is not None else clocks.current()
        self.gateway = gateway
        self.buffer = buffer
        self.version = version
        prefix = settings.topic_prefix
        self.telemetry_topic = build_topic(
            prefix, gateway.tenant_id, gateway.id, TopicKind.TELEMETRY
        )
        self.status_topic = build_topic(prefix, gateway.tenant_id, gateway.id, TopicKind.STATUS)
        self.ack_topic = build_topic(prefix, gateway.tenant_id, gateway.id, TopicKind.ACK)
        self.state: LinkState = "disconnected"
        self.in_flight: dict[int, InFlight] = {}
        # Publishes waiting for their PUBACK: mid -> (stream, seq, sends) of the batch sent.
        self._mids: dict[int, tuple[uuid.UUID, int, int]] = {}
        self._unheard_logged = False
        self.sent = 0
        self.resent = 0
        self.acked = 0
        self._wake = asyncio.Event()
        self._acks: asyncio.Queue[tuple[Ack, int]] = asyncio.Queue()
        self.time_requests = 0
        self._time_unanswered = 0
        self._stopping = False
        self._draining = False
        self._drain_deadline = 0.0
        self._lost = asyncio.Event()
        self._client: mqtt.Client | None = None
        self._connack: asyncio.Future[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tokens = 1.0
        self._tokens_at = time.monotonic()
        self._live_floor = -1
        self.drained = asyncio.Event()
        self.outcomes = OutcomeLog()
        self.takeover = TakeoverWatch()
        self._taken_over = False
        self._connected_at = 0.0
        self._ack_timeouts = 0
        self._no_ack_logged = False
        self.on_connected: Callable[[], None] | None = None
        self.ack_latency: Callable[[float], None] | None = None
        self.backlog_figures: Callable[[], Backlog] | None = None

    # --- called by the runtime ------------------------------------------------------------

    def wake(self) -> None:
        """A batch was sealed (or something else changed): look at the buffer now."""
        self._wake.set()

    async def drain(self, seconds: float) -> None:
        """Send what is sealed and wait for in-flight acks, for at most ``seconds``."""
        self._draining = True
        self._drain_deadline = time.monotonic() + seconds
        self._wake.set()
        if self.state != "connected":
            return  # nothing is in flight on a link that is down; the buffer keeps the rest
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.drained.wait()

    def stop(self) -> None:
        """Leave the send loop; :meth:`run` then says ``offline`` and disconnects."""
        self._stopping = True
        self._wake.set()
        self._lost.set()

    # --- paho callbacks (paho's thread) ---------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        loop, fut = self._loop, self._connack
        if loop is not None and fut is not None:
            loop.call_soon_threadsafe(_set_result, fut, reason)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if self._loop is not None:
            taken_over = getattr(reason, "value", None) == _SESSION_TAKEN_OVER
            self._loop.call_soon_threadsafe(self._link_lost, str(reason), taken_over)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        code = getattr(reason, "value", 0)
        if code == _NO_MATCHING_SUBSCRIBERS and self._loop is not None:
            self._loop.call_soon_threadsafe(self._unheard, mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # The arrival time first: the round trip ends here, not when asyncio gets to it.
        received = self.timebase.clock.boot_us()
        try:
            frame = decode_frame(bytes(message.payload))
        except ProtocolError as exc:
            log.warning("ack.invalid", topic=message.topic, reason=exc.reason.value, error=str(exc))
            return
        if isinstance(frame, TimeReply):
            self.timebase.observe(frame.sent, received, frame.time)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._time_answered)
            return
        if not isinstance(frame, Ack):
            log.warning(
                "ack.invalid",
                topic=message.topic,
                reason="unexpected_kind",
                error=f"expected an ack frame, got {type(frame).__name__}",
            )
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._ack_arrived, frame, received)

    # --- asyncio side ---------------------------------------------------------------------

    def _link_lost(self, reason: str, taken_over: bool = False) -> None:
        if self.state == "connected" and not self._stopping:
            log.warning("link.lost", reason=reason)
            self._taken_over = self._taken_over or taken_over
        self.state = "disconnected"
        self._lost.set()
        self._wake.set()

    def _ack_arrived(self, ack: Ack, received: int) -> None:
        self._acks.put_nowait((ack, received))
        self._wake.set()

    def _time_answered(self) -> None:
        self._time_unanswered = 0
        if self._no_ack_logged and not self._ack_timeouts:
            log.info("link.acks_resumed", time_reply=True)
            self._no_ack_logged = False

    def _ask_time(self) -> None:
        """Ask the collector for its time if the timebase wants it (QoS 0: a lost one is
        simply asked again)."""
        client = self._client
        if client is None or not self.timebase.wants_time():
            return
        request = TimeRequest(gateway_id=self.gateway.id, sent=self.timebase.clock.boot_us())
        client.publish(self.telemetry_topic, encode_frame(request), qos=0)
        self.time_requests += 1
        self._time_unanswered += 1
        if self._time_unanswered > NO_ACK_HINT_AFTER:
            # Asked every request_interval while the time is unknown: nobody answers.
            self._say_no_acks()

    def _build_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=str(self.gateway.id),
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            reconnect_on_failure=False,
        )
        username = mqtt_username(s)
        if username is not None:
            client.username_pw_set(username, mqtt_password(s))
        if s.tls.enabled:
            client.tls_set(
                ca_certs=str(s.tls.ca_file) if s.tls.ca_file else None,
                certfile=str(s.tls.cert_file) if s.tls.cert_file else None,
                keyfile=str(s.tls.key_file) if s.tls.key_file else None,
                cert_reqs=ssl.CERT_NONE if s.tls.insecure_skip_verify else ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
            if s.tls.insecure_skip_verify:
                client.tls_insecure_set(True)
        client.max_inflight_messages_set(max(20, s.window * 2))
        offline = encode_frame(
            GatewayStatus(
                gateway_id=self.gateway.id,
                state="offline",
                time=self.timebase.wall_now(),
                version=self.version,
                clock=self.timebase.offset().source,
            )
        )
        client.will_set(self.status_topic, offline, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    async def _connect(self) -> mqtt.Client:
        loop = asyncio.get_running_loop()
        self._loop = loop
        client = self._build_client()
        self._connack = loop.create_future()
        self._lost.clear()
        self.state = "connecting"
        s = self.settings
        kwargs: dict[str, Any] = {"keepalive": int(max(5, s.keepalive))}
        if s.protocol == "5":
            kwargs["clean_start"] = True
        try:
            await loop.run_in_executor(None, lambda: client.connect(s.host, s.port, **kwargs))
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise LinkDown(f"cannot reach {s.host}:{s.port}: {exc}") from None
        self._client = client
        client.loop_start()
        # Wait for CONNACK, but give up early when the link drops or we are told to stop.
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait(
                [self._connack, lost], timeout=CONNACK_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        if not self._connack.done():
            if self._stopping:
                raise LinkDown("stopped while connecting")
            if self._lost.is_set():
                raise LinkDown(f"{s.host}:{s.port} closed the connection before CONNACK")
            raise LinkDown(f"no CONNACK from {s.host}:{s.port} in {CONNACK_TIMEOUT:g} s")
        reason = self._connack.result()
        if getattr(reason, "is_failure", False):
            raise LinkDown(f"broker refused the connection: {reason}")
        client.subscribe(self.ack_topic, qos=1)
        client.publish(self.status_topic, self._online_frame(), qos=1, retain=True)
        self.state = "connected"
        self._connected_at = time.monotonic()
        self._taken_over = False
        self._ack_timeouts = 0
        if self.on_connected is not None:
            self.on_connected()
        return client

    def _online_frame(self) -> bytes:
        return encode_frame(
            GatewayStatus(
                gateway_id=self.gateway.id,
                state="online",
                time=self.timebase.wall_now(),
                version=self.version,
                clock=self.timebase.offset().source,
                backlog=self.backlog_figures() if self.backlog_figures is not None else None,
            )
        )

    def publish_status(self) -> None:
        """Say ``online`` again with the current backlog figures (retained), while connected."""
        client = self._client
        if client is None or self.state != "connected":
            return
        client.publish(self.status_topic, self._online_frame(), qos=1, retain=True)

    async def _close(self, graceful: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        loop = asyncio.get_running_loop()
        if graceful and self.state == "connected":
            offline = encode_frame(
                GatewayStatus(
                    gateway_id=self.gateway.id,
                    state="offline",
                    time=self.timebase.wall_now(),
                    version=self.version,
                    clock=self.timebase.offset().source,
                )
            )
            info = client.publish(self.status_topic, offline, qos=1, retain=True)
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, lambda: info.wait_for_publish(3.0))
            client.disconnect()
        else:
            with contextlib.suppress(Exception):
                client.disconnect()
        await loop.run_in_executor(None, client.loop_stop)
        self.state = "disconnected"

    async def run(self) -> None:
        """Connect, send and reconnect until :meth:`stop`; then say ``offline`` and leave."""
        attempt = 0
        while not self._stopping:
            connected = False
            try:
                await self._connect()
                connected = True
                log.info(
                    "link.connected",
                    host=self.settings.host,
                    port=self.settings.port,
                    protocol=self.settings.protocol,
                )
                attempt = 0
                await self._session()
            except LinkDown as exc:
                log.warning("link.failed", error=str(exc), attempt=attempt)
            finally:
                # Leaving on purpose (stop or drain): say "offline" ourselves; a clean
                # DISCONNECT does not fire the will.
                await self._close(graceful=self._stopping or self._draining)
            if self._stopping or (self._draining and not self.in_flight):
                break
            delay = backoff_delay(attempt, self.settings.reconnect_min, self.settings.reconnect_max)
            attempt += 1
            if connected and self.takeover.session_ended(
                time.monotonic() - self._connected_at, self._taken_over
            ):
                delay = self.takeover.backoff()
                log.error(
                    "link.taken_over",
                    client_id=str(self.gateway.id),
                    broker_said="session taken over (0x8E)"
                    if self._taken_over
                    else f"closed {TAKEOVER_SESSIONS} sessions in a row within"
                    f" {SHORT_SESSION:g} s of connecting",
                    retry_in_s=round(delay),
                    hint="another client connects with this gateway's id: is a second agent"
                    " running with the same gateway.id (a cloned SD card or agent.toml)? Give"
                    " each gateway its own id (sensormine-collector gateways provision); this"
                    " agent backs off instead of fighting for the connection",
                )
            log.info("link.reconnect_wait", seconds=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    self._lost.clear()
                    while not self._stopping:
                        await self._lost.wait()
                        self._lost.clear()
        self.outcomes.flush(force=True)
        self.drained.set()

    async def _session(self) -> None:
        """Send and collect acks while the link is up."""
        self.in_flight.clear()
        self._mids.clear()
        self.buffer.protected.clear()
        # What is buffered right now is backlog; what gets sealed from here on is live.
        self._live_floor = await self.buffer.last_seq()
        self._tokens, self._tokens_at = 1.0, time.monotonic()
        while not self._stopping and self.state == "connected":
            self._wake.clear()
            self._ask_time()
            await self._take_acks()
            self.outcomes.flush()
            self._expire()
            if self.state != "connected":
                break
            await self._fill_window()
            if self._draining and await self._drain_done():
                self.drained.set()
                return
            await self._sleep()
        if self.state != "connected" and not self._stopping:
            raise LinkDown("connection lost")

    async def _drain_done(self) -> bool:
        if self.in_flight:
            return False
        if time.monotonic() >= self._drain_deadline:
            return True
        # Live batches (sealed since connect, e.g. the final flush) are part of the drain.
        pending = await self.buffer.batches(after=self._live_floor, limit=1)
        return not pending

    async def _sleep(self) -> None:
        timeout = 1.0
        if self.in_flight:
            now = time.monotonic()
            oldest = min(f.sent_at for f in self.in_flight.values())
            timeout = min(timeout, max(0.01, oldest + self.settings.ack_timeout - now))
            soonest = min(
                (f.resend_at for f in self.in_flight.values() if f.resend_at is not None),
                default=None,
            )
            if soonest is not None:
                timeout = min(timeout, max(0.01, soonest - now))
        if self._tokens < 1.0:
            timeout = min(timeout, (1.0 - self._tokens) / self.settings.backlog_rate)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _take_acks(self) -> None:
        while not self._acks.empty():
            ack, received = self._acks.get_nowait()
            if ack.time is not None:
                sent = self.in_flight.get(ack.seq)
                if sent is not None and sent.stream == ack.stream and sent.first_sent_boot:
                    self.timebase.observe(sent.first_sent_boot, received, ack.time)
            if ack.result == AckResult.CONFLICT:
                await self._conflict(ack)
                continue
            outcome = await self.buffer.settle(ack)
            if outcome is None:
                self._unmatched(ack)
                continue
            entry = self._forget(ack.stream, ack.seq)
            self.acked += 1
            if entry is not None and self.ack_latency is not None:
                self.ack_latency(time.monotonic() - entry.sent_at)
            self._unheard_logged = False
            self._ack_timeouts = 0
            if self._no_ack_logged:
                log.info("link.acks_resumed", seq=ack.seq)
                self._no_ack_logged = False
            if outcome.rejected:
                log.error(
                    "batch.rejected", seq=ack.seq, reason=ack.reason, readings=outcome.readings
                )
            else:
                log.debug(
                    "batch.acked",
                    seq=ack.seq,
                    result=ack.result.value,
                    readings=outcome.readings,
                    sends=entry.sends if entry else None,
                    delete_pending=outcome.pending or None,
                )
            self.outcomes.add(outcome)

    async def _conflict(self, ack: Ack) -> None:
        """The collector holds this key with other content: the batch goes again, re-encoded."""
        reencoded = await self.buffer.conflict(ack.stream, ack.seq)
        if reencoded is None:
            self._unmatched(ack)
            return
        self._forget(ack.stream, ack.seq)
        log.warning(
            "batch.conflict",
            stream=str(ack.stream),
            seq=ack.seq,
            reencoded_as=[f"{r.stream}/{r.seq}" for r in reencoded] or None,
        )
        self._wake.set()

    def _forget(self, stream: uuid.UUID, seq: int) -> InFlight | None:
        entry = self.in_flight.get(seq)
        if entry is None or entry.stream != stream:
            return None
        del self.in_flight[seq]
        self.buffer.protected.discard(seq)
        return entry

    def _unmatched(self, ack: Ack) -> None:
        if not self.buffer.knows_stream(ack.stream):
            log.warning("ack.foreign_stream", stream=str(ack.stream), seq=ack.seq)
        else:
            log.debug(
                "ack.unknown_batch", stream=str(ack.stream), seq=ack.seq, result=ack.result.value
            )

    def _unheard(self, mid: int) -> None:
        """The broker delivered publish ``mid`` to no subscriber: send it again soon."""
        sent = self._mids.pop(mid, None)
        if sent is None:
            return
        stream, seq, sends = sent
        entry = self.in_flight.get(seq)
        if entry is None or entry.stream != stream or entry.sends != sends:
            return  # acked meanwhile, or already sent again
        if not self._unheard_logged:
            log.warning(
                "link.no_collector",
                topic=self.telemetry_topic,
                hint="the broker has no collector subscribed to this gateway's telemetry; sending"
                " again soon (after a broker restart collectors resubscribe within seconds)",
            )
            self._unheard_logged = True
        delay = min(self.settings.ack_timeout, NO_SUBSCRIBER_RETRY * 2**entry.unheard)
        entry.unheard += 1
        entry.resend_at = time.monotonic() + delay
        self._wake.set()

    def _expire(self) -> None:
        now = time.monotonic()
        deadline = now - self.settings.ack_timeout
        for seq, entry in list(self.in_flight.items()):
            if entry.resend_at is not None and entry.resend_at <= now:
                log.debug("batch.resend_unheard", seq=seq, sends=entry.sends)
                self._publish(entry, resend=True)
            elif entry.sent_at <= deadline:
                log.info("batch.ack_timeout", seq=seq, sends=entry.sends)
                self._ack_timeouts += 1
                if self._ack_timeouts >= NO_ACK_HINT_AFTER:
                    self._say_no_acks()
                self._publish(entry, resend=True)

    def _say_no_acks(self) -> None:
        """Once per stretch of silence: no collector answers (acks or time replies)."""
        if self._no_ack_logged:
            return
        self._no_ack_logged = True
        log.warning(
            "link.no_acks",
            ack_timeouts=self._ack_timeouts,
            time_requests_unanswered=self._time_unanswered,
            topic=self.telemetry_topic,
            ack_topic=self.ack_topic,
            hint="connected to the broker, but no collector acknowledges on this"
            " topic prefix: check that a collector is running and connected to this"
            " broker, that its mqtt.topic_prefix equals this agent's"
            f" ({self.settings.topic_prefix!r}), that this gateway is registered"
            " (sensormine-collector gateways show), and that the broker's ACL lets"
            " the collector publish on the ack topic; the buffer keeps every batch",
        )

    def _refill(self) -> None:
        now = time.monotonic()
        cap = float(self.settings.window)
        self._tokens = min(cap, self._tokens + (now - self._tokens_at) * self.settings.backlog_rate)
        self._tokens_at = now

    async def _fill_window(self) -> None:
        window = self.settings.window
        free = window - len(self.in_flight)
        if free <= 0:
            return
        live = await self.buffer.batches(
            after=self._live_floor, exclude=tuple(self.in_flight), limit=free, protect=True
        )
        for batch in live:
            self._send(batch, live=True)
        backlog_in_flight = sum(1 for f in self.in_flight.values() if not f.live)
        # The last slot of the window stays free for live data.
        backlog_slots = min(window - len(self.in_flight), max(1, window - 1) - backlog_in_flight)
        if backlog_slots <= 0 or self._live_floor < 0:
            return
        self._refill()
        allowed = min(backlog_slots, int(self._tokens))
        if allowed <= 0:
            return
        backlog = await self.buffer.batches(
            upto=self._live_floor, exclude=tuple(self.in_flight), limit=allowed, protect=True
        )
        if not backlog and not any(not f.live for f in self.in_flight.values()):
            self._live_floor = -1  # backlog drained: from now on there is one lane
        for batch in backlog:
            self._tokens -= 1.0
            self._send(batch, live=False)

    def _send(self, batch: SealedBatch, live: bool) -> None:
        entry = InFlight(
            batch.seq,
            batch.frame,
            batch.readings,
            time.monotonic(),
            live,
            sends=0,
            stream=batch.stream,
        )
        self.in_flight[batch.seq] = entry
        self.buffer.protected.add(batch.seq)
        self._publish(entry, resend=False)

    def _publish(self, entry: InFlight, resend: bool) -> None:
        client = self._client
        if client is None:
            return
        if entry.first_sent_boot is None:
            entry.first_sent_boot = self.timebase.clock.boot_us()
        info = client.publish(self.telemetry_topic, entry.frame, qos=1)
        entry.sent_at = time.monotonic()
        entry.sends += 1
        entry.resend_at = None
        self._mids[info.mid] = (entry.stream, entry.seq, entry.sends)
        if len(self._mids) > 4 * max(64, self.settings.window):
            # PUBACKs that never came (a lost link): forget the oldest.
            for old in list(self._mids)[: len(self._mids) // 2]:
                del self._mids[old]
        if resend:
            self.resent += 1
        else:
            self.sent += 1
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._link_lost(f"publish failed: {mqtt.error_string(info.rc)}")
            return
        log.debug(
            "batch.sent",
            stream=str(entry.stream),
            seq=entry.seq,
            bytes=len(entry.frame),
            readings=entry.readings,
            lane="live" if entry.live else "backlog",
            resend=resend,
        )


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
