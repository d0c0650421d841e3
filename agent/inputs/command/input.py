"""The ``command`` input: readings from a program's standard output."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import structlog

from agent.inputs.base import Emitter, InputContext, ProbeResult
from agent.inputs.command.config import CommandConfig
from agent.inputs.command.lines import LineError, ParsedLine, parse_line
from agent.inputs.common import DeviceConfig, ProblemLog, StatusTracker, now_us, run_every, zone
from protocol import Value

log = structlog.get_logger(__name__)

# Grace between SIGTERM and SIGKILL for a program that has to go.
KILL_GRACE = 2.0
STDERR_TAIL = 512


@dataclass
class Counters:
    """What went wrong so far, for the operator and for tests."""

    runs: int = 0
    failed_exits: int = 0
    timeouts: int = 0
    bad_lines: int = 0
    last_exit: int | None = None


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that gave no readings: why, and the device it is about (``None``: no device)."""

    reason: str
    device: DeviceConfig | None


@dataclass
class RunOutcome:
    """What one run (interval mode) or one program lifetime (stream mode) produced."""

    lines: list[tuple[DeviceConfig, ParsedLine]] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)
    exit_code: int | None = None
    timed_out: bool = False
    stderr: str = ""
    start_error: str | None = None

    def failure(self, timeout: float, streaming: bool = False) -> str | None:
        """Why the run counts as failed, or ``None`` if it exited 0 in time."""
        if self.start_error is not None:
            return self.start_error
        if self.timed_out and streaming:
            return f"printed nothing for {timeout:g}s; killed (timeout)"
        if self.timed_out:
            return f"killed after {timeout:g}s (timeout)"
        if self.exit_code is not None and self.exit_code != 0:
            detail = f": {self.stderr}" if self.stderr else ""
            if self.exit_code < 0:
                return f"killed by signal {-self.exit_code}{detail}"
            return f"exit status {self.exit_code}{detail}"
        return None


