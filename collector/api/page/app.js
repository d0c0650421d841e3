// The status page of Sensormine Edge: plain JavaScript over the query API (/api/v1) with
// plotly.js, both served by `sensormine-collector api` (no network beyond it).
"use strict";

const TOKEN_KEY = "sensormine-api-token";
const RANGES = [["1h", 3600], ["6h", 21600], ["24h", 86400], ["7d", 604800], ["30d", 2592000]];

// --- token, requests, problems -------------------------------------------------------------
function takeTokenFromUrl() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

class Problem extends Error {
  constructor(body, status) {
    super(body.detail || `HTTP ${status}`);
    this.body = body;
    this.status = status;
  }
}

async function api(path, params) {
  const url = new URL("/api/v1" + path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null) url.searchParams.set(k, v);
  }
  const headers = { Accept: "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(url, { headers });
  const body = await r.json().catch(() => ({ detail: r.statusText }));
  if (!r.ok) throw new Problem(body, r.status);
  return body;
}

// --- DOM and formatting --------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  return fill(node, children, false);
}

// Put children (nested arrays flattened, null skipped) into node, replacing what it had.
function fill(node, children, replace = true) {
  if (replace) node.replaceChildren();
  for (const c of [children].flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtTime(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - new Date(iso).getTime()) / 1000;
  if (s < 1) return "just now";  // the browser's clock and the database's differ a little
  return duration(s) + " ago";
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  const a = Math.abs(s);
  const sign = s < 0 ? "-" : "";
  if (a < 1) return sign + a.toFixed(2) + " s";
  if (a < 90) return sign + a.toFixed(0) + " s";
  if (a < 5400) return sign + (a / 60).toFixed(0) + " min";
  if (a < 172800) return sign + (a / 3600).toFixed(1) + " h";
  return sign + (a / 86400).toFixed(1) + " d";
}

function fmtValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  return String(v);
}

// Names everywhere; the id only on hover (title) and in links.
function named(kind, ref) {
  if (!ref) return el("span", { class: "muted" }, "–");
  const label = ref.name || ref.id.slice(0, 8) + "…";
  if (kind === "device") return el("a", { href: `device.html?id=${ref.id}`, title: ref.id }, label);
  if (kind === "gateway") return el("a", { href: `gateway.html?id=${ref.id}`, title: ref.id }, label);
  return el("span", { title: ref.id }, label);
}

function statusBadge(st) {
  if (!st) return el("span", { class: "status unknown" }, "unknown");
  return el("span", { class: `status ${st.status}`, title: st.reason || "" }, st.status);
}

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "empty" }, empty || "none");
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) =>
      c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))))),
  );
}

const num = (v) => el("td", { class: "num" }, v);
const main = () => document.getElementById("main");

