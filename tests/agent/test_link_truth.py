"""What the agent tells its operator about the link: no collector acking, a gateway id used twice,
device statuses restated after a reconnect. Real agent processes against a real Mosquitto."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from protocol import decode_status
from tests.agent.conftest import (
    Acknowledger,
    named,
    start_agent,
    status_json,
    write_config,
)
from tests.services import SYSTEM_MQTT, MosquittoBroker
from tests.waiting import wait_for


def test_a_connected_agent_that_nobody_acks_says_what_to_check(tmp_path: Path, prefix: str) -> None:
    """Connected to the broker but no collector on its prefix: after a few ack timeouts the agent
    logs one ``link.no_acks`` warning naming the prefix and what to check, not only timeouts."""
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=SYSTEM_MQTT[1],
        prefix=prefix,
        extra_mqtt='ack_timeout = "500ms"',
    )
    log = tmp_path / "agent.log"
    agent = start_agent(config, log)
    try:
        wait_for(lambda: bool(named(log, "link.no_acks")), 30)
        time.sleep(2)
    finally:
        agent.terminate()
        agent.wait(30)
    hints = named(log, "link.no_acks")
    assert 1 == len(hints), "said once per stretch without acks, not on every timeout"
    assert "warning" == hints[0]["level"]
    assert prefix in hints[0]["hint"] and "collector" in hints[0]["hint"]


def test_two_agents_with_one_gateway_id_say_so_and_back_off(
    tmp_path: Path, private_broker: MosquittoBroker, prefix: str
) -> None:
    """Two agents with the same gateway id (a cloned configuration) knock each other off the
    broker: the first to see it happen three times in a row says ``link.taken_over`` with what to
    check and backs off instead of fighting (about 20 lost links in 15 s before)."""
    gateway, tenant = uuid.uuid4(), uuid.uuid4()
    logs, agents = [], []
    try:
        for name in ("a", "b"):
            config = write_config(
                tmp_path / f"{name}.toml",
                buffer=tmp_path / f"{name}.db",
                port=private_broker.port,
                prefix=prefix,
                gateway=gateway,
                tenant=tenant,
            )
            logs.append(tmp_path / f"{name}.log")
            agents.append(start_agent(config, logs[-1]))
        time.sleep(15)
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait(30)
    said = [e for p in logs for e in named(p, "link.taken_over")]
    assert said, "neither agent recognised the takeover"
    assert {"error"} == {e["level"] for e in said}
    assert all("same gateway.id" in e["hint"] and e["retry_in_s"] >= 20 for e in said)
    lost = sum(len(named(p, "link.lost")) for p in logs)
    assert lost <= 10, f"{lost} lost links in 15 s: the agents kept fighting"


def test_every_device_status_is_stated_again_after_a_reconnect(
    tmp_path: Path,
    private_broker: MosquittoBroker,
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """A device whose input fails is ``error``; after the link comes back the agent states that
    error again in a batch (only changes travel otherwise, and the collector marks a gateway's
    devices offline while it is away)."""
    broken = uuid.uuid4()
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=private_broker.port,
        prefix=prefix,
    )
    with config.open("a") as f:
        f.write(
            '\n[[inputs]]\ntype = "command"\nname = "failing"\ncommand = ["/bin/false"]\n'
            f'interval = "1h"\n\n[[inputs.devices]]\nid = "{broken}"\nname = "broken"\n'
        )
    ack = acknowledger_factory(private_broker.host, private_broker.port, prefix)

    def errors() -> list[int]:
        return sorted(
            s.time
            for b in ack.batches().values()
            for s in b.status
            if s.device_id == broken and s.status == "error"
        )

    agent = start_agent(config, tmp_path / "agent.log")
    try:
        # The first error may be stated twice already (the input failed before the first connect).
        wait_for(lambda: len(errors()) >= 1)
        time.sleep(1)
        before = len(errors())
        private_broker.stop()
        time.sleep(1)
        restarted_us = time.time_ns() // 1000
        private_broker.start()
        wait_for(lambda: len(errors()) > before, 40)
    finally:
        agent.terminate()
        agent.wait(30)
    assert errors()[-1] > restarted_us, "restated with the time of the reconnect"


def test_a_backlog_drain_is_estimated_from_measured_rates_and_reported(
    tmp_path: Path,
    private_broker: MosquittoBroker,
    prefix: str,
    acknowledger_factory: Callable[..., Acknowledger],
) -> None:
    """After an outage the agent says that it drains (in its log, and in its retained status
    frames with the backlog figures), how far it got and when it is done, and
    ``status`` estimates the drain from the measured ack and production rates: the estimate taken
    halfway is within a factor of two of the time the drain really took (the old estimate,
    batches / backlog_rate, ignored the live data that keeps arriving)."""
    config = write_config(
        tmp_path / "agent.toml",
        buffer=tmp_path / "buffer.db",
        port=private_broker.port,
        prefix=prefix,
        devices=5,
        interval="50ms",
        extra_mqtt='backlog_rate = 1.0\nwindow = 4\nack_timeout = "5s"',
        extra_batch='max_age = "500ms"',
        # Sealed during the outage as they come, whatever this host's NTP state: a gateway
        # without a trusted time would keep them unsealed and seal them in a few full batches
        # once the collector's time arrives, a drain too short to estimate.
        extra_clock='max_wait = "0s"',
    )
    log = tmp_path / "agent.log"
    private_broker.stop()
    agent = start_agent(config, log)
    estimates: list[tuple[float, float]] = []
    try:
        time.sleep(20)  # the uplink is down: a backlog builds up
        private_broker.start()
        ack = acknowledger_factory(private_broker.host, private_broker.port, prefix)
        wait_for(lambda: bool(named(log, "backlog.draining")), 30)
        deadline = time.monotonic() + 120
        while not named(log, "backlog.drained"):
            assert time.monotonic() < deadline, "the backlog never drained"
            doc = status_json(config)
            if doc["drain"]["measured"] and doc["drain"]["estimate_s"]:
                estimates.append((time.monotonic(), doc["drain"]["estimate_s"]))
            time.sleep(1)
        drained_at = time.monotonic()
    finally:
        agent.terminate()
        agent.wait(30)
    draining = named(log, "backlog.draining")[0]
    progress = named(log, "backlog.progress")
    drained = named(log, "backlog.drained")[0]
    assert progress, "no progress line during the drain"
    assert all(p["buffered_readings"] < draining["buffered_readings"] for p in progress)
    assert drained["backlog_readings"] == draining["buffered_readings"]
    # The status frames: the backlog at connect, then the drain's figures, then drained.
    frames = [decode_status(payload) for payload in ack.statuses]
    backlogs = [f.backlog for f in frames if f.state == "online" and f.backlog is not None]
    assert backlogs[0].readings >= draining["buffered_readings"] * 0.5
    assert backlogs[0].oldest_age_s is not None and backlogs[0].oldest_age_s >= 10
    assert any(b.draining and b.drain_s for b in backlogs)
    assert not backlogs[-1].draining and backlogs[-1].readings < backlogs[0].readings
    # Halfway through the drain, the estimate against what the rest really took.
    assert estimates
    at, estimate = estimates[len(estimates) // 2]
    actual = drained_at - at
    assert 0.5 <= actual / estimate <= 2.0, f"estimated {estimate} s, took {actual:.1f} s"
