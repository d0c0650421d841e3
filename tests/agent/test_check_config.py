"""``sensormine-agent check-config`` checks every file and directory the configuration names, as
the service's user will meet them, in a system image laid out under a scratch directory."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.agent.conftest import agent_cli

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the tests set owners: run as root")

UID = GID = 4242
DIALOUT = 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A system image: the service's user ``sensormine`` (in dialout through the unit), its
    state directory and its credentials as install-agent makes them."""
    root = tmp_path / "image"
    (root / "etc/sensormine/credentials").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        f"root:x:0:0::/root:/bin/sh\nsensormine:x:{UID}:{GID}::/var/lib/sensormine:/usr/sbin/nologin\n"
    )
    (root / "etc/group").write_text(f"root:x:0:\ndialout:x:{DIALOUT}:\nsensormine:x:{GID}:\n")
    for directory, mode, owner in (
        ("etc/sensormine", 0o750, (0, GID)),
        ("etc/sensormine/credentials", 0o750, (0, GID)),
        ("var/lib/sensormine", 0o750, (UID, GID)),
        ("usr/local/bin", 0o755, (0, 0)),
        ("dev", 0o755, (0, 0)),
    ):
        path = root / directory
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *owner)
        path.chmod(mode)
    password = root / "etc/sensormine/credentials/mqtt-password"
    password.write_text("secret\n")
    os.chown(password, 0, GID)
    password.chmod(0o640)
    return root


def config(root: Path, body: str = "", inputs: str = "") -> Path:
    """An agent.toml in the image, with ``body`` after [gateway] and ``inputs`` at the end."""
    path = root / "etc/sensormine/agent.toml"
    path.write_text(
        f'[gateway]\nid = "{uuid.uuid4()}"\ntenant_id = "{uuid.uuid4()}"\n{body}\n{inputs}\n'
    )
    os.chown(path, 0, GID)
    path.chmod(0o640)
    return path


def command_input(program: str, **extra: str) -> str:
    """A ``command`` input named ``pump`` running ``program``."""
    keys = "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    return (
        f'[[inputs]]\ntype = "command"\nname = "pump"\ncommand = ["{program}"]\n{keys}'
        f'[[inputs.devices]]\nid = "{uuid.uuid4()}"\nname = "p1"\n'
    )


def check(path: Path, root: Path) -> tuple[int, list[str]]:
    """Exit status and the stderr lines of check-config run for the service's user."""
    result = agent_cli(
        "check-config", "--config", str(path), "--root", str(root), "--user", "sensormine"
    )
    return result.returncode, result.stderr.splitlines()


def test_installed_layout_passes_and_names_the_account(image: Path) -> None:
    """The files as install-agent lays them out, with the credential file as password_file,
    are what the service's user can use."""
    path = config(image, '[mqtt]\npassword_file = "/etc/sensormine/credentials/mqtt-password"\n')
    code, lines = check(path, image)
    assert (0, [f"{path}: configuration is valid (files checked as user sensormine)"]) == (
        code,
        lines,
    )


def test_missing_and_unreadable_files_are_errors_naming_key_path_and_cause(image: Path) -> None:
    """A missing password file, a credential the service's user cannot read, missing TLS
    files: one line each, exit status 1."""
    password = image / "etc/sensormine/credentials/mqtt-password"
    os.chown(password, 0, 0)
    password.chmod(0o600)
    path = config(
        image,
        '[mqtt]\npassword_file = "/etc/sensormine/credentials/mqtt-password"\n'
        '[mqtt.tls]\nenabled = true\nca_file = "/etc/sensormine/ca.pem"\n'
        'cert_file = "/etc/sensormine/gateway.pem"\nkey_file = "/etc/sensormine/gateway.key"\n',
    )
    code, lines = check(path, image)
    assert 1 == code
    assert [
        f"error: {path}: mqtt.password_file: /etc/sensormine/credentials/mqtt-password:"
        " sensormine cannot read it (root:root 0600)",
        f"error: {path}: mqtt.tls.ca_file: /etc/sensormine/ca.pem: does not exist",
        f"error: {path}: mqtt.tls.cert_file: /etc/sensormine/gateway.pem: does not exist",
        f"error: {path}: mqtt.tls.key_file: /etc/sensormine/gateway.key: does not exist",
        f"{path}: files checked as user sensormine (uid {UID}): not valid",
    ] == lines


