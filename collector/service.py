"""The collector process: consumer, pipeline and writer wired together, with a two-phase shutdown.

``Collector(settings).run(stop)`` runs until ``stop`` is set, then stops taking messages,
flushes and commits what is staged, sends the acks of what committed, and disconnects, all
within ``drain_deadline``. Messages received but not committed are never acknowledged; the broker
keeps them in the persistent session and redelivers them. Signals are the CLI's business.

The collector is a time source for its gateways: the ack of every batch that says how its times
were taken (``clock``) carries this collector's clock, read just before the ack is published, and
a gateway's ``time_request`` (QoS 0) is answered at once with a ``time`` frame, outside the
writer (nothing is stored, and a QoS 0 message needs no PUBACK in order). Each batch's
``created`` against its receive time feeds the per-gateway skew gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from collector import migrations
from collector.alerts.engine import AlertEngine
from collector.clock_skew import SkewTracker
from collector.consumer import Consumer
from collector.errors import CollectorError, DatabaseUnavailable
from collector.lifecycle.runner import run_lifecycle
from collector.lifecycle.status import GatewayDevices
from collector.observability import CollectorMetrics
from collector.outcomes import REGISTRY_REASONS, SCHEMA_REASONS, Attempts
from collector.pipeline import Incoming, Pipeline, Staged
from collector.quarantine import Filters, QuotaSettings, replay
from collector.registry import Registry
from collector.settings import DEFAULT_GROUP, Settings, connect_params, mqtt_password
from collector.streams import StreamWatch
from collector.writer import Writer, write_items
from protocol import Ack, AckResult, Limits, Reason, TimeReply, encode_frame
from service.systemd import Notifier

log = structlog.get_logger("collector")


def db_kwargs(
    settings: Settings, kind: str, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """``asyncpg.connect`` arguments for the ``metadata`` or ``timeseries`` database."""
    db = settings.metadata if kind == "metadata" else settings.timeseries
    params = connect_params(db, "metadata" if kind == "metadata" else "timeseries", environ)
    kwargs = params.kwargs()
    kwargs["timeout"] = db.connect_timeout
    if db.command_timeout:
        kwargs["command_timeout"] = db.command_timeout
    kwargs["server_settings"] = {
        "application_name": "sensormine-collector",
        **db.session_settings(),
    }
    return kwargs


def build_registry(settings: Settings, environ: dict[str, str] | None = None) -> Registry:
    """The registry cache of the metadata database, as configured."""
    return Registry(
        db_kwargs(settings, "metadata", environ),
        refresh_interval=settings.registry.refresh_interval,
        negative_ttl=settings.registry.negative_ttl,
        allow_non_finite=settings.validation.allow_non_finite,
    )


def build_pipeline(settings: Settings, registry: Registry) -> Pipeline:
    """The pipeline as configured: the same checks for ingest and for quarantine replay."""
    v = settings.validation
    return Pipeline(
        registry,
        prefix=settings.mqtt.prefix,
        limits=Limits(max_frame_bytes=v.max_frame_bytes, max_points=v.max_points),
        max_age=v.max_age,
        max_skew=v.max_skew,
        allow_non_finite=v.allow_non_finite,
        reject_sample=v.reject_sample,
    )


async def migrate_all(
    settings: Settings, environ: dict[str, str] | None = None
) -> dict[str, list[int]]:
    """Apply pending migrations to both databases; return the versions applied to each."""
    done: dict[str, list[int]] = {}
    for kind in migrations.KINDS:
        kwargs = db_kwargs(settings, kind, environ)
        done[kind] = await migrations.apply(
            kwargs["dsn"],
            kind,
            chunk_interval=timedelta(seconds=settings.timeseries.chunk_interval),
            connect_kwargs=kwargs,
        )
    return done


class Collector:
    """One collector process's work; ``run(stop)`` until ``stop`` is set."""

    def __init__(self, settings: Settings, environ: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = environ
        self.metrics = CollectorMetrics()
        self.skew = SkewTracker(self.metrics.gateway_clock_skew)
        self._skew_logged: dict[uuid.UUID, float] = {}
        self.notifier = Notifier(environ)
        self.committed_batches = 0
        self.streams = StreamWatch()
        self._flagged: set[uuid.UUID] = set()
        self.ready = asyncio.Event()
        self.writer: Writer | None = None
        self.registry: Registry | None = None
        self.consumer: Consumer | None = None
        self.pipeline: Pipeline | None = None
        self.alerts: AlertEngine | None = None
        self.attempts = Attempts(settings.quarantine.max_attempts)
        # Quarantine filters waiting for the next automatic replay (registry changes).
        self._replay_due: set[Filters] = set()
        self._replay_wake = asyncio.Event()
        self.replays = 0
        # When the pump started on its current message (monotonic), None while it waits.
        self._processing_since: float | None = None
        self._stalled = False
        self._metrics_server: Any = None

    async def _retry(self, what: str, stop: asyncio.Event, op: Any) -> Any:
        """Run ``op()`` until it stops raising ``DatabaseUnavailable`` (or ``stop`` is set)."""
        delay = self.settings.writer.retry_min
        while True:
            try:
                return await op()
            except DatabaseUnavailable as exc:
                self.metrics.db_errors.labels(database=what).inc()
                log.warning("startup.waiting", what=what, error=str(exc), retry_in=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return None
                delay = min(delay * 2, self.settings.writer.retry_max)

    async def _set_chunk_interval(self) -> None:
        kwargs = db_kwargs(self.settings, "timeseries", self.environ)
        try:
            conn = await asyncpg.connect(**kwargs)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"time-series database: {exc}") from exc
        try:
            interval = timedelta(seconds=self.settings.timeseries.chunk_interval)
            # Collectors starting together would update the same catalog rows ("tuple
            # concurrently updated"): change only what differs, one collector at a time.
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)", migrations.lock_key("timeseries")
                )
                for table in ("telemetry", "telemetry_text", "events"):
                    current = await conn.fetchval(
                        "SELECT time_interval FROM timescaledb_information.dimensions "
                        "WHERE hypertable_name = $1 AND column_name = 'time'",
                        table,
                    )
                    if current != interval:
                        await conn.execute(
                            "SELECT set_chunk_time_interval($1::regclass, $2::interval)",
                            table,
                            interval,
                        )
        except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"time-series database: {exc}") from exc
        finally:
            await conn.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain within the deadline."""
        s = self.settings
        loop = asyncio.get_running_loop()
        if s.migrate_on_start:
            done = await self._retry("migrations", stop, lambda: migrate_all(s, self.environ))
            if stop.is_set():
                return
            log.info("migrations.applied", applied=done)
        await self._retry("timeseries", stop, self._set_chunk_interval)
        if stop.is_set():
            return
        try:
            self._metrics_server = self.metrics.serve(s.metrics.listen)
        except OSError as exc:
            raise CollectorError(f"metrics.listen {s.metrics.listen}: {exc.strerror}") from None
        registry = build_registry(s, self.environ)
        if s.quarantine.auto_replay:
            # Before the first connection: what was registered while no collector listened is
            # replayed at start-up too.
            registry.on_change.append(self._registry_changed)
        alerts = AlertEngine(
            registry,
            s.alerts,
            prefix=s.mqtt.prefix,
            connect_kwargs=db_kwargs(s, "timeseries", self.environ),
            refresh_interval=s.registry.refresh_interval,
        )
        registry.on_change.append(alerts.registry_changed)
        await self._retry("metadata", stop, registry.start)
        if not stop.is_set() and s.alerts.enabled:
            # Before the first batch: a batch evaluated without the rules would miss alerts.
            await self._retry("metadata", stop, alerts.load)
        if stop.is_set():
            await registry.close()
            return
        self.registry = registry
        self.alerts = alerts
        pipeline = build_pipeline(s, registry)
        self.pipeline = pipeline
        queue: asyncio.Queue[Incoming] = asyncio.Queue()
        consumer = Consumer(
            s.mqtt, mqtt_password(s.mqtt, self.environ), queue, loop, self.metrics.mqtt_connected
        )
        self.consumer = consumer
        writer = Writer(
            db_kwargs(s, "timeseries", self.environ),
            self._on_committed,
            self.metrics,
            on_failed=self._failed,
            quota=QuotaSettings(
                per_tenant=s.quarantine.max_bytes_per_tenant,
                per_unknown_gateway=s.quarantine.max_bytes_per_unknown_gateway,
            ),
            max_rows=s.writer.max_rows,
            max_age=s.writer.max_age,
            max_staged_rows=s.writer.max_staged_rows,
            retry_min=s.writer.retry_min,
            retry_max=s.writer.retry_max,
        )
        self.writer = writer
        gateway_devices = GatewayDevices(db_kwargs(s, "metadata", self.environ))
        writer.gateway_devices = gateway_devices.rows
        if s.alerts.enabled:
            writer.alerts = alerts
            writer.add_flush_hook(alerts.flushed)
        writer_task = asyncio.create_task(writer.run(), name="writer")
        lifecycle_task = asyncio.create_task(
            run_lifecycle(
                s,
                stop,
                runner=s.mqtt.client_id,
                connect_kwargs=db_kwargs(s, "timeseries", self.environ),
                on_run=lambda run: self.metrics.lifecycle_runs.labels(
                    job=run.job, result=run.result
                ).inc(),
            ),
            name="lifecycle",
        )
        pump_task = asyncio.create_task(self._pump(queue, pipeline, writer, stop), name="pump")
        watchdog_task = asyncio.create_task(self._watchdog(), name="watchdog")
        replay_task = asyncio.create_task(self._auto_replay(stop), name="replay")
        alerts_task = asyncio.create_task(
            alerts.run(stop, consumer.publish_tracked if s.alerts.publish else None),
            name="alerts",
        )
        consumer.start()
        self.notifier.ready("consuming")
        self.ready.set()
        # The group name is the collectors' shared secret against gateways joining their shared
        # subscription (docs/security.md): logged as a digest that tells groups apart.
        log.info(
            "collector.started",
            client_id=s.mqtt.client_id,
            group_digest=hashlib.sha256(s.mqtt.group.encode()).hexdigest()[:12],
            prefix=s.mqtt.prefix,
        )
        if s.mqtt.group == DEFAULT_GROUP and s.mqtt.username is not None:
            log.warning(
                "mqtt.group_default",
                hint="set mqtt.group to a random value shared by the collectors only: a gateway"
                " that knows the group can join the shared subscription (docs/security.md)",
            )
        stopped = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                {stopped, writer_task, pump_task}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
            stop.set()  # the lifecycle task watches it too
            replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await replay_task
            alerts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await alerts_task
            await self._shutdown(consumer, writer, writer_task, pump_task, watchdog_task, registry)
            await _finish_lifecycle(lifecycle_task, self.settings.drain_deadline)
            await gateway_devices.close()
        for task in (writer_task, pump_task):
            # A crashed writer or pump must not leave a process that consumes nothing: exit
            # non-zero so that systemd restarts it (unacknowledged messages are redelivered).
            if task in done and not task.cancelled() and task.exception() is not None:
                raise CollectorError(f"{task.get_name()} failed: {task.exception()!r}")

    async def _shutdown(
        self,
        consumer: Consumer,
        writer: Writer,
        writer_task: asyncio.Task[None],
        pump_task: asyncio.Task[None],
        watchdog_task: asyncio.Task[None],
        registry: Registry,
    ) -> None:
        started = time.monotonic()
        self.notifier.stopping()
        log.info("collector.draining", staged=writer.pending, deadline=self.settings.drain_deadline)
        consumer.stop_intake()
        pump_task.cancel()
        # A crashed task's exception is reported by run(); here it only must not stop the drain.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump_task
        writer.close_intake()
        try:
            await asyncio.wait_for(asyncio.shield(writer_task), self.settings.drain_deadline)
        except TimeoutError:
            log.error("collector.drain_timeout", unacknowledged=writer.pending)
            writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer_task
        except Exception:
            log.exception("writer.failed")
        watchdog_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog_task
        remaining = self.settings.drain_deadline - (time.monotonic() - started)
        await asyncio.get_running_loop().run_in_executor(
            None, consumer.stop, min(5.0, max(0.5, remaining))
        )
        await writer.close()
        await registry.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("collector.stopped", seconds=round(time.monotonic() - started, 3))

    async def _pump(
        self,
        queue: asyncio.Queue[Incoming],
        pipeline: Pipeline,
        writer: Writer,
        stop: asyncio.Event,
    ) -> None:
        """Process messages in arrival order and stage them."""
        while True:
            msg = await queue.get()
            self.metrics.inflight.inc()
            delay = self.settings.writer.retry_min
            self._processing_since = time.monotonic()
            while True:
                try:
                    staged = await pipeline.process(msg)
                    break
                except DatabaseUnavailable as exc:
                    self.metrics.db_errors.labels(database="metadata").inc()
                    log.warning("registry.unavailable", error=str(exc), retry_in=delay)
                    self._processing_since = None  # waiting on a dead database is not a hang
                    await asyncio.sleep(delay)
                    self._processing_since = time.monotonic()
                    delay = min(delay * 2, self.settings.writer.retry_max)
                except Exception as exc:
                    # A bug must cost neither the collector nor the batch: retry it, and after
                    # its attempts keep its raw frame in quarantine.
                    log.exception("pipeline.failed", topic=msg.topic)
                    staged = self._failed(msg, exc)
                    break
            self._processing_since = None
            if staged.time_request is not None and msg.qos == 0:
                self._answer_time(staged)
                self.metrics.inflight.dec()
                continue
            writer.stage(staged)
            # Queued messages never suspend this loop by themselves: yield so that the writer
            # can start a full flush while the next messages are processed.
            await asyncio.sleep(0)
            await writer.room()

    def _answer_time(self, item: Staged) -> None:
        """Publish this collector's clock in answer to a gateway's time request."""
        consumer = self.consumer
        assert consumer is not None and item.ack_topic is not None
        assert item.time_request is not None
        reply = TimeReply(sent=item.time_request, time=time.time_ns() // 1000)
        try:
            consumer.publish(item.ack_topic, encode_frame(reply, compress=False), qos=0)
        except Exception:
            log.exception("time.publish_failed", topic=item.ack_topic)
            return
        self.metrics.time_requests.inc()

    def _record_skew(self, item: Staged) -> None:
        if item.gateway_id is None or item.created is None or item.key is None:
            return
        # The receive time on the wall clock: now, less how long the message has been with us.
        received = time.time_ns() // 1000 - int((time.monotonic() - item.incoming.received) * 1e6)
        skew = self.skew.record(item.gateway_id, item.created, received)
        tolerance = self.settings.validation.clock_tolerance
        now = time.monotonic()
        off = skew > tolerance or (skew < -tolerance and self.skew.settled(item.gateway_id))
        if off and now >= self._skew_logged.get(item.gateway_id, 0.0):
            self._skew_logged[item.gateway_id] = now + 60.0  # one line per gateway a minute
            log.warning(
                "gateway.clock_skew",
                gateway_id=str(item.gateway_id),
                skew_s=round(skew, 3),
                clock=item.clock,
                hint="the gateway sealed this batch with a clock it does not trust"
                if item.clock == "untrusted"
                else "an agent that does not take the collector's time (first release) on a"
                " wrong clock"
                if item.clock is None
                else "the gateway's times differ from this collector's clock",
            )

    def _on_committed(self, items: list[Staged]) -> None:
        """After a commit: ack frames and PUBACKs in arrival order, and the counters."""
        consumer = self.consumer
        assert consumer is not None
        m = self.metrics
        if items:
            now = time.monotonic()
            m.commit_lag.set(max(now - item.incoming.received for item in items))
        for item in items:
            if item.time_request is not None:
                # A time request sent at QoS 1: answered after the commit, in arrival order.
                self._answer_time(item)
                consumer.ack(item.incoming)
                m.inflight.dec()
                continue
            if item.retry:
                # No ack frame: the agent sends the batch again after its ack timeout.
                consumer.ack(item.incoming)
                m.inflight.dec()
                m.messages.labels(kind="telemetry", result="retry").inc()
                continue
            if item.key is not None and item.result is not AckResult.CONFLICT:
                self.attempts.forget((item.key,))
            if item.ack_topic is not None and item.result is not None and item.stream is not None:
                frame = Ack(
                    stream=item.stream,
                    seq=item.seq,
                    result=item.result,
                    accepted=item.accepted,
                    rejected=item.rejected,
                    reason=item.reason,
                    quarantined=item.quarantined,
                    reasons=item.tally.reasons() if item.result is not AckResult.OK else {},
                    # Only to an agent that reads it: one that says how its times were taken.
                    time=time.time_ns() // 1000 if item.clock is not None else None,
                )
                try:
                    consumer.publish(item.ack_topic, encode_frame(frame, compress=False))
                except Exception:
                    # The batch is committed; without its ack frame the agent resends it and
                    # gets a duplicate ack. Not worth stopping the writer for.
                    log.exception("ack.publish_failed", topic=item.ack_topic)
            if item.stream is not None and item.gateway_id is not None and item.created:
                self.streams.observe(item.gateway_id, item.stream, item.created, time.monotonic())
            pubacked = consumer.ack(item.incoming)
            log.debug(
                "batch.acked",
                seq=item.seq,
                result=item.result.value if item.result else None,
                puback=pubacked,
            )
            m.inflight.dec()
            kind = "status" if item.ack_topic is None and item.result is None else "telemetry"
            result = item.result.value if item.result is not None else "ok"
            m.messages.labels(kind=kind, result=result).inc()
            if item.result is not None and item.result is not AckResult.CONFLICT:
                self._record_skew(item)
            if item.result in (AckResult.OK, AckResult.PARTIAL, AckResult.QUARANTINED):
                m.points_accepted.inc(item.accepted)
                self.committed_batches += 1
            for r in item.rejects:
                m.points_rejected.labels(reason=r.reason).inc(r.points)
            for q in item.quarantine:
                m.points_quarantined.labels(reason=q.reason).inc(q.points)
            if item.result is AckResult.CONFLICT:
                m.conflicts.inc()
            elif item.result is AckResult.QUARANTINED:
                log.warning(
                    "batch.quarantined",
                    reason=item.reason,
                    topic=item.incoming.topic,
                    quarantined=item.quarantined,
                    message=item.quarantine[0].message if item.quarantine else "",
                )
            elif item.result is AckResult.REJECTED or (item.result is None and item.rejects):
                log.warning(
                    "batch.rejected",
                    reason=item.reason or (item.rejects[0].reason if item.rejects else ""),
                    topic=item.incoming.topic,
                    message=item.rejects[0].message if item.rejects else "",
                )
            elif item.result is AckResult.PARTIAL:
                log.info(
                    "batch.partial",
                    topic=item.incoming.topic,
                    accepted=item.accepted,
                    quarantined=item.quarantined,
                    rejected=item.rejected,
                    reason=item.reason,
                )

    def _failed(self, msg: Incoming, exc: BaseException) -> Staged:
        """A message whose processing or writing raised: retry it, or quarantine its frame."""
        pipeline = self.pipeline
        assert pipeline is not None
        self.metrics.internal_errors.inc()
        if self.attempts.failed(pipeline.retry_key(msg)):
            return pipeline.internal_error(msg, exc)
        return Staged(incoming=msg, retry=True, reason=Reason.INTERNAL_ERROR.value)

    # --- automatic replay of the quarantine -----------------------------------------------------

    def _registry_changed(self, table: str, ident: uuid.UUID | None) -> None:
        """Note what waits for a changed gateway, device, device type or schema."""
        if table == "gateways" and ident is not None:
            self._replay_due.add(Filters(gateway_id=ident))
        elif table == "devices" and ident is not None:
            self._replay_due.add(Filters(device_id=ident))
        elif table in ("device_types", "schemas", "schema_versions"):
            reasons = {r.value for r in SCHEMA_REASONS} | {Reason.DEVICE_DISABLED.value}
            self._replay_due.add(Filters(reasons=tuple(sorted(reasons))))
        else:
            # A tenant changed, or the listener (re)connected and may have missed changes.
            reasons = {r.value for r in REGISTRY_REASONS | SCHEMA_REASONS}
            self._replay_due.add(Filters(reasons=tuple(sorted(reasons))))
        self._replay_wake.set()

    async def _auto_replay(self, stop: asyncio.Event) -> None:
        """Replay what waits for a registry change, shortly after the change (debounced)."""
        s = self.settings
        kwargs = db_kwargs(s, "timeseries", self.environ)
        await self.ready.wait()
        while not stop.is_set():
            await self._replay_wake.wait()
            await asyncio.sleep(s.quarantine.replay_delay)
            self._replay_wake.clear()
            due, self._replay_due = self._replay_due, set()
            pipeline = self.pipeline
            if pipeline is None or not due:
                continue
            try:
                conn = await asyncpg.connect(**kwargs)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("quarantine.replay_failed", error=str(exc))
                self._replay_due |= due
                continue
            try:
                for filters in due:
                    write = functools.partial(
                        write_items, alerts=self.alerts if s.alerts.enabled else None
                    )
                    await replay(conn, pipeline, write, filters)
                self.replays += 1
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("quarantine.replay_failed", error=str(exc))
                self._replay_due |= due
            except DatabaseUnavailable as exc:
                log.warning("quarantine.replay_failed", error=str(exc))
                self._replay_due |= due
            finally:
                await conn.close()

    def stall(self) -> str:
        """Why the collector is stuck (a flush or a message beyond its bound), or ``""``."""
        limit = self._stall_limit()
        now = time.monotonic()
        writer = self.writer
        started = writer.flush_started if writer is not None else None
        if started is not None and now - started > limit:
            return f"a flush has been running for {now - started:.0f} s"
        if self._processing_since is not None and now - self._processing_since > limit:
            return f"one message has been in processing for {now - self._processing_since:.0f} s"
        return ""

    def _stall_limit(self) -> float:
        db = self.settings.timeseries
        bound = max(db.command_timeout, db.statement_timeout, self.settings.drain_deadline)
        return 2 * bound if bound else 600.0

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        while True:
            await asyncio.sleep(interval or 10.0)
            stall = self.stall()
            if stall and not self._stalled:
                # systemd's watchdog restarts us; un-acked messages are redelivered.
                log.error("collector.stalled", why=stall, watchdog=bool(interval))
            self._stalled = bool(stall)
            if interval and not stall:
                self.notifier.watchdog()
            self._check_streams()
            if self.writer is not None:
                state = (
                    f"error: {self.writer.last_error}" if self.writer.last_error else "consuming"
                )
                self.notifier.status(f"{state}; {self.committed_batches} batches committed")

    def _check_streams(self) -> None:
        flagged = self.streams.flagged()
        self.metrics.concurrent_streams.set(len(flagged))
        for gateway in flagged - self._flagged:
            log.error(
                "gateway.concurrent_streams",
                gateway_id=str(gateway),
                hint="batches of this gateway come from two streams at once: two agents run"
                " with one gateway id (a cloned SD card or agent.toml); give each its own",
            )
        self._flagged = flagged


async def _finish_lifecycle(task: asyncio.Task[None], deadline: float) -> None:
    """Let the lifecycle task end its current transaction (it watches ``stop``), then cancel it."""
    try:
        await asyncio.wait_for(asyncio.shield(task), deadline)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _subscribed(collector: Collector) -> None:
    await collector.ready.wait()
    assert collector.consumer is not None
    await collector.consumer.subscribed.wait()


@contextlib.asynccontextmanager
async def running(
    settings: Settings, environ: dict[str, str] | None = None
) -> AsyncIterator[Collector]:
    """Run a collector in this event loop for the ``async with`` block, entered once it is subscribed."""
    collector = Collector(settings, environ)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop), name="collector")
    ready = asyncio.create_task(_subscribed(collector))
    done, _ = await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ready.cancel()
        task.result()
    try:
        yield collector
    finally:
        stop.set()
        await task
