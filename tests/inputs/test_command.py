"""The command input with real child processes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.inputs.base import InputContext
from agent.inputs.command import CommandConfig, CommandInput
from agent.inputs.command.lines import LineError, parse_line
from tests.inputs.conftest import RecordingEmitter, build_config, load_sample, run_for, stop

UPS = uuid.uuid4()
TANK1 = uuid.uuid4()
TANK2 = uuid.uuid4()


def script(tmp_path: Path, body: str) -> list[str]:
    """argv running ``body`` as a Python program (the interpreter is always here)."""
    path = tmp_path / f"prog_{uuid.uuid4().hex[:6]}.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has ended (gone, or a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def config(argv: list[str], **extra: Any) -> CommandConfig:
    """A command input for one device unless ``devices`` is given."""
    raw: dict[str, Any] = {
        "type": "command",
        "name": "test-command",
        "command": argv,
        "interval": "200ms",
        "timeout": "3s",
        "devices": [{"id": str(UPS), "name": "ups"}],
    }
    raw.update(extra)
    built = build_config("command", raw)
    assert isinstance(built, CommandConfig)
    return built


def test_sample_configuration_loads() -> None:
    """Both stanzas of the commented sample.toml validate."""
    assert [c.name for c in load_sample("command")] == ["ups", "serial-logger"]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"command": []}, "command"),
        ({"mode": "cron"}, "mode"),
        ({"timeout": "0s"}, "timeout"),
        ({"interval": "5 parsecs"}, "interval"),
        ({"shell": True}, "shell"),
    ],
)
def test_config_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    """Invalid settings are refused with the offending key in the message."""
    with pytest.raises(ValidationError) as info:
        config(["true"], **change)
    assert key in str(info.value)


def test_line_formats() -> None:
    """JSON objects and metric=value pairs parse; bad lines say what is wrong."""
    parsed = parse_line(
        '{"t": 21.5, "on": true, "n": 3, "s": "ok", "x": null}', "auto", "device", None
    )
    assert parsed is not None
    assert parsed.readings == {"t": 21.5, "on": True, "n": 3, "s": "ok"}
    parsed = parse_line("device=tank-1 level=3.2 pump=false count=7", "auto", "device", None)
    assert parsed is not None
    assert (parsed.device, parsed.readings) == ("tank-1", {"level": 3.2, "pump": False, "count": 7})
    parsed = parse_line('{"v": 1, "ts": 1700000000.5}', "json", "device", "ts")
    assert parsed is not None
    assert parsed.time_us == 1_700_000_000_500_000
    assert parse_line("   ", "auto", "device", None) is None
    for bad, message in [
        ('{"t": 21.5', "malformed JSON"),
        ("[1, 2]", "must be an object"),
        ("temperature 21", "is not metric=value"),
        ('{"t": NaN}', "not a finite number"),
        ('{"device": "x"}', "holds no readings"),
        ('{"t": {"nested": 1}}', "a dict is not a reading"),
    ]:
        with pytest.raises(LineError, match=message):
            parse_line(bad, "auto" if not bad.startswith("[") else "json", "device", None)


async def test_interval_mode_reads_each_run(
    tmp_path: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """The program runs every interval; its lines become readings, bad lines are counted."""
    counter = tmp_path / "runs"
    argv = script(
        tmp_path,
        f"""
import pathlib
p = pathlib.Path({str(counter)!r})
n = int(p.read_text()) + 1 if p.exists() else 1
p.write_text(str(n))
print('{{"run": %d, "volts": 13.6}}' % n)
print("charging=true load=42")
print("this is not a reading")
""",
    )
    command_input = CommandInput(config(argv), context)
    task = await run_for(command_input, emitter)
    try:
        await emitter.wait_for(lambda: len(emitter.values(UPS, "run")) >= 3)
    finally:
        await stop(task)
    runs = emitter.values(UPS, "run")
    assert runs == list(range(1, len(runs) + 1))
    assert set(emitter.values(UPS, "volts")) == {13.6}
    assert set(emitter.values(UPS, "charging")) == {True}
    # With one device every line is its own: the bad line puts it in error, as `inputs test`.
    assert ("error", "bad line: 'this' is not metric=value") == emitter.last_status(UPS)
    assert command_input.counters.bad_lines >= 3
    assert command_input.counters.failed_exits == 0
    assert len(emitter.durations) >= 3


async def test_non_zero_exits_are_counted_and_reported(
    tmp_path: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A failing program makes the device `error` with its status and stderr, every time counted."""
    argv = script(
        tmp_path,
        """
import sys
print("partial=1")
print("sensor bus not found", file=sys.stderr)
sys.exit(3)
""",
    )
    command_input = CommandInput(config(argv), context)
    task = await run_for(command_input, emitter)
    try:
        await emitter.wait_for(lambda: command_input.counters.failed_exits >= 2)
    finally:
        await stop(task)
    assert emitter.last_status(UPS) == ("error", "exit status 3: sensor bus not found")
    failed = [e for e in emitter.events if e["kind"] == "command.failed"]
    assert failed and failed[0]["attributes"]["exit_code"] == 3
    assert command_input.counters.last_exit == 3
    # What it printed before failing is still data.
    assert 1 in emitter.values(UPS, "partial")


