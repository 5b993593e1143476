// The playground page: sends one generation request, reads its server-sent events (see
// sdk/playground/events.py for every event and its fields) and draws them: the answer as
// coloured spans, the rounds as a table and two charts, the usage, auto's decision; and drives
// the simulated link (RTT, jitter, loss, cut, restore). Plain browser APIs, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const MAX_TIMELINE_ROWS = 300;

// what scripts and tests can read: generations started, the last `done` event, the rounds so far
const playground = { runs: 0, last: null, rounds: [], marks: [], config: null };
window.playground = playground;

let controller = null;   // aborts the running generation (Stop)
let drawPending = false;

// -- talking to the server -----------------------------------------------------------------

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body ?? {}),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

// Server-sent events from a fetch body: blocks separated by a blank line, each with an
// `event:` and a `data:` line (EventSource cannot POST, so the stream is read by hand).
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield [name, JSON.parse(data || "null")];
    }
  }
}

// -- set-up ----------------------------------------------------------------------------------

async function init() {
  const config = await (await fetch("/api/state")).json();
  playground.config = config;
  $("drafter").textContent = config.drafter ?? "no drafter";
  $("target").textContent = config.target ?? "(gateway unreachable)";
  $("gateway").textContent = config.gateway;
  for (const mode of config.modes) $("mode").add(new Option(mode, mode, false, mode === config.defaults.mode));
  $("draft-len").add(new Option("auto", "auto", true, true));
  for (let k = 1; k <= 16; k++) $("draft-len").add(new Option(String(k), String(k)));
  $("prompt").value = config.defaults.prompt;
  $("max-tokens").value = config.defaults.max_new_tokens;
  $("temperature").value = config.defaults.temperature;
  $("policy").value = config.policy;
  $("legend").replaceChildren(...Object.entries(config.origins).map(([origin, name]) => {
    const item = document.createElement("span");
    item.innerHTML = `<span class="swatch" style="background: var(--${origin})"></span>`;
    item.append(name);
    return item;
  }));
  showLink(config.link);
  setRunning(false);
  drawCharts();
  renderUsage(null);
}

// -- the link ----------------------------------------------------------------------------------

function showLink(link) {
  const pill = $("link-status");
  if (!link.simulated) {
    pill.textContent = "link: not simulated";
    for (const id of ["rtt", "jitter", "loss", "cut-link", "restore-link"]) $(id).disabled = true;
    $("link-note").hidden = false;
    $("link-note").textContent = "This gateway cannot sit behind the link simulator (only http:// gateways can).";
    return;
  }
  $("rtt").value = link.rtt_ms; $("jitter").value = link.jitter_ms; $("loss").value = Math.round(link.loss * 100);
  sliderLabels();
  pill.className = "pill " + (link.down ? "cut" : "online");
  pill.textContent = link.down ? "link cut" : `link up · +${Math.round(link.rtt_ms)} ms RTT`;
  $("cut-link").disabled = link.down;
  $("restore-link").disabled = !link.down;
}

function sliderLabels() {
  $("rtt-value").textContent = `${$("rtt").value} ms`;
  $("jitter-value").textContent = `${$("jitter").value} ms`;
  $("loss-value").textContent = `${$("loss").value} %`;
}

async function linkAction(path, body) {
  try { showLink(await post(path, body)); } catch (error) { showError(error.message); }
}

// -- one generation ----------------------------------------------------------------------------

function readForm() {
  const draft = $("draft-len").value;
  return {
    prompt: $("prompt").value, mode: $("mode").value, max_new_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value), chat: $("chat").checked,
    draft_len: draft === "auto" ? "auto" : Number(draft), policy: $("policy").value.trim(),
    tags: $("tags").value.split(",").map((t) => t.trim()).filter(Boolean),
  };
}

// body[data-state]: loading, idle, running, done, stopped, error (what tests wait for)
function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  document.body.dataset.state = running ? "running" : (playground.last ? "done" : "idle");
}

function reset() {
  playground.last = null; playground.rounds = []; playground.marks = [];
  $("output").replaceChildren();
  $("timeline").tBodies[0].replaceChildren();
  $("error").hidden = true;
  $("run-status").textContent = "";
  drawCharts();
}

async function generate() {
  reset();
  playground.runs += 1;
  setRunning(true);
  controller = new AbortController();
  const started = performance.now();
  try {
    const response = await fetch("/api/generate", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(readForm()),
      signal: controller.signal,
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error || `HTTP ${response.status}`);
    }
    for await (const [name, data] of readEvents(response.body)) {
      (handlers[name] ?? (() => {}))(data);
    }
  } catch (error) {
    if (error.name === "AbortError") $("run-status").textContent = `stopped after ${((performance.now() - started) / 1000).toFixed(1)} s`;
    else showError(error.message);
  } finally {
    const stopped = controller.signal.aborted;
    controller = null;
    setRunning(false);
    if (!playground.last) document.body.dataset.state = stopped ? "stopped" : "error";
  }
}

