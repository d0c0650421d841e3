"""Errors as RFC 9457 problem details (``application/problem+json``) with a stable ``code``.

Every error the API gives has the same shape::

    {"type": "https://sensormine.dev/problems/unknown-device", "title": "Unknown device",
     "status": 404, "code": "unknown_device", "detail": "...", "instance": "/api/v1/..."}

``code`` is what programs match on; ``detail`` says what was wrong in words. A request
parameter that fails validation is ``invalid_parameter`` with ``errors`` naming each one.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_TYPE_BASE = "https://sensormine.dev/problems/"
MEDIA_TYPE = "application/problem+json"

log = structlog.get_logger("collector.api")


class Problem(BaseModel):
    """An RFC 9457 problem detail with the API's stable ``code``."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ApiProblem(Exception):
    """Raised by a handler: answered as a problem detail."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        title: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.headers = headers


def problem_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    title: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The problem-detail response for ``code``."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code.replace("_", "-"),
        "title": title or code.replace("_", " ").capitalize(),
        "status": status,
        "code": code,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


# Error responses every API route may give, for the OpenAPI document.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": Problem,
        "description": "A parameter is not valid (code invalid_parameter, invalid_range, range_too_large, ...)",
    },
    401: {
        "model": Problem,
        "description": "No token, an unknown token or a revoked one (code unauthorized)",
    },
    404: {
        "model": Problem,
        "description": "An id that the token's tenant does not have (code unknown_*)",
    },
    422: {
        "model": Problem,
        "description": "A parameter has the wrong form (code invalid_parameter)",
    },
    503: {
        "model": Problem,
        "description": "A database cannot be reached (code database_unavailable)",
    },
}

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as a problem detail."""

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiProblem)
        return problem_response(
            request, exc.status, exc.code, exc.detail, exc.title, headers=exc.headers
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "parameter": ".".join(str(p) for p in e.get("loc", ())[1:]) or "request",
                "in": str(e.get("loc", ("query",))[0]),
                "message": str(e.get("msg", "")),
            }
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['parameter']}: {e['message']}" for e in errors)
        return problem_response(
            request, 422, "invalid_parameter", detail, "Invalid parameter", errors=errors
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no such resource: {request.url.path}"
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(request, exc.status_code, code, detail, headers=headers)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("api.error", path=request.url.path, error=repr(exc), exc_info=exc)
        return problem_response(
            request,
            500,
            "internal_error",
            "the API failed to answer; see its log",
            "Internal error",
        )

    app.add_exception_handler(ApiProblem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
