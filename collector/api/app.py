"""The API's routes: fleet, gateways, devices, series, events, status history, quarantine, rejects.

Every route under ``/api/v1`` needs ``Authorization: Bearer <token>``; the token's tenant is the
only one it reads: an id of another tenant is answered exactly like an id that does not exist.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator

from collector import __version__
from collector.api import models, reads
from collector.api import tokens as token_store
from collector.api.databases import Cluster, Source, build_cluster
from collector.api.directory import Directory, TenantDirectory
from collector.api.problems import COMMON_RESPONSES, ApiProblem, install
from collector.settings import Settings

PAGE_DIR = Path(str(files("collector.api") / "page"))


def plotly_js() -> Path:
    """plotly.min.js as the installed ``plotly`` distribution ships it (no network needed)."""
    spec = importlib.util.find_spec("plotly")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the plotly package is not installed (pip install 'sensormine[collector]')"
        )
    path = Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the plotly package has no plotly.min.js")
    return path


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    if isinstance(o, uuid.UUID):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON")


class Answer(JSONResponse):
    """JSON of plain dicts, built to match the route's response model (not validated again)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, default=_default, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode()


@dataclass
class State:
    settings: Settings
    metadata: Cluster
    timeseries: Cluster
    directory: Directory


@dataclass
class Context:
    """One request's caller and its tenant's names."""

    state: State
    tenant_id: uuid.UUID
    dir: TenantDirectory


_bearer = HTTPBearer(
    auto_error=False, description="A token of `sensormine-collector tokens create`"
)


