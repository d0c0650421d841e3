"""The status page in headless Chromium: the fleet, a device's charts and a gateway's charts
render with the data of the API (not only the page's frame)."""

from __future__ import annotations

import re
from urllib.parse import quote

from tests.api.browser import dump_dom
from tests.api.conftest import World


def _attrs(dom: str, chart: str) -> dict[str, str]:
    m = re.search(r'<div class="chart" data-chart="' + re.escape(chart) + r'"([^>]*)>', dom)
    assert m, f"no chart {chart!r} in the page"
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', m.group(1)))


def _traces(dom: str) -> list[str]:
    """The ``d`` attribute of every line plotly drew (an SVG path per trace)."""
    return re.findall(r'<path class="js-line" d="([^"]+)"', dom)


def _url(world: World, page: str) -> str:
    return f"{world.url}/ui/{page}#token={quote(world.token_a)}"


def test_fleet_page_shows_gateways_and_devices_by_name(world: World) -> None:
    dom = dump_dom(_url(world, ""))
    assert 'data-state="ready"' in dom, dom[-3000:]
    f = world.fleet
    assert f'<a href="gateway.html?id={f.gateway}" title="{f.gateway}">gw1</a>' in dom
    for i, device in enumerate(f.devices):
        assert f'<a href="device.html?id={device}" title="{device}">dev{i}</a>' in dom
    assert "device_disabled" in dom and "bad_magic" in dom
    assert "drained: 40 readings" in dom
    assert "Alerts of the last 7 days" in dom and "temperature-high" in dom
    # UUIDs only on hover (title) or in links: never as text between tags.
    text = re.sub(r"<[^>]+>", " ", dom)
    assert str(f.gateway) not in text and str(f.devices[0]) not in text


def test_device_page_draws_a_chart_of_every_metric_with_its_resolution(world: World) -> None:
    dom = dump_dom(_url(world, f"device.html?id={world.fleet.devices[0]}"))
    assert 'data-state="ready"' in dom, dom[-3000:]
    for metric in ("humidity", "temperature"):
        attrs = _attrs(dom, metric)
        # The last 24 hours hold 3 hours of readings: raw fits.
        assert "raw" == attrs["resolution"]
        assert int(attrs["points"]) > 100
    assert "resolution raw (auto)" in dom
    # Drawn lines are paths of many segments (plotly thins them to the pixels; the legend's
    # samples are paths of one segment). Humidity is one line; temperature, with its gap shown
    # as a gap, is two.
    lines = [d for d in _traces(dom) if d.count("L") >= 5]
    assert 3 == len(lines), [d[:80] for d in _traces(dom)]
    assert "modbus timeout" not in dom  # dev0 never failed; dev1 did
    assert "Status history" in dom and "online" in dom


def test_gateway_page_draws_backlog_and_ingest_lag(world: World) -> None:
    dom = dump_dom(_url(world, f"gateway.html?id={world.fleet.gateway}"))
    assert 'data-state="ready"' in dom, dom[-3000:]
    assert "4" == _attrs(dom, "Backlog")["points"]
    assert int(_attrs(dom, "Ingest lag")["points"]) >= 1
    assert len(_traces(dom)) >= 3
    assert "dev0" in dom and "dev1" in dom


def test_a_page_without_a_token_asks_for_one(world: World) -> None:
    dom = dump_dom(f"{world.url}/ui/")
    assert 'data-state="error"' in dom
    assert "unauthorized" in dom and "tokens create" in dom
