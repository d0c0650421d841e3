"""What ``status`` and ``doctor`` say about alerts: open alerts, recent transitions, rules that
reference unknown metrics, rules never evaluated, transitions waiting to be published."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

# A rule this old that has never seen a reading is worth an operator's look.
NEVER_EVALUATED_AFTER = 3600.0
# Transitions older than this still in the outbox mean publishing is stuck.
OUTBOX_STUCK_AFTER = 60.0

_RULES_SQL = """
SELECT r.id, r.name, r.tenant_id, r.metric, r.enabled, r.device_id, r.device_type_id,
       r.no_data_for IS NOT NULL AS no_data,
       extract(epoch FROM now() - r.created_at) AS age,
       t.name AS tenant
FROM alert_rules r JOIN tenants t ON t.id = r.tenant_id
ORDER BY t.name, r.name
"""

# The metrics each rule may see: its device's type, its device type, or every type of its
# tenant; NULL where a type has no schema or its schema allows any property.
_METRICS_SQL = """
SELECT r.id AS rule_id, dt.id AS type_id,
       (SELECT v.json_schema FROM schema_versions v WHERE v.schema_id = dt.schema_id
        ORDER BY v.version DESC LIMIT 1)::text AS doc
FROM alert_rules r
JOIN device_types dt ON dt.tenant_id = r.tenant_id
  AND (r.device_type_id IS NULL OR dt.id = r.device_type_id)
  AND (r.device_id IS NULL OR dt.id = (SELECT device_type_id FROM devices WHERE id = r.device_id))
WHERE r.enabled
"""


def _known(doc: str | None) -> set[str] | None:
    """The metrics a schema admits, or ``None`` when it admits any."""
    if doc is None:
        return None
    schema = json.loads(doc)
    if schema.get("additionalProperties", True) is not False:
        return None
    return set(schema.get("properties", {}))


async def alert_report(meta: asyncpg.Connection, ts: asyncpg.Connection) -> dict[str, Any]:
    """The alert section of ``status --json`` and ``doctor --json``; ``problems`` for doctor."""
    rules = await meta.fetch(_RULES_SQL)
    scopes = await meta.fetch(_METRICS_SQL)
    devices = {r["id"]: r["name"] for r in await meta.fetch("SELECT id, name FROM devices")}
    seen = {
        r["rule_id"]: (int(r["evaluated"]), int(r["skipped"]))
        for r in await ts.fetch(
            "SELECT rule_id, sum(evaluated) AS evaluated, sum(skipped) AS skipped"
            " FROM alert_state GROUP BY rule_id"
        )
    }
    open_rows = await ts.fetch(
        "SELECT id, rule_id, rule_name, device_id, metric, severity, raised_at, raised_value,"
        " raised_late FROM alerts WHERE cleared_at IS NULL ORDER BY raised_at DESC"
    )
    day = await ts.fetchrow(
        "SELECT count(*) FILTER (WHERE kind = 'alert.raised') AS raised,"
        " count(*) FILTER (WHERE kind = 'alert.cleared') AS cleared FROM events"
        " WHERE kind IN ('alert.raised', 'alert.cleared') AND time > now() - interval '1 day'"
    )
    outbox = await ts.fetchrow(
        "SELECT count(*) AS n, extract(epoch FROM now() - min(created_at)) AS oldest"
        " FROM alert_outbox"
    )
    known: dict[uuid.UUID, set[str] | None] = {}
    for s in scopes:
        metrics = _known(s["doc"])
        if s["rule_id"] in known and known[s["rule_id"]] is None:
            continue
        if metrics is None:
            known[s["rule_id"]] = None
        else:
            known[s["rule_id"]] = (known.get(s["rule_id"]) or set()) | metrics
    problems: list[str] = []
    listed: list[dict[str, Any]] = []
    for r in rules:
        evaluated, skipped = seen.get(r["id"], (0, 0))
        label = f"{r['tenant']}/{r['name']}"
        entry = {
            "id": str(r["id"]),
            "name": r["name"],
            "tenant": r["tenant"],
            "metric": r["metric"],
            "enabled": r["enabled"],
            "no_data": r["no_data"],
            "evaluated": evaluated,
            "skipped": skipped,
            "unknown_metric": False,
        }
        listed.append(entry)
        if not r["enabled"]:
            continue
        metrics = known.get(r["id"], set())
        if metrics is not None and r["metric"] not in metrics:
            entry["unknown_metric"] = True
            problems.append(
                f"alert rule {label}: metric {r['metric']!r} is not a metric of any device type"
                " in its scope (the schemas do not admit it): it can never fire"
            )
        elif evaluated == 0 and float(r["age"]) > NEVER_EVALUATED_AFTER:
            problems.append(
                f"alert rule {label}: never evaluated in {float(r['age']) / 3600:.0f} h: no"
                f" device in its scope has sent {r['metric']!r}"
            )
        if skipped:
            problems.append(
                f"alert rule {label}: {skipped} out-of-order readings could not be evaluated"
                " (they would have changed published transitions; docs/alerts.md)"
            )
    oldest = float(outbox["oldest"]) if outbox["oldest"] is not None else None
    if oldest is not None and oldest > OUTBOX_STUCK_AFTER:
        problems.append(
            f"alerts: {outbox['n']} transitions waiting {oldest:.0f} s to be published: is a"
            " collector running and may it write {prefix}/v1/+/alerts (broker ACL)?"
        )
    return {
        "rules": listed,
        "open": [
            {
                "id": a["id"],
                "rule": a["rule_name"],
                "device": devices.get(a["device_id"]) or str(a["device_id"]),
                "device_id": str(a["device_id"]),
                "metric": a["metric"],
                "severity": a["severity"],
                "since": _iso(a["raised_at"]),
                "value": a["raised_value"],
                "late": a["raised_late"],
            }
            for a in open_rows
        ],
        "last_day": {"raised": int(day["raised"]), "cleared": int(day["cleared"])},
        "unpublished": int(outbox["n"]),
        "problems": problems,
    }


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def render(report: dict[str, Any]) -> list[str]:
    """The alert section as terminal lines."""
    enabled = [r for r in report["rules"] if r["enabled"]]
    day = report["last_day"]
    out = [
        f"alerts: {len(report['open'])} open; {len(enabled)} rules enabled"
        f" ({len(report['rules']) - len(enabled)} disabled); last 24 h raised {day['raised']},"
        f" cleared {day['cleared']}"
        + (f"; {report['unpublished']} waiting to be published" if report["unpublished"] else "")
    ]
    for a in report["open"][:20]:
        late = " (late)" if a["late"] else ""
        out.append(
            f"  {a['severity']:<8} {a['rule']}: {a['device']} {a['metric']}"
            f" = {a['value']} since {a['since']}{late}"
        )
    if len(report["open"]) > 20:
        out.append(f"  … and {len(report['open']) - 20} more (status --json)")
    return out
