"""Registry administration through the real CLI against a migrated scratch metadata database."""

from __future__ import annotations

import getpass
import json
import uuid
from pathlib import Path

from tests.admin.conftest import REPO, Admin

SCHEMAS = REPO / "config" / "schemas"


def _setup_tenant(admin: Admin, name: str = "acme") -> str:
    return str(admin.data(f"tenants create {name}")["id"])


def test_tenant_round_trip(admin: Admin) -> None:
    """A tenant is created, listed, shown, renamed, disabled, enabled and deleted."""
    ident = "0b6f2a52-6e1e-4d55-9d1e-4c1f0e7a9b10"
    created = admin.data(f"tenants create acme --id {ident}")
    assert {"id": ident, "name": "acme", "enabled": True} == {
        k: created[k] for k in ("id", "name", "enabled")
    }
    assert [("acme", 0, 0)] == [
        (t["name"], t["gateways"], t["devices"]) for t in admin.data("tenants list")
    ]
    admin.run("tenants update acme --name acme-corp")
    assert "acme-corp" == admin.data(f"tenants show {ident}")["name"]
    admin.run("tenants disable acme-corp")
    assert False is admin.data("tenants show acme-corp")["enabled"]
    admin.run("tenants enable acme-corp")
    assert True is admin.data("tenants show acme-corp")["enabled"]
    admin.run("tenants delete acme-corp")
    assert [] == admin.data("tenants list")
    assert "tenant acme-corp not found" in admin.fail("tenants show acme-corp")


def test_names_and_ids_are_checked(admin: Admin) -> None:
    """A taken name, a taken id, a bad --id and a UUID-looking name are refused by name."""
    ident = _setup_tenant(admin)
    assert "tenant name 'acme' is already used" in admin.fail("tenants create acme")
    assert f"tenant {ident} already exists" in admin.fail(f"tenants create other --id {ident}")
    assert "--id 'nope' is not a UUID" in admin.fail("tenants create other --id nope")
    assert "must not be a UUID" in admin.fail(f"tenants create {uuid.uuid4()}")


def test_gateway_round_trip_and_guarded_delete(admin: Admin) -> None:
    """Gateways round-trip; deleting one with devices assigned is refused with the fix."""
    _setup_tenant(admin)
    gw = admin.data("gateways create plant-1 --tenant acme --description 'Hall A'")
    assert ("plant-1", "Hall A", True) == (gw["name"], gw["description"], gw["enabled"])
    admin.run("device-types create sensor --tenant acme")
    admin.run("devices create d1 --tenant acme --type sensor --gateway plant-1")
    listed = admin.data("gateways list --tenant acme")
    assert [("plant-1", "acme", 1)] == [(g["name"], g["tenant"], g["devices"]) for g in listed]
    shown = admin.data(f"gateways show {gw['id']}")
    assert ["d1"] == [d["name"] for d in shown["devices"]]
    admin.run("gateways update plant-1 --name plant-one --description 'Hall B'")
    assert ("plant-one", "Hall B") == tuple(
        admin.data("gateways show plant-one")[k] for k in ("name", "description")
    )
    admin.run("gateways disable plant-one")
    assert False is admin.data("gateways show plant-one")["enabled"]
    refusal = admin.fail("gateways delete plant-one")
    assert "gateway plant-one has 1 device(s) assigned (d1)" in refusal
    admin.run("devices update d1 --no-gateway")
    admin.run("gateways delete plant-one")
    assert [] == admin.data("gateways list")


def test_ambiguous_name_needs_tenant(admin: Admin) -> None:
    """A name used in two tenants is refused as ambiguous; --tenant picks one."""
    _setup_tenant(admin, "acme")
    _setup_tenant(admin, "globex")
    admin.run("gateways create gw --tenant acme")
    globex_gw = admin.data("gateways create gw --tenant globex")
    assert "gateway name 'gw' is used in 2 tenants; give its id or --tenant" in admin.fail(
        "gateways show gw"
    )
    assert globex_gw["id"] == admin.data("gateways show gw --tenant globex")["id"]
    acme_gw = admin.data("gateways show gw --tenant acme")
    assert globex_gw["id"] != acme_gw["id"]


def test_schema_versions(admin: Admin, tmp_path: Path) -> None:
    """A schema gets versions from files; an unchanged file adds none; old versions stay readable."""
    _setup_tenant(admin)
    created = admin.data(
        f"schemas create env --tenant acme --file {SCHEMAS / 'environmental.json'} --description Climate"
    )
    assert 1 == created["version"]
    again = admin.run(f"schemas add-version env {SCHEMAS / 'environmental.json'}")
    assert "unchanged" in again.output
    changed = json.loads((SCHEMAS / "environmental.json").read_text())
    changed["properties"]["pressure"] = {"type": "number", "unit": "hPa", "minimum": 300}
    path = tmp_path / "env-v2.json"
    path.write_text(json.dumps(changed), encoding="utf-8")
    added = admin.data(f"schemas add-version env {path} --actor alice")
    assert (2, True, "alice") == (added["version"], added["added"], added["created_by"])
    shown = admin.data("schemas show env")
    assert [1, 2] == [v["version"] for v in shown["versions"]]
    assert "pressure" in shown["json_schema"]["properties"]
    first = admin.data("schemas show env --version 1")
    assert "pressure" not in first["json_schema"]["properties"]
    assert [("env", 2, 0)] == [
        (s["name"], s["version"], s["device_types"]) for s in admin.data("schemas list")
    ]
    admin.run("schemas update env --name environmental --description 'Indoor climate'")
    assert "Indoor climate" == admin.data("schemas show environmental")["description"]


