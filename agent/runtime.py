"""The agent's runtime: supervises inputs, the commit loop into the buffer, and the shipper.

Readings reported by inputs are staged in memory for at most ``buffer.commit_interval`` and then
appended to the buffer in one transaction; a reading counts as accepted (``produced``) when that
transaction commits. Each input runs in its own task: an exception escaping an input is logged,
recorded as an ``input.crashed`` event, and the input is restarted after
``runtime.input_restart_delay``; the other inputs never notice.

Time: inputs stamp readings through :func:`agent.inputs.common.now_us` (or leave the time to the
emitter); the emitter stores the boot-clock reading behind the stamp, and the buffer turns it
into wall time at sealing with the timebase's best offset (:mod:`agent.clock`). A time an input
took from the reading itself (a device's own timestamp) is stored as given.

Shutdown (:meth:`Runtime.run` returns when ``stop`` is set): stop the inputs, commit what they
reported, seal it, let the shipper send it and wait for in-flight acks up to
``runtime.drain_timeout``, say ``offline`` and close the buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog

from agent import __version__
from agent import clock as clocks
from agent.backlog import BacklogMeter
from agent.buffer import DROP_REASONS, Buffer, ReadingRow, Store, event_note, now_us, status_note
from agent.errors import AgentError, ConfigError
from agent.inputs.base import DeviceState, Input, InputContext, Severity, kind
from agent.metrics import AgentMetrics
from agent.settings import Settings, exposed_credentials, input_label
from agent.shipper import Shipper
from protocol import Backlog, Value
from service.systemd import Notifier

log = structlog.get_logger("agent.runtime")

# Readings staged in memory beyond this (a stalled disk) are counted as dropped, not hoarded.
MAX_STAGED = 1_000_000


def rss_bytes() -> int:
    """Resident set size of this process (from /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def store_figures(store: Store, link_up: bool) -> dict[str, float]:
    """The agent's own figures from a buffer store (what the ``system`` input reports as
    ``agent_*`` metrics; ``inputs test`` reads them from the buffer file)."""
    dropped = sum(store.counters[f"dropped_{r}"] for r in DROP_REASONS)
    return {
        "buffer_readings": float(store.unsealed + store.batched_readings),
        "buffer_held_readings": float(len(store.held)),
        "buffer_batches": float(store.batch_count),
        "buffer_bytes": float(store.bytes),
        "dropped": float(dropped + sum(store.unpersisted.values())),
        "produced": float(store.counters["produced"]),
        "rss_bytes": float(rss_bytes()),
        "link_up": 1.0 if link_up else 0.0,
    }


class Staging:
    """What inputs reported since the last commit; cheap to append to, drained by the runtime."""

    def __init__(self) -> None:
        self.rows: list[ReadingRow] = []
        self.notes: list[tuple[str, bytes]] = []
        self.overflowed = 0
        self.first_at: float | None = None
        # Inputs' "tell me when this is in the buffer" callbacks (Emitter.after_commit).
        self.after_commit: list[Callable[[], None]] = []
        # Inputs' "call me before each commit" callbacks (Emitter.every_commit).
        self.every_commit: list[Callable[[], None]] = []

    def take(self) -> tuple[list[ReadingRow], list[tuple[str, bytes]]]:
        """Hand over everything staged."""
        rows, notes = self.rows, self.notes
        self.rows, self.notes = [], []
        return rows, notes

    def take_after_commit(self) -> list[Callable[[], None]]:
        """Hand over the callbacks registered so far (with ``take``, in the same loop step)."""
        callbacks, self.after_commit = self.after_commit, []
        return callbacks


_INT64 = 2**63


def _invalid(metric: object, value: object, time_us: object) -> str | None:
    """What makes a reading unencodable under protocol v1, or ``None``."""
    if metric.__class__ is not str or not 1 <= len(metric) <= 128:  # type: ignore[arg-type]
        return f"metric name {str(metric)[:40]!r} must be a string of 1 to 128 characters"
    cls = value.__class__
    if cls is int:
        if not -_INT64 <= value < _INT64:  # type: ignore[operator]
            return f"{metric}: integer {value} is outside the 64-bit range"
    elif cls is str:
        if len(value) > 16_384 and len(value.encode()) > 65_536:  # type: ignore[arg-type,attr-defined]
            return f"{metric}: text value is longer than 64 KiB"
    elif cls is not float and cls is not bool:
        return f"{metric}: value of type {cls.__name__} is not int, float, bool or str"
    if time_us.__class__ is not int or not 0 <= time_us < _INT64:
        return f"{metric}: timestamp {time_us!r} is not µs since the epoch"
    return None


class InputEmitter:
    """The :class:`~agent.inputs.base.Emitter` an input instance writes to."""

    def __init__(
        self,
        input_name: str,
        staging: Staging,
        statuses: dict[uuid.UUID, Any],
        timebase: clocks.Timebase | None = None,
    ) -> None:
        self.input_name = input_name
        self._timebase = timebase if timebase is not None else clocks.current()
        self._staging = staging
        self._statuses = statuses
        self.last_read_s = 0.0
        self.invalid = 0
        self._reported_invalid: set[tuple[uuid.UUID, str]] = set()

    def reading(
        self, device_id: uuid.UUID, metric: str, value: Value, time_us: int | None = None
    ) -> None:
        """Stage one reading for the next commit.

        Without ``time_us``, or with a :class:`~agent.clock.Stamp` of the gateway's clock, the
        reading is stored on the boot clock; any other time is the reading's own (wall time).
        """
        staging = self._staging
        if len(staging.rows) >= MAX_STAGED:
            staging.overflowed += 1
            return
        if time_us is None:
            t, on_boot_clock = self._timebase.boot_now(), True
        elif time_us.__class__ is clocks.Stamp:
            t, on_boot_clock = time_us.boot, True  # type: ignore[attr-defined]
        else:
            t, on_boot_clock = time_us, False
        problem = _invalid(metric, value, t)
        if problem is not None:
            # One bad reading must not make a whole batch undecodable for the collector.
            self._refuse(device_id, metric, problem)
            return
        staging.rows.append((device_id.bytes, metric, t, value, on_boot_clock))

    def _refuse(self, device_id: uuid.UUID, metric: str, problem: str) -> None:
        self.invalid += 1
        key = (device_id, str(metric)[:128])
        if key in self._reported_invalid:
            return
        self._reported_invalid.add(key)
        log.warning(
            "reading.invalid", input=self.input_name, device_id=str(device_id), problem=problem
        )
        self.event(
            "reading.invalid",
            f"input {self.input_name} reported an invalid reading: {problem}",
            severity="warning",
            device_id=device_id,
        )

    def device_status(self, device_id: uuid.UUID, status: DeviceState, reason: str = "") -> None:
        """Forward a device's status to the collector when it changed."""
        if self._statuses.get(device_id) == (status, reason):
            return
        self._statuses[device_id] = (status, reason)
        self._staging.notes.append(status_note(device_id, status, reason))

    def event(
        self,
        kind: str,
        message: str,
        *,
        severity: Severity = "info",
        device_id: uuid.UUID | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """Stage an event for the next batch."""
        attrs = {"input": self.input_name, **(attributes or {})}
        self._staging.notes.append(
            event_note(kind, message, severity=severity, device_id=device_id, attributes=attrs)
        )

    def read_duration(self, seconds: float) -> None:
        """Remember how long the last read cycle took."""
        self.last_read_s = seconds

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything reported so far is committed to the buffer's file."""
        self._staging.after_commit.append(callback)

    def every_commit(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` before each commit; returns the function that stops the calls."""
        callbacks = self._staging.every_commit
        callbacks.append(callback)

        def cancel() -> None:
            if callback in callbacks:
                callbacks.remove(callback)

        return cancel


class Runtime:
    """Runs one agent: buffer, inputs and shipper, until asked to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        max_page_count: int | None = None,
        clock: clocks.Clock | None = None,
    ) -> None:
        self.settings = settings
        self.timebase = clocks.Timebase(
            clock,
            tolerance=settings.clock.tolerance,
            request_interval=settings.clock.request_interval,
        )
        b = settings.buffer
        self.buffer = Buffer(
            b.path,
            gateway_id=settings.gateway.id,
            max_bytes=b.max_bytes,
            overflow=b.overflow,
            synchronous=b.synchronous,
            journal_size_limit=b.journal_size_limit,
            max_points=settings.batch.max_points,
            max_frame_bytes=settings.batch.max_frame_bytes,
            max_page_count=max_page_count,
            reserve_bytes=b.reserve_bytes,
            hold_readings=b.hold_readings,
            timebase=self.timebase,
            max_wait=settings.clock.max_wait,
        )
        self.shipper = Shipper(
            settings.mqtt,
            settings.gateway,
            self.buffer,
            version=__version__,
            timebase=self.timebase,
        )
        self.staging = Staging()
        # after_commit callbacks whose readings are still held in memory (a failing disk).
        self._after_commit: list[Callable[[], None]] = []
        self.statuses: dict[uuid.UUID, Any] = {}
        self.shipper.on_connected = self.restate_statuses
        self.notifier = Notifier()
        self.inputs: list[Input] = self.build_inputs()
        self._unsealed_since: float | None = None
        self.backlog = BacklogMeter()
        self.oldest_us: int | None = None
        self.shipper.backlog_figures = self.backlog_figures
        self.metrics = AgentMetrics(self) if settings.metrics.listen else None
        if self.metrics is not None:
            self.shipper.ack_latency = self.metrics.ack_latency.observe

    def restate_statuses(self) -> None:
        """State every device's current status again (called on each connect to the broker).

        Only changes travel otherwise, and the collector marks a gateway's devices ``offline``
        while the gateway is; restating after the gateway's ``online`` frame makes each device's
        latest status its own (an input that failed at start stays ``error``).
        """
        for device_id, (status, reason) in self.statuses.items():
            self.staging.notes.append(status_note(device_id, status, reason))

    def context(self) -> InputContext:
        """What inputs are told about this agent."""
        return InputContext(
            gateway_id=self.settings.gateway.id,
            buffer_path=self.settings.buffer.path,
            stats=self.stats,
        )

    def build_inputs(self) -> list[Input]:
        """Build every configured input (a failure here is a configuration error)."""
        built: list[Input] = []
        for i, config in enumerate(self.settings.inputs):
            try:
                built.append(kind(config.type).factory(config, self.context()))
            except Exception as exc:
                label = input_label(i, config.name)
                raise ConfigError(f"{label}: cannot be set up: {exc}") from exc
        return built

    def stats(self) -> dict[str, float]:
        """Figures for inputs (the ``system`` input reports them as metrics)."""
        try:
            store = self.buffer.store
        except Exception:
            return {"buffer_readings": 0, "buffer_bytes": 0, "dropped": 0, "rss_bytes": rss_bytes()}
        return store_figures(store, link_up=self.shipper.state == "connected")

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then drain and return."""
        # Inputs and buffer notes stamp through the process's timebase: this one while it runs.
        previous = clocks.install(self.timebase)
        try:
            await self._run(stop)
        finally:
            clocks.install(previous)

    async def _run(self, stop: asyncio.Event) -> None:
        await self.buffer.open()
        try:
            if self.metrics is not None:
                self.metrics.serve(self.settings.metrics.listen)
            shipper_task = asyncio.create_task(self.shipper.run(), name="shipper")
            committer = asyncio.create_task(self._commit_loop(), name="commit")
            input_tasks = [
                asyncio.create_task(self._supervise(inp), name=f"input:{inp.name}")
                for inp in self.inputs
            ]
            watchdog = asyncio.create_task(self._heartbeat(), name="heartbeat")
            meter = asyncio.create_task(self._meter_backlog(), name="backlog")
            self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
            for key, path, mode in exposed_credentials(self.settings.mqtt):
                log.warning(
                    "credentials.exposed",
                    key=key,
                    path=str(path),
                    mode=mode,
                    hint=f"other users can read it: chmod 0600 {path} (or 0640 with the service's group)",
                )
            log.info(
                "agent.started",
                gateway_id=str(self.settings.gateway.id),
                inputs=[i.name for i in self.inputs],
                version=__version__,
            )
            stop_wait = asyncio.create_task(stop.wait())
            await asyncio.wait(
                [stop_wait, committer, shipper_task], return_when=asyncio.FIRST_COMPLETED
            )
            failed = [
                t
                for t in (committer, shipper_task)
                if t.done() and not t.cancelled() and t.exception() is not None
            ]
            for task in failed:
                log.error("agent.task_failed", task=task.get_name(), error=repr(task.exception()))
            self.notifier.notify("STOPPING=1", "STATUS=draining")
            log.info("agent.stopping", drain_timeout=self.settings.runtime.drain_timeout)
            started = time.monotonic()
            for task in input_tasks:
                task.cancel()
            await asyncio.gather(*input_tasks, return_exceptions=True)
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await self._commit(final=True)
            remaining = max(0.0, self.settings.runtime.drain_timeout - (time.monotonic() - started))
            if not shipper_task.done():
                await self.shipper.drain(remaining)
            self.shipper.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(shipper_task, return_exceptions=True)
            watchdog.cancel()
            meter.cancel()
            stop_wait.cancel()
            await asyncio.gather(watchdog, meter, stop_wait, return_exceptions=True)
            if failed:
                # A bug in the agent's own machinery: exit non-zero so that systemd restarts it.
                raise AgentError(f"{failed[0].get_name()} failed: {failed[0].exception()!r}")
            stats = await self.buffer.stats()
            log.info(
                "agent.stopped",
                readings_buffered=stats.readings,
                batches_buffered=stats.batches,
                produced=stats.produced,
                delivered=stats.delivered,
            )
        finally:
            if self.metrics is not None:
                self.metrics.close()
            await self.buffer.close()

    async def _supervise(self, inp: Input) -> None:
        emitter = InputEmitter(inp.name, self.staging, self.statuses, self.timebase)
        while True:
            try:
                await inp.run(emitter)
                log.warning("input.returned", input=inp.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("input.crashed", input=inp.name, error=repr(exc))
                emitter.event(
                    "input.crashed",
                    f"input {inp.name} crashed: {exc!r}"[:1024],
                    severity="error",
                )
            await asyncio.sleep(self.settings.runtime.input_restart_delay)

    async def _commit_loop(self) -> None:
        interval = self.settings.buffer.commit_interval
        while True:
            await asyncio.sleep(interval)
            for callback in list(self.staging.every_commit):
                # Inputs that read on the commit's beat (no wake-ups of their own).
                try:
                    callback()
                except Exception as exc:
                    log.exception("input.every_commit_failed", error=repr(exc))
            # Once _commit has taken the staged rows it must finish: cancelled halfway (SIGTERM
            # while it awaits the notes write), the rows would be in neither staging nor buffer.
            commit = asyncio.ensure_future(self._commit(final=False))
            try:
                await asyncio.shield(commit)
            except asyncio.CancelledError:
                while not commit.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(commit)
                raise

    async def _commit(self, final: bool) -> None:
        rows, notes = self.staging.take()
        self._after_commit.extend(self.staging.take_after_commit())
        if self.staging.overflowed:
            # Staged beyond the cap while the disk stalled: counted, never silent.
            self.buffer.store.unpersisted["drop_newest"] += self.staging.overflowed
            self.buffer.store.unpersisted_produced += self.staging.overflowed
            self.staging.overflowed = 0
        if notes:
            await self.buffer.add_notes(notes)
        if rows:
            await self.buffer.append(rows)
        if self._after_commit and not self.buffer.store.held:
            # Everything reported before these callbacks is in the file now (stored, or dropped
            # and counted by the overflow policy): inputs may acknowledge it to their devices.
            callbacks, self._after_commit = self._after_commit, []
            for callback in callbacks:
                try:
                    callback()
                except Exception as exc:
                    log.exception("input.after_commit_failed", error=repr(exc))
        # Deletes and re-encodings a full disk deferred, the reserve file, the disk-full state.
        await self.buffer.maintain()
        now = time.monotonic()
        if self.buffer.has_unsealed():
            if self._unsealed_since is None:
                self._unsealed_since = now
        else:
            self._unsealed_since = None
        due = self._unsealed_since is not None and (
            final or now - self._unsealed_since >= self.settings.batch.max_age
        )
        sealed = await self.buffer.seal(force=due)
        if due and not self.buffer.has_unsealed():
            self._unsealed_since = None
        if sealed:
            self.shipper.wake()

    def _status_line(self) -> str:
        s = self.buffer.store
        line = (
            f"link {self.shipper.state}; buffered {s.unsealed + s.batched_readings} readings"
            f" in {s.batch_count} batches + unsealed,"
            f" {s.bytes} bytes; in flight {len(self.shipper.in_flight)}"
        )
        if s.counters["quarantined"]:
            line += f"; quarantined in the cloud {s.counters['quarantined']}"
        offset = self.timebase.offset()
        if not offset.trusted:
            line += "; CLOCK UNTRUSTED: " + "; ".join(offset.reasons)
        elif offset.source == "collector":
            line += "; time from the collector"
        if s.space.full or s.held or s.pending_deletes:
            line += (
                f"; DISK FULL: {len(s.held)} readings held in memory,"
                f" {len(s.pending_deletes)} acked batches to delete"
            )
        return line

    async def _meter_backlog(self) -> None:
        """Sample the buffer's counters once a second; say how a backlog drains."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            if ticks % 5 == 1:
                self.oldest_us = await self._oldest_unacked()
                if self.metrics is not None:
                    self.metrics.oldest_us = self.oldest_us
            store = self.buffer.store
            reports = self.backlog.sample(
                time.monotonic(),
                now_us(),
                produced=store.counters["produced"] + store.unpersisted_produced,
                delivered=store.counters["delivered"],
                buffered=store.unsealed + store.batched_readings,
                linked=self.shipper.state == "connected",
            )
            if reports:
                # The same figures in the retained status frame (at most every 10 % or 30 s).
                self.shipper.publish_status()
            for report in reports:
                log.info(report.kind, **report.attributes)
                self.staging.notes.append(
                    event_note(report.kind, report.message, attributes=report.attributes)
                )
            if self.backlog.figures is not None:
                store.backlog_note = self.backlog.figures.to_json()

    def backlog_figures(self) -> Backlog:
        """What the buffer holds and how it drains, for the gateway status frame."""
        try:
            store = self.buffer.store
        except Exception:
            return Backlog(readings=0, batches=0)
        figures = self.backlog.figures
        oldest = self.oldest_us
        return Backlog(
            readings=store.unsealed + store.batched_readings,
            batches=store.batch_count,
            oldest_age_s=None if oldest is None else round(max(0.0, time.time() - oldest / 1e6), 1),
            ack_rate=figures.ack_rate if figures else 0.0,
            production_rate=figures.production_rate if figures else 0.0,
            drain_s=figures.estimate_s if figures else None,
            draining=figures.draining if figures else False,
        )

    async def _oldest_unacked(self) -> int | None:
        """Time (µs) of the oldest reading not yet acknowledged: batches are sealed in order, so
        it is in the lowest-seq batch or, with no batch waiting, the first unsealed reading."""
        batch = await self.buffer.query("SELECT oldest_us FROM batches ORDER BY seq LIMIT 1")
        reading = await self.buffer.query("SELECT ts, boot FROM readings ORDER BY id LIMIT 1")
        times = [int(batch[0][0])] if batch and batch[0][0] is not None else []
        if reading:
            # An unsealed reading may be on the boot clock: its wall time as sealing would give.
            ts, boot = reading[0]
            times.append(self.buffer.store.wall_time(int(ts), None if boot is None else int(boot)))
        return min(times) if times else None

    async def _heartbeat(self) -> None:
        interval = self.notifier.watchdog_interval
        status_every = self.settings.runtime.status_interval
        tick = min(interval or status_every, status_every)
        last_status = 0.0
        while True:
            now = time.monotonic()
            fields = []
            if interval:
                fields.append("WATCHDOG=1")
            if now - last_status >= status_every:
                fields.append(f"STATUS={self._status_line()}")
                last_status = now
                store = self.buffer.store
                log.info(
                    "agent.status",
                    link=self.shipper.state,
                    readings=self.buffer.unsealed + store.batched_readings,
                    batches=self.buffer.batch_count,
                    bytes=self.buffer.size_bytes,
                    in_flight=len(self.shipper.in_flight),
                    stored=store.counters["stored"],
                    quarantined=store.counters["quarantined"],
                    refused=store.counters["refused"],
                    stream=str(store.stream),
                    disk_full=store.space.full,
                    held=len(store.held),
                    pending_deletes=len(store.pending_deletes),
                    clock=self.timebase.status(),
                    rss_bytes=rss_bytes(),
                )
            if fields:
                self.notifier.notify(*fields)
            await asyncio.sleep(tick)
