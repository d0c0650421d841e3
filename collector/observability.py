"""Prometheus metrics of the collector (logging is set up by :mod:`service.logs`).

Each :class:`Collector` has its own registry, so that several collectors can run in one process
(tests do), and serves it on ``metrics.listen``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_NS = "sensormine_collector"


class CollectorMetrics:
    """The collector's Prometheus metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            f"{_NS}_messages",
            "MQTT messages processed, by topic kind and ack result",
            ["kind", "result"],
            registry=r,
        )
        self.points_accepted = Counter(
            f"{_NS}_points_accepted", "Readings committed to telemetry", registry=r
        )
        self.points_rejected = Counter(
            f"{_NS}_points_rejected", "Readings refused, by reason code", ["reason"], registry=r
        )
        self.points_quarantined = Counter(
            f"{_NS}_points_quarantined",
            "Readings kept in quarantine (replayable), by reason code",
            ["reason"],
            registry=r,
        )
        self.conflicts = Counter(
            f"{_NS}_conflicts",
            "Batches whose key was committed earlier with other content (a gateway's buffer"
            " rolled back), answered with conflict",
            registry=r,
        )
        self.internal_errors = Counter(
            f"{_NS}_internal_errors",
            "Messages whose processing or writing raised; retried, then quarantined",
            registry=r,
        )
        self.duplicates = Counter(
            f"{_NS}_duplicates",
            "Batches already in the ledger, acknowledged as duplicate",
            registry=r,
        )
        self.flush_rows = Histogram(
            f"{_NS}_flush_rows",
            "Readings written per flush",
            buckets=(0, 10, 100, 1000, 5000, 10_000, 20_000, 50_000, 100_000),
            registry=r,
        )
        self.flush_seconds = Histogram(
            f"{_NS}_flush_seconds",
            "Duration of a flush transaction",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.db_errors = Counter(
            f"{_NS}_db_errors",
            "Database operations that failed, by database",
            ["database"],
            registry=r,
        )
        self.inflight = Gauge(
            f"{_NS}_inflight_messages", "Messages received and not yet acknowledged", registry=r
        )
        self.mqtt_connected = Gauge(
            f"{_NS}_mqtt_connected", "1 while connected to the broker", registry=r
        )
        self.lifecycle_runs = Counter(
            f"{_NS}_lifecycle_runs_total",
            "Lifecycle job runs by job and result (ok, error)",
            ["job", "result"],
            registry=r,
        )
        self.commit_lag = Gauge(
            f"{_NS}_commit_lag_seconds",
            "Seconds from a message's arrival at this collector to the commit of its batch"
            " (the slowest of the last flush)",
            registry=r,
        )
        self.concurrent_streams = Gauge(
            f"{_NS}_gateways_concurrent_streams",
            "Gateways whose batches of the last 10 minutes come from two streams at once"
            " (two agents with one gateway id)",
            registry=r,
        )
        self.gateway_clock_skew = Gauge(
            f"{_NS}_gateway_clock_skew_seconds",
            "A gateway's batch creation time minus this collector's receive time, the largest of"
            " the last minute (positive: the gateway's times are ahead; about zero when right)",
            ["gateway_id"],
            registry=r,
        )
        self.time_requests = Counter(
            f"{_NS}_time_requests",
            "Time requests of gateways answered with this collector's clock",
            registry=r,
        )

    def serve(self, listen: str) -> Any:
        """Serve the metrics on ``host:port``; return the server (``None`` if disabled)."""
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=self.registry
        )
        return server
