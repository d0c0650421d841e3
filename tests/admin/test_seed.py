"""Seed files: the demo seed applied twice gives the same rows; changes and errors are handled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from collector.cli import main
from tests.admin.conftest import REPO, Admin

COUNTS = """
SELECT (SELECT count(*) FROM tenants) AS tenants,
       (SELECT count(*) FROM gateways) AS gateways,
       (SELECT count(*) FROM schemas) AS schemas,
       (SELECT count(*) FROM schema_versions) AS schema_versions,
       (SELECT count(*) FROM device_types) AS device_types,
       (SELECT count(*) FROM device_type_versions) AS device_type_versions,
       (SELECT count(*) FROM device_type_audit_logs) AS audit_rows,
       (SELECT count(*) FROM devices) AS devices,
       (SELECT count(*) FROM alert_rules) AS alert_rules
"""
EXPECTED = {
    "tenants": 1,
    "gateways": 2,
    "schemas": 3,
    "schema_versions": 3,
    "device_types": 3,
    "device_type_versions": 3,
    "audit_rows": 3,
    "devices": 20,
    "alert_rules": 4,
}
SNAPSHOT = """
SELECT 'tenant' AS kind, id, name, updated_at FROM tenants
UNION ALL SELECT 'gateway', id, name, updated_at FROM gateways
UNION ALL SELECT 'schema', id, name, updated_at FROM schemas
UNION ALL SELECT 'device_type', id, name, updated_at FROM device_types
UNION ALL SELECT 'device', id, name, updated_at FROM devices
UNION ALL SELECT 'alert_rule', id, name, updated_at FROM alert_rules
ORDER BY 1, 2
"""


def test_demo_seed_is_idempotent(admin: Admin) -> None:
    """`seed --demo` twice: exact counts, and the second run creates and changes nothing."""
    first = admin.data("seed --demo")
    assert {"created": 20, "updated": 0, "unchanged": 0} == first["devices"]
    assert EXPECTED == admin.query(COUNTS)[0]
    rows = admin.query(SNAPSHOT)
    second = admin.data("seed --demo")
    for table in ("tenants", "gateways", "schemas", "device_types", "devices", "alert_rules"):
        assert 0 == second[table]["created"] + second[table]["updated"], table
    assert EXPECTED == admin.query(COUNTS)[0]
    assert rows == admin.query(SNAPSHOT)


def test_demo_seed_shape(admin: Admin) -> None:
    """The demo: ten devices per gateway, 8/6/6 per type, each type on its schema's version 1."""
    admin.run("seed --demo")
    per_gateway = admin.query(
        "SELECT g.name, count(*) AS n FROM devices d JOIN gateways g ON g.id = d.gateway_id GROUP BY 1 ORDER BY 1"
    )
    assert [("demo-gateway-north", 10), ("demo-gateway-south", 10)] == [
        (r["name"], r["n"]) for r in per_gateway
    ]
    types = admin.data("device-types list --tenant demo")
    assert [
        ("environmental", "environmental", 1, 8),
        ("power-meter", "power-meter", 1, 6),
        ("vibration", "vibration", 1, 6),
    ] == [(t["name"], t["schema"], t["schema_version"], t["devices"]) for t in types]
    env = admin.data("schemas show environmental --tenant demo")
    assert {"temperature", "humidity", "co2"} == set(env["json_schema"]["properties"])


def _copy_demo(tmp_path: Path) -> Path:
    (tmp_path / "seed").mkdir()
    shutil.copytree(REPO / "config" / "schemas", tmp_path / "schemas")
    seed = tmp_path / "seed" / "demo.toml"
    shutil.copy(REPO / "config" / "seed" / "demo.toml", seed)
    return seed


def test_changed_seed_updates_with_versions(admin: Admin, tmp_path: Path) -> None:
    """A changed schema file becomes a new version; a changed device type is versioned and audited."""
    seed = _copy_demo(tmp_path)
    admin.run(f"seed {seed}")
    schema_file = tmp_path / "schemas" / "vibration.json"
    document = json.loads(schema_file.read_text())
    document["properties"]["temperature"] = {"type": "number", "unit": "°C", "maximum": 150}
    schema_file.write_text(json.dumps(document))
    text = seed.read_text()
    seed.write_text(
        text.replace(
            'description = "Machine vibration sensor"\n',
            'description = "Machine vibration and bearing temperature"\n',
        )
    )
    report = admin.data(f"seed {seed} --actor seeder")
    assert {"created": 0, "updated": 1, "unchanged": 2} == report["schemas"]
    assert {"created": 0, "updated": 1, "unchanged": 2} == report["device_types"]
    history = admin.data("device-types history vibration --tenant demo")
    assert [1, 2] == [v["version"] for v in history["versions"]]
    assert ("seeder", "update") == (history["audit"][-1]["actor"], history["audit"][-1]["action"])
    assert 2 == admin.data("schemas show vibration --tenant demo")["version"]


