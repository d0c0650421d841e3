"""The query API against databases filled by a real collector (see conftest.World)."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from collector.settings import ApiSettings
from tests.api.conftest import World, cli

PROBLEM = "application/problem+json"


def test_fleet_names_each_gateway_with_status_last_batch_lag_and_backlog(world: World) -> None:
    with world.a() as c:
        r = c.get("/api/v1/fleet")
    assert 200 == r.status_code, r.text
    body = r.json()
    assert {"id": str(world.fleet.tenant), "name": "acme"} == body["tenant"]
    assert {"server": "primary", "replica_lag_s": 0.0} == body["source"]
    (gw,) = body["gateways"]
    assert (str(world.fleet.gateway), "gw1", True, 3) == (
        gw["id"],
        gw["name"],
        gw["enabled"],
        gw["devices"],
    )
    assert "online" == gw["status"]["status"]
    assert gw["status"]["since"].startswith(world.start.isoformat()[:19])
    # The newest batch by its sealing time: seq 4 (the quarantined one), sealed just now.
    assert (4, "quarantined") == (gw["last_batch"]["seq"], gw["last_batch"]["result"])
    assert 0 <= gw["ingest_lag_s"] < 60
    assert None is gw["clock_skew_s"]
    assert {
        "state": "drained",
        "buffered_readings": 40,
        "estimate_s": 0.0,
        "ack_rate": 500.0,
        "production_rate": 83.0,
    }.items() <= gw["backlog"].items()
    assert {"online": 3} == body["devices"]


def test_devices_have_names_type_gateway_status_since_and_latest_values(world: World) -> None:
    with world.a() as c:
        r = c.get("/api/v1/devices")
    assert 200 == r.status_code, r.text
    body = r.json()
    assert 3 == body["total"]
    by_name = {d["name"]: d for d in body["devices"]}
    assert ["dev0", "dev1", "dev2"] == sorted(by_name)
    dev0, dev1 = by_name["dev0"], by_name["dev1"]
    assert {"id": str(world.fleet.device_type), "name": "env"} == dev0["type"]
    assert {"id": str(world.fleet.gateway), "name": "gw1"} == dev0["gateway"]
    assert {"humidity", "mode", "temperature"} == set(dev0["latest"])
    assert "auto" == dev0["latest"]["mode"]["value"]
    assert "text" == dev0["latest"]["mode"]["kind"]
    # Readings every 10 s of pattern 20 + (i % 60) / 10: the last one of the third hour.
    assert 25.9 == dev0["latest"]["temperature"]["value"]
    # dev0 stayed online (restated each hour): online since the first statement.
    assert "online" == dev0["status"]["status"]
    assert dev0["status"]["since"] <= (world.start + timedelta(seconds=1)).isoformat()
    # dev1 went into error in the second hour and came back: online since the third hour.
    assert "online" == dev1["status"]["status"]
    assert dev1["status"]["since"] >= (world.start + timedelta(hours=2)).isoformat()
    # dev2 is disabled; its readings wait in quarantine, so it has no latest values.
    assert (False, {}) == (by_name["dev2"]["enabled"], by_name["dev2"]["latest"])
    with world.a() as c:
        one = c.get(f"/api/v1/devices/{world.fleet.devices[0]}").json()
        paged = c.get("/api/v1/devices", params={"limit": 1, "offset": 1}).json()
        of_gw = c.get("/api/v1/devices", params={"gateway_id": str(world.fleet.gateway)}).json()
    assert dev0["latest"]["temperature"]["value"] == one["latest"]["temperature"]["value"]
    # /latest: the same values, built by the database, for the devices that sent any.
    with world.a() as c:
        compact = c.get("/api/v1/latest").json()
        of_other = c.get("/api/v1/latest", params={"gateway_id": str(world.fleet.other_gateway)})
    assert ["dev0", "dev1"] == [d["name"] for d in compact["devices"]]
    for d in compact["devices"]:
        full = by_name[d["name"]]
        assert datetime.fromisoformat(d["last_seen"]) == datetime.fromisoformat(full["last_seen"])
        for metric, v in d["latest"].items():
            assert (v["value"], v["kind"]) == (
                full["latest"][metric]["value"],
                full["latest"][metric]["kind"],
            )
            assert datetime.fromisoformat(v["time"]) == datetime.fromisoformat(
                full["latest"][metric]["time"]
            )
            assert abs(v["age_s"] - full["latest"][metric]["age_s"]) < 5
    assert (404, "unknown_gateway") == (of_other.status_code, of_other.json()["code"])
    assert (3, 1, ["dev1"]) == (
        paged["total"],
        paged["offset"],
        [d["name"] for d in paged["devices"]],
    )
    assert 3 == of_gw["total"]


def _series(world: World, **params: Any) -> Any:
    with world.a() as c:
        return c.get(f"/api/v1/devices/{world.fleet.devices[0]}/series", params=params)


async def _raw_minute(world: World, minute: str) -> float:
    conn = await asyncpg.connect(world.dbs.timeseries)
    try:
        value = await conn.fetchval(
            "SELECT avg(value) FROM readings WHERE device_id = $1 AND metric = 'temperature'"
            " AND time >= $2 AND time < $2 + interval '1 minute'",
            world.fleet.devices[0],
            datetime.fromisoformat(minute),
        )
        return float(value)
    finally:
        await conn.close()


def test_series_picks_raw_1m_or_1h_from_range_and_points_and_shows_gaps(world: World) -> None:
    start = world.start.isoformat()
    end = (world.start + timedelta(hours=3)).isoformat()
    # 3 hours hold 960 readings (20 minutes missing): raw fits 2000 points.
    raw = _series(world, metric="temperature", start=start, end=end).json()
    assert ("raw", "auto", 1) == (raw["resolution"], raw["chosen"], raw["gaps"])
    values = raw["points"]["value"]
    assert 960 + 1 == len(values)
    gap = values.index(None)
    t = raw["points"]["time"]
    assert t[gap - 1] < world.gap_from.isoformat() < t[gap] < world.gap_to.isoformat() <= t[gap + 1]
    # At most 500 points: 180 one-minute buckets, the 20 empty ones one gap.
    minute = _series(world, metric="temperature", start=start, end=end, max_points=500).json()
    assert ("1m", "auto", 1) == (minute["resolution"], minute["chosen"], minute["gaps"])
    assert 160 + 1 == len(minute["points"]["time"])
    assert {"time", "value", "min", "max", "count"} == set(minute["points"])
    # Stored rollups (older part) and buckets computed now (the newest 50 minutes) both agree
    # with the readings.
    for i in (5, len(minute["points"]["time"]) - 3):
        first = minute["points"]["time"][i]
        assert abs(asyncio.run(_raw_minute(world, first)) - minute["points"]["value"][i]) < 1e-9
        assert 6 == minute["points"]["count"][i]
    # At most 100 points: hourly buckets.
    hourly = _series(world, metric="temperature", start=start, end=end, max_points=100).json()
    assert "1h" == hourly["resolution"]
    assert [360, 240, 360] == hourly["points"]["count"]
    # Overridden.
    forced = _series(world, metric="temperature", start=start, end=end, resolution="1h").json()
    assert ("1h", "requested") == (forced["resolution"], forced["chosen"])
    too_many = _series(
        world, metric="temperature", start=start, end=end, resolution="raw", max_points=100
    )
    assert (400, "too_many_points") == (too_many.status_code, too_many.json()["code"])
    # A text metric is raw only.
    mode = _series(world, metric="mode", start=start, end=end).json()
    assert ("text", ["auto"] * 6) == (mode["kind"], mode["points"]["value"])
    no_rollup = _series(world, metric="mode", start=start, end=end, resolution="1m")
    assert "no_rollups" == no_rollup.json()["code"]


def test_every_bad_parameter_is_a_problem_detail_with_a_stable_code(world: World) -> None:
    dev = world.fleet.devices[0]
    later = world.start + timedelta(hours=1)
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (
            f"/api/v1/devices/{dev}/series",
            {"metric": "temperature", "start": later.isoformat(), "end": world.start.isoformat()},
            400,
            "invalid_range",
        ),
        (
            f"/api/v1/devices/{dev}/series",
            {"metric": "temperature", "start": "2000-01-01T00:00:00Z"},
            400,
            "range_too_large",
        ),
        (f"/api/v1/devices/{dev}/series", {"metric": "pressure"}, 404, "unknown_metric"),
        (
            f"/api/v1/devices/{dev}/series",
            {"metric": "temperature", "max_points": 10**6},
            400,
            "too_many_points",
        ),
        (f"/api/v1/devices/{dev}/series", {}, 422, "invalid_parameter"),
        (
            f"/api/v1/devices/{dev}/series",
            {"metric": "temperature", "resolution": "5m"},
            422,
            "invalid_parameter",
        ),
        (
            f"/api/v1/devices/{dev}/series",
            {"metric": "temperature", "start": "yesterday"},
            422,
            "invalid_parameter",
        ),
        ("/api/v1/devices/not-a-uuid", {}, 422, "invalid_parameter"),
        ("/api/v1/devices/00000000-0000-0000-0000-000000000000", {}, 404, "unknown_device"),
        ("/api/v1/gateways/00000000-0000-0000-0000-000000000000", {}, 404, "unknown_gateway"),
        ("/api/v1/events", {"limit": 0}, 422, "invalid_parameter"),
        ("/api/v1/events", {"limit": 5000}, 422, "invalid_parameter"),
        ("/api/v1/devices", {"limit": 10**7}, 400, "limit_too_large"),
        ("/api/v1/nothing", {}, 404, "not_found"),
    ]
    with world.a() as c:
        for path, params, status, code in cases:
            r = c.get(path, params=params)
            assert (status, code) == (r.status_code, r.json().get("code")), (path, params, r.text)
            assert r.headers["content-type"].startswith(PROBLEM)
            body = r.json()
            assert {"type", "title", "status", "code", "detail", "instance"} <= set(body)
            assert body["detail"]
            assert body["type"].endswith(code.replace("_", "-"))
    with world.a() as c:
        bad = c.get(
            f"/api/v1/devices/{dev}/series", params={"metric": "temperature", "start": "yesterday"}
        ).json()
    assert "start" == bad["errors"][0]["parameter"]
    unknown = _series(world, metric="pressure").json()["detail"]
    assert "dev0" in unknown and "humidity, mode, temperature" in unknown


def test_no_token_or_an_unknown_one_is_refused(world: World) -> None:
    for token in (None, "smt_" + "x" * 43, "not even a token"):
        with world.client(token) as c:
            r = c.get("/api/v1/fleet")
        assert (401, "unauthorized") == (r.status_code, r.json()["code"])
        assert r.headers["www-authenticate"].startswith("Bearer")
    with world.client(None) as c:
        assert 200 == c.get("/healthz").status_code


def _paths(world: World) -> list[str]:
    with world.a() as c:
        doc = c.get("/api/v1/openapi.json").json()
    return sorted(p for p in doc["paths"] if p.startswith("/api/v1/"))


def test_tenant_b_reads_nothing_of_tenant_a_on_any_endpoint(world: World) -> None:
    """Every path of the OpenAPI document, asked with B's token: A's ids are unknown and no
    answer holds anything of A (ids, names, values)."""
    f = world.fleet
    a_ids = [str(f.tenant), str(f.gateway), *map(str, f.devices), str(f.device_type)]
    a_words = ["acme", '"gw1"', '"dev0"', '"dev1"', '"dev2"', "temperature", "humidity"]
    b_sees = {
        "/api/v1/fleet": "gw-other",
        "/api/v1/devices": '"x"',
        "/api/v1/events": "secret.event",
    }
    asked: set[str] = set()
    with world.b() as c:
        for path in _paths(world):
            asked.add(path)
            if "{gateway_id}" in path or "{device_id}" in path:
                concrete = path.replace("{gateway_id}", str(f.gateway)).replace(
                    "{device_id}", str(f.devices[0])
                )
                r = c.get(concrete, params={"metric": "temperature"})
                code = "unknown_gateway" if "{gateway_id}" in path else "unknown_device"
                assert (404, code) == (r.status_code, r.json()["code"]), (path, r.text)
                # B's own ids answer (so the 404 is about A's ids, not about the path).
                own = path.replace("{gateway_id}", str(f.other_gateway)).replace(
                    "{device_id}", str(f.other_device)
                )
                mine = c.get(own, params={"metric": "secret"})
                assert 200 == mine.status_code, (own, mine.text)
                text = mine.text
            else:
                r = c.get(path)
                assert 200 == r.status_code, (path, r.text)
                text = r.text
                if path in b_sees:
                    assert b_sees[path] in text
                for name, value in (("gateway_id", f.gateway), ("device_id", f.devices[0])):
                    if name in json.dumps(_params(world, path)):
                        filtered = c.get(path, params={name: str(value)})
                        assert 404 == filtered.status_code, (path, name, filtered.text)
            leaked = [x for x in a_ids + a_words if x in text]
            assert [] == leaked, (path, text[:500])
    assert set(_paths(world)) == asked
    # And A, for the contrast, sees its own and none of B's.
    with world.a() as c:
        fleet = c.get("/api/v1/fleet").text
        events = c.get("/api/v1/events").text
    assert "gw1" in fleet and "gw-other" not in fleet
    assert "backlog.drained" in events and "secret.event" not in events


def _params(world: World, path: str) -> list[str]:
    with world.a() as c:
        doc = c.get("/api/v1/openapi.json").json()
    return [p["name"] for p in doc["paths"][path]["get"].get("parameters", [])]


def test_a_revoked_token_is_refused_at_its_next_request(world: World) -> None:
    made = cli(
        "tokens",
        "create",
        "--config",
        str(world.config),
        "--tenant",
        "acme",
        "--name",
        "short-lived",
        "--json",
    )
    assert 0 == made.returncode, made.stderr
    record = json.loads(made.stdout)
    token = record["token"]
    assert re.fullmatch(r"smt_[A-Za-z0-9_-]{43}", token)
    with world.client(token) as c:
        assert 200 == c.get("/api/v1/fleet").status_code
        listed = cli("tokens", "list", "--config", str(world.config), "--tenant", "acme")
        assert "short-lived" in listed.stdout and token[:12] in listed.stdout
        assert token not in listed.stdout
        revoked = cli("tokens", "revoke", "--config", str(world.config), record["id"])
        assert 0 == revoked.returncode, revoked.stderr
        r = c.get("/api/v1/fleet")
        assert (401, "unauthorized") == (r.status_code, r.json()["code"])
    again = cli("tokens", "list", "--config", str(world.config), "--revoked", "--json")
    (gone,) = [t for t in json.loads(again.stdout) if t["id"] == record["id"]]
    assert gone["revoked_at"] is not None
    # The stored form is a hash: the secret is nowhere in the metadata database.

    async def stored() -> list[Any]:
        conn = await asyncpg.connect(world.dbs.metadata)
        try:
            return list(await conn.fetch("SELECT to_jsonb(t)::text AS row FROM api_tokens t"))
        finally:
            await conn.close()

    assert all(token not in r["row"] and token[4:] not in r["row"] for r in asyncio.run(stored()))


def test_token_cli_refuses_unknown_tenants_and_duplicate_names(world: World) -> None:
    unknown = cli(
        "tokens", "create", "--config", str(world.config), "--tenant", "nobody", "--name", "x"
    )
    assert 1 == unknown.returncode and "no tenant 'nobody'" in unknown.stderr
    twice = cli(
        "tokens", "create", "--config", str(world.config), "--tenant", "acme", "--name", "tests"
    )
    assert 1 == twice.returncode and "already has a valid token named 'tests'" in twice.stderr
    nothing = cli("tokens", "revoke", "--config", str(world.config), "smt_nothing-like-it")
    assert 1 == nothing.returncode and "no token" in nothing.stderr


def test_events_status_history_quarantine_and_rejects(world: World) -> None:
    f = world.fleet
    with world.a() as c:
        backlog = c.get("/api/v1/events", params={"kind": "backlog."}).json()["events"]
        drained = c.get("/api/v1/events", params={"kind": "backlog.drained"}).json()["events"]
        history = c.get(f"/api/v1/devices/{f.devices[1]}/status-history").json()
        gw_history = c.get(f"/api/v1/gateways/{f.gateway}/status-history").json()
        quarantine = c.get("/api/v1/quarantine").json()
        rejects = c.get("/api/v1/rejects").json()
        points = c.get(f"/api/v1/gateways/{f.gateway}/backlog").json()["points"]
        lag = c.get(f"/api/v1/gateways/{f.gateway}/ingest-lag").json()
    assert ["backlog.drained", "backlog.progress", "backlog.progress", "backlog.draining"] == [
        e["kind"] for e in backlog
    ]
    assert {"id": str(f.gateway), "name": "gw1"} == drained[0]["gateway"]
    assert 50_000 == drained[0]["attributes"]["backlog_readings"]
    assert ["online", "error", "online"] == [ch["status"] for ch in history["changes"]][:3]
    assert "modbus timeout" == history["changes"][1]["reason"]
    assert {"id": str(f.devices[1]), "name": "dev1"} == history["subject"]
    assert ["online"] == [ch["status"] for ch in gw_history["changes"]]
    assert {"device_disabled": 5} == quarantine["by_reason"]
    assert "gw1" == quarantine["groups"][0]["gateway"]["name"]
    assert [("bad_magic", 1)] == [(r["reason"], r["messages"]) for r in rejects["by_reason"]]
    assert "gw1" == rejects["recent"][0]["gateway"]["name"]
    assert [50_000, 30_000, 10_000, 40] == [p["buffered_readings"] for p in points]
    assert lag["points"] and all(p["lag_max_s"] >= p["lag_avg_s"] for p in lag["points"])


def test_alerts_of_the_tenants_rules_with_names(world: World) -> None:
    with world.a() as c:
        raised = c.get("/api/v1/alerts").json()
        still_open = c.get("/api/v1/alerts", params={"open": "true"}).json()
        of_dev1 = c.get("/api/v1/alerts", params={"device_id": str(world.fleet.devices[1])}).json()
    with world.b() as c:
        b_open = c.get("/api/v1/alerts", params={"open": "true"}).json()
    alerts = raised["alerts"]
    assert alerts, raised
    assert {"temperature-high"} == {a["rule"]["name"] for a in alerts}
    assert {"dev0", "dev1"} == {a["device"]["name"] for a in alerts}
    assert {"gw1"} == {a["gateway"]["name"] for a in alerts}
    closed = [a for a in alerts if a["cleared_at"] is not None]
    assert closed and all(a["raised_value"] > 25.5 and a["cleared_value"] < 25.0 for a in closed)
    assert all(a["cleared_at"] is None for a in still_open["alerts"])
    assert {"dev1"} == {a["device"]["name"] for a in of_dev1["alerts"]}
    # B's alert stays open and is B's alone.
    assert [("secret-high", "critical", "x")] == [
        (a["rule"]["name"], a["severity"], a["device"]["name"]) for a in b_open["alerts"]
    ]


def test_the_openapi_document_lists_every_route_and_the_api_binds_to_localhost(
    world: World,
) -> None:
    with world.client(None) as c:
        doc = c.get("/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {
        "/api/v1/fleet",
        "/api/v1/gateways/{gateway_id}",
        "/api/v1/gateways/{gateway_id}/backlog",
        "/api/v1/gateways/{gateway_id}/ingest-lag",
        "/api/v1/gateways/{gateway_id}/status-history",
        "/api/v1/devices",
        "/api/v1/devices/{device_id}",
        "/api/v1/devices/{device_id}/series",
        "/api/v1/devices/{device_id}/status-history",
        "/api/v1/events",
        "/api/v1/quarantine",
        "/api/v1/rejects",
        "/api/v1/alerts",
        "/api/v1/latest",
    } <= set(doc["paths"])
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    assert "127.0.0.1:8080" == ApiSettings().listen
