"""The agent's optional Prometheus endpoint, scraped from a real agent process."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tests.agent.conftest import Acknowledger, agent_cli, start_agent, write_config
from tests.ops.test_prometheus_rules import rule_metrics
from tests.services import SYSTEM_MQTT, free_port


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_the_metrics_endpoint_reports_the_buffer_the_link_and_acks(
    tmp_path: Path, prefix: str, acknowledger_factory: Callable[..., Acknowledger]
) -> None:
    """With ``[metrics] listen`` set, the agent serves buffer depth, oldest unacked age, drops by
    reason, delivered readings, link state and ack latency; every agent metric the shipped
    Prometheus rules use is among them."""
    port = free_port()
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=SYSTEM_MQTT[1],
        prefix=prefix,
    )
    with config.open("a") as f:
        f.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    acknowledger_factory(*SYSTEM_MQTT, prefix)
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        deadline = time.monotonic() + 30
        samples: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                samples = scrape(port)
            except OSError:
                samples = {}
            if samples.get("sensormine_agent_readings_delivered_total", 0) > 0 and samples.get(
                "sensormine_agent_ack_latency_seconds_count", 0
            ):
                break
            time.sleep(0.5)
    finally:
        agent.terminate()
        agent.wait(30)
    assert 1.0 == samples["sensormine_agent_link_up"]
    assert (
        samples["sensormine_agent_readings_produced_total"]
        >= samples["sensormine_agent_readings_delivered_total"]
        > 0
    )
    assert samples["sensormine_agent_ack_latency_seconds_count"] > 0
    assert 0.0 == samples['sensormine_agent_readings_dropped_total{reason="drop_oldest"}']
    assert 0 <= samples["sensormine_agent_oldest_unacked_age_seconds"] < 30
    assert "sensormine_agent_buffer_bytes" in samples
    names = {re.sub(r"\{.*", "", k) for k in samples}
    assert set() == rule_metrics("sensormine_agent_") - names


def test_a_taken_metrics_port_is_a_clear_start_up_error(tmp_path: Path, prefix: str) -> None:
    """A metrics port another program holds stops the agent at start with exit 1 and a message
    that names the key and the address, instead of serving nowhere."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path / "agent.toml",
            buffer=tmp_path / "buffer.db",
            port=SYSTEM_MQTT[1],
            prefix=prefix,
        )
        with config.open("a") as f:
            f.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        result = agent_cli("run", "--config", str(config))
    assert 1 == result.returncode
    assert (
        f"metrics.listen: cannot serve metrics on 127.0.0.1:{port}" in result.stderr + result.stdout
    )
