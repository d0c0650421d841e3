"""``sensormine-collector api``: serve the query API and the status page with uvicorn."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from types import FrameType

import click
import structlog
import uvicorn

from collector.errors import CollectorError
from collector.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, load_settings
from service.cli import config_option
from service.logs import configure_logging
from service.systemd import Notifier

log = structlog.get_logger("collector.api")


@click.command("api")
@config_option(
    DEFAULT_CONFIG_PATH,
    "Collector configuration file (TOML): [metadata], [timeseries] and [api].",
    envvar=CONFIG_ENV,
)
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Listen here instead of api.listen (default 127.0.0.1:8080).",
)
@click.option("--no-page", is_flag=True, help="Serve the API only, not the status page.")
def api(config_path: Path, listen: str | None, no_page: bool) -> None:
    """Serve the query API (/api/v1, OpenAPI at /api/v1/openapi.json) and the status page (/).

    Reads both databases (streaming replicas first when [api] names them); every request needs
    a tenant's token (`sensormine-collector tokens create`). Plain HTTP on 127.0.0.1 by default:
    put a TLS reverse proxy in front of it (docs/api.md).
    """
    from collector.api.app import create_app

    try:
        settings = load_settings(config_path)
    except CollectorError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings.log.level, settings.log.format)
    address = listen or settings.api.listen
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{address!r} is not host:port", param_hint="--listen")
    app = create_app(settings, page=not no_page)
    config = uvicorn.Config(
        app,
        host=host.strip("[]"),
        port=int(port),
        log_level="warning",
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        server_header=False,
    )
    NotifyingServer(config, f"http://{host}:{port}/").run()


class NotifyingServer(uvicorn.Server):
    """uvicorn's server that tells systemd (``Type=notify``) when it listens, pings its
    watchdog from the event loop (a stuck loop gets the API restarted), and says when it stops."""

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self.url = url
        self.notifier = Notifier()
        self._watchdog: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        log.info("api.listening", url=self.url)
        self.notifier.ready(f"serving {self.url}")
        if self.notifier.watchdog_interval:
            self._watchdog = asyncio.create_task(self._ping(self.notifier.watchdog_interval))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn raises a caught SIGTERM again once it has shut down (the process then dies of
        # it); like the collector, the API exits 0 after a graceful stop.
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    async def _ping(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.notifier.stopping()
        if self._watchdog is not None:
            self._watchdog.cancel()
        await super().shutdown(sockets)