const handlers = {
  start(data) {
    $("run-status").textContent = `${data.mode} · generating…`;
  },
  decision(data) { renderDecision(data); },
  round(data) {
    playground.rounds.push(data);
    addTimelineRow(data);
    scheduleDraw();
  },
  offline(data) {
    playground.marks.push({ kind: "offline", round: playground.rounds.length, token: data.at_token });
    addMark("offline", `link lost at token ${data.at_token}: the device goes on alone`);
    $("link-status").className = "pill alone";
    $("link-status").textContent = "device alone";
    scheduleDraw();
  },
  rejoin(data) {
    playground.marks.push({ kind: "rejoin", round: playground.rounds.length, token: data.at_token });
    addMark("rejoin", `rejoined the gateway at token ${data.at_token}`);
    refreshLink();
    scheduleDraw();
  },
  piece(data) {
    const output = $("output");
    const span = document.createElement("span");
    span.className = `tok tok-${data.origin}`;
    span.title = playground.config.origins[data.origin] ?? data.origin;
    span.textContent = data.text;
    const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 30;
    output.append(span);
    if (atBottom) output.scrollTop = output.scrollHeight;
  },
  usage(data) { renderUsage(data); },
  error(data) { showError(data.message); },
  done(data) {
    playground.last = data;
    renderUsage(data.usage);
    if (data.decision && data.decision.mode) renderDecision(data.decision);
    const u = data.usage;
    $("run-status").textContent = `${data.mode} · ${data.finish_reason ?? "stopped"} · ${u.tokens} tokens in ${u.wall_s.toFixed(2)} s`;
    drawCharts();
    refreshLink();
  },
};

async function refreshLink() {
  try { showLink((await (await fetch("/api/state")).json()).link); } catch { /* the next action tells */ }
}

function showError(message) {
  $("error").hidden = false;
  $("error").textContent = message;
}

// -- rounds: the table ---------------------------------------------------------------------------

// Of a round's k drafts the target keeps `accepted`, rejects the next one (if any) and never
// looks at the rest: they are discarded with it. Acceptance counts the first two (as Usage does).
function judged(r) {
  const rejected = r.accepted < r.k ? 1 : 0;
  return { rejected, discarded: Math.max(0, r.k - r.accepted - rejected) };
}

function ms(value) {
  return value >= 1000 ? `${(value / 1000).toFixed(1)} s` : `${Math.round(value)} ms`;
}

function addTimelineRow(r) {
  const body = $("timeline").tBodies[0];
  const row = body.insertRow();
  const cloud = Math.max(0, r.emitted - Math.min(r.accepted, r.emitted));
  const { rejected, discarded } = judged(r);
  for (const value of [r.index, r.k, r.accepted, r.rejected, cloud, ms(r.round_ms)]) row.insertCell().textContent = value;
  const blocks = row.insertCell();
  blocks.className = "blocks";
  blocks.innerHTML = "<i class=a></i>".repeat(Math.min(r.accepted, 32)) + "<i class=r></i>".repeat(rejected)
    + "<i class=d></i>".repeat(Math.min(discarded, 32)) + "<i class=c></i>".repeat(Math.min(cloud, 32));
  trimAndScroll(body);
}

function addMark(kind, text) {
  const body = $("timeline").tBodies[0];
  const row = body.insertRow();
  row.className = `mark ${kind}`;
  const cell = row.insertCell();
  cell.colSpan = 7;
  cell.textContent = text;
  trimAndScroll(body);
  const marker = document.createElement("span");
  marker.className = `tok-mark ${kind}`;
  marker.textContent = kind === "offline" ? "link lost" : "rejoined";
  $("output").append(marker);
}

function trimAndScroll(body) {
  while (body.rows.length > MAX_TIMELINE_ROWS) body.deleteRow(0);
  const wrap = body.closest(".timeline-wrap");
  wrap.scrollTop = wrap.scrollHeight;
}