function setTenant(tenant) {
  const t = document.getElementById("tenant");
  t.textContent = tenant.name || "";
  t.title = tenant.id;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

function showProblem(err) {
  const box = el("div", { class: "problem" },
    el("strong", {}, err.body && err.body.title ? err.body.title : "Error"), ": ",
    err.message, err.body && err.body.code ? el("span", { class: "muted" }, ` (${err.body.code})`) : null);
  main().prepend(box);
  if (err.status === 401) main().append(tokenForm());
  document.body.dataset.state = "error";
}

function tokenForm() {
  const input = el("input", { type: "password", placeholder: "smt_…", autocomplete: "off" });
  return el("form", {
    class: "token",
    onsubmit: (e) => {
      e.preventDefault();
      localStorage.setItem(TOKEN_KEY, input.value.trim());
      location.reload();
    },
  }, el("p", {}, "This page needs an API token of your tenant: ",
    el("code", {}, "sensormine-collector tokens create --tenant NAME --name browser")),
  input, el("button", { type: "submit" }, "Use token"));
}

function rangeBar(current, onPick) {
  return el("div", { class: "toolbar" }, el("span", { class: "muted" }, "Range:"),
    RANGES.map(([label, seconds]) => el("button", {
      class: seconds === current ? "on" : "",
      onclick: () => onPick(seconds),
    }, label)),
    el("span", { class: "muted" }, "drag on a chart to zoom, double-click to go back"));
}

// --- charts --------------------------------------------------------------------------------
const PLOT_CONFIG = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"] };

function layout(yTitle, extra) {
  return Object.assign({
    margin: { l: 60, r: 60, t: 10, b: 40 },
    xaxis: { type: "date" },
    yaxis: { title: { text: yTitle } },
    showlegend: true,
    legend: { orientation: "h", y: -0.2 },
    hovermode: "x unified",
  }, extra || {});
}

// A chart box: title line (with what it shows) and the plot; data-* attributes say what is drawn.
function chartBox(title) {
  const info = el("span", { class: "muted" });
  const plot = el("div", { class: "plot" });
  const box = el("div", { class: "chart", "data-chart": title }, el("div", { class: "title" }, el("strong", {}, title), info), plot);
  return { box, info, plot };
}

// The x axis: the range asked for after a zoom; fitted to the data on a range button.
function xaxis(start, end, fit) {
  return fit ? { type: "date", autorange: true } : { type: "date", range: [start.toISOString(), end.toISOString()] };
}

async function drawSeries(chart, deviceId, metric, start, end, fit = false) {
  const s = await api(`/devices/${deviceId}/series`, { metric, start: start.toISOString(), end: end.toISOString() });
  const p = s.points;
  const traces = [];
  if (p.min && p.max) {
    traces.push({ x: p.time, y: p.min, name: "min", mode: "lines", line: { width: 0 }, connectgaps: false, hoverinfo: "skip", showlegend: false });
    traces.push({ x: p.time, y: p.max, name: "min–max", mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: "rgba(9,105,218,0.15)", connectgaps: false });
  }
  traces.push({ x: p.time, y: p.value, name: p.min ? "average" : metric, mode: "lines", line: { color: "#0969da", width: 1.5 }, connectgaps: false });
  const drawn = p.value.filter((v) => v !== null).length;
  chart.box.dataset.points = String(drawn);
  chart.box.dataset.resolution = s.resolution;
  chart.info.textContent = `resolution ${s.resolution} (${s.chosen}) · ${drawn} points · ${s.gaps} gap${s.gaps === 1 ? "" : "s"}`;
  const lay = layout(metric, { xaxis: xaxis(start, end, fit) });
  await Plotly.react(chart.plot, traces, lay, PLOT_CONFIG);
  return s;
}

// Zoom: a new x range asks the API again, at the resolution that fits it.
function zoomable(chart, redraw, home) {
  chart.plot.on("plotly_relayout", (ev) => {
    if (ev["xaxis.range[0]"] && ev["xaxis.range[1]"]) {
      redraw(new Date(ev["xaxis.range[0]"]), new Date(ev["xaxis.range[1]"])).catch(showProblem);
    } else if (ev["xaxis.autorange"]) {
      const [a, b] = home();
      redraw(a, b, true).catch(showProblem);
    }
  });
}

// --- pages ---------------------------------------------------------------------------------
async function fleetPage() {
  const [fleet, devices, quarantine, rejects, alerts] = await Promise.all([
    api("/fleet"), api("/devices"), api("/quarantine"), api("/rejects"), api("/alerts"),
  ]);
  setTenant(fleet.tenant);
  const gwOnline = fleet.gateways.filter((g) => g.status && g.status.status === "online").length;
  const held = Object.values(quarantine.by_reason).reduce((a, b) => a + b, 0);
  const refused = rejects.by_reason.reduce((a, r) => a + r.readings, 0);
  const m = main();
  fill(m, [
    el("h1", {}, "Fleet"),
    el("div", { class: "cards" },
      el("div", { class: "card" }, el("div", { class: "big" }, `${gwOnline} / ${fleet.gateways.length}`), "gateways online"),
      el("div", { class: "card" }, el("div", { class: "big" }, String(devices.total)), "devices: ",
        Object.entries(fleet.devices).map(([s, n]) => el("span", { class: `status ${s}` }, `${n} ${s} `))),
      el("div", { class: "card" }, el("div", { class: "big" }, String(held)), "readings in quarantine"),
      el("div", { class: "card" }, el("div", { class: "big" }, String(refused)), "readings refused (24 h)")),
    el("h2", {}, "Gateways"),
    table(["Gateway", "Status", "Since", "Last batch", "Ingest lag", "Clock skew", "Backlog", "Devices"],
      fleet.gateways.map((g) => [
        named("gateway", g),
        statusBadge(g.status),
        g.status ? el("span", { title: fmtTime(g.status.since) }, ago(g.status.since)) : "–",
        g.last_batch ? el("span", { title: `${g.last_batch.result}, seq ${g.last_batch.seq}, ${fmtTime(g.last_batch.received_at)}` }, ago(g.last_batch.received_at)) : "never",
        num(duration(g.ingest_lag_s)),
        num(g.clock_skew_s === null ? "not recorded" : duration(g.clock_skew_s)),
        g.backlog ? `${g.backlog.state}: ${g.backlog.buffered_readings ?? "?"} readings` +
          (g.backlog.state === "draining" && g.backlog.estimate_s !== null ? `, ~${duration(g.backlog.estimate_s)} to go` : "") : "–",
        num(g.devices),
      ]), "no gateways"),
    el("h2", {}, "Devices"),
    table(["Device", "Type", "Gateway", "Status", "Since", "Last seen", "Latest values"],
      devices.devices.map((d) => [
        named("device", d),
        named("type", d.type),
        named("gateway", d.gateway),
        statusBadge(d.status),
        d.status ? el("span", { title: fmtTime(d.status.since) }, ago(d.status.since)) : "–",
        d.last_seen ? el("span", { title: fmtTime(d.last_seen) }, ago(d.last_seen)) : "never",
        Object.entries(d.latest).map(([k, v]) => el("span", { title: fmtTime(v.time), style: "margin-right:.8rem" }, `${k} `, el("strong", {}, fmtValue(v.value)))),
      ]), "no devices"),
    el("h2", {}, "Alerts of the last 7 days"),
    alertTable(alerts.alerts, true),
    el("h2", {}, "Quarantine by reason"),
    table(["Reason", "Gateway", "Readings", "Rows", "Bytes", "Newest"],
      quarantine.groups.map((q) => [q.reason, named("gateway", q.gateway), num(q.readings), num(q.rows), num(q.bytes), fmtTime(q.last)]),
      "nothing in quarantine"),
    el("h2", {}, "Refused in the last 24 hours, by reason"),
    table(["Reason", "Messages", "Readings", "Newest"],
      rejects.by_reason.map((r) => [r.reason, num(r.messages), num(r.readings), fmtTime(r.last)]), "nothing refused"),
  ]);
}

function alertTable(alerts, withDevice) {
  return table(
    ["Rule", ...(withDevice ? ["Device"] : []), "Severity", "Raised", "Value", "Cleared", "Value"],
    alerts.map((a) => [
      el("span", { title: `${a.metric} ${a.condition} ${a.threshold}` }, a.rule.name),
      ...(withDevice ? [named("device", a.device)] : []),
      el("span", { class: `status ${a.cleared_at ? "unknown" : "error"}` }, a.severity),
      fmtTime(a.raised_at), num(fmtValue(a.raised_value)),
      a.cleared_at ? fmtTime(a.cleared_at) : el("strong", {}, "open"), num(fmtValue(a.cleared_value)),
    ]), "no alerts");
}

async function devicePage() {
  const id = new URLSearchParams(location.search).get("id");
  const device = await api(`/devices/${id}`);
  document.title = `${device.name} · Sensormine Edge`;
  const [fleet, history, events, alerts] = await Promise.all([
    api("/fleet"), api(`/devices/${id}/status-history`), api("/events", { device_id: id, limit: 50 }),
    api("/alerts", { device_id: id, limit: 50 }),
  ]);
  setTenant(fleet.tenant);
  let span = 86400;
  const numeric = Object.entries(device.latest).filter(([, v]) => v.kind !== "text").map(([k]) => k).sort();
  const text = Object.entries(device.latest).filter(([, v]) => v.kind === "text");
  const charts = numeric.map((metric) => ({ metric, chart: chartBox(metric) }));
  const m = main();
  const draw = async () => {
    const end = new Date();
    const start = new Date(end.getTime() - span * 1000);
    await Promise.all(charts.map(({ metric, chart }) => drawSeries(chart, id, metric, start, end, true)));
  };
  const bar = () => rangeBar(span, (s) => { span = s; toolbar.replaceWith(toolbar = bar()); draw().catch(showProblem); });
  let toolbar = bar();
  fill(m, [
    el("h1", { title: device.id }, device.name),
    el("p", {}, "Type ", named("type", device.type), " · gateway ", named("gateway", device.gateway), " · ",
      statusBadge(device.status), device.status ? ` since ${fmtTime(device.status.since)}` : "",
      device.status && device.status.reason ? ` (${device.status.reason})` : "",
      el("span", { class: "muted" }, ` · id ${device.id}`)),
    toolbar,
    charts.length ? charts.map((c) => c.chart.box) : el("p", { class: "empty" }, "no numeric readings yet"),
    text.length ? [el("h2", {}, "Text values"), table(["Metric", "Latest", "At"], text.map(([k, v]) => [k, fmtValue(v.value), fmtTime(v.time)]))] : null,
    el("h2", {}, "Alerts of the last 7 days"),
    alertTable(alerts.alerts, false),
    el("h2", {}, "Status history"),
    table(["Time", "Status", "Reason"], history.changes.map((c) => [fmtTime(c.time), statusBadge(c), c.reason]), "no status changes in 7 days"),
    el("h2", {}, "Events"),
    table(["Time", "Severity", "Kind", "Message"], events.events.map((e) => [fmtTime(e.time), e.severity, e.kind, e.message]), "no events in 24 hours"),
  ]);
  await draw();
  for (const { metric, chart } of charts) {
    zoomable(chart, (a, b, fit) => drawSeries(chart, id, metric, a, b, fit), () => {
      const end = new Date();
      return [new Date(end.getTime() - span * 1000), end];
    });
  }
}

async function drawBacklog(chart, id, start, end, fit = false) {
  const b = await api(`/gateways/${id}/backlog`, { start: start.toISOString(), end: end.toISOString() });
  const t = b.points.map((p) => p.time);
  chart.box.dataset.points = String(b.points.length);
  chart.info.textContent = `${b.points.length} reports of the agent (backlog.* events)`;
  await Plotly.react(chart.plot, [
    { x: t, y: b.points.map((p) => p.buffered_readings), name: "buffered readings", mode: "lines+markers", line: { shape: "hv", color: "#0969da" } },
    { x: t, y: b.points.map((p) => p.estimate_s), name: "drain estimate (s)", mode: "lines+markers", yaxis: "y2", line: { dash: "dot", color: "#9a6700" } },
  ], layout("readings", {
    xaxis: xaxis(start, end, fit),
    yaxis2: { title: { text: "seconds" }, overlaying: "y", side: "right" },
  }), PLOT_CONFIG);
}

async function drawLag(chart, id, start, end, fit = false) {
  const l = await api(`/gateways/${id}/ingest-lag`, { start: start.toISOString(), end: end.toISOString() });
  const t = l.points.map((p) => p.time);
  chart.box.dataset.points = String(l.points.length);
  chart.info.textContent = `buckets of ${duration(l.bucket_s)} · ${l.points.reduce((a, p) => a + p.batches, 0)} batches`;
  await Plotly.react(chart.plot, [
    { x: t, y: l.points.map((p) => p.lag_avg_s), name: "average", mode: "lines+markers", line: { color: "#0969da" } },
    { x: t, y: l.points.map((p) => p.lag_max_s), name: "max", mode: "lines+markers", line: { color: "#cf222e", dash: "dot" } },
  ], layout("seconds from sealed to stored", { xaxis: xaxis(start, end, fit) }), PLOT_CONFIG);
}

async function gatewayPage() {
  const id = new URLSearchParams(location.search).get("id");
  const [gw, fleet, devices, history, events] = await Promise.all([
    api(`/gateways/${id}`), api("/fleet"), api("/devices", { gateway_id: id }),
    api(`/gateways/${id}/status-history`), api("/events", { gateway_id: id, limit: 50 }),
  ]);
  document.title = `${gw.name} · Sensormine Edge`;
  setTenant(fleet.tenant);
  let span = 86400;
  const backlog = chartBox("Backlog");
  const lag = chartBox("Ingest lag");
  const draw = async () => {
    const end = new Date();
    const start = new Date(end.getTime() - span * 1000);
    await Promise.all([drawBacklog(backlog, id, start, end, true), drawLag(lag, id, start, end, true)]);
  };
  const bar = () => rangeBar(span, (s) => { span = s; toolbar.replaceWith(toolbar = bar()); draw().catch(showProblem); });
  let toolbar = bar();
  fill(main(), [
    el("h1", { title: gw.id }, gw.name),
    el("p", {}, statusBadge(gw.status), gw.status ? ` since ${fmtTime(gw.status.since)}` : "",
      gw.status && gw.status.reason ? ` (${gw.status.reason})` : "",
      " · last batch ", gw.last_batch ? ago(gw.last_batch.received_at) : "never",
      " · ingest lag ", duration(gw.ingest_lag_s),
      " · clock skew ", gw.clock_skew_s === null ? "not recorded" : duration(gw.clock_skew_s),
      el("span", { class: "muted" }, ` · id ${gw.id}`)),
    gw.backlog ? el("p", {}, `Backlog ${gw.backlog.state}: ${gw.backlog.buffered_readings ?? "?"} readings buffered`,
      gw.backlog.estimate_s !== null ? `, drained in ~${duration(gw.backlog.estimate_s)}` : "",
      ` (reported ${ago(gw.backlog.at)})`) : el("p", { class: "muted" }, "No backlog reported in 30 days."),
    toolbar,
    backlog.box,
    lag.box,
    el("h2", {}, "Devices"),
    table(["Device", "Type", "Status", "Last seen"], devices.devices.map((d) => [named("device", d), named("type", d.type), statusBadge(d.status), ago(d.last_seen)]), "no devices"),
    el("h2", {}, "Status history"),
    table(["Time", "Status", "Reason"], history.changes.map((c) => [fmtTime(c.time), statusBadge(c), c.reason]), "no status changes in 7 days"),
    el("h2", {}, "Events"),
    table(["Time", "Severity", "Kind", "Message"], events.events.map((e) => [fmtTime(e.time), e.severity, e.kind, e.message]), "no events in 24 hours"),
  ]);
  await draw();
  const home = () => { const end = new Date(); return [new Date(end.getTime() - span * 1000), end]; };
  zoomable(backlog, (a, b, fit) => drawBacklog(backlog, id, a, b, fit), home);
  zoomable(lag, (a, b, fit) => drawLag(lag, id, a, b, fit), home);
}

async function start() {
  takeTokenFromUrl();
  const page = document.body.dataset.page;
  try {
    if (page === "device") await devicePage();
    else if (page === "gateway") await gatewayPage();
    else await fleetPage();
    document.body.dataset.state = "ready";
  } catch (err) {
    if (err instanceof Problem) showProblem(err);
    else { showProblem({ message: String(err), body: {} }); console.error(err); }
  }
}

start();
