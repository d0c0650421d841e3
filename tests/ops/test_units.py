"""The systemd units: valid for systemd, hardened to an exposure of at most 2.5, and true to
what the programs expect (notify, watchdog, drain deadline, credentials, serial ports)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.ops.units import (
    MAX_EXPOSURE,
    REPO,
    UNITS,
    UNITS_DIR,
    exposure,
    make_scratch_root,
    parse_unit,
    seconds,
    verify,
)

# The programs' own drain deadline on SIGTERM (agent and collector runtimes).
DRAIN_DEADLINE_S = 20.0
PROGRAMS = {
    "sensormine-agent.service": ("sensormine-agent run", "/etc/sensormine/agent.toml"),
    "sensormine-collector.service": ("sensormine-collector run", "/etc/sensormine/collector.toml"),
    "sensormine-collector@.service": (
        "sensormine-collector run",
        "/etc/sensormine/collector-%i.toml",
    ),
    "sensormine-api.service": ("sensormine-collector api", "/etc/sensormine/collector.toml"),
}
CREDENTIALS = {
    "sensormine-agent.service": {"mqtt-password"},
    "sensormine-collector.service": {"mqtt-password", "metadata-password", "timeseries-password"},
    "sensormine-collector@.service": {"mqtt-password", "metadata-password", "timeseries-password"},
    # The API reads the databases only: no broker password.
    "sensormine-api.service": {"metadata-password", "timeseries-password"},
}


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the host's unit library, our units and stand-ins for the two programs."""
    root = make_scratch_root(tmp_path_factory.mktemp("root"))
    for unit in UNITS:
        shutil.copy(UNITS_DIR / unit, root / "etc/systemd/system" / unit)
    bindir = root / "opt/sensormine/venv/bin"
    bindir.mkdir(parents=True)
    for program in ("sensormine-agent", "sensormine-collector"):
        (bindir / program).write_text("#!/bin/sh\nexit 0\n")
        (bindir / program).chmod(0o755)
    (root / "etc/sensormine").mkdir(parents=True)
    (root / "etc/sensormine/collector-a.toml").write_text("")
    return root


@pytest.mark.parametrize("unit", [*UNITS, "sensormine-collector@a.service"])
def test_unit_verifies_without_any_warning(scratch_root: Path, unit: str) -> None:
    """``systemd-analyze verify`` accepts the unit and has nothing to say about it."""
    result = verify(scratch_root, unit)
    assert (0, "", "") == (result.returncode, result.stdout, result.stderr)


def test_verify_reports_a_missing_program(tmp_path: Path) -> None:
    """The verification is real: without the installed program it fails and names it."""
    root = make_scratch_root(tmp_path / "root")
    shutil.copy(UNITS_DIR / "sensormine-agent.service", root / "etc/systemd/system")
    result = verify(root, "sensormine-agent.service")
    assert result.returncode != 0
    assert "/opt/sensormine/venv/bin/sensormine-agent is not executable" in result.stderr


