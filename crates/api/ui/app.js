// userseg console: plain JavaScript, no dependencies, served from the binary.
// Everything on the page comes from the public API (/v1/...) and /metrics.
"use strict";

const TOKEN_KEY = "userseg.token";
const $ = (id) => document.getElementById(id);
const state = {
  segments: [],          // [{segment, users}] as last loaded
  sort: { key: "users", desc: true },
  picked: new Set(),     // segments chosen for the overlap matrix
  current: null,         // segment shown in the trend chart
  metrics: null,         // previous /metrics sample {at, values}
};

// --- API access ------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

async function request(path, asText) {
  const headers = {};
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) {
    askForToken(t ? "the server refused this token" : "");
  }
  if (!resp.ok) {
    let code = "http_" + resp.status;
    let message = resp.status + " " + resp.statusText;
    try {
      const body = await resp.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch (_) { /* not JSON */ }
    throw new HttpError(resp.status, code, message);
  }
  return asText ? resp.text() : resp.json();
}

const api = (path) => request(path, false);

// Shows an endpoint's failure in its panel; a 404 means this server has no such endpoint yet.
function showError(el, err, what) {
  el.hidden = false;
  if (err instanceof HttpError && err.status === 404) {
    el.className = "message";
    el.textContent = capital(what) + " is not available on this server (404: " + err.message + ").";
  } else if (err instanceof HttpError && err.status === 401) {
    el.className = "message error";
    el.textContent = "An API token is needed (401).";
  } else {
    el.className = "message error";
    el.textContent = capital(what) + " failed: " + err.message;
  }
}

const capital = (s) => s.charAt(0).toUpperCase() + s.slice(1);

function hideMessage(el) {
  el.hidden = true;
  el.textContent = "";
}

// --- token -----------------------------------------------------------------------------

function askForToken(message) {
  $("token-panel").hidden = false;
  $("token-message").textContent = message || "";
  document.body.dataset.state = "needs-token";
  $("token-input").focus();
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token-input").value.trim();
  if (!t) return;
  sessionStorage.setItem(TOKEN_KEY, t);
  $("token-input").value = "";
  $("token-panel").hidden = true;
  refresh();
});

$("token-button").addEventListener("click", () => askForToken(""));

// The view can be set from the address, so a view can be shared as a link:
// #filter=TEXT&sort=users|segment[-asc|-desc]&within=1d&segment=S&compare=a,b&user=ID.
// A token there (#token=T) is moved to sessionStorage and removed from the address.
function viewFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const t = params.get("token");
  if (t) {
    sessionStorage.setItem(TOKEN_KEY, t);
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
  }
  const view = {};
  if (params.has("filter")) $("filter").value = params.get("filter");
  const sort = /^(users|segment)(?:-(asc|desc))?$/.exec(params.get("sort") || "");
  if (sort) state.sort = { key: sort[1], desc: sort[2] ? sort[2] === "desc" : sort[1] === "users" };
  const within = params.get("within");
  if (within && [...$("within").options].some((o) => o.value === within)) $("within").value = within;
  if (params.get("segment")) view.segment = params.get("segment");
  for (const c of (params.get("compare") || "").split(",").filter(Boolean)) state.picked.add(c);
  if (params.get("user")) view.user = params.get("user");
  return view;
}

// --- formatting ------------------------------------------------------------------------

const fmtInt = (n) => Number(n).toLocaleString("en-US");

function fmtRate(x) {
  if (x === null || !isFinite(x)) return "–";
  if (x >= 1e6) return (x / 1e6).toFixed(2) + " M";
  if (x >= 1e3) return (x / 1e3).toFixed(1) + " k";
  return x.toFixed(x < 10 ? 1 : 0);
}

function fmtSeconds(s) {
  if (s === null || !isFinite(s)) return "–";
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  return (s / 60).toFixed(1) + " min";
}

function fmtDuration(s) {
  if (s % 86400 === 0) return s / 86400 + " d";
  if (s % 3600 === 0) return s / 3600 + " h";
  if (s % 60 === 0) return s / 60 + " min";
  return s + " s";
}

