"""The collector process: consumer, pipeline and writer wired together, with a two-phase shutdown.

``Collector(settings).run(stop)`` runs until ``stop`` is set, then stops taking messages,
flushes and commits what is staged, sends the acks of what committed, and disconnects, all
within ``drain_deadline``. Messages received but not committed are never acknowledged; the broker
keeps them in the persistent session and redelivers them. Signals are the CLI's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import structlog

from collector import migrations
from collector.consumer import Consumer
from collector.errors import CollectorError, DatabaseUnavailable
from collector.lifecycle.runner import run_lifecycle
from collector.lifecycle.status import GatewayDevices
from collector.observability import CollectorMetrics
from collector.pipeline import Incoming, Pipeline, Staged
from collector.registry import Registry
from collector.sd_notify import Notifier
from collector.settings import Settings, connect_params, mqtt_password
from collector.writer import Writer
from protocol import Ack, AckResult, Limits, encode_frame

log = structlog.get_logger("collector")


def db_kwargs(
    settings: Settings, kind: str, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """``asyncpg.connect`` arguments for the ``metadata`` or ``timeseries`` database."""
    db = settings.metadata if kind == "metadata" else settings.timeseries
    params = connect_params(db, "metadata" if kind == "metadata" else "timeseries", environ)
    kwargs = params.kwargs()
    kwargs["timeout"] = db.connect_timeout
    kwargs["server_settings"] = {"application_name": "sensormine-collector"}
    return kwargs


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
        self.notifier = Notifier(environ)
        self.committed_batches = 0
        self.ready = asyncio.Event()
        self.writer: Writer | None = None
        self.registry: Registry | None = None
        self.consumer: Consumer | None = None
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
                for table in ("telemetry", "events"):
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
        registry = Registry(
            db_kwargs(s, "metadata", self.environ),
            refresh_interval=s.registry.refresh_interval,
            negative_ttl=s.registry.negative_ttl,
            allow_non_finite=s.validation.allow_non_finite,
        )
        await self._retry("metadata", stop, registry.start)
        if stop.is_set():
            await registry.close()
            return
        self.registry = registry
        pipeline = Pipeline(
            registry,
            prefix=s.mqtt.prefix,
            limits=Limits(
                max_frame_bytes=s.validation.max_frame_bytes, max_points=s.validation.max_points
            ),
            max_age=s.validation.max_age,
            max_skew=s.validation.max_skew,
            allow_non_finite=s.validation.allow_non_finite,
            reject_sample=s.validation.reject_sample,
        )
        queue: asyncio.Queue[Incoming] = asyncio.Queue()
        consumer = Consumer(
            s.mqtt, mqtt_password(s.mqtt, self.environ), queue, loop, self.metrics.mqtt_connected
        )
        self.consumer = consumer
        writer = Writer(
            db_kwargs(s, "timeseries", self.environ),
            self._on_committed,
            self.metrics,
            max_rows=s.writer.max_rows,
            max_age=s.writer.max_age,
            max_staged_rows=s.writer.max_staged_rows,
            retry_min=s.writer.retry_min,
            retry_max=s.writer.retry_max,
        )
        self.writer = writer
        gateway_devices = GatewayDevices(db_kwargs(s, "metadata", self.environ))
        writer.gateway_devices = gateway_devices.rows
        writer_task = asyncio.create_task(writer.run(), name="writer")
        lifecycle_task = asyncio.create_task(
            run_lifecycle(
                s,
                stop,
                runner=s.mqtt.client_id,
                connect_kwargs=db_kwargs(s, "timeseries", self.environ),
            ),
            name="lifecycle",
        )
        pump_task = asyncio.create_task(self._pump(queue, pipeline, writer, stop), name="pump")
        watchdog_task = asyncio.create_task(self._watchdog(), name="watchdog")
        consumer.start()
        self.notifier.ready("consuming")
        self.ready.set()
        log.info(
            "collector.started",
            client_id=s.mqtt.client_id,
            group=s.mqtt.group,
            prefix=s.mqtt.prefix,
        )
        stopped = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                {stopped, writer_task, pump_task}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
            stop.set()  # the lifecycle task watches it too
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
            while True:
                try:
                    staged = await pipeline.process(msg)
                    break
                except DatabaseUnavailable as exc:
                    self.metrics.db_errors.labels(database="metadata").inc()
                    log.warning("registry.unavailable", error=str(exc), retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.settings.writer.retry_max)
                except Exception as exc:
                    # A bug must cost one message, not the collector: refuse it and go on.
                    log.exception("pipeline.failed", topic=msg.topic)
                    staged = pipeline.failed(msg, exc)
                    break
            writer.stage(staged)
            # Queued messages never suspend this loop by themselves: yield so that the writer
            # can start a full flush while the next messages are processed.
            await asyncio.sleep(0)
            await writer.room()

    def _on_committed(self, items: list[Staged]) -> None:
        """After a commit: ack frames and PUBACKs in arrival order, and the counters."""
        consumer = self.consumer
        assert consumer is not None
        m = self.metrics
        for item in items:
            if item.ack_topic is not None and item.result is not None and item.stream is not None:
                frame = Ack(
                    stream=item.stream,
                    seq=item.seq,
                    result=item.result,
                    accepted=item.accepted,
                    rejected=item.rejected,
                    reason=item.reason,
                )
                try:
                    consumer.publish(item.ack_topic, encode_frame(frame, compress=False))
                except Exception:
                    # The batch is committed; without its ack frame the agent resends it and
                    # gets a duplicate ack. Not worth stopping the writer for.
                    log.exception("ack.publish_failed", topic=item.ack_topic)
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
            if item.result in (AckResult.OK, AckResult.PARTIAL):
                m.points_accepted.inc(item.accepted)
                self.committed_batches += 1
            for r in item.rejects:
                m.points_rejected.labels(reason=r.reason).inc(r.points)
            if item.result is AckResult.REJECTED or (item.result is None and item.rejects):
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
                    rejected=item.rejected,
                    reason=item.reason,
                )

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        while True:
            await asyncio.sleep(interval or 10.0)
            if interval:
                self.notifier.watchdog()
            if self.writer is not None:
                state = (
                    f"error: {self.writer.last_error}" if self.writer.last_error else "consuming"
                )
                self.notifier.status(f"{state}; {self.committed_batches} batches committed")


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