// -- charts (SVG) ------------------------------------------------------------------------------

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => { drawPending = false; drawCharts(); });
}

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A bar chart over rounds, with an optional line on its own scale and the offline/rejoin marks.
// `bars(round)` returns [{value, cls}] stacked from the bottom, in units of `max`; `line` is
// {value(round, i), cls, max, label}.
function roundChart(svg, { max, bars, yLabels, line }) {
  const W = 560, H = 170, left = 34, right = line ? 40 : 8, top = 8, bottom = 20;
  const w = W - left - right, h = H - top - bottom;
  const rounds = playground.rounds;
  const parts = [];
  for (const [value, label] of yLabels) {
    const y = top + h - (value / max) * h;
    parts.push(el("line", { x1: left, x2: left + w, y1: y, y2: y, class: "grid" }));
    parts.push(el("text", { x: left - 4, y: y + 3, "text-anchor": "end" }, label));
  }
  parts.push(el("line", { x1: left, x2: left + w, y1: top + h, y2: top + h, class: "axis" }));
  if (!rounds.length) {
    parts.push(el("text", { x: left + w / 2, y: top + h / 2, "text-anchor": "middle", class: "empty" }, "no verify rounds yet"));
    svg.replaceChildren(...parts);
    return;
  }
  const n = Math.max(rounds.length, 24);
  const slot = w / n, barW = Math.max(1, slot * 0.8);
  rounds.forEach((r, i) => {
    let y = top + h;
    for (const { value, cls } of bars(r)) {
      const bh = (Math.min(value, max) / max) * h;
      y -= bh;
      if (bh > 0) parts.push(el("rect", { x: left + i * slot + (slot - barW) / 2, y, width: barW, height: bh, class: cls }));
    }
  });
  if (line) {
    const y = (r, i) => top + h - (Math.min(line.value(r, i), line.max) / line.max) * h;
    const points = rounds.map((r, i) => `${left + (i + 0.5) * slot},${y(r, i)}`);
    parts.push(el("polyline", { points: points.join(" "), class: line.cls }));
    parts.push(el("text", { x: left + w + 4, y: top + 8 }, line.label));
  }
  for (const mark of playground.marks) {
    const x = left + mark.round * slot;
    parts.push(el("line", { x1: x, x2: x, y1: top, y2: top + h, class: `mark-${mark.kind}` }));
    parts.push(el("text", { x: x + 3, y: top + 10 }, mark.kind === "offline" ? "link lost" : "rejoined"));
  }
  const step = Math.max(1, Math.ceil(rounds.length / 8));
  for (let i = 0; i < rounds.length; i += step) {
    parts.push(el("text", { x: left + (i + 0.5) * slot, y: H - 6, "text-anchor": "middle" }, String(i + 1)));
  }
  svg.replaceChildren(...parts);
}

function drawCharts() {
  const rounds = playground.rounds;
  // running acceptance as Usage counts it: accepted over tested (the accepted, plus the first rejected)
  let accepted = 0, tested = 0;
  const running = rounds.map((r) => {
    accepted += r.accepted;
    tested += r.accepted + (r.accepted < r.k ? 1 : 0);
    return tested ? accepted / tested : 0;
  });
  roundChart($("chart-acceptance"), {
    max: 1,
    yLabels: [[0, "0"], [0.5, "50%"], [1, "100%"]],
    bars: (r) => {
      if (!r.k) return [];
      const { rejected, discarded } = judged(r);
      return [{ value: r.accepted / r.k, cls: "bar-accept" }, { value: rejected / r.k, cls: "bar-reject" },
              { value: discarded / r.k, cls: "bar-discard" }];
    },
    line: { value: (r, i) => running[i], cls: "line-rate", max: 1,
            label: running.length ? `${Math.round(running.at(-1) * 100)}%` : "" },
  });
  const kMax = Math.max(4, ...rounds.map((r) => r.k));
  const msMax = Math.max(10, ...rounds.map((r) => r.round_ms));
  roundChart($("chart-draft"), {
    max: kMax,
    yLabels: [[0, "0"], [Math.round(kMax / 2), String(Math.round(kMax / 2))], [kMax, String(kMax)]],
    bars: (r) => [{ value: r.k, cls: "bar-k" }],
    line: { value: (r) => r.round_ms, cls: "line-time", max: msMax * 1.1, label: ms(msMax) },
  });
}

// -- usage and the decision ---------------------------------------------------------------------