@pytest.mark.parametrize("unit", [*UNITS, "sensormine-collector@a.service"])
def test_unit_exposure_is_at_most_2_5(scratch_root: Path, unit: str) -> None:
    """``systemd-analyze security --offline=yes`` rates the unit 2.5 or better (the API, which
    faces browsers, 2.0 or better)."""
    level, report = exposure(scratch_root, unit)
    print(f"{unit}: exposure {level}")
    assert level <= (2.0 if unit == "sensormine-api.service" else MAX_EXPOSURE), report


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_the_program_as_a_watched_notify_service(unit: str) -> None:
    """Type=notify with a watchdog, restarts on failure within start limits, and a stop
    timeout longer than the program's drain deadline, as the system user ``sensormine``."""
    sections = parse_unit(UNITS_DIR / unit)
    service, unit_section = sections["Service"], sections["Unit"]
    program, config = PROGRAMS[unit]
    assert [f"/opt/sensormine/venv/bin/{program} --config {config}"] == service["ExecStart"]
    assert ["notify"] == service["Type"]
    assert seconds(service["WatchdogSec"][-1]) > 0
    assert ["on-failure"] == service["Restart"]
    assert int(unit_section["StartLimitBurst"][-1]) > 0
    assert seconds(unit_section["StartLimitIntervalSec"][-1]) > 0
    assert seconds(service["TimeoutStopSec"][-1]) > DRAIN_DEADLINE_S
    assert (["sensormine"], ["sensormine"]) == (service["User"], service["Group"])
    assert ["multi-user.target"] == sections["Install"]["WantedBy"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_secrets_as_credentials_only(unit: str) -> None:
    """Each password the program reads from ``$CREDENTIALS_DIRECTORY`` is a LoadCredential=,
    from a root-owned file under /etc/sensormine/credentials; none is in the environment."""
    service = parse_unit(UNITS_DIR / unit)["Service"]
    loaded = dict(entry.split(":", 1) for entry in service["LoadCredential"])
    assert CREDENTIALS[unit] == set(loaded)
    assert {f"/etc/sensormine/credentials/{name}" for name in loaded} == set(loaded.values())
    assert "Environment" not in service and "EnvironmentFile" not in service


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_the_required_hardening(unit: str) -> None:
    """The settings the issue names are there with their strict values."""
    service = parse_unit(UNITS_DIR / unit)["Service"]
    required = {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
    }
    assert required == {key: service[key][-1] for key in required}
    assert "@system-service" == service["SystemCallFilter"][0]


def test_agent_gets_serial_ports_and_nothing_more() -> None:
    """The agent may open serial ports (group dialout, tty char devices) and no other device."""
    service = parse_unit(UNITS_DIR / "sensormine-agent.service")["Service"]
    assert ["dialout"] == service["SupplementaryGroups"]
    assert ["closed"] == service["DevicePolicy"]
    assert {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw"} == set(
        service["DeviceAllow"]
    )
    assert ["sensormine"] == service["StateDirectory"]


@pytest.mark.parametrize(
    "unit",
    ["sensormine-collector.service", "sensormine-collector@.service", "sensormine-api.service"],
)
def test_collector_gets_no_devices_and_no_extra_groups(unit: str) -> None:
    """The collector needs no hardware: private /dev, private users, no supplementary groups."""
    service = parse_unit(UNITS_DIR / unit)["Service"]
    assert (["yes"], ["yes"]) == (service["PrivateDevices"], service["PrivateUsers"])
    assert "SupplementaryGroups" not in service and "DeviceAllow" not in service


def test_collector_instances_differ_only_by_their_configuration() -> None:
    """The template is the single-collector unit with the instance's own configuration file."""
    single = parse_unit(UNITS_DIR / "sensormine-collector.service")
    template = parse_unit(UNITS_DIR / "sensormine-collector@.service")
    assert ["/etc/sensormine/collector-%i.toml"] == template["Unit"]["AssertPathExists"]
    differing = {
        key
        for key in set(single["Service"]) | set(template["Service"])
        if single["Service"].get(key) != template["Service"].get(key)
    }
    assert {"ExecStart", "SyslogIdentifier"} == differing


def test_api_unit_serves_what_the_collector_unit_reads() -> None:
    """The API unit runs the installed collector's ``api`` command on the collector's own
    configuration, with the same hardening (only the broker password is left out)."""
    api = parse_unit(UNITS_DIR / "sensormine-api.service")["Service"]
    collector = parse_unit(UNITS_DIR / "sensormine-collector.service")["Service"]
    differs = {
        "ExecStart",
        "LoadCredential",
        "TimeoutStartSec",
        "TimeoutStopSec",
        "SyslogIdentifier",
    }
    assert {k: v for k, v in collector.items() if k not in differs} == {
        k: v for k, v in api.items() if k not in differs
    }


def test_agent_stop_timeout_exceeds_the_example_drain_timeout() -> None:
    """systemd waits longer than the drain the shipped agent configuration asks for."""
    import tomllib

    example = tomllib.loads((REPO / "config/agent.example.toml").read_text())
    drain = seconds(example["runtime"]["drain_timeout"])
    service = parse_unit(UNITS_DIR / "sensormine-agent.service")["Service"]
    assert DRAIN_DEADLINE_S == drain
    assert seconds(service["TimeoutStopSec"][-1]) >= drain + 10