function fmtTime(unix) {
  return new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// --- segments --------------------------------------------------------------------------

async function loadSegments() {
  const within = $("within").value;
  const q = within ? "?within=" + encodeURIComponent(within) : "";
  const msg = $("segments-message");
  try {
    const body = await api("/v1/segments" + q);
    hideMessage(msg);
    state.segments = body.segments;
    const parts = ["as of " + fmtTime(body.as_of)];
    if (body.window_seconds) parts.push("window " + fmtDuration(body.window_seconds));
    if (body.within_seconds) parts.push("active within " + fmtDuration(body.within_seconds));
    if (body.exact === false) parts.push("approximate");
    $("as-of").textContent = parts.join(" · ");
    renderSegments();
    // Live pairs = memberships counted = the sum of the segments' counts.
    if (!within) $("glance-live").textContent = fmtInt(body.segments.reduce((a, s) => a + s.users, 0));
    document.body.dataset.state = "ready";
    // On first load, show the trend of the segment asked for, else of the largest one.
    if (state.current === null && (initial.segment || state.segments.length)) {
      const largest = state.segments.reduce((a, b) => (b.users > a.users ? b : a), state.segments[0]);
      await showTrend(initial.segment || largest.segment);
    }
  } catch (err) {
    if (err instanceof HttpError && err.status === 400 && within) {
      // A server without sub-windows: go back to the whole window, and say why.
      $("within").value = "";
      await loadSegments();
      showError(msg, err, "within=" + within);
      return;
    }
    showError(msg, err, "the segment list");
    if (document.body.dataset.state !== "needs-token") document.body.dataset.state = "error";
  }
}

function renderSegments() {
  const filter = $("filter").value.trim().toLowerCase();
  const { key, desc } = state.sort;
  const rows = state.segments
    .filter((s) => !filter || s.segment.toLowerCase().includes(filter))
    .sort((a, b) => {
      const c = key === "users" ? a.users - b.users : a.segment.localeCompare(b.segment);
      return desc ? -c : c;
    });
  const tbody = $("segments").tBodies[0];
  tbody.replaceChildren();
  for (const s of rows) {
    const tr = el("tr", { "data-segment": s.segment, "data-users": String(s.users) });
    if (s.segment === state.current) tr.className = "current";
    const pick = el("input", { type: "checkbox", "aria-label": "compare " + s.segment });
    pick.checked = state.picked.has(s.segment);
    pick.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (pick.checked) state.picked.add(s.segment); else state.picked.delete(s.segment);
      updatePicked();
    });
    const td = el("td", { class: "pick" });
    td.append(pick);
    tr.append(td, el("td", { class: "name" }, s.segment), el("td", { class: "num users" }, fmtInt(s.users)));
    tr.addEventListener("click", () => showTrend(s.segment));
    tbody.append(tr);
  }
  $("segment-total").textContent = rows.length === state.segments.length
    ? "(" + state.segments.length + ")"
    : "(" + rows.length + " of " + state.segments.length + ")";
  for (const th of document.querySelectorAll("#segments th.sortable")) {
    th.classList.remove("sorted-asc", "sorted-desc");
    if (th.dataset.sort === key) th.classList.add(desc ? "sorted-desc" : "sorted-asc");
  }
}

for (const th of document.querySelectorAll("#segments th.sortable")) {
  th.addEventListener("click", () => {
    const key = th.dataset.sort;
    state.sort = state.sort.key === key
      ? { key, desc: !state.sort.desc }
      : { key, desc: key === "users" };
    renderSegments();
  });
}
$("filter").addEventListener("input", renderSegments);
$("within").addEventListener("change", loadSegments);

// --- trend -----------------------------------------------------------------------------

async function showTrend(segment) {
  state.current = segment;
  renderSegments();
  $("trend-segment").textContent = segment;
  const range = Number($("trend-range").value);
  const to = Math.floor(Date.now() / 1000);
  const from = to - range;
  const step = Math.max(60, Math.round(range / 240));
  const msg = $("trend-message");
  const chart = $("trend-chart");
  try {
    const body = await api("/v1/segments/" + encodeURIComponent(segment) +
      "/history?from=" + from + "&to=" + to + "&step=" + step + "s");
    hideMessage(msg);
    if (!body.points.length) {
      chart.replaceChildren();
      msg.hidden = false;
      msg.className = "message";
      msg.textContent = "No samples for " + segment + " in this range yet.";
      return;
    }
    chart.replaceChildren(lineChart(body.points));
  } catch (err) {
    chart.replaceChildren();
    showError(msg, err, "the history API");
  }
}