async def _context(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Context:
    state: State = request.app.state.api
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiProblem(
            401,
            "unauthorized",
            "send a token as 'Authorization: Bearer <token>' (sensormine-collector tokens create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Checked against the primary at every request: a revoked token is refused at once.
    async with state.metadata.connection(primary=True) as (conn, _):
        caller = await _authenticate(conn, credentials.credentials)
    if caller is None:
        raise ApiProblem(
            401,
            "unauthorized",
            "the token is unknown, revoked or expired",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return Context(state, caller.tenant_id, await state.directory.tenant(caller.tenant_id))


async def _authenticate(conn: asyncpg.Connection, token: str) -> token_store.Caller | None:
    try:
        return await token_store.authenticate(conn, token)
    except asyncpg.UndefinedTableError:
        raise ApiProblem(
            503,
            "database_not_migrated",
            "the metadata database has no api_tokens table: run `sensormine-collector migrate`",
        ) from None


Ctx = Annotated[Context, Depends(_context)]

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("not an RFC 3339 time with its offset, e.g. 2026-12-07T05:30:00Z")
    return value


Time = Annotated[datetime, BeforeValidator(_rfc3339)]
Start = Annotated[
    Time | None,
    Query(description="Start of the range, RFC 3339 (default: end minus the default span)"),
]
End = Annotated[Time | None, Query(description="End of the range, RFC 3339 (default: now)")]


GatewayId = Annotated[uuid.UUID, PathParam(description="The gateway's id")]
DeviceId = Annotated[uuid.UUID, PathParam(description="The device's id")]
Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many, newest first")]


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def time_range(
    ctx: Context, start: datetime | None, end: datetime | None, default_span: timedelta
) -> tuple[datetime, datetime]:
    """The range asked for, checked: start before end, no longer than ``api.max_range``."""
    try:
        stop = _aware(end) if end is not None else datetime.now(UTC)
        begin = _aware(start) if start is not None else stop - default_span
    except OverflowError:
        raise ApiProblem(400, "invalid_range", "the range falls outside the calendar") from None
    if begin >= stop:
        raise ApiProblem(
            400,
            "invalid_range",
            f"start ({begin.isoformat()}) must be before end ({stop.isoformat()})",
        )
    longest = ctx.state.settings.api.max_range
    if (stop - begin).total_seconds() > longest:
        raise ApiProblem(
            400,
            "range_too_large",
            f"the range is {(stop - begin).total_seconds() / 86400:.1f} days; at most"
            f" {longest / 86400:g} days may be asked at once (api.max_range)",
        )
    return begin, stop


def _gateway(ctx: Context, gateway_id: uuid.UUID) -> None:
    if gateway_id not in ctx.dir.gateways:
        raise ApiProblem(404, "unknown_gateway", f"no gateway {gateway_id} in this tenant")


def _device(ctx: Context, device_id: uuid.UUID) -> None:
    if device_id not in ctx.dir.devices:
        raise ApiProblem(404, "unknown_device", f"no device {device_id} in this tenant")


def _status(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"status": row["status"], "since": row["since"] or row["time"], "reason": row["reason"]}


def _gateway_answer(
    ctx: Context, gid: uuid.UUID, facts: reads.GatewayFacts, device_counts: dict[uuid.UUID, int]
) -> dict[str, Any]:
    g = ctx.dir.gateways[gid]
    st = facts.status.get(gid)
    batch = facts.batch.get(gid)
    backlog = facts.backlog.get(gid)
    lag = None
    if batch is not None and batch["created"] is not None:
        lag = round((batch["received_at"] - batch["created"]).total_seconds(), 3)
    return {
        "id": str(gid),
        "name": g.name,
        "description": g.description,
        "enabled": g.enabled,
        "status": _status(st),
        "last_batch": None
        if batch is None
        else {
            "received_at": batch["received_at"],
            "created": batch["created"],
            "result": batch["result"],
            "stream": str(batch["stream"]),
            "seq": int(batch["seq"]),
        },
        "ingest_lag_s": lag,
        "clock_skew_s": facts.skew.get(gid),
        "backlog": None if backlog is None else reads.backlog_of(backlog),
        "devices": device_counts.get(gid, 0),
    }


def _value(kind: str, value: float | None, text: str | None) -> float | str | None:
    if kind == "text" or text is not None:
        return text
    return reads.num(value)


def create_app(settings: Settings, *, page: bool = True) -> FastAPI:
    """The API (and the status page, unless ``page`` is false) for ``settings``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from collector.service import db_kwargs

        metadata = build_cluster(settings, "metadata")
        timeseries = build_cluster(settings, "timeseries")
        directory = Directory(metadata, db_kwargs(settings, "metadata"))
        await directory.start()
        app.state.api = State(settings, metadata, timeseries, directory)
        try:
            yield
        finally:
            await directory.close()
            await metadata.close()
            await timeseries.close()

    app = FastAPI(
        title="Sensormine Edge query API",
        version=__version__,
        description="The fleet, its devices' readings, events, status history, quarantine and"
        " rejects, one tenant per token. Errors are RFC 9457 problem details with a stable"
        " `code`. See docs/api.md.",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=Answer,
    )
    install(app)
    api = _routes(settings)
    app.include_router(api)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_media_types(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz", response_model=models.Health, tags=["service"])
    async def healthz() -> Answer:
        """Liveness: the process answers (no database is asked)."""
        return Answer({"status": "ok"})

    if page:
        js = plotly_js()

        @app.get("/", include_in_schema=False)
        async def root() -> Response:
            return RedirectResponse("/ui/")

        @app.get("/ui/vendor/plotly.min.js", include_in_schema=False)
        async def plotly() -> Response:
            return FileResponse(
                js,
                media_type="text/javascript",
                headers={"Cache-Control": "public, max-age=86400"},
            )

        app.mount("/ui", StaticFiles(directory=PAGE_DIR, html=True), name="ui")
    return app


def problem_media_types(schema: dict[str, Any]) -> dict[str, Any]:
    """Errors are ``application/problem+json`` (schema Problem), also for FastAPI's own 422."""
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if code[:1] in ("4", "5"):
                    response["content"] = {"application/problem+json": problem}
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def _routes(settings: Settings) -> Any:
    from fastapi import APIRouter

    router = APIRouter(prefix="/api/v1", responses=COMMON_RESPONSES)
    max_points_default = min(2000, settings.api.max_points)

    async def ts(ctx: Context, work: Callable[[asyncpg.Connection], Any]) -> tuple[Any, Source]:
        return await ctx.state.timeseries.run(work)

    @router.get("/fleet", response_model=models.Fleet, tags=["fleet"])
    async def fleet(ctx: Ctx) -> Answer:
        """Every gateway of the tenant: status and since when, last batch, ingest lag, clock
        skew, buffer backlog and drain estimate; and the tenant's devices counted by status."""
        gateways = sorted(ctx.dir.gateways, key=lambda g: ctx.dir.gateways[g].name)
        devices = ctx.dir.device_ids

        async def work(conn: asyncpg.Connection) -> Any:
            facts = await reads.gateway_facts(conn, ctx.tenant_id, gateways)
            statuses = await reads.device_status(conn, ctx.tenant_id, devices)
            return facts, statuses

        (facts, statuses), source = await ts(ctx, work)
        per_gateway: dict[uuid.UUID, int] = {}
        for d in ctx.dir.devices.values():
            if d.gateway_id is not None:
                per_gateway[d.gateway_id] = per_gateway.get(d.gateway_id, 0) + 1
        counts: dict[str, int] = {}
        for did in devices:
            st = statuses.get(did)
            key = st["status"] if st is not None else "unknown"
            counts[key] = counts.get(key, 0) + 1
        return Answer(
            {
                "tenant": {"id": str(ctx.tenant_id), "name": ctx.dir.name},
                "generated_at": datetime.now(UTC),
                "source": source.as_dict(),
                "devices": counts,
                "gateways": [_gateway_answer(ctx, g, facts, per_gateway) for g in gateways],
            }
        )

    @router.get("/gateways/{gateway_id}", response_model=models.Gateway, tags=["fleet"])
    async def gateway(ctx: Ctx, gateway_id: GatewayId) -> Answer:
        """One gateway, as in the fleet answer."""
        _gateway(ctx, gateway_id)
        facts, _ = await ts(ctx, lambda c: reads.gateway_facts(c, ctx.tenant_id, [gateway_id]))
        n = sum(1 for d in ctx.dir.devices.values() if d.gateway_id == gateway_id)
        return Answer(_gateway_answer(ctx, gateway_id, facts, {gateway_id: n}))

    @router.get(
        "/gateways/{gateway_id}/backlog", response_model=models.BacklogHistory, tags=["fleet"]
    )
    async def gateway_backlog(
        ctx: Ctx,
        gateway_id: GatewayId,
        start: Start = None,
        end: End = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 5000,
    ) -> Answer:
        """The gateway's buffer backlog over time, from the agent's ``backlog.*`` events (default
        range: the last 24 hours)."""
        _gateway(ctx, gateway_id)
        begin, stop = time_range(ctx, start, end, timedelta(days=1))
        rows, source = await ts(
            ctx,
            lambda c: reads.backlog_history(c, ctx.tenant_id, gateway_id, begin, stop, limit),
        )
        points = []
        for r in rows:
            b = reads.backlog_of(r)
            points.append(
                {
                    "time": r["time"],
                    "kind": r["kind"],
                    "buffered_readings": b["buffered_readings"],
                    "estimate_s": b["estimate_s"],
                    "ack_rate": b["ack_rate"],
                    "production_rate": b["production_rate"],
                }
            )
        return Answer(
            {
                "gateway": ctx.dir.ref("gateway", gateway_id),
                "start": begin,
                "end": stop,
                "source": source.as_dict(),
                "points": points,
            }
        )

    @router.get(
        "/gateways/{gateway_id}/ingest-lag", response_model=models.LagHistory, tags=["fleet"]
    )
    async def gateway_lag(
        ctx: Ctx,
        gateway_id: GatewayId,
        start: Start = None,
        end: End = None,
        max_points: Annotated[int, Query(ge=2, le=100_000)] = 500,
    ) -> Answer:
        """Seconds from sealing a batch on the gateway to storing it, averaged and at most, per
        time bucket (the bucket width fits ``max_points`` into the range; default: 24 hours)."""
        _gateway(ctx, gateway_id)
        _check_points(settings, max_points)
        begin, stop = time_range(ctx, start, end, timedelta(days=1))
        width = max(1.0, math.ceil((stop - begin).total_seconds() / max_points))
        bucket = timedelta(seconds=width)
        rows, source = await ts(
            ctx, lambda c: reads.lag_history(c, ctx.tenant_id, gateway_id, begin, stop, bucket)
        )
        return Answer(
            {
                "gateway": ctx.dir.ref("gateway", gateway_id),
                "start": begin,
                "end": stop,
                "bucket_s": width,
                "source": source.as_dict(),
                "points": [
                    {
                        "time": r["time"],
                        "batches": int(r["batches"]),
                        "lag_avg_s": reads.num(r["lag_avg"]),
                        "lag_max_s": reads.num(r["lag_max"]),
                    }
                    for r in rows
                ],
            }
        )

    @router.get(
        "/gateways/{gateway_id}/status-history",
        response_model=models.StatusHistory,
        tags=["fleet"],
    )
    async def gateway_history(
        ctx: Ctx, gateway_id: GatewayId, start: Start = None, end: End = None, limit: Limit = 100
    ) -> Answer:
        """The gateway's own status changes (online, offline), newest first (default: 7 days)."""
        _gateway(ctx, gateway_id)
        begin, stop = time_range(ctx, start, end, timedelta(days=7))
        rows, source = await ts(
            ctx,
            lambda c: reads.status_history(c, ctx.tenant_id, gateway_id, None, begin, stop, limit),
        )
        return Answer(_history(ctx.dir.ref("gateway", gateway_id), begin, stop, source, rows))

    @router.get("/devices", response_model=models.Devices, tags=["devices"])
    async def devices(
        ctx: Ctx,
        gateway_id: Annotated[uuid.UUID | None, Query(description="Only this gateway's")] = None,
        limit: Annotated[
            int | None, Query(ge=1, description="At most (default api.max_devices)")
        ] = None,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> Answer:
        """The tenant's devices by name: type, gateway, current status and since when, and the
        latest value of every metric."""
        most = settings.api.max_devices
        if limit is not None and limit > most:
            raise ApiProblem(
                400,
                "limit_too_large",
                f"limit: at most {most} devices per answer (api.max_devices)",
            )
        if gateway_id is not None:
            _gateway(ctx, gateway_id)
            ids = [i for i in ctx.dir.device_ids if ctx.dir.devices[i].gateway_id == gateway_id]
        else:
            ids = ctx.dir.device_ids
        total = len(ids)
        page = ids[offset : offset + (limit or most)]
        whole = len(page) == len(ctx.dir.device_ids)

        async def work(conn: asyncpg.Connection) -> Any:
            latest = await reads.latest_values(conn, ctx.tenant_id, None if whole else page)
            statuses = await reads.device_status(conn, ctx.tenant_id, page)
            return latest, statuses

        (latest, statuses), source = await ts(ctx, work)
        return Answer(
            {
                "tenant": {"id": str(ctx.tenant_id), "name": ctx.dir.name},
                "generated_at": datetime.now(UTC),
                "source": source.as_dict(),
                "total": total,
                "offset": offset,
                "devices": _device_answers(ctx, page, latest, statuses),
            }
        )

    @router.get("/latest", response_model=models.Latest, tags=["devices"])
    async def latest(
        ctx: Ctx,
        gateway_id: Annotated[uuid.UUID | None, Query(description="Only this gateway's")] = None,
    ) -> Response:
        """The latest value of every metric of every device that has sent one (or of one
        gateway's), by device name: the compact read for dashboards and exports."""
        ids: list[uuid.UUID] | None = None
        if gateway_id is not None:
            _gateway(ctx, gateway_id)
            ids = [i for i in ctx.dir.device_ids if ctx.dir.devices[i].gateway_id == gateway_id]
        devices, source = await ts(
            ctx,
            lambda c: reads.latest_document(
                c, ctx.tenant_id, ids, ctx.dir.device_ids, ctx.dir.device_names
            ),
        )
        head = Answer(
            {
                "tenant": {"id": str(ctx.tenant_id), "name": ctx.dir.name},
                "generated_at": datetime.now(UTC),
                "source": source.as_dict(),
            }
        ).body
        # The devices array comes as JSON text from the database: spliced, not re-encoded.
        body = bytes(head)[:-1] + b',"devices":' + devices.encode() + b"}"
        return Response(body, media_type="application/json")

    @router.get("/devices/{device_id}", response_model=models.Device, tags=["devices"])
    async def device(ctx: Ctx, device_id: DeviceId) -> Answer:
        """One device, as in the devices answer."""
        _device(ctx, device_id)

        async def work(conn: asyncpg.Connection) -> Any:
            latest = await reads.latest_values(conn, ctx.tenant_id, [device_id])
            statuses = await reads.device_status(conn, ctx.tenant_id, [device_id])
            return latest, statuses

        (latest, statuses), _ = await ts(ctx, work)
        return Answer(_device_answers(ctx, [device_id], latest, statuses)[0])

    @router.get("/devices/{device_id}/series", response_model=models.SeriesAnswer, tags=["devices"])
    async def series(
        ctx: Ctx,
        device_id: DeviceId,
        metric: Annotated[str, Query(min_length=1, max_length=200, description="The metric")],
        start: Start = None,
        end: End = None,
        resolution: Annotated[
            Literal["auto", "raw", "1m", "1h"],
            Query(description="auto: raw when it fits max_points, else 1-minute, else 1-hour"),
        ] = "auto",
        max_points: Annotated[
            int | None,
            Query(ge=2, description="Most points (default 2000, at most api.max_points)"),
        ] = None,
    ) -> Answer:
        """One device's metric over a range (default: the last 24 hours): raw readings or
        rollup buckets (average, min, max, count); a null value marks a gap."""
        _device(ctx, device_id)
        points_cap = max_points if max_points is not None else max_points_default
        _check_points(settings, points_cap)
        begin, stop = time_range(ctx, start, end, timedelta(days=1))
        span = (stop - begin).total_seconds()

        async def work(conn: asyncpg.Connection) -> Any:
            info = await reads.find_series(conn, ctx.tenant_id, device_id, metric)
            if info is None:
                known = await reads.device_metrics(conn, ctx.tenant_id, device_id)
                raise ApiProblem(
                    404,
                    "unknown_metric",
                    f"device {ctx.dir.device_name(device_id)!r} has no metric {metric!r}"
                    f" (it has: {', '.join(known) or 'none yet'})",
                )
            return info, await _series_points(conn, info, begin, stop, span, resolution, points_cap)

        (info, (chosen_res, cols, gaps)), source = await ts(ctx, work)
        return Answer(
            {
                "device": ctx.dir.ref("device", device_id),
                "metric": metric,
                "kind": info.kind,
                "start": begin,
                "end": stop,
                "resolution": chosen_res,
                "chosen": "auto" if resolution == "auto" else "requested",
                "max_points": points_cap,
                "gaps": gaps,
                "source": source.as_dict(),
                "points": cols,
            }
        )

    @router.get(
        "/devices/{device_id}/status-history",
        response_model=models.StatusHistory,
        tags=["devices"],
    )
    async def device_history(
        ctx: Ctx, device_id: DeviceId, start: Start = None, end: End = None, limit: Limit = 100
    ) -> Answer:
        """The device's status changes (online, error, offline), newest first (default: 7 days)."""
        _device(ctx, device_id)
        begin, stop = time_range(ctx, start, end, timedelta(days=7))
        rows, source = await ts(
            ctx,
            lambda c: reads.status_history(c, ctx.tenant_id, None, device_id, begin, stop, limit),
        )
        return Answer(_history(ctx.dir.ref("device", device_id), begin, stop, source, rows))

    @router.get("/events", response_model=models.Events, tags=["events"])
    async def events(
        ctx: Ctx,
        start: Start = None,
        end: End = None,
        gateway_id: Annotated[uuid.UUID | None, Query()] = None,
        device_id: Annotated[uuid.UUID | None, Query()] = None,
        kind: Annotated[
            str | None,
            Query(min_length=1, max_length=64, description="A kind, or a prefix ending in '.'"),
        ] = None,
        severity: Annotated[
            Literal["debug", "info", "warning", "error", "critical"] | None, Query()
        ] = None,
        limit: Limit = 100,
    ) -> Answer:
        """Events of the tenant's gateways and devices, newest first (default: 24 hours)."""
        if gateway_id is not None:
            _gateway(ctx, gateway_id)
        if device_id is not None:
            _device(ctx, device_id)
        begin, stop = time_range(ctx, start, end, timedelta(days=1))
        rows, source = await ts(
            ctx,
            lambda c: reads.events(
                c, ctx.tenant_id, begin, stop, limit, gateway_id, device_id, kind, severity
            ),
        )
        return Answer(
            {
                "start": begin,
                "end": stop,
                "source": source.as_dict(),
                "events": [
                    {
                        "time": r["time"],
                        "gateway": ctx.dir.ref("gateway", r["gateway_id"]),
                        "device": ctx.dir.ref("device", r["device_id"]),
                        "severity": r["severity"],
                        "kind": r["kind"],
                        "message": r["message"],
                        "attributes": r["attributes"] if isinstance(r["attributes"], dict) else {},
                    }
                    for r in rows
                ],
            }
        )

    @router.get("/alerts", response_model=models.Alerts, tags=["events"])
    async def alerts(
        ctx: Ctx,
        start: Start = None,
        end: End = None,
        open_only: Annotated[
            bool, Query(alias="open", description="Every open alert, whenever it was raised")
        ] = False,
        gateway_id: Annotated[uuid.UUID | None, Query()] = None,
        device_id: Annotated[uuid.UUID | None, Query()] = None,
        severity: Annotated[Literal["info", "warning", "error", "critical"] | None, Query()] = None,
        limit: Limit = 100,
    ) -> Answer:
        """Alerts of the tenant's alert rules raised in the range (default: 7 days), or with
        ``open=true`` every alert still open; newest first."""
        if gateway_id is not None:
            _gateway(ctx, gateway_id)
        if device_id is not None:
            _device(ctx, device_id)
        begin, stop = time_range(ctx, start, end, timedelta(days=7))

        async def work(conn: asyncpg.Connection) -> Any:
            try:
                return await reads.alerts(
                    conn,
                    ctx.tenant_id,
                    begin,
                    stop,
                    limit,
                    open_only,
                    gateway_id,
                    device_id,
                    severity,
                )
            except asyncpg.UndefinedTableError:
                raise ApiProblem(
                    503,
                    "database_not_migrated",
                    "the time-series database has no alerts table: run `sensormine-collector migrate`",
                ) from None

        rows, source = await ts(ctx, work)
        return Answer(
            {
                "start": begin,
                "end": stop,
                "open_only": open_only,
                "source": source.as_dict(),
                "alerts": [
                    {
                        "id": int(r["id"]),
                        "rule": {"id": str(r["rule_id"]), "name": r["rule_name"]},
                        "gateway": ctx.dir.ref("gateway", r["gateway_id"]),
                        "device": ctx.dir.ref("device", r["device_id"]),
                        "metric": r["metric"],
                        "severity": r["severity"],
                        "condition": r["condition"],
                        "threshold": reads.num(r["threshold"]),
                        "raised_at": r["raised_at"],
                        "raised_value": reads.num(r["raised_value"]),
                        "cleared_at": r["cleared_at"],
                        "cleared_value": reads.num(r["cleared_value"]),
                        "clear_reason": r["clear_reason"],
                    }
                    for r in rows
                ],
            }
        )

    @router.get("/quarantine", response_model=models.Quarantine, tags=["ingest"])
    async def quarantine(ctx: Ctx) -> Answer:
        """What the tenant has in quarantine, per gateway and reason (replayed by `sensormine-
        collector quarantine replay`)."""
        rows, source = await ts(ctx, lambda c: reads.quarantine_groups(c, ctx.tenant_id))
        by_reason: dict[str, int] = {}
        for r in rows:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + int(r["readings"])
        return Answer(
            {
                "source": source.as_dict(),
                "by_reason": by_reason,
                "groups": [
                    {
                        "gateway": ctx.dir.ref("gateway", r["gateway_id"]),
                        "reason": r["reason"],
                        "rows": int(r["rows"]),
                        "readings": int(r["readings"]),
                        "bytes": int(r["bytes"]),
                        "first": r["first"],
                        "last": r["last"],
                    }
                    for r in rows
                ],
            }
        )

    @router.get("/rejects", response_model=models.Rejects, tags=["ingest"])
    async def rejects(ctx: Ctx, start: Start = None, end: End = None, limit: Limit = 50) -> Answer:
        """What was refused for good, by reason, and the latest refusals with a sample of their
        values (default: 24 hours)."""
        begin, stop = time_range(ctx, start, end, timedelta(days=1))

        async def work(conn: asyncpg.Connection) -> Any:
            return (
                await reads.reject_reasons(conn, ctx.tenant_id, begin, stop),
                await reads.recent_rejects(conn, ctx.tenant_id, begin, stop, limit),
            )

        (reasons, recent), source = await ts(ctx, work)
        return Answer(
            {
                "start": begin,
                "end": stop,
                "source": source.as_dict(),
                "by_reason": [
                    {
                        "reason": r["reason"],
                        "messages": int(r["messages"]),
                        "readings": int(r["readings"]),
                        "first": r["first"],
                        "last": r["last"],
                    }
                    for r in reasons
                ],
                "recent": [
                    {
                        "received_at": r["received_at"],
                        "reason": r["reason"],
                        "message": r["message"],
                        "gateway": ctx.dir.ref("gateway", r["gateway_id"]),
                        "device": ctx.dir.ref("device", r["device_id"]),
                        "metric": r["metric"],
                        "points": int(r["points"]),
                        "sample": r["sample"],
                    }
                    for r in recent
                ],
            }
        )

    return router


def _check_points(settings: Settings, n: int) -> None:
    if n > settings.api.max_points:
        raise ApiProblem(
            400,
            "too_many_points",
            f"max_points: at most {settings.api.max_points} on this server (api.max_points)",
        )


def _history(
    subject: dict[str, Any] | None, begin: datetime, stop: datetime, source: Source, rows: Any
) -> dict[str, Any]:
    return {
        "subject": subject,
        "start": begin,
        "end": stop,
        "source": source.as_dict(),
        "changes": [
            {"time": r["time"], "status": r["status"], "reason": r["reason"]} for r in rows
        ],
    }


def _device_answers(
    ctx: Context, ids: list[uuid.UUID], latest: list[Any], statuses: dict[uuid.UUID, Any]
) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    values: dict[uuid.UUID, dict[str, Any]] = {}
    seen: dict[uuid.UUID, datetime] = {}
    for r in latest:
        did = r["device_id"]
        t = r["time"]
        values.setdefault(did, {})[r["metric"]] = {
            "value": _value(r["kind"], r["value"], r["value_text"]),
            "time": t,
            "kind": r["kind"],
            "age_s": round((now - t).total_seconds(), 3),
        }
        if did not in seen or t > seen[did]:
            seen[did] = t
    out = []
    for did in ids:
        d = ctx.dir.devices[did]
        out.append(
            {
                "id": str(did),
                "name": d.name,
                "enabled": d.enabled,
                "type": {
                    "id": str(d.device_type_id),
                    "name": ctx.dir.device_types.get(d.device_type_id),
                },
                "gateway": ctx.dir.ref("gateway", d.gateway_id),
                "status": _status(statuses.get(did)),
                "last_seen": seen.get(did),
                "latest": values.get(did, {}),
            }
        )
    return out


async def _series_points(
    conn: asyncpg.Connection,
    info: reads.SeriesInfo,
    begin: datetime,
    stop: datetime,
    span: float,
    resolution: str,
    cap: int,
) -> tuple[str, dict[str, Any], int]:
    """(resolution, columns, gaps) for the range, the resolution chosen or checked."""
    if info.kind == "text" and resolution not in ("auto", "raw"):
        raise ApiProblem(
            400, "no_rollups", f"{resolution}: text metrics have no rollups; ask resolution=raw"
        )
    if resolution in ("auto", "raw"):
        if resolution == "raw" or info.kind == "text" or span / 60 <= cap:
            rows = await reads.raw_points(conn, info, begin, stop, cap)
            if rows is not None:
                return "raw", *_raw_columns(info, rows)
            if resolution == "raw" or info.kind == "text":
                raise ApiProblem(
                    400,
                    "too_many_points",
                    f"the range holds more than {cap} readings; narrow it, raise max_points or"
                    " ask resolution=1m",
                )
        resolution = "1m" if span / 60 <= cap else "1h"
        if span / 3600 > cap:
            raise ApiProblem(
                400,
                "too_many_points",
                f"{span / 3600:.0f} hourly buckets do not fit max_points={cap}; narrow the range",
            )
    period = reads.PERIODS[resolution]
    if span / period.total_seconds() > cap:
        raise ApiProblem(
            400,
            "too_many_points",
            f"{span / period.total_seconds():.0f} buckets of {resolution} do not fit"
            f" max_points={cap}; narrow the range or ask a coarser resolution",
        )
    buckets = await reads.rollup_points(conn, info, period, begin, stop)
    return resolution, *_rollup_columns(buckets, period)


def _raw_columns(info: reads.SeriesInfo, rows: list[Any]) -> tuple[dict[str, Any], int]:
    times = [r["time"] for r in rows]
    if info.kind == "text":
        vals: list[Any] = [r["value"] for r in rows]
    else:
        vals = [reads.num(r["value"]) for r in rows]
    # A gap: a pause longer than three times the usual interval between readings.
    steps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(times))
    gaps = 0
    if steps:
        usual = steps[len(steps) // 2]
        limit = max(3 * usual, 0.001)
        out_t: list[datetime] = [times[0]]
        out_v: list[Any] = [vals[0]]
        for i in range(1, len(times)):
            dt = (times[i] - times[i - 1]).total_seconds()
            if dt > limit:
                out_t.append(times[i - 1] + (times[i] - times[i - 1]) / 2)
                out_v.append(None)
                gaps += 1
            out_t.append(times[i])
            out_v.append(vals[i])
        times, vals = out_t, out_v
    return {"time": times, "value": vals}, gaps


def _rollup_columns(
    buckets: list[tuple[datetime, int, float | None, float | None, float | None]],
    period: timedelta,
) -> tuple[dict[str, Any], int]:
    t: list[datetime] = []
    v: list[float | None] = []
    lo: list[float | None] = []
    hi: list[float | None] = []
    n: list[int | None] = []
    gaps = 0
    prev: datetime | None = None
    for bucket, count, avg, mn, mx in buckets:
        if prev is not None and bucket - prev > period:
            t.append(prev + period)
            v.append(None)
            lo.append(None)
            hi.append(None)
            n.append(None)
            gaps += 1
        t.append(bucket)
        v.append(avg)
        lo.append(mn)
        hi.append(mx)
        n.append(count)
        prev = bucket
    return {"time": t, "value": v, "min": lo, "max": hi, "count": n}, gaps
