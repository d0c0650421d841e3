"""The MQTT side: a paho-mqtt 2.x client (MQTT v5) with manual acknowledgement.

paho runs its network loop in its own thread and reconnects by itself with capped backoff
(``reconnect_min`` .. ``reconnect_max``); messages reach asyncio only through
``call_soon_threadsafe``. The session is persistent (``clean_start`` false, a session expiry),
so messages received but not acknowledged are redelivered after a reconnect or a restart.

The session expiry (``mqtt.session_expiry``) is short on purpose. Mosquitto hands a shared
subscription's messages round-robin to every member that has a session, connected or not
(``subs__shared_process`` in its ``src/subs.c``), and when a session expires it deletes what was
queued in it rather than passing it to another member. So while a dead collector's session
lives, its share of the batches waits there, and the agents get them through only by resending
after their ``ack_timeout``: with a one-day expiry, one dead collector of two held each agent
to 23-38 % of its production (issue 11). A short expiry bounds that to seconds and still covers
what a session is for: after a network blip, or a restart within the expiry, the collector gets
its unacknowledged messages again at once. What the broker drops with an expired session the
agents resend: they keep every batch until its ack frame.

Every connection has a generation number. A PUBACK belongs to the connection that delivered the
message: after a reconnect the broker redelivers what was not acknowledged, with the same packet
ids, so acknowledging an old generation's message on the new connection could acknowledge a
different message. Such acks are skipped; the redelivered copy is found in the ledger and
acknowledged as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from collector.pipeline import Incoming
from collector.settings import MqttSettings
from protocol import TopicKind, subscription

log = structlog.get_logger("collector.mqtt")


class Consumer:
    """Subscribes to telemetry and status topics and hands messages to an asyncio queue."""

    def __init__(
        self,
        settings: MqttSettings,
        password: str | None,
        queue: asyncio.Queue[Incoming],
        loop: asyncio.AbstractEventLoop,
        connected_gauge: Any = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.loop = loop
        self.generation = 0
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._lock = threading.Lock()
        self._intake = True
        self._gauge = connected_gauge
        self._disconnected = threading.Event()
        self._pending: deque[mqtt.MQTTMessageInfo] = deque()
        self._disconnected.set()
        self._failed_attempts = 0
        self._stopping = False
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        if settings.username is not None:
            client.username_pw_set(settings.username, password)
        if settings.tls:
            context = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
            client.tls_set_context(context)
        client.reconnect_delay_set(
            max(1, round(settings.reconnect_min)), max(1, round(settings.reconnect_max))
        )
        # Outgoing ack frames: enough in flight that acks of one flush do not queue in paho.
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client
        self.filters = [
            subscription(settings.prefix, TopicKind.TELEMETRY, settings.group),
            subscription(settings.prefix, TopicKind.STATUS, settings.group),
        ]

    # --- paho thread --------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("mqtt.connect_refused", reason=str(reason))
            return
        with self._lock:
            self.generation += 1
            generation = self.generation
        self._failed_attempts = 0
        self._disconnected.clear()
        if self._gauge is not None:
            self._gauge.set(1)
        client.subscribe([(f, 1) for f in self.filters])
        log.info(
            "mqtt.connected",
            host=self.settings.host,
            port=self.settings.port,
            generation=generation,
            session_present=bool(getattr(_flags, "session_present", False)),
            session_expiry=self.settings.session_expiry,
        )
        self.loop.call_soon_threadsafe(self.connected.set)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` around the attempt: the error is at hand.
        error = sys.exc_info()[1]
        self._failed_attempts += 1
        log.warning(
            "mqtt.unreachable",
            host=self.settings.host,
            port=self.settings.port,
            error=str(error) if error else "connection failed",
            attempt=self._failed_attempts,
            retry_within_s=max(1, round(self.settings.reconnect_max)),
        )

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt.subscribe_refused", filters=self.filters, reasons=failed)
            return
        self.loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._lock:
            self.generation += 1
        self._disconnected.set()
        if self._gauge is not None:
            self._gauge.set(0)
        if self._stopping and not reason.is_failure:
            log.info("mqtt.disconnected", reason=str(reason))
        else:
            log.warning("mqtt.disconnected", reason=str(reason))
        self.loop.call_soon_threadsafe(self.connected.clear)
        self.loop.call_soon_threadsafe(self.subscribed.clear)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not self._intake:
            return  # never acknowledged: the broker redelivers it after we reconnect
        incoming = Incoming(
            mid=message.mid,
            qos=message.qos,
            topic=message.topic,
            payload=bytes(message.payload),
            generation=self.generation,
        )
        # A closed loop means shutdown: the unacknowledged message is redelivered later.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, incoming)

    # --- asyncio side -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho's thread retries until the broker answers)."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = int(self.settings.session_expiry)
        props.ReceiveMaximum = self.settings.receive_maximum
        self.client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=max(5, int(self.settings.keepalive)),
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()

    def stop_intake(self) -> None:
        """Take no more messages; those already queued are still processed by the caller."""
        self._intake = False

    def ack(self, incoming: Incoming) -> bool:
        """Send the PUBACK of ``incoming`` if its connection is still the current one."""
        if incoming.qos == 0:
            return True
        with self._lock:
            if incoming.generation != self.generation:
                return False
            rc = self.client.ack(incoming.mid, incoming.qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish an ack frame (QoS 1; paho queues it across reconnects) or, at QoS 0, a time
        reply (worthless once late: the gateway asks again)."""
        if qos == 0:
            self.client.publish(topic, payload, qos=0)
            return
        pending = self._pending
        while pending and _sent(pending[0]):
            pending.popleft()
        pending.append(self.client.publish(topic, payload, qos=1))

    def publish_tracked(self, topic: str, payload: bytes) -> Callable[[], bool]:
        """Publish (QoS 1); the returned check says whether the broker has acknowledged it."""
        info = self.client.publish(topic, payload, qos=1)

        def acknowledged() -> bool:
            try:
                return info.is_published()
            except (RuntimeError, ValueError):
                return False  # queued while offline: not acknowledged yet

        return acknowledged

    def stop(self, deadline: float = 5.0) -> None:
        """Disconnect (the session, with any unacknowledged messages, stays on the broker)."""
        # paho keeps QoS 1 publishes beyond the broker's receive maximum in its own queue and
        # sends them only as PUBACKs come back: let the ack frames of the last flush get out.
        until = time.monotonic() + deadline
        while self._pending and time.monotonic() < until:
            if _sent(self._pending[0]):
                self._pending.popleft()
            elif not self.client.is_connected():
                break
            else:
                time.sleep(0.01)
        self._stopping = True
        self.client.disconnect()
        # The PUBACKs and ack frames queued before DISCONNECT go out first; wait for the
        # network thread to get there before stopping it.
        self._disconnected.wait(5.0)
        self.client.loop_stop()


def _sent(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether paho is done with a publish (``is_published`` raises for one made offline)."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        # Published while disconnected: paho sends QoS 1 messages after it reconnects, or the
        # frame is lost with the process; either way the agent's resend gets a duplicate ack.
        return True