$("trend-range").addEventListener("change", () => state.current && showTrend(state.current));

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// A line chart of [{ts, users}] as SVG, with a few grid lines and labels.
function lineChart(points) {
  const W = 640, H = 220, L = 64, R = 12, T = 10, B = 26;
  const xs = points.map((p) => p.ts), ys = points.map((p) => p.users);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const yMax = Math.max(1, ...ys) * 1.05;
  const X = (t) => L + (t - x0) / (x1 - x0) * (W - L - R);
  const Y = (u) => T + (1 - u / yMax) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "users over time" });
  const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const u = yMax * i / 4, y = Y(u);
    grid.append(svg("line", { x1: L, x2: W - R, y1: y, y2: y }));
    axis.append(svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, fmtRate(u).replace(" ", "")));
  }
  for (let i = 0; i <= 4; i++) {
    const t = x0 + (x1 - x0) * i / 4;
    const d = new Date(t * 1000).toISOString();
    const label = (x1 - x0) > 2 * 86400 ? d.slice(5, 10) : d.slice(11, 16);
    axis.append(svg("text", { x: X(t), y: H - 8, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" }, label));
  }
  const line = points.map((p, i) => (i ? "L" : "M") + X(p.ts).toFixed(1) + "," + Y(p.users).toFixed(1)).join("");
  const area = line + `L${X(xs[xs.length - 1]).toFixed(1)},${Y(0)}L${X(xs[0]).toFixed(1)},${Y(0)}Z`;
  root.append(grid, axis, svg("path", { class: "area", d: area }), svg("path", { class: "line", d: line }));
  const last = points[points.length - 1];
  root.append(svg("title", {}, fmtInt(last.users) + " users at " + fmtTime(last.ts)));
  return root;
}

// --- overlap ---------------------------------------------------------------------------

function updatePicked() {
  const n = state.picked.size;
  $("overlap-picked").textContent = n < 2 ? "tick 2 or more segments" : n + " segments ticked";
  $("overlap-button").disabled = n < 2 || n > 64;
}

async function showOverlap() {
  const names = [...state.picked];
  const within = $("within").value;
  // Segment names are URL-safe ([A-Za-z0-9_.:-]): sent as they are.
  const q = "segments=" + names.join(",") +
    (within ? "&within=" + encodeURIComponent(within) : "");
  const msg = $("overlap-message");
  const table = $("overlap");
  try {
    const body = await api("/v1/overlap?" + q);
    hideMessage(msg);
    table.replaceChildren();
    const head = el("tr");
    head.append(el("th", {}, ""), el("th", { class: "num" }, "users"));
    for (const s of body.segments) head.append(el("th", { class: "num" }, "∩ " + s));
    table.append(head);
    body.segments.forEach((s, i) => {
      const tr = el("tr", { "data-segment": s });
      tr.append(el("th", {}, s), el("td", { class: "num" }, fmtInt(body.users[i])));
      body.both[i].forEach((n, j) => {
        const td = el("td", { class: "cell", "data-both": String(n) }, fmtInt(n));
        const share = body.users[i] ? n / body.users[i] : 0;
        td.style.background = `rgba(47, 111, 223, ${(0.05 + 0.45 * share).toFixed(2)})`;
        if (i !== j) td.append(el("span", { class: "pct" }, (100 * share).toFixed(0) + "%"));
        tr.append(td);
      });
      table.append(tr);
    });
  } catch (err) {
    table.replaceChildren();
    showError(msg, err, "the overlap API");
  }
}

$("overlap-button").addEventListener("click", showOverlap);

// --- user lookup -----------------------------------------------------------------------

$("user-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if ($("user-input").value) lookUpUser($("user-input").value);
});

async function lookUpUser(id) {
  const msg = $("user-message");
  const table = $("user-segments");
  try {
    const body = await api("/v1/users/" + encodeURIComponent(id) + "/segments");
    table.replaceChildren();
    if (!body.segments.length) {
      msg.hidden = false;
      msg.className = "message";
      msg.textContent = "This user is in no segment.";
      return;
    }
    hideMessage(msg);
    const head = el("tr");
    head.append(el("th", {}, "segment"), el("th", {}, "last seen"), el("th", {}, "expires"));
    table.append(head);
    for (const m of body.segments) {
      const tr = el("tr", { "data-segment": m.segment });
      tr.append(el("td", {}, m.segment), el("td", {}, fmtTime(m.last_seen)), el("td", {}, fmtTime(m.expires_at)));
      table.append(tr);
    }
  } catch (err) {
    table.replaceChildren();
    showError(msg, err, "the user lookup API");
  }
}

// --- at a glance (from /metrics) -------------------------------------------------------

// Parses the Prometheus text format into {name: [{labels, value}]}.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) {
      for (const kv of m[2].slice(1, -1).matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[kv[1]] = kv[2];
      }
    }
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[3]) });
  }
  return out;
}