def test_buffer_directory_must_be_writable_by_the_service(image: Path) -> None:
    """A buffer in a directory the service's user cannot write is an error; outside the
    unit's state directory it is a warning about the sandbox as well."""
    data = image / "srv/data"
    data.mkdir(parents=True)
    path = config(image, '[buffer]\npath = "/srv/data/buffer.db"\n')
    code, lines = check(path, image)
    assert 1 == code
    assert [
        f"warning: {path}: buffer.path: /srv/data/buffer.db: the unit lets the service write"
        " only to /var/lib/sensormine (ProtectSystem=strict): add ReadWritePaths=/srv/data in"
        " a drop-in (systemctl edit sensormine-agent)",
        f"error: {path}: buffer.path: /srv/data/buffer.db: sensormine cannot create files in"
        " /srv/data (root:root 0755); SQLite writes the buffer, its -wal and -shm files there",
    ] == lines[:2]

    os.chown(data, UID, GID)
    buffer = data / "buffer.db"
    buffer.write_bytes(b"")  # left behind by a run as root
    code, lines = check(path, image)
    assert 1 == code
    assert (
        f"error: {path}: buffer.path: /srv/data/buffer.db: sensormine cannot read and write it"
        " (root:root 0644)"
    ) in lines


def test_command_program_must_exist_and_be_executable(image: Path) -> None:
    """A command input's program: a full path that does not exist, a file that is not
    executable, a bare name not in the service's PATH, a missing working directory. The input
    is named by its name."""
    script = image / "usr/local/bin/read-pump"
    script.write_text("#!/bin/sh\necho level=1\n")
    script.chmod(0o644)
    cases = {
        "/usr/local/bin/read-tank": "/usr/local/bin/read-tank: does not exist",
        "/usr/local/bin/read-pump": "/usr/local/bin/read-pump: sensormine cannot run it (root:root 0644)",
        "read-flow": "read-flow: no such program in the service's PATH"
        " (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin); write its full path",
    }
    for program, problem in cases.items():
        path = config(image, inputs=command_input(program))
        code, lines = check(path, image)
        assert (1, f'error: {path}: inputs["pump"].command[0]: {problem}') == (code, lines[0])

    script.chmod(0o755)
    path = config(image, inputs=command_input("read-pump", working_dir="/srv/pump"))
    code, lines = check(path, image)
    assert (1, f'error: {path}: inputs["pump"].working_dir: /srv/pump: does not exist') == (
        code,
        lines[0],
    )
    (image / "srv/pump").mkdir(parents=True)
    assert 0 == check(path, image)[0]


def test_serial_port_absent_is_a_warning_and_unusable_is_an_error(image: Path) -> None:
    """An RTU bus's adapter may be plugged in later: its absence warns. A device node the
    service's user cannot open (not in its groups) is an error; dialout is one of them."""
    modbus = (
        '[[inputs]]\ntype = "modbus"\nname = "meters"\ntransport = "rtu"\n'
        'serial_port = "/dev/ttyUSB0"\n'
        f'[[inputs.devices]]\nid = "{uuid.uuid4()}"\nname = "m1"\n'
        '[[inputs.devices.fields]]\nmetric = "energy"\naddress = 0\n'
    )
    path = config(image, inputs=modbus)
    code, lines = check(path, image)
    assert 0 == code
    assert (
        f'warning: {path}: inputs["meters"].serial_port: /dev/ttyUSB0: does not exist now'
        " (expected to appear at run time?)"
    ) == lines[0]

    port = image / "dev/ttyUSB0"
    port.write_bytes(b"")  # a stand-in for the device node: only its owner and mode matter here
    os.chown(port, 0, 0)
    port.chmod(0o660)
    code, lines = check(path, image)
    assert 1 == code
    assert (
        f'error: {path}: inputs["meters"].serial_port: /dev/ttyUSB0: sensormine cannot open it'
        " for reading and writing (root:root 0660)"
    ) in lines
    os.chown(port, 0, DIALOUT)
    code, lines = check(path, image)
    assert 0 == code, lines


def test_configuration_file_the_service_cannot_read(image: Path) -> None:
    """The configuration file itself must be readable by the service's user."""
    path = config(image)
    path.chmod(0o600)
    code, lines = check(path, image)
    assert 1 == code
    assert (
        f"error: {path}: configuration file: /etc/sensormine/agent.toml: sensormine cannot read"
        " it (root:sensormine 0600)"
    ) == lines[0]


def test_unknown_user_is_refused(image: Path) -> None:
    """--user names an account of the image; a typo is an error, not a silent pass."""
    path = config(image)
    result = agent_cli(
        "check-config", "--config", str(path), "--root", str(image), "--user", "sensormien"
    )
    assert 1 == result.returncode
    assert f"--user sensormien: no such user in {image}/etc/passwd" in result.stderr