def test_schema_file_refused_before_storing(admin: Admin, tmp_path: Path) -> None:
    """add-version checks the file first: a bad one is named and nothing is stored."""
    _setup_tenant(admin)
    admin.run("schemas create env --tenant acme")
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"temperature": {"type": "number", "pattern": "^x"}},
            }
        )
    )
    message = admin.fail(f"schemas add-version env {bad}")
    assert "properties.temperature: unsupported keyword 'pattern'" in message
    assert 0 == admin.scalar("SELECT count(*) FROM schema_versions")


def test_device_type_refuses_missing_or_foreign_schema(admin: Admin) -> None:
    """A device type naming a schema that does not exist, or another tenant's, is refused."""
    _setup_tenant(admin, "acme")
    _setup_tenant(admin, "globex")
    missing = uuid.uuid4()
    assert f"schema {missing} not found" in admin.fail(
        f"device-types create sensor --tenant acme --schema {missing}"
    )
    assert "schema nosuch not found" in admin.fail(
        "device-types create sensor --tenant acme --schema nosuch"
    )
    foreign = admin.data(
        f"schemas create env --tenant globex --file {SCHEMAS / 'environmental.json'}"
    )
    assert f"schema {foreign['id']} belongs to tenant globex, not to tenant acme" in admin.fail(
        f"device-types create sensor --tenant acme --schema {foreign['id']}"
    )
    assert 0 == admin.scalar("SELECT count(*) FROM device_types")
    admin.run("device-types create sensor --tenant acme")
    assert f"schema {missing} not found" in admin.fail(
        f"device-types update sensor --schema {missing}"
    )


def test_device_cross_tenant_references_refused(admin: Admin) -> None:
    """A device of another tenant's type, or on another tenant's gateway, is refused."""
    _setup_tenant(admin, "acme")
    _setup_tenant(admin, "globex")
    admin.run("device-types create sensor --tenant acme")
    admin.run("gateways create gw-a --tenant acme")
    foreign_type = admin.data("device-types create meter --tenant globex")
    foreign_gw = admin.data("gateways create gw-g --tenant globex")
    assert (
        f"device type {foreign_type['id']} belongs to tenant globex, not to tenant acme"
        in admin.fail(f"devices create d1 --tenant acme --type {foreign_type['id']}")
    )
    assert "device type meter not found in tenant acme" in admin.fail(
        "devices create d1 --tenant acme --type meter"
    )
    assert f"gateway {foreign_gw['id']} belongs to tenant globex, not to tenant acme" in admin.fail(
        f"devices create d1 --tenant acme --type sensor --gateway {foreign_gw['id']}"
    )
    admin.run("devices create d1 --tenant acme --type sensor --gateway gw-a")
    assert f"gateway {foreign_gw['id']} belongs to tenant globex, not to tenant acme" in admin.fail(
        f"devices update d1 --gateway {foreign_gw['id']}"
    )
    assert 1 == admin.scalar("SELECT count(*) FROM devices")


def test_device_round_trip(admin: Admin) -> None:
    """Devices round-trip with attributes, filters, moves between gateways and deletion."""
    _setup_tenant(admin)
    admin.run("device-types create sensor --tenant acme")
    admin.run("device-types create meter --tenant acme")
    admin.run("gateways create gw-1 --tenant acme")
    admin.run("gateways create gw-2 --tenant acme")
    created = admin.data(
        'devices create d1 --tenant acme --type sensor --gateway gw-1 --attributes \'{"room": "201"}\''
    )
    assert {"room": "201"} == created["attributes"]
    admin.run("devices create d2 --tenant acme --type meter")
    assert ["d1"] == [d["name"] for d in admin.data("devices list --gateway gw-1")]
    assert ["d2"] == [d["name"] for d in admin.data("devices list --type meter")]
    admin.run("devices update d1 --gateway gw-2 --type meter --name d1b --description moved")
    shown = admin.data("devices show d1b")
    assert ("gw-2", "meter", "moved") == (
        shown["gateway"],
        shown["device_type"],
        shown["description"],
    )
    admin.run("devices disable d1b")
    assert False is admin.data("devices show d1b")["enabled"]
    admin.run("devices delete d1b")
    assert ["d2"] == [d["name"] for d in admin.data("devices list")]


