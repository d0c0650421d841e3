"""Read replicas: a private cluster and a streaming replica made with pg_basebackup. The API reads
the replica (and says so), a paused replica's "latest" is older and the answer says how much,
a stopped replica leaves the primary to answer, and token checks always ask the primary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from collector import migrations
from collector.api import tokens
from tests.api.conftest import start_api, write_config
from tests.collector.conftest import Databases, make_fleet
from tests.conftest import create_database
from tests.services import PostgresCluster, free_port


class Standby(PostgresCluster):
    """A streaming replica of ``primary``, copied with pg_basebackup -R."""

    def __init__(self, workdir: Path, primary: PostgresCluster) -> None:
        super().__init__(workdir)
        self.primary = primary

    def init(self) -> None:
        if self._as_user:
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        self._run(
            str(self.bindir / "pg_basebackup"),
            *("-h", self.primary.host, "-p", str(self.primary.port), "-U", "postgres"),
            *("-D", str(self.datadir), "-R", "-X", "stream", "--no-sync"),
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nunix_socket_directories = '{self.datadir}'\n"
                "hot_standby = on\n"
            )


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[PostgresCluster, Standby]]:
    # Not under pytest's basetemp: that is 0700 root, and the clusters run as postgres.
    base = Path(tempfile.mkdtemp(prefix="sensormine-replica-"))
    os.chmod(base, 0o755)
    primary = PostgresCluster(base / "primary")
    primary.start()
    standby = Standby(base / "standby", primary)
    try:
        standby.start()
        yield primary, standby
    finally:
        for cluster in (standby, primary):
            with contextlib.suppress(subprocess.CalledProcessError):
                cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


async def _one(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _fill(primary: PostgresCluster) -> tuple[Databases, str]:
    meta = await create_database(primary.dsn, "smrmeta", timescale=False)
    ts = await create_database(primary.dsn, "smrts", timescale=True)
    await migrations.apply(meta, "metadata")
    await migrations.apply(ts, "timeseries")
    dbs = Databases(meta, ts, primary.dsn)
    dbs.fleet = await make_fleet(meta)
    conn = await asyncpg.connect(meta)
    try:
        _, token = await tokens.create(conn, dbs.fleet.tenant, "replica-test")
    finally:
        await conn.close()
    conn = await asyncpg.connect(ts)
    try:
        sid = await conn.fetchval(
            "INSERT INTO series (tenant_id, device_id, metric, kind) VALUES ($1, $2,"
            " 'temperature', 'number') RETURNING id",
            dbs.fleet.tenant,
            dbs.fleet.devices[0],
        )
        await conn.execute(
            "INSERT INTO series_latest (series_id, time, value) VALUES ($1, $2, 20.0)",
            sid,
            datetime.now(UTC) - timedelta(seconds=5),
        )
    finally:
        await conn.close()
    return dbs, token


def _wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def test_the_api_reads_the_replica_says_how_old_latest_is_and_falls_back_to_the_primary(
    clusters: tuple[PostgresCluster, Standby], tmp_path: Path
) -> None:
    primary, standby = clusters
    dbs, token = asyncio.run(_fill(primary))
    ts_db = dbs.timeseries.rpartition("/")[2]
    meta_db = dbs.metadata.rpartition("/")[2]
    replica_ts = standby.dsn_for(ts_db)
    # The replica has replayed the data (the token too).
    _wait(
        "replica caught up",
        lambda: asyncio.run(_one(replica_ts, "SELECT count(*) FROM series_latest")) == 1,
    )
    config = write_config(
        tmp_path / "collector.toml",
        dbs,
        timeseries_replicas=[replica_ts],
        metadata_replicas=[standby.dsn_for(meta_db)],
    )
    port = free_port()
    process = start_api(config, port)
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )

    def latest() -> tuple[dict[str, Any], dict[str, Any]]:
        r = client.get("/api/v1/latest")
        assert 200 == r.status_code, r.text
        body = r.json()
        (device,) = body["devices"]
        return body["source"], device["latest"]["temperature"]

    try:
        source, value = latest()
        assert ("replica", 0.0, 20.0) == (source["server"], source["replica_lag_s"], value["value"])
        # Replay paused: the primary moves on, the replica's "latest" stays behind, and says so.
        asyncio.run(_one(replica_ts, "SELECT pg_wal_replay_pause()"))
        asyncio.run(_one(dbs.timeseries, "UPDATE series_latest SET value = 21.0, time = now()"))
        time.sleep(2.5)
        source, value = _wait(
            "lag reported", lambda: (s := latest()) and s[0]["replica_lag_s"] >= 1.0 and s
        )
        assert ("replica", 20.0) == (source["server"], value["value"])
        assert value["age_s"] >= 5
        # Token checks ask the primary: a token revoked there is refused at once, although
        # the paused replica still holds it as valid.
        extra = asyncio.run(_make_token(dbs.metadata, dbs))
        with httpx.Client(
            base_url=client.base_url, headers={"Authorization": f"Bearer {extra[1]}"}
        ) as c:
            assert 200 == c.get("/api/v1/fleet").status_code
            asyncio.run(
                _one(
                    dbs.metadata, "UPDATE api_tokens SET revoked_at = now() WHERE id = $1", extra[0]
                )
            )
            assert 401 == c.get("/api/v1/fleet").status_code
        # Replay resumed: the replica catches up.
        asyncio.run(_one(replica_ts, "SELECT pg_wal_replay_resume()"))
        source, value = _wait("caught up", lambda: (s := latest()) and s[1]["value"] == 21.0 and s)
        assert "replica" == source["server"]
        # The replica stops: the primary answers.
        standby.stop("immediate")
        source, value = latest()
        assert ("primary", 0.0, 21.0) == (source["server"], source["replica_lag_s"], value["value"])
        with httpx.Client(base_url=client.base_url, headers=client.headers) as c:
            fleet = c.get("/api/v1/fleet")
        assert (200, "primary") == (fleet.status_code, fleet.json()["source"]["server"])
    finally:
        client.close()
        process.terminate()
        process.wait(15)
        if not (standby.datadir / "postmaster.pid").exists():
            standby.start()


async def _make_token(meta: str, dbs: Databases) -> tuple[uuid.UUID, str]:
    assert dbs.fleet is not None
    conn = await asyncpg.connect(meta)
    try:
        record, secret = await tokens.create(conn, dbs.fleet.tenant, f"t-{uuid.uuid4().hex[:6]}")
        return record.id, secret
    finally:
        await conn.close()