const fmt = {
  n: (v) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en")),
  f2: (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(2)),
  pct: (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)} %`),
  bytes: (v) => (v >= 1e6 ? `${(v / 1e6).toFixed(2)} MB` : v >= 1e3 ? `${(v / 1e3).toFixed(1)} kB` : `${v} B`),
};

// the last cloud-mode run's rate on this gateway, and this run's rate over it (other modes)
function cloudAlone(u) {
  const c = u.cloud_tokens_per_s;
  if (c === null || c === undefined) return "– (run mode cloud once)";
  if (u.mode === "cloud" || !u.tokens_per_s) return `${fmt.f2(c)} tok/s`;
  return `${fmt.f2(c)} tok/s (this run ${fmt.f2(u.tokens_per_s / c)}x)`;
}

function renderUsage(u) {
  const usage = $("usage");
  if (!u) {
    usage.innerHTML = '<dt>nothing generated yet</dt><dd></dd>';
    return;
  }
  const alone = Math.max(0, u.tokens - u.accepted_tokens - u.cloud_tokens);
  const share = (x) => (u.tokens ? (100 * x) / u.tokens : 0);
  const rows = [
    ["tokens", fmt.n(u.tokens), "tokens"],
    ["accepted drafts", fmt.n(u.accepted_tokens), "accepted"],
    ["cloud's own tokens", fmt.n(u.cloud_tokens), "cloud"],
    ["device alone", fmt.n(alone), "local"],
    ["drafted on the device", fmt.n(u.local_tokens), "drafted"],
    ["rounds", fmt.n(u.rounds), "rounds"],
    ["tokens per round", fmt.f2(u.tokens_per_round), "tokens-per-round"],
    ["acceptance", fmt.pct(u.acceptance_rate), "acceptance"],
    ["cloud passes per token", fmt.f2(u.cloud_passes_per_token), "passes"],
    ["bytes up / down", `${fmt.bytes(u.bytes_up)} / ${fmt.bytes(u.bytes_down)}`, "bytes"],
    ["time to first token", u.ttft_ms === null || u.ttft_ms === undefined ? "–" : `${fmt.n(Math.round(u.ttft_ms))} ms`, "ttft"],
    ["tokens per second", fmt.f2(u.tokens_per_s), "tokens-per-s"],
    ["cloud alone, last run", cloudAlone(u), "cloud-alone"],
    ["wall time", `${fmt.f2(u.wall_s)} s`, "wall"],
    ["fallbacks", fmt.n(u.fallbacks), "fallbacks"],
  ];
  usage.replaceChildren();
  const bar = document.createElement("div");
  bar.className = "origin-bar";
  bar.innerHTML = `<span style="width:${share(u.accepted_tokens)}%;background:var(--accepted)"></span>`
    + `<span style="width:${share(u.cloud_tokens)}%;background:var(--cloud)"></span>`
    + `<span style="width:${share(alone)}%;background:var(--local)"></span>`;
  usage.append(bar);
  for (const [name, value, key] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name; dd.textContent = value; dd.id = `usage-${key}`;
    usage.append(dt, dd);
  }
  usage.dataset.fallbacks = u.fallbacks;
  usage.dataset.tokens = u.tokens;
}

function renderDecision(d) {
  const box = $("decision");
  box.classList.remove("muted");
  box.replaceChildren();
  const head = document.createElement("div");
  head.className = "reason";
  const policy = d.policy;
  head.textContent = policy
    ? `${d.mode}: rule "${policy.rule}": ${policy.reason}${policy.overridden_by ? ` (overridden by ${policy.overridden_by})` : ""}`
    : d.predicted ? `${d.mode}: the lowest predicted ${d.objective === "cost" ? "cloud passes" : "seconds"} per token`
    : `${d.mode}: the gateway is unreachable, so the device answers alone`;
  box.append(head);
  if (d.predicted) {
    const table = document.createElement("table");
    table.innerHTML = "<tr><th>mode</th><th>s / token</th><th>cloud passes / token</th></tr>";
    for (const [mode, p] of Object.entries(d.predicted)) {
      const row = table.insertRow();
      if (mode === d.mode) row.className = "chosen";
      for (const v of [mode, p.s_per_token.toFixed(4), p.cloud_passes_per_token.toFixed(2)]) row.insertCell().textContent = v;
    }
    box.append(table);
  }
  if (d.rtt_ms !== undefined) {
    const rtt = document.createElement("div");
    rtt.className = "muted small";
    rtt.textContent = d.rtt_ms === null ? "the gateway did not answer" : `measured RTT ${d.rtt_ms} ms`;
    box.append(rtt);
  }
}

// -- wiring ------------------------------------------------------------------------------------

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller?.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
});
for (const id of ["rtt", "jitter", "loss"]) {
  $(id).addEventListener("input", sliderLabels);
  $(id).addEventListener("change", () => linkAction("/api/link", {
    rtt_ms: Number($("rtt").value), jitter_ms: Number($("jitter").value), loss: Number($("loss").value) / 100,
  }));
}
$("cut-link").addEventListener("click", () => linkAction("/api/link/cut"));
$("restore-link").addEventListener("click", () => linkAction("/api/link/restore"));
init().catch((error) => showError(`could not load the playground's state: ${error.message}`));