const total = (values, name) => (values[name] || []).reduce((a, s) => a + s.value, 0);
const has = (values, name) => Boolean(values[name] && values[name].length);

// Cumulative buckets of a histogram summed over its label sets: [[le, count]].
function buckets(values, name) {
  const by = new Map();
  for (const s of values[name + "_bucket"] || []) {
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    by.set(le, (by.get(le) || 0) + s.value);
  }
  return [...by.entries()].sort((a, b) => a[0] - b[0]);
}

// The q-quantile of the observations between two samples of a histogram (as histogram_quantile).
function quantile(q, before, after) {
  const prev = new Map(before);
  const delta = after.map(([le, c]) => [le, c - (prev.get(le) || 0)]);
  const n = delta.length ? delta[delta.length - 1][1] : 0;
  if (n <= 0) return null;
  const rank = q * n;
  let lo = 0, below = 0;
  for (const [le, c] of delta) {
    if (c >= rank) {
      if (le === Infinity) return lo;
      return lo + (le - lo) * ((rank - below) / Math.max(1, c - below));
    }
    lo = le; below = c;
  }
  return null;
}

async function loadMetrics() {
  let text;
  try {
    text = await request("/metrics", true);
  } catch (_) {
    return;
  }
  const values = parseMetrics(text);
  const now = Date.now() / 1000;
  const prev = state.metrics;
  state.metrics = { at: now, values };
  if (has(values, "userseg_index_serving")) {
    const serving = total(values, "userseg_index_serving") > 0;
    $("glance-live-unit").textContent = serving
      ? "in the ES index (serving)"
      : "index loading: ClickHouse answers";
  }
  if (has(values, "userseg_kafka_consumer_lag")) {
    $("glance-backlog").textContent = fmtInt(total(values, "userseg_kafka_consumer_lag"));
    $("glance-backlog-unit").textContent = "messages behind on the topic";
  } else if (has(values, "userseg_wal_unapplied_bytes")) {
    $("glance-backlog").textContent = fmtInt(total(values, "userseg_wal_unapplied_bytes"));
    $("glance-backlog-unit").textContent = "log bytes not yet applied";
  }
  if (!prev) return;
  const dt = now - prev.at;
  const rate = (name) => has(values, name) ? Math.max(0, total(values, name) - total(prev.values, name)) / dt : null;
  $("glance-ingest").textContent = fmtRate(rate("userseg_ingest_pairs_total"));
  $("glance-applied").textContent = fmtRate(rate("userseg_processor_pairs_written_total"));
  const lag = "userseg_processor_applied_lag_seconds";
  $("glance-lag").textContent = fmtSeconds(quantile(0.99, buckets(prev.values, lag), buckets(values, lag)));
}

// --- start -----------------------------------------------------------------------------

async function refresh() {
  await Promise.all([loadSegments(), loadMetrics()]);
}

const initial = viewFromHash();
updatePicked();
refresh().then(() => {
  const work = [];
  if (state.picked.size >= 2) work.push(showOverlap());
  if (initial.user) {
    $("user-input").value = initial.user;
    work.push(lookUpUser(initial.user));
  }
  return Promise.all(work);
}).finally(() => { document.body.dataset.loaded = "1"; });
setInterval(loadMetrics, 5000);
setInterval(() => { if (document.body.dataset.state === "ready") loadSegments(); }, 30000);
