"""scripts/install-agent into scratch roots: the files it lays down, upgrades that keep the
buffer and the configuration, uninstall and purge, and the offline bundle with no network."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.ops.test_distribution import closure
from tests.ops.units import REPO, make_scratch_root, verify
from tests.services import free_port

INSTALLER = REPO / "scripts/install-agent"
UNIT = "sensormine-agent.service"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer sets owners: run as root")

# A site's configuration that reads the broker password itself, from the one place for it: the
# installer refuses a configuration whose files the service's user cannot use.
SITE_CONFIG = """# the site's own configuration
[gateway]
id = "3b0f8d4e-8c1a-4f7e-9d2b-5a6c7e8f9012"
tenant_id = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"

[mqtt]
username = "3b0f8d4e-8c1a-4f7e-9d2b-5a6c7e8f9012"
password_file = "/etc/sensormine/credentials/mqtt-password"
"""


def install(
    *args: str,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    installer: Path = INSTALLER,
) -> subprocess.CompletedProcess[str]:
    """Run the installer; fail the test with its output if it fails."""
    result = subprocess.run(
        [*(prefix or []), str(installer), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert 0 == result.returncode, f"{result.stdout}\n{result.stderr}"
    return result


def account(root: Path, name: str = "sensormine") -> list[str]:
    """The passwd entry of ``name`` in the scratch root, split into its fields."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    raise AssertionError(f"{name} is not in {root}/etc/passwd")