def test_seed_errors_apply_nothing(admin: Admin, tmp_path: Path) -> None:
    """A bad reference names the entry and leaves the database untouched (one transaction)."""
    seed = _copy_demo(tmp_path)
    text = seed.read_text()
    seed.write_text(
        text.replace(
            'name = "vib-south-fan"\ntype = "vibration"', 'name = "vib-south-fan"\ntype = "nosuch"'
        )
    )
    message = admin.fail(f"seed {seed}")
    assert "device vib-south-fan: device type nosuch not found in tenant demo" in message
    assert 0 == admin.scalar("SELECT count(*) FROM tenants")


def test_seed_file_errors_name_file_and_key(admin: Admin, tmp_path: Path) -> None:
    """An unknown key, a missing schema file or a duplicate id is named before anything runs."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[tenants]]\nid = "5a0c2f7e-0d7b-4a38-9f0e-3c1c2f0b1a01"\nname = "t"\ncolour = "red"\n'
    )
    assert f"{bad}: tenants.0.colour: Extra inputs are not permitted" in admin.fail(f"seed {bad}")
    bad.write_text(
        '[[schemas]]\nid = "5a0c2f7e-0d7b-4a38-9f0e-3c1c2f0b1a02"\ntenant = "t"\nname = "s"\nfile = "missing.json"\n'
    )
    assert "schemas[0] (s):" in admin.fail(f"seed {bad}")
    assert "missing.json: file not found" in admin.fail(f"seed {bad}")
    ident = "5a0c2f7e-0d7b-4a38-9f0e-3c1c2f0b1a03"
    bad.write_text(
        f'[[tenants]]\nid = "{ident}"\nname = "t"\n[[gateways]]\nid = "{ident}"\ntenant = "t"\nname = "g"\n'
    )
    assert f"id {ident} is given to two entries" in admin.fail(f"seed {bad}")
    assert "give either a seed FILE or --demo" in admin.fail("seed")


def test_seed_moves_and_disables_devices(admin: Admin, tmp_path: Path) -> None:
    """A device moved to the other gateway or disabled in the file is updated in place."""
    seed = _copy_demo(tmp_path)
    admin.run(f"seed {seed}")
    text = seed.read_text()
    moved = text.replace(
        'name = "env-north-lab"\ntype = "environmental"\ngateway = "demo-gateway-north"',
        'name = "env-north-lab"\ntype = "environmental"\ngateway = "demo-gateway-south"',
    ).replace(
        'name = "vib-south-pump"\ntype = "vibration"\ngateway = "demo-gateway-south"\n',
        'name = "vib-south-pump"\ntype = "vibration"\ngateway = "demo-gateway-south"\nenabled = false\n',
    )
    assert moved != text
    seed.write_text(moved)
    report = admin.data(f"seed {seed}")
    assert {"created": 0, "updated": 2, "unchanged": 18} == report["devices"]
    lab = admin.data("devices show env-north-lab")
    pump = admin.data("devices show vib-south-pump")
    assert ("demo-gateway-south", False) == (lab["gateway"], pump["enabled"])
    assert 20 == admin.scalar("SELECT count(*) FROM devices")


def test_config_option_names_the_database(admin: Admin) -> None:
    """--config works like $SENSORMINE_COLLECTOR_CONFIG; a missing file is named."""
    result = CliRunner().invoke(
        main,
        ["seed", "--demo", "--config", str(admin.config)],
        env={"SENSORMINE_COLLECTOR_CONFIG": None},
    )
    assert 0 == result.exit_code, result.output
    assert 1 == admin.scalar("SELECT count(*) FROM tenants")
    missing = admin.workdir / "nope.toml"
    result = CliRunner().invoke(
        main,
        ["tenants", "list", "--config", str(missing)],
        env={"SENSORMINE_COLLECTOR_CONFIG": None},
    )
    assert 1 == result.exit_code
    assert f"{missing}: configuration file not found" in result.output
