"""``sensormine-collector check-config`` and ``run`` check the files the configuration names;
configuration errors suggest the key that was meant."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import create_database, drop_database
from tests.services import SYSTEM_PG_DSN


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's own temporary directories are root's only)."""
    path = Path(tempfile.mkdtemp(prefix="smcheck-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_missing_password_file_fails_check_config_naming_key_and_path(tmp_path: Path) -> None:
    """A password file that does not exist is an error of check-config, not ``ok``."""
    config = tmp_path / "c.toml"
    missing = tmp_path / "metadata-password"
    config.write_text(
        '[metadata]\ndsn = "postgresql://db.example/sensormine"\n'
        f'password_file = "{missing}"\n'
        '[timeseries]\ndsn = "postgresql://db.example/sensormine_timeseries"\n'
        '[mqtt]\ntls = true\nca_file = "/etc/sensormine/no-such-ca.pem"\n'
    )
    result = _cli("check-config", "--config", str(config))
    assert 1 == result.returncode
    assert [
        f"error: {config}: metadata.password_file: {missing}: does not exist",
        f"error: {config}: mqtt.ca_file: /etc/sensormine/no-such-ca.pem: does not exist",
        f"Error: {config}: files checked as user root (uid 0): not valid",
    ] == result.stderr.splitlines()
    missing.write_text("secret\n")
    config.write_text(config.read_text().replace("tls = true\nca_file", "# ca_file"))
    result = _cli("check-config", "--config", str(config))
    assert (0, f"{config}: ok (files checked as user root)") == (
        result.returncode,
        result.stdout.splitlines()[0],
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="judges access for another account: run as root")
def test_file_the_service_user_cannot_read(open_dir: Path) -> None:
    """A password file only root may read fails for the account that runs the collector."""
    secret = open_dir / "mqtt-password"
    secret.write_text("secret\n")
    secret.chmod(0o600)
    config = open_dir / "c.toml"
    config.write_text(
        '[metadata]\ndsn = "postgresql://db.example/sensormine"\n'
        '[timeseries]\ndsn = "postgresql://db.example/sensormine_timeseries"\n'
        f'[mqtt]\npassword_file = "{secret}"\n'
    )
    config.chmod(0o644)
    result = _cli("check-config", "--config", str(config), "--user", "nobody")
    assert 1 == result.returncode
    assert (
        f"error: {config}: mqtt.password_file: {secret}: nobody cannot read it (root:root 0600)"
    ) in result.stderr.splitlines()
    secret.chmod(0o644)
    assert 0 == _cli("check-config", "--config", str(config), "--user", "nobody").returncode


async def test_run_refuses_a_missing_file_before_touching_the_databases(tmp_path: Path) -> None:
    """``run`` with a missing password file exits 1 naming it, and has migrated nothing."""
    meta = await create_database(SYSTEM_PG_DSN, "smcheck", timescale=False)
    ts = await create_database(SYSTEM_PG_DSN, "smcheck", timescale=True)
    try:
        config = tmp_path / "c.toml"
        missing = tmp_path / "mqtt-password"
        config.write_text(
            f'[metadata]\ndsn = "{meta}"\n[timeseries]\ndsn = "{ts}"\n'
            f'[mqtt]\npassword_file = "{missing}"\n[metrics]\nlisten = ""\n'
        )
        result = _cli("run", "--config", str(config))
        assert 1 == result.returncode
        assert f"{config}: mqtt.password_file: {missing}: does not exist" in result.stderr
        conn = await asyncpg.connect(meta)
        try:
            assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
        finally:
            await conn.close()
    finally:
        await drop_database(SYSTEM_PG_DSN, meta)
        await drop_database(SYSTEM_PG_DSN, ts)


def test_unknown_keys_suggest_the_closest_valid_key(tmp_path: Path) -> None:
    """A misspelt key names the key that was probably meant; a key with no near match lists
    the keys allowed in its table."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[metadata]\ndsn = "postgresql://db.example/sensormine"\n'
        '[timeseries]\ndsn = "postgresql://db.example/sensormine_timeseries"\n'
        'chunk_intervall = "1d"\n'
        '[mqtt]\nhots = "broker.example"\n'
        "[writr]\n"
        "[lifecycle]\ncolour = 1\n"
    )
    result = _cli("check-config", "--config", str(config))
    assert 1 == result.returncode
    lines = result.stderr.splitlines()
    assert (
        f"{config}: timeseries.chunk_intervall: unknown key (did you mean 'chunk_interval'?)"
        in result.stderr
    )
    assert f"{config}: mqtt.hots: unknown key (did you mean 'host'?)" in lines
    assert f"{config}: writr: unknown key (did you mean 'writer'?)" in lines
    (listed,) = [line for line in lines if f"{config}: lifecycle.colour: " in line]
    allowed = listed.split("unknown key (allowed here: ", 1)[1].rstrip(")").split(", ")
    assert {"enabled", "retention", "rollups"} <= set(allowed)