def test_schema_and_device_type_delete_guarded(admin: Admin) -> None:
    """A schema in use and a device type in use cannot be deleted; once unused they can."""
    _setup_tenant(admin)
    admin.run(f"schemas create env --tenant acme --file {SCHEMAS / 'environmental.json'}")
    admin.run("device-types create sensor --tenant acme --schema env")
    admin.run("devices create d1 --tenant acme --type sensor")
    assert "schema env is used by 1 device type(s) (sensor)" in admin.fail("schemas delete env")
    assert "device type sensor is used by 1 device(s) (d1)" in admin.fail(
        "device-types delete sensor"
    )
    admin.run("devices delete d1")
    admin.run("device-types update sensor --no-schema")
    admin.run("schemas delete env")
    admin.run("device-types delete sensor")
    assert (0, 0) == (
        admin.scalar("SELECT count(*) FROM schemas"),
        admin.scalar("SELECT count(*) FROM schema_versions"),
    )


def test_device_type_changes_are_versioned_and_audited(admin: Admin) -> None:
    """Each device-type change bumps its version, snapshots it and writes an audit row."""
    _setup_tenant(admin)
    env = admin.data(f"schemas create env --tenant acme --file {SCHEMAS / 'environmental.json'}")
    vib = admin.data(f"schemas create vib --tenant acme --file {SCHEMAS / 'vibration.json'}")
    created = admin.data("device-types create sensor --tenant acme --schema env --actor alice")
    admin.run("device-types update sensor --description 'Wall sensor' --actor bob")
    admin.run("device-types update sensor --schema vib --actor bob")
    admin.run("device-types update sensor --schema vib --actor bob")  # no change: no new version
    admin.run("device-types disable sensor --actor carol")
    admin.run("device-types enable sensor")
    history = admin.data("device-types history sensor")
    assert [1, 2, 3, 4, 5] == [v["version"] for v in history["versions"]]
    assert [
        ("alice", "create"),
        ("bob", "update"),
        ("bob", "update"),
        ("carol", "disable"),
        (getpass.getuser(), "enable"),
    ] == [(a["actor"], a["action"]) for a in history["audit"]]
    assert {"description": {"old": "", "new": "Wall sensor"}} == history["audit"][1]["changes"]
    assert {"schema_id": {"old": env["id"], "new": vib["id"]}} == history["audit"][2]["changes"]
    assert {"enabled": {"old": True, "new": False}} == history["audit"][3]["changes"]
    create_changes = history["audit"][0]["changes"]
    assert {"old": None, "new": "sensor"} == create_changes["name"]
    snapshot = history["versions"][2]["snapshot"]
    assert (vib["id"], 1, 3) == (
        snapshot["schema_id"],
        snapshot["schema_version"],
        snapshot["version"],
    )
    assert 5 == admin.data("device-types show sensor")["version"]
    admin.run("device-types delete sensor --actor dave")
    rows = admin.query(
        "SELECT actor, action FROM device_type_audit_logs WHERE device_type_id = $1 ORDER BY id",
        uuid.UUID(created["id"]),
    )
    assert ("dave", "delete") == (rows[-1]["actor"], rows[-1]["action"])


def test_alert_rules_round_trip(admin: Admin) -> None:
    """Alert rules round-trip; a metric outside the type's schema is refused."""
    _setup_tenant(admin)
    admin.run(f"schemas create env --tenant acme --file {SCHEMAS / 'environmental.json'}")
    admin.run("device-types create sensor --tenant acme --schema env")
    admin.run("devices create d1 --tenant acme --type sensor")
    rule = admin.data(
        "alert-rules create co2-high --tenant acme --device-type sensor --metric co2 "
        "--condition '>' --threshold 1500 --duration 5m --severity warning"
    )
    assert ("co2", ">", 1500.0, "300s") == (
        rule["metric"],
        rule["condition"],
        rule["threshold"],
        rule["duration"],
    )
    refusal = admin.fail(
        "alert-rules create bad --tenant acme --device d1 --metric rpm --condition '>' --threshold 1"
    )
    assert "metric 'rpm' is not a metric of device type sensor" in refusal
    admin.run("alert-rules update co2-high --threshold 2000 --severity error")
    shown = admin.data("alert-rules show co2-high")
    assert (2000.0, "error", "sensor") == (
        shown["threshold"],
        shown["severity"],
        shown["device_type"],
    )
    admin.run("alert-rules disable co2-high")
    assert [False] == [r["enabled"] for r in admin.data("alert-rules list")]
    admin.run("devices delete d1")
    assert "device type sensor is used by 1 alert rule(s) (co2-high)" in admin.fail(
        "device-types delete sensor"
    )
    admin.run("alert-rules delete co2-high")
    assert [] == admin.data("alert-rules list")


def test_not_migrated_database_is_named(admin: Admin) -> None:
    """Against a database without the registry tables, the command says to migrate."""
    admin.query(
        "DROP TABLE alert_rules, devices, device_type_audit_logs, device_type_versions, device_types CASCADE"
    )
    assert "run `sensormine-collector migrate` first" in admin.fail("tenants list")
