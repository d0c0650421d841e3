"""The ``doctor`` report as lines for a terminal."""

from __future__ import annotations

from typing import Any

from collector.alerts.report import render as render_alerts
from collector.clock_skew import describe


def _retention(r: dict[str, Any]) -> list[str]:
    state = "on" if r["enabled"] else "off"
    out = [
        f"retention ({state}): {r['mode']}, every {r['interval']}, last run {r['last_run'] or 'never'}"
    ]
    for name, t in r["tables"].items():
        age, data_age = t["oldest_chunk_age_days"], t.get("oldest_data_age_days")
        if age is None:
            oldest = "no chunks"
        elif data_age is not None:
            oldest = f"oldest data {data_age} days (its chunk starts {age} days back)"
        else:
            oldest = f"oldest chunk starts {age} days back"
        live = t["live"] or "not yet applied"
        native = t.get("native_policy")
        policy = f", native policy drop_after {native.get('drop_after')}" if native else ""
        out.append(f"  {name:<24} keep {t['configured']:<6} (live: {live}) {oldest}{policy}")
    return out


def _compression(c: dict[str, Any]) -> list[str]:
    if "tables" not in c:
        return [f"compression: {c['status']}"]
    out = [f"compression: {c['status']}, every {c['interval']}"]
    for name, t in c["tables"].items():
        ratio = f", {t['ratio']}:1" if t["ratio"] else ""
        live = t["live_after"] or "not yet applied"
        out.append(
            f"  {name:<24} after {t['configured_after']:<6} (live: {live}) "
            f"{t['compressed_chunks']} chunks compressed{ratio}, {t['overdue_chunks']} overdue; "
            f"segment by {c['segment_by'][name]}"
        )
    return out


def render(report: dict[str, Any]) -> str:
    """The report as lines for a terminal."""
    out: list[str] = []
    ts = report.get("timescaledb")
    if ts:
        out.append(f"TimescaleDB {ts['version']}, license {ts['license']}: {ts['edition']}")
    for kind, db in report.get("databases", {}).items():
        state = "reachable" if db.get("reachable") else f"UNREACHABLE ({db.get('error')})"
        pending = db.get("pending_migrations")
        extra = f", pending migrations: {', '.join(pending)}" if pending else ""
        out.append(f"{kind} database: {state}{extra}")
    if "hypertables" in report:
        out.append("hypertables:")
        for name, t in report["hypertables"].items():
            ratio = f", compression {t['compression_ratio']}:1" if t["compression_ratio"] else ""
            compressed = f" ({t['compressed_chunks']} compressed)" if t["compressed_chunks"] else ""
            out.append(
                f"  {name:<24} {t['chunks']:>5} chunks{compressed}, {t['size_bytes'] / 1048576:.1f} MiB{ratio}"
            )
    if report.get("layout_move"):
        out.append(f"storage: {report['layout_move']}")
    if "retention" in report:
        out.extend(_retention(report["retention"]))
    if "compression" in report:
        out.extend(_compression(report["compression"]))
    if "rollups" in report:
        r = report["rollups"]
        age = r["oldest_dirty_seconds"]
        out.append(
            f"rollups ({'on' if r['enabled'] else 'off'}): periods {', '.join(r['periods'])}, lag {r['lag']}; "
            f"{r['dirty_ranges']} dirty ranges waiting"
            + (f", oldest {age} s" if age is not None else "")
            + (" (waiting for the layout move)" if r.get("waiting_for_layout_move") else "")
        )
    if "jobs" in report:
        out.append("jobs:")
        for name, j in report["jobs"].items():
            if j["last_result"] == "never":
                out.append(f"  {name:<12} every {j['interval']:<5} never ran")
                continue
            out.append(
                f"  {name:<12} every {j['interval']:<5} last {j['last_result']} at {j['last_finished']} "
                f"by {j['last_runner']} ({j['runs']} runs)"
            )
    if report.get("timescaledb_jobs"):
        out.append("timescaledb jobs:")
        for name, j in report["timescaledb_jobs"].items():
            status = j["last_run_status"] or "never ran"
            err = f": {j['last_error']}" if j["last_error"] else ""
            out.append(
                f"  {name:<40} every {j['schedule_interval']:<5} {status} "
                f"({j['total_failures']}/{j['total_runs']} failed){err}"
            )
    if "ingest" in report:
        i = report["ingest"]
        since = i["seconds_since_last_batch"]
        last = f"{i['last_batch_at']} ({since} s ago)" if since is not None else "none yet"
        lag = (
            f"lag p50 {i['lag_p50_seconds']} s, max {i['lag_max_seconds']} s over {i['batches_last_15m']} batches in 15 min"
            if i["batches_last_15m"]
            else "no batches in the last 15 min"
        )
        out.append(f"ingest: last batch {last}; {lag}")
    if "clocks" in report:
        c = report["clocks"]
        out.append(
            f"gateway clocks: {len(c['skewed'])} beyond {c['tolerance_s']:g} s in the last 15 min"
        )
        out.extend(f"  {describe(g)}" for g in c["skewed"])
    if "ledger" in report:
        led = report["ledger"]
        out.append(
            f"ledger: {led['rows']} rows, {led['size_bytes'] / 1048576:.1f} MiB, horizon {led['horizon']}"
            + (
                f", oldest {led['oldest_row_age_days']} days"
                if led["oldest_row_age_days"] is not None
                else ""
            )
        )
    if "rejects_24h" in report:
        rejects = report["rejects_24h"]
        out.append("rejects in the last 24 h:" + ("" if rejects else " none"))
        for reason, r in rejects.items():
            out.append(f"  {reason:<26} {r['messages']} messages, {r['points']} readings")
    if "quarantine" in report:
        held = report["quarantine"]["by_reason"]
        out.append(
            "quarantine (sensormine-collector quarantine list):" + ("" if held else " empty")
        )
        for reason, r in held.items():
            out.append(
                f"  {reason:<26} {r['rows']} rows, {r['points']} readings, oldest {r['oldest_days']} days"
            )
    if "alerts" in report:
        out.extend(render_alerts({**report["alerts"], "problems": []}))
    b = report.get("broker")
    if b:
        if not b["reachable"]:
            state = f"UNREACHABLE ({b['detail']})"
        elif not b.get("authorized", True):
            state = f"reachable, LOGIN REFUSED ({b['detail']})"
        else:
            state = "reachable"
        out.append(f"broker {b['host']}:{b['port']}: {state}")
    for note in report["notes"]:
        out.append(f"note: {note}")
    if report["problems"]:
        out.append(f"NEEDS ATTENTION ({len(report['problems'])}):")
        out.extend(f"  - {p}" for p in report["problems"])
    else:
        out.append("all good")
    return "\n".join(out)