async def test_hung_program_is_killed_by_the_timeout(
    tmp_path: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A run that outlives the timeout is killed together with its children."""
    child_pid = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        f"""
import subprocess, sys, time, pathlib
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
pathlib.Path({str(child_pid)!r}).write_text(str(child.pid))
print("started=1", flush=True)
time.sleep(600)
""",
    )
    command_input = CommandInput(config(argv, timeout="500ms", interval="1s"), context)
    task = await run_for(command_input, emitter)
    started = time.monotonic()
    try:
        await emitter.wait_for(lambda: emitter.last_status(UPS) is not None)
    finally:
        await stop(task)
    assert time.monotonic() - started < 5
    assert emitter.last_status(UPS) == ("error", "killed after 0.5s (timeout)")
    assert command_input.counters.timeouts == 1
    assert process_gone(int(child_pid.read_text()))


async def test_stream_mode_reads_lines_as_they_come(
    tmp_path: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A long-running program's lines arrive one by one and name their device."""
    argv = script(
        tmp_path,
        """
import sys, time
for i in range(1000):
    print(f"device=tank-1 level={i}", flush=True)
    print(f'{{"device": "tank-2", "level": {i * 10}, "time": "2026-01-02T03:04:05Z"}}', flush=True)
    print("device=tank-9 level=1", flush=True)
    time.sleep(0.05)
""",
    )
    devices = [{"id": str(TANK1), "name": "tank-1"}, {"id": str(TANK2), "name": "tank-2"}]
    command_input = CommandInput(
        config(argv, mode="stream", devices=devices, time_field="time"), context
    )
    task = await run_for(command_input, emitter)
    try:
        await emitter.wait_for(lambda: len(emitter.values(TANK2, "level")) >= 5)
    finally:
        await stop(task)
    levels = emitter.values(TANK1, "level")
    assert levels[:5] == [0, 1, 2, 3, 4]
    tank2 = [r for r in emitter.readings if r.device_id == TANK2]
    assert {r.time_us for r in tank2} == {1_767_323_045_000_000}
    assert emitter.last_status(TANK1) == ("online", "")
    assert command_input.counters.bad_lines >= 3  # tank-9 is not configured


async def test_stream_mode_restarts_and_kills_a_silent_program(
    tmp_path: Path, context: InputContext, emitter: RecordingEmitter
) -> None:
    """A stream program that exits is restarted; one that goes silent is killed and restarted."""
    exits = script(tmp_path, "print('level=1'); import sys; sys.exit(2)")
    command_input = CommandInput(config(exits, mode="stream", restart_delay="100ms"), context)
    task = await run_for(command_input, emitter)
    try:
        # Each run reports online (its line) then error (its exit): wait for the second error.
        await emitter.wait_for(
            lambda: (
                [s for _, s, _ in emitter.statuses].count("error") >= 2
                and emitter.last_status(UPS) == ("error", "exit status 2")
            )
        )
    finally:
        await stop(task)
    assert command_input.counters.failed_exits >= 2
    assert command_input.counters.runs >= 2

    # sh rather than Python: the silence clock starts at spawn, and an interpreter's start-up on
    # a busy machine could eat the whole 300 ms before the first line.
    silent = ["sh", "-c", "echo level=1; exec sleep 600"]
    emitter2 = RecordingEmitter()
    command_input = CommandInput(
        config(silent, mode="stream", timeout="300ms", restart_delay="100ms"), context
    )
    task = await run_for(command_input, emitter2)
    try:
        await emitter2.wait_for(
            lambda: (
                [s for _, s, _ in emitter2.statuses].count("error") >= 2
                and (emitter2.last_status(UPS) or ("", ""))[0] == "error"
            )
        )
    finally:
        await stop(task)
    status = emitter2.last_status(UPS)
    assert status == ("error", "printed nothing for 0.3s; killed (timeout)")
    assert command_input.counters.timeouts >= 2
    assert len(emitter2.values(UPS, "level")) >= 2


async def test_probe(tmp_path: Path, context: InputContext) -> None:
    """probe runs the program once and shows readings, or the failure."""
    ok = script(tmp_path, "print('{\"volts\": 12.9}')")
    [result] = await CommandInput(config(ok), context).probe()
    assert (result.readings, result.error) == ({"volts": 12.9}, None)
    failing = script(tmp_path, "import sys; print('boom', file=sys.stderr); sys.exit(1)")
    [result] = await CommandInput(config(failing), context).probe()
    assert result.error == "exit status 1: boom"
    [result] = await CommandInput(config(["/nonexistent/prog"]), context).probe()
    assert result.error is not None
    assert "cannot start /nonexistent/prog" in result.error
    stream = script(tmp_path, "import time\nprint('level=4', flush=True)\ntime.sleep(600)")
    [result] = await CommandInput(config(stream, mode="stream"), context).probe()
    assert (result.readings, result.error) == ({"level": 4}, None)


def test_keyvalue_quoting() -> None:
    """Double-quoted keyvalue values may hold spaces and escaped quotes; they are always text."""
    parsed = parse_line('note="two words" q="say \\"hi\\"" n="42" level=3', "auto", "device", None)
    assert parsed is not None
    assert {"note": "two words", "q": 'say "hi"', "n": "42", "level": 3} == parsed.readings
    with pytest.raises(LineError, match="is not metric=value"):
        parse_line('note="unterminated level=3', "auto", "device", None)


async def test_iso_time_without_a_zone_needs_the_input_timezone(
    tmp_path: Path, context: InputContext
) -> None:
    """A zone-less ISO time is a bad line of its device unless `timezone` is set."""
    argv = script(tmp_path, "print('time=2026-01-02T03:04:05 level=1')")
    [refused] = await CommandInput(config(argv, time_field="time"), context).probe()
    assert refused.error is not None
    assert "bad line: time: time '2026-01-02T03:04:05' has no zone offset" in refused.error
    emitter = RecordingEmitter()
    berlin = CommandInput(config(argv, time_field="time", timezone="Europe/Berlin"), context)
    task = await run_for(berlin, emitter)
    try:
        await emitter.wait_for(lambda: bool(emitter.readings))
    finally:
        await stop(task)
    assert 1_767_319_445_000_000 == emitter.readings[0].time_us  # 03:04:05 CET = 02:04:05Z
    with pytest.raises(ValidationError, match="timezone"):
        config(argv, timezone="Berlin")


# Lines for two devices: tank-2's line is bad, one line names a device nobody configured and
# one names none. Printed on every run.
MIXED_LINES = """
print("device=tank-1 level=1")
print("device=tank-2 level=2 oops")
print("device=tank-9 level=3")
print("level=4")
"""


def agent_config(tmp_path: Path, argv: list[str]) -> Path:
    """An agent configuration with one command input for tank-1 and tank-2."""
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
[gateway]
id = "{uuid.uuid4()}"
tenant_id = "{uuid.uuid4()}"

[buffer]
path = "{tmp_path / "buffer.db"}"

[mqtt]
host = "127.0.0.1"
port = 1

[[inputs]]
type = "command"
name = "tanks"
command = {json.dumps(argv)}
interval = "100ms"

[[inputs.devices]]
id = "{TANK1}"
name = "tank-1"

[[inputs.devices]]
id = "{TANK2}"
name = "tank-2"
"""
    )
    return path


async def test_inputs_test_and_the_running_agent_attribute_bad_lines_alike(tmp_path: Path) -> None:
    """One rule: a bad line is its device's error; lines about no device are only logged.

    `inputs test` and a running agent (real processes) agree: tank-1 is fine, tank-2 is in
    error with its bad line, and ~30 runs with 3 bad lines each log `command.bad_line` only
    the first 5 times (the rate limit every input uses).
    """
    config_path = agent_config(tmp_path, script(tmp_path, MIXED_LINES))
    probe = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "inputs",
        "test",
        "--config",
        str(config_path),
        "tanks",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _err = await asyncio.wait_for(probe.communicate(), 60)
    assert 1 == probe.returncode
    printed = out.decode().splitlines()
    assert [
        f"tank-1 ({TANK1})",
        "  level = 1",
        f"tank-2 ({TANK2})",
        "  error: bad line: 'oops' is not metric=value",
    ] == printed

    running = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "run",
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    await asyncio.sleep(4)
    running.send_signal(signal.SIGTERM)
    log_text, _ = await asyncio.wait_for(running.communicate(), 60)
    events = [json.loads(line) for line in log_text.decode().splitlines() if line.startswith("{")]
    errors = [e for e in events if e["event"] == "input.device_error"]
    assert [str(TANK2)] == [e["device_id"] for e in errors]
    assert "bad line: 'oops' is not metric=value" == errors[0]["reason"]
    bad_lines = [e for e in events if e["event"] == "command.bad_line"]
    assert 5 == len(bad_lines)
    assert [
        "'oops' is not metric=value",
        "device='tank-9' names no configured device",
        "no device in the line and several devices configured",
    ] == [e["problem"] for e in bad_lines[:3]]
