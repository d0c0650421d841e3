"""The agent's optional Prometheus endpoint (``[metrics] listen``, off by default).

Figures are read when Prometheus scrapes, from what the runtime already keeps in memory (buffer
counters and sizes, the backlog meter, the link state), so an enabled endpoint costs nothing
between scrapes. The age of the oldest unacknowledged reading needs the buffer file: the runtime
refreshes it every few seconds while the endpoint is on. Ack latency (send to ack frame, of the
last send) is the one histogram the shipper feeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.buffer import DROP_REASONS
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.runtime import Runtime

NS = "sensormine_agent"
ACK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Figures(Collector):
    """Reads the runtime's figures at scrape time."""

    def __init__(self, runtime: Runtime, oldest_us: Callable[[], int | None]) -> None:
        self.runtime = runtime
        self.oldest_us = oldest_us

    def collect(self) -> Iterator[Any]:
        runtime = self.runtime
        try:
            store = runtime.buffer.store
        except Exception:
            return  # the buffer is not open (start-up or shutdown): nothing to report
        counters = dict(store.counters)
        gauges = {
            "buffer_readings": (
                "Readings in the buffer, sealed or not",
                store.unsealed + store.batched_readings,
            ),
            "buffer_batches": ("Sealed batches in the buffer", store.batch_count),
            "buffer_bytes": (
                "Estimated bytes of buffered data (what max_bytes bounds)",
                store.bytes,
            ),
            "buffer_held_readings": (
                "Readings held in memory because the disk is full",
                len(store.held),
            ),
            "in_flight_batches": (
                "Batches sent and not yet acknowledged",
                len(runtime.shipper.in_flight),
            ),
            "link_up": (
                "1 while connected to the broker",
                1 if runtime.shipper.state == "connected" else 0,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{NS}_{name}", doc, value=value)
        oldest = self.oldest_us()
        age = GaugeMetricFamily(
            f"{NS}_oldest_unacked_age_seconds",
            "Age of the oldest reading not yet acknowledged by the collector (0 when none)",
        )
        now = self.runtime.timebase.wall_now() / 1e6  # the agent's best time, not the raw clock
        age.add_metric([], 0.0 if oldest is None else max(0.0, now - oldest / 1e6))
        yield age
        figures = runtime.backlog.figures
        if figures is not None:
            yield GaugeMetricFamily(
                f"{NS}_ack_rate", "Readings acknowledged per second (last 30 s)", figures.ack_rate
            )
            yield GaugeMetricFamily(
                f"{NS}_production_rate",
                "Readings produced per second (last 30 s)",
                figures.production_rate,
            )
            if figures.estimate_s is not None:
                yield GaugeMetricFamily(
                    f"{NS}_drain_estimate_seconds",
                    "Seconds until the backlog is drained at the measured rates",
                    figures.estimate_s,
                )
        totals = {
            "produced": ("Readings committed to the buffer", counters["produced"]),
            "delivered": (
                "Readings in batches the collector finally acknowledged",
                counters["delivered"],
            ),
            "stored": ("Readings the collector stored", counters["stored"]),
            "quarantined": ("Readings the collector quarantined", counters["quarantined"]),
            "refused": ("Readings the collector refused for good", counters["refused"]),
        }
        for name, (doc, value) in totals.items():
            yield CounterMetricFamily(f"{NS}_readings_{name}", doc, value=value)
        dropped = CounterMetricFamily(
            f"{NS}_readings_dropped", "Readings dropped by the agent, by reason", labels=["reason"]
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], counters[f"dropped_{reason}"] + store.unpersisted[reason])
        yield dropped
        offset = getattr(runtime, "clock_offset", None)
        if callable(offset):
            value = offset()
            if value is not None:
                yield GaugeMetricFamily(
                    f"{NS}_clock_offset_seconds",
                    "Measured offset of the collector's clock from this gateway's",
                    value,
                )


class AgentMetrics:
    """The registry, the ack-latency histogram and the HTTP server of one agent."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.oldest_us: int | None = None
        self.ack_latency = Histogram(
            f"{NS}_ack_latency_seconds",
            "Seconds from a batch's (last) send to the collector's ack frame",
            buckets=ACK_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Figures(runtime, lambda: self.oldest_us))
        self._server: Any = None

    def serve(self, listen: str) -> None:
        """Serve ``/metrics`` on ``host:port``; a port in use is a clear start-up error."""
        host, _, port = listen.rpartition(":")
        try:
            self._server, _thread = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics.listen: cannot serve metrics on {listen}: {exc.strerror or exc}"
                " (is another program using that port?)"
            ) from None

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