def layout(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """Every path under ``root`` outside the virtual environment: (kind, mode, uid, gid / link)."""
    found: dict[str, tuple[str, int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = "/" + str(path.relative_to(root))
        if rel.startswith("/opt/sensormine/venv/") or rel.startswith("/opt/sensormine/docs/"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", 0, st.st_uid, os.readlink(path))
        else:
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            found[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, str(st.st_gid))
    return found


@pytest.fixture
def site_config(tmp_path: Path) -> Path:
    """A gateway's own configuration file, as an operator would pass it with --config."""
    path = tmp_path / "site.toml"
    path.write_text(SITE_CONFIG)
    return path


def test_install_lays_down_every_file_with_its_mode_and_owner(
    tmp_path: Path, site_config: Path
) -> None:
    """A scratch-root install creates exactly the documented files, owned and protected as
    documented, adds the user to the root's own /etc/passwd only, and enables the unit."""
    root = tmp_path / "root"
    real_passwd = Path("/etc/passwd").read_text()
    install("--root", str(root), "--config", str(site_config))

    user = account(root)
    uid, gid = int(user[2]), user[3]
    assert ["sensormine", "/var/lib/sensormine", "/usr/sbin/nologin"] == [user[0], user[5], user[6]]
    assert real_passwd == Path("/etc/passwd").read_text()
    expected = {
        "/etc": ("dir", 0o755, 0, "0"),
        "/etc/passwd": ("file", 0o644, 0, "0"),
        "/etc/group": ("file", 0o644, 0, "0"),
        "/etc/shadow": ("file", 0o000, 0, "0"),
        "/etc/gshadow": ("file", 0o000, 0, "0"),
        "/etc/.pwd.lock": ("file", 0o600, 0, "0"),
        "/etc/sensormine": ("dir", 0o750, 0, gid),
        "/etc/sensormine/agent.toml": ("file", 0o640, 0, gid),
        "/etc/sensormine/credentials": ("dir", 0o750, 0, gid),
        "/etc/sensormine/credentials/mqtt-password": ("file", 0o640, 0, gid),
        "/etc/systemd": ("dir", 0o755, 0, "0"),
        "/etc/systemd/system": ("dir", 0o755, 0, "0"),
        f"/etc/systemd/system/{UNIT}": ("file", 0o644, 0, "0"),
        "/etc/systemd/system/multi-user.target.wants": ("dir", 0o755, 0, "0"),
        f"/etc/systemd/system/multi-user.target.wants/{UNIT}": (
            "link",
            0,
            0,
            f"/etc/systemd/system/{UNIT}",
        ),
        "/opt": ("dir", 0o755, 0, "0"),
        "/opt/sensormine": ("dir", 0o755, 0, "0"),
        "/opt/sensormine/docs": ("dir", 0o755, 0, "0"),
        "/opt/sensormine/venv": ("dir", 0o755, 0, "0"),
        "/usr": ("dir", 0o755, 0, "0"),
        "/usr/lib": ("dir", 0o755, 0, "0"),
        "/usr/lib/sysusers.d": ("dir", 0o755, 0, "0"),
        "/usr/lib/sysusers.d/sensormine.conf": ("file", 0o644, 0, "0"),
        "/var": ("dir", 0o755, 0, "0"),
        "/var/lib": ("dir", 0o755, 0, "0"),
        "/var/lib/sensormine": ("dir", 0o750, uid, gid),
    }
    assert expected == layout(root)
    assert site_config.read_text() == (root / "etc/sensormine/agent.toml").read_text()
    assert "" == (root / "etc/sensormine/credentials/mqtt-password").read_text()
    assert (REPO / "systemd" / UNIT).read_text() == (root / "etc/systemd/system" / UNIT).read_text()
    docs = {p.name for p in (root / "opt/sensormine/docs").iterdir()}
    assert {
        d for d in ("install-agent.md", "troubleshooting.md") if (REPO / "docs" / d).exists()
    } == docs


def test_installed_program_belongs_to_root_and_the_unit_verifies(
    tmp_path: Path, site_config: Path
) -> None:
    """The service user cannot change its own program, and systemd accepts the installed unit
    with the installed program in place."""
    root = tmp_path / "root"
    install("--root", str(root), "--config", str(site_config))
    venv = root / "opt/sensormine/venv"
    agent = venv / "bin/sensormine-agent"
    assert os.access(agent, os.X_OK)
    writable_by_others = [
        p
        for p in venv.rglob("*")
        if not p.is_symlink()
        and (p.lstat().st_uid != 0 or p.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    ]
    assert [] == writable_by_others
    result = verify(make_scratch_root(root), UNIT)
    assert (0, "") == (result.returncode, result.stderr)


def test_upgrade_keeps_configuration_credentials_and_buffer(
    tmp_path: Path, site_config: Path
) -> None:
    """Running the installer again replaces program and unit but keeps what the site made."""
    root = tmp_path / "root"
    install("--root", str(root), "--config", str(site_config))
    buffer = root / "var/lib/sensormine/buffer.db"
    buffer.write_bytes(b"SQLite format 3\x00 buffered readings")
    (root / "etc/sensormine/agent.toml").write_text("# edited on site\n" + SITE_CONFIG)
    password = root / "etc/sensormine/credentials/mqtt-password"
    password.write_text("s3cret\n")
    # As an earlier installer left it: root only, which the service user cannot read.
    os.chown(password, 0, 0)
    password.chmod(0o600)
    unit = root / "etc/systemd/system" / UNIT
    unit.write_text("# an old unit\n")
    marker = root / "opt/sensormine/venv/lib/stale-marker"
    marker.write_text("")

    other_config = tmp_path / "other.toml"
    other_config.write_text("# must not replace the site's file\n" + SITE_CONFIG)
    result = install("--root", str(root), "--config", str(other_config))

    assert (
        "install-agent: kept the existing configuration /etc/sensormine/agent.toml and IGNORED"
        f" --config {other_config}, which differs from it"
    ) in result.stdout
    assert b"SQLite format 3\x00 buffered readings" == buffer.read_bytes()
    # Written by root above (as by a run of the agent as root): given back to the service.
    assert (int(account(root)[2]), int(account(root)[3])) == (
        buffer.stat().st_uid,
        buffer.stat().st_gid,
    )
    assert "# edited on site\n" + SITE_CONFIG == (root / "etc/sensormine/agent.toml").read_text()
    assert "s3cret\n" == password.read_text()
    gid = int(account(root)[3])
    assert (0o640, 0, gid) == (
        stat.S_IMODE(password.stat().st_mode),
        password.stat().st_uid,
        password.stat().st_gid,
    )
    assert (REPO / "systemd" / UNIT).read_text() == unit.read_text()
    assert 1 == sum(
        1
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("sensormine:")
    )
    assert os.access(root / "opt/sensormine/venv/bin/sensormine-agent", os.X_OK)


def test_installer_refuses_a_configuration_the_agent_refuses(
    tmp_path: Path, site_config: Path
) -> None:
    """A configuration naming a program that does not exist stops the installer with exit
    status 1, naming the input by its name; the file is not installed and neither is the unit.
    An existing configuration the agent refuses stops an upgrade the same way, and the
    installer says plainly that it kept it and ignored the new one."""
    root = tmp_path / "root"
    broken = tmp_path / "broken.toml"
    broken.write_text(
        SITE_CONFIG
        + '[[inputs]]\ntype = "command"\nname = "tank-level"\ncommand = ["/usr/local/bin/read-tank"]\n'
        + '[[inputs.devices]]\nid = "6f1c2b8e-3d4a-4f5b-9c6d-7e8f9a0b1c2d"\nname = "tank"\n'
    )

    def run(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(INSTALLER), "--root", str(root), "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )

    result = run(broken)
    assert 1 == result.returncode, result.stdout
    assert (
        f"install-agent: error: the agent refuses {broken}:\nerror: {broken}:"
        ' inputs["tank-level"].command[0]: /usr/local/bin/read-tank: does not exist\n'
    ) in result.stderr
    assert (
        f"install-agent: error: {broken} was not installed: fix it (sensormine-agent"
        f" check-config --config {broken}) and run install-agent again; the unit was neither"
        " installed nor started\n"
    ) in result.stderr
    assert [] == list((root / "etc/sensormine").glob("agent.toml*"))
    assert not (root / "etc/systemd/system" / UNIT).exists()

    (root / "etc/sensormine/agent.toml").write_text(broken.read_text())
    result = run(site_config)
    assert 1 == result.returncode, result.stdout
    assert (
        "install-agent: kept the existing configuration /etc/sensormine/agent.toml and IGNORED"
        f" --config {site_config}, which differs from it"
    ) in result.stdout
    assert (
        "install-agent: error: the agent refuses /etc/sensormine/agent.toml:\nerror:"
        ' /etc/sensormine/agent.toml: inputs["tank-level"].command[0]:'
        " /usr/local/bin/read-tank: does not exist\n"
    ) in result.stderr
    assert not (root / "etc/systemd/system" / UNIT).exists()


def test_credentials_of_a_provisioned_gateway_are_installed_before_the_check(
    tmp_path: Path,
) -> None:
    """A configuration that logs in with a client certificate names files the fresh gateway
    does not have: refused, naming the missing key. With ``--credentials`` (the directory
    ``gateways provision`` writes) they are installed first, the key for the service's user
    only, and the configuration passes."""
    config = tmp_path / "agent.toml"
    config.write_text(
        SITE_CONFIG.replace('password_file = "/etc/sensormine/credentials/mqtt-password"\n', "")
        + "\n[mqtt.tls]\nenabled = true\n"
        + 'ca_file = "/etc/sensormine/credentials/ca.pem"\n'
        + 'cert_file = "/etc/sensormine/credentials/gateway.pem"\n'
        + 'key_file = "/etc/sensormine/credentials/gateway.key"\n'
    )
    credentials = tmp_path / "agent-credentials"
    credentials.mkdir()
    for name in ("ca.pem", "gateway.pem", "gateway.key"):
        (credentials / name).write_text(f"-----BEGIN {name}-----\n")
    (credentials / "gateway.key").chmod(0o600)
    root = tmp_path / "root"

    refused = subprocess.run(
        [str(INSTALLER), "--root", str(root), "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert 1 == refused.returncode, refused.stdout
    assert (
        f"error: {config}: mqtt.tls.key_file: /etc/sensormine/credentials/gateway.key:"
        " does not exist"
    ) in refused.stderr

    result = install(
        "--root", str(root), "--config", str(config), "--credentials", str(credentials)
    )
    assert (
        "install-agent: installed the credential /etc/sensormine/credentials/gateway.key (0640)"
        f" from {credentials}/gateway.key"
    ) in result.stdout
    gid = int(account(root)[3])
    installed = root / "etc/sensormine/credentials"
    assert {
        "ca.pem": (0o644, 0, gid),
        "gateway.pem": (0o644, 0, gid),
        "gateway.key": (0o640, 0, gid),
        "mqtt-password": (0o640, 0, gid),
    } == {
        p.name: (stat.S_IMODE(p.stat().st_mode), p.stat().st_uid, p.stat().st_gid)
        for p in installed.iterdir()
    }


def test_uninstall_keeps_data_and_purge_removes_it(tmp_path: Path, site_config: Path) -> None:
    """--uninstall removes program and unit and keeps configuration, buffer and user;
    --uninstall --purge removes those too."""
    root = tmp_path / "root"
    install("--root", str(root), "--config", str(site_config))
    (root / "var/lib/sensormine/buffer.db").write_bytes(b"readings")

    install("--root", str(root), "--uninstall")
    assert not (root / "opt/sensormine").exists()
    assert not (root / "etc/systemd/system" / UNIT).exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants" / UNIT).is_symlink()
    assert b"readings" == (root / "var/lib/sensormine/buffer.db").read_bytes()
    assert site_config.read_text() == (root / "etc/sensormine/agent.toml").read_text()
    assert "sensormine" == account(root)[0]

    install("--root", str(root), "--uninstall", "--purge")
    assert not (root / "var/lib/sensormine").exists()
    assert not (root / "etc/sensormine").exists()
    assert not (root / "usr/lib/sysusers.d/sensormine.conf").exists()
    assert "sensormine:" not in (root / "etc/passwd").read_text()
    assert "sensormine:" not in (root / "etc/group").read_text()


def test_installer_refuses_unknown_options_and_lone_purge(tmp_path: Path) -> None:
    """Mistyped options stop the installer before it changes anything, naming the option."""
    for args, message in (
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (["--purge"], "--purge only goes with --uninstall"),
    ):
        result = subprocess.run(
            [str(INSTALLER), "--root", str(tmp_path / "r"), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert (1, True) == (result.returncode, message in result.stderr)
    assert not (tmp_path / "r/etc").exists()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline bundle, built by scripts/build-bundle (what ``make bundle`` runs)."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [str(REPO / "scripts/build-bundle"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert 0 == result.returncode, f"{result.stdout}\n{result.stderr}"
    (tarball,) = out.glob("sensormine-agent-*.tar.gz")
    return tarball


def test_bundle_holds_wheelhouse_unit_example_and_installer(bundle: Path) -> None:
    """The bundle is named for version, Python tag and architecture and has everything the
    offline install needs."""
    import platform
    import sys

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    name = f"sensormine-agent-{version}-{tag}-{platform.machine()}"
    assert f"{name}.tar.gz" == bundle.name
    with tarfile.open(bundle) as tar:
        members = {m.name: m for m in tar.getmembers()}
    for part in ("install-agent", UNIT, "agent.example.toml"):
        assert f"{name}/{part}" in members
    assert members[f"{name}/install-agent"].mode & 0o111
    wheels = {
        canonicalize_name(n.split("/")[-1].split("-")[0]) for n in members if n.endswith(".whl")
    }
    core = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {"sensormine"} | closure(core) == wheels
    assert {"asyncpg", "jsonschema", "cryptography"}.isdisjoint(wheels)
    assert [] == [n for n in members if n.endswith((".tar.gz", ".zip")) and "/wheelhouse/" in n]


def test_bundle_carries_the_checksum_of_every_file(bundle: Path) -> None:
    """SHA256SUMS in the bundle lists every other file with its SHA-256, and the tarball's own
    checksum file beside it matches the tarball (both in ``sha256sum -c`` format)."""
    actual: dict[str, str] = {}
    listed: dict[str, str] = {}
    with tarfile.open(bundle) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            data = tar.extractfile(member)
            assert data is not None
            relative = member.name.split("/", 1)[1]
            if relative == "SHA256SUMS":
                for line in data.read().decode().splitlines():
                    digest, name = line.split("  ", 1)
                    listed[name] = digest
            else:
                actual[relative] = hashlib.sha256(data.read()).hexdigest()
    assert actual == listed
    assert any(name.startswith("wheelhouse/sensormine-") for name in listed)
    published = bundle.with_name(bundle.name + ".sha256").read_text()
    assert f"{hashlib.sha256(bundle.read_bytes()).hexdigest()}  {bundle.name}\n" == published


def unpacked(bundle: Path, into: Path) -> Path:
    """The bundle extracted under ``into``: its top directory."""
    with tarfile.open(bundle) as tar:
        tar.extractall(into, filter="data")
    (bundle_dir,) = into.iterdir()
    return bundle_dir


def test_installer_refuses_a_damaged_or_altered_bundle(tmp_path: Path, bundle: Path) -> None:
    """A wheel changed after the build, a wheel added to the wheelhouse, or a missing
    SHA256SUMS: the installer says so, exits 1 and installs nothing."""

    def damage(bundle_dir: Path) -> None:
        wheel = next((bundle_dir / "wheelhouse").glob("click-*.whl"))
        with wheel.open("ab") as f:
            f.write(b"\0")

    def plant(bundle_dir: Path) -> None:
        wheel = next((bundle_dir / "wheelhouse").glob("click-*.whl"))
        shutil.copy(wheel, bundle_dir / "wheelhouse/click-99.0.0-py3-none-any.whl")

    def strip(bundle_dir: Path) -> None:
        (bundle_dir / "SHA256SUMS").unlink()

    for n, (change, message) in enumerate(
        (
            (damage, "does not match its SHA256SUMS (damaged or altered); refusing to install"),
            (plant, "holds files that are not in its SHA256SUMS (added after it was built)"),
            (strip, "has no SHA256SUMS: it is incomplete or was not made by build-bundle"),
        )
    ):
        bundle_dir = unpacked(bundle, tmp_path / f"unpacked{n}")
        change(bundle_dir)
        root = tmp_path / f"root{n}"
        result = subprocess.run(
            [str(bundle_dir / "install-agent"), "--root", str(root)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert (1, True) == (result.returncode, message in result.stderr), result.stderr
        assert [] == list(root.iterdir())


def test_bundle_installs_with_no_network_and_no_index(tmp_path: Path, bundle: Path) -> None:
    """From the unpacked bundle the installer needs no package index: it runs with the indexes
    pointing at a closed port and, where possible, in a network namespace of its own."""
    bundle_dir = unpacked(bundle, tmp_path / "unpacked")
    closed = f"http://127.0.0.1:{free_port()}/simple"
    env = {
        **os.environ,
        "PIP_INDEX_URL": closed,
        "PIP_EXTRA_INDEX_URL": closed,
        "PIP_FIND_LINKS": closed,
        "PIP_NO_INDEX": "1",
    }
    # An empty network namespace: not even the loopback works, let alone an index.
    prefix = (
        ["unshare", "--net"]
        if shutil.which("unshare")
        and subprocess.run(["unshare", "--net", "true"], check=False).returncode == 0
        else []
    )
    root = tmp_path / "root"
    result = install(
        "--root", str(root), env=env, prefix=prefix, installer=bundle_dir / "install-agent"
    )

    assert "(bundle)" in result.stdout
    assert "checked every file of the bundle against its SHA256SUMS" in result.stdout
    assert (bundle_dir / "agent.example.toml").read_text() == (
        root / "etc/sensormine/agent.toml"
    ).read_text()
    python = root / "opt/sensormine/venv/bin/python"
    shown = subprocess.run(
        [str(python), "-m", "pip", "show", "sensormine"], capture_output=True, text=True, check=True
    ).stdout
    assert "Name: sensormine" in shown
    imported = subprocess.run(
        [str(python), "-c", "import protocol, agent; print('ok')"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (0, "ok\n") == (imported.returncode, imported.stdout)
    # A gateway gets the agent only: no collector dependencies, no setuptools, and a
    # collector command that says what it lacks.
    absent = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print([m for m in ('asyncpg', 'jsonschema',"
            " 'cryptography', 'setuptools') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (0, "[]\n") == (absent.returncode, absent.stdout)
    collector = subprocess.run(
        [str(root / "opt/sensormine/venv/bin/sensormine-collector"), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (1, True) == (
        collector.returncode,
        "pip install 'sensormine[collector]'" in collector.stderr,
    )