class CommandInput:
    """Runs the configured program and turns its output lines into readings."""

    def __init__(self, config: CommandConfig, context: InputContext) -> None:
        """Build the input from its validated configuration."""
        self.name = config.name
        self._config = config
        self._status = StatusTracker(config.name)
        self._by_name = {device.name: device for device in config.devices}
        self._zone = zone(config.timezone)
        self.counters = Counters()
        self._problems = ProblemLog("command", config.name)

    # -- process handling -------------------------------------------------------------------

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {**os.environ, **self._config.env} if self._config.env else None
        return await asyncio.create_subprocess_exec(
            *self._config.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self._config.working_dir,
            env=env,
            limit=self._config.max_line_bytes,
            # Its own process group, so that a timeout also ends what the program started
            # (a shell script's children would otherwise keep the pipe open).
            start_new_session=True,
        )

    @staticmethod
    async def _kill(process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                await asyncio.wait_for(process.wait(), wait)
                return
            except TimeoutError:
                continue

    @staticmethod
    async def _stderr_tail(stream: asyncio.StreamReader | None) -> str:
        if stream is None:
            return ""
        tail: deque[bytes] = deque(maxlen=8)
        while chunk := await stream.read(4096):
            tail.append(chunk)
        text = b"".join(tail)[-STDERR_TAIL:].decode("utf-8", errors="replace")
        return " ".join(text.split())

    async def _read_line(self, stdout: asyncio.StreamReader) -> bytes | None:
        """The next line, ``b""`` at end of output, or ``None`` for an over-long line."""
        try:
            return await stdout.readline()
        except ValueError:
            # StreamReader discards the over-long line and the stream stays usable.
            return None

    def _parse(self, raw: bytes | None, outcome: RunOutcome) -> DeviceConfig | None:
        """Parse one line into ``outcome``; the device it is about, if any (good or bad)."""
        if raw is None:
            return self._bad_line(
                outcome, f"line longer than {self._config.max_line_bytes} bytes", None
            )
        try:
            parsed = parse_line(
                raw.decode("utf-8", errors="replace"),
                self._config.format,
                self._config.device_field,
                self._config.time_field,
                self._zone,
            )
        except LineError as exc:
            return self._bad_line(outcome, str(exc), exc.device)
        if parsed is None:
            return None
        device = self._attribute(parsed.device)
        if isinstance(device, str):
            self._bad_line(outcome, device, parsed.device)
            return None
        outcome.lines.append((device, parsed))
        return device

    def _attribute(self, name: str | None) -> DeviceConfig | str:
        """The device a line is about, or why it is about none.

        The one rule for the running input and ``inputs test``: a line naming a configured
        device is that device's, good or bad; with a single device every line is its own; a
        line naming an unknown device, or none while several are configured, is nobody's.
        """
        field_name = self._config.device_field
        if name is None:
            if len(self._config.devices) == 1:
                return self._config.devices[0]
            return f"no {field_name} in the line and several devices configured"
        device = self._by_name.get(name)
        if device is None:
            return f"{field_name}={name[:64]!r} names no configured device"
        return device

    def _bad_line(
        self, outcome: RunOutcome, reason: str, device_name: str | None
    ) -> DeviceConfig | None:
        attributed = self._attribute(device_name)
        device: DeviceConfig | None = None
        if isinstance(attributed, str):
            if attributed != reason:
                reason = f"{reason} ({attributed})"
        else:
            device = attributed
        self.counters.bad_lines += 1
        outcome.bad_lines.append(BadLine(reason, device))
        self._problems("bad_line", reason, device=device.name if device is not None else None)
        return device

    @staticmethod
    def _bad_line_reason(bad: BadLine) -> str:
        return f"bad line: {bad.reason}"

    async def _run_once(self) -> RunOutcome:
        """Run the program to completion (interval mode), killing it at the timeout."""
        outcome = RunOutcome()
        self.counters.runs += 1
        try:
            process = await self._spawn()
        except OSError as exc:
            outcome.start_error = f"cannot start {self._config.command[0]}: {exc.strerror or exc}"
            return outcome
        assert process.stdout is not None
        stderr_task = asyncio.create_task(self._stderr_tail(process.stderr))
        stdout = process.stdout

        async def consume() -> None:
            while (raw := await self._read_line(stdout)) != b"":
                self._parse(raw, outcome)
            await process.wait()

        try:
            await asyncio.wait_for(consume(), self._config.timeout)
        except TimeoutError:
            outcome.timed_out = True
            self.counters.timeouts += 1
            await self._kill(process)
        finally:
            if process.returncode is None:
                await self._kill(process)
        outcome.exit_code = process.returncode
        try:
            outcome.stderr = await asyncio.wait_for(stderr_task, KILL_GRACE)
        except TimeoutError:
            outcome.stderr = ""
        self._count_exit(outcome)
        return outcome

    def _count_exit(self, outcome: RunOutcome) -> None:
        self.counters.last_exit = outcome.exit_code
        if outcome.exit_code not in (None, 0) and not outcome.timed_out:
            self.counters.failed_exits += 1

    # -- reporting --------------------------------------------------------------------------

    @staticmethod
    def _emit_line(emit: Emitter, device: DeviceConfig, parsed: ParsedLine) -> None:
        stamp = parsed.time_us if parsed.time_us is not None else now_us()
        for metric, value in parsed.readings.items():
            emit.reading(device.id, metric, value, stamp)

    def _device_problems(self, outcome: RunOutcome) -> dict[uuid.UUID, str]:
        """Each device's first bad line of ``outcome`` as its error reason."""
        problems: dict[uuid.UUID, str] = {}
        for bad in outcome.bad_lines:
            if bad.device is not None:
                problems.setdefault(bad.device.id, self._bad_line_reason(bad))
        return problems

    def _report_outcome(self, emit: Emitter, outcome: RunOutcome, failure: str | None) -> None:
        if failure is None:
            problems = self._device_problems(outcome)
            for device in self._config.devices:
                if device.id in problems:
                    self._status.error(emit, device.id, problems[device.id])
                else:
                    self._status.online(emit, device.id)
            return
        self._problems(
            "failed",
            failure,
            runs=self.counters.runs,
            failed_exits=self.counters.failed_exits,
            timeouts=self.counters.timeouts,
        )
        emit.event(
            "command.failed",
            failure,
            severity="warning",
            attributes={
                "input": self.name,
                "exit_code": outcome.exit_code,
                "failed_exits": self.counters.failed_exits,
                "timeouts": self.counters.timeouts,
            },
        )
        for device in self._config.devices:
            self._status.error(emit, device.id, failure)

    # -- modes ------------------------------------------------------------------------------

    async def _run_interval(self, emit: Emitter) -> None:
        async def cycle() -> None:
            started = time.perf_counter()
            outcome = await self._run_once()
            for device, parsed in outcome.lines:
                self._emit_line(emit, device, parsed)
            self._report_outcome(emit, outcome, outcome.failure(self._config.timeout))
            emit.read_duration(time.perf_counter() - started)

        await run_every(self._config.interval, cycle)

    async def _stream_once(self, emit: Emitter) -> RunOutcome:
        """One lifetime of the long-running program: read lines until it exits or goes silent."""
        outcome = RunOutcome()
        self.counters.runs += 1
        try:
            process = await self._spawn()
        except OSError as exc:
            outcome.start_error = f"cannot start {self._config.command[0]}: {exc.strerror or exc}"
            return outcome
        assert process.stdout is not None
        stderr_task = asyncio.create_task(self._stderr_tail(process.stderr))
        silence = self._config.timeout or None
        try:
            while True:
                try:
                    raw = await asyncio.wait_for(self._read_line(process.stdout), silence)
                except TimeoutError:
                    outcome.timed_out = True
                    self.counters.timeouts += 1
                    break
                if raw == b"":
                    break
                started = time.perf_counter()
                self._parse(raw, outcome)
                for device, parsed in outcome.lines:
                    self._emit_line(emit, device, parsed)
                    self._status.online(emit, device.id)
                for bad in outcome.bad_lines:
                    if bad.device is not None:
                        # Until the device's next good line, as for an mqtt device.
                        self._status.error(emit, bad.device.id, self._bad_line_reason(bad))
                emit.read_duration(time.perf_counter() - started)
                # A long-lived program must not grow these lists.
                outcome.lines.clear()
                outcome.bad_lines.clear()
        finally:
            await self._kill(process)
            if not stderr_task.done():
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    outcome.stderr = await asyncio.wait_for(stderr_task, KILL_GRACE)
            else:
                outcome.stderr = stderr_task.result()
        outcome.exit_code = process.returncode
        self._count_exit(outcome)
        return outcome

    async def _run_stream(self, emit: Emitter) -> None:
        while True:
            outcome = await self._stream_once(emit)
            # A program meant to keep running that ends is a failure even with status 0.
            failure = outcome.failure(self._config.timeout, streaming=True) or (
                "the program exited with status 0"
            )
            self._report_outcome(emit, outcome, failure)
            await asyncio.sleep(self._config.restart_delay)

    async def run(self, emit: Emitter) -> None:
        """Run the program per the configured mode until cancelled."""
        if self._config.mode == "interval":
            await self._run_interval(emit)
        else:
            await self._run_stream(emit)

    async def probe(self) -> list[ProbeResult]:
        """Run the program once (stream mode: until each device has spoken or the timeout)."""
        if self._config.mode == "interval":
            outcome = await self._run_once()
        else:
            outcome = await self._probe_stream()
        readings: dict[uuid.UUID, dict[str, Value]] = {d.id: {} for d in self._config.devices}
        for device, parsed in outcome.lines:
            readings[device.id].update(parsed.readings)
        # The running input's rule: a failed run is every device's error, a bad line only its
        # own device's; lines about no device are logged (command.bad_line), as when running.
        failure = outcome.failure(self._config.timeout)
        if self._config.mode == "stream" and outcome.timed_out:
            failure = None
        problems = self._device_problems(outcome)
        results = []
        for device in self._config.devices:
            reasons = [r for r in (failure, problems.get(device.id)) if r is not None]
            error = "; ".join(reasons) or (None if readings[device.id] else "no readings")
            results.append(ProbeResult(device.id, device.name, readings[device.id], error))
        return results

    async def _probe_stream(self) -> RunOutcome:
        outcome = RunOutcome()
        try:
            process = await self._spawn()
        except OSError as exc:
            outcome.start_error = f"cannot start {self._config.command[0]}: {exc.strerror or exc}"
            return outcome
        assert process.stdout is not None
        stderr_task = asyncio.create_task(self._stderr_tail(process.stderr))
        waiting = {device.id for device in self._config.devices}
        deadline = asyncio.get_running_loop().time() + (self._config.timeout or 10.0)
        try:
            while waiting:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    outcome.timed_out = True
                    break
                try:
                    raw = await asyncio.wait_for(self._read_line(process.stdout), remaining)
                except TimeoutError:
                    outcome.timed_out = True
                    break
                if raw == b"":
                    break
                device = self._parse(raw, outcome)
                if device is not None:
                    waiting.discard(device.id)
        finally:
            await self._kill(process)
            with contextlib.suppress(TimeoutError):
                outcome.stderr = await asyncio.wait_for(stderr_task, KILL_GRACE)
        outcome.exit_code = process.returncode
        if not waiting:
            # We stopped it: the signal exit is ours, not the program's failure.
            outcome.exit_code = 0
        return outcome
