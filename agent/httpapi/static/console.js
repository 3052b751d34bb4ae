// cv-worker web console: plain JS, no build step. Talks to the node's own /v1 API with the bearer token.
"use strict";

const TOKEN_KEY = "cvw-token";
const $ = (id) => document.getElementById(id);
let token = null;
let timers = [];
let streamIds = "";

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function ago(ts) {
  if (!ts) return "";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return new Date(ts * 1000).toLocaleString();
}

function duration(s) {
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} days`;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: `Bearer ${token}` }, options.headers || {});
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (r.status === 401) throw new Unauthorized("the token was not accepted");
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok && r.status !== 202) {
    const err = new Error(body && body.detail ? `${body.code}: ${body.detail}` : `HTTP ${r.status}`);
    err.problem = body;
    throw err;
  }
  return { status: r.status, body };
}

function withToken(path) {
  return `${path}${path.includes("?") ? "&" : "?"}access_token=${encodeURIComponent(token)}`;
}

// -- sign in ------------------------------------------------------------------------------------------------

function showLogin(message) {
  timers.forEach(clearInterval);
  timers = [];
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function start() {
  try {
    await api("/v1/node");
  } catch (e) {
    if (e instanceof Unauthorized) {
      localStorage.removeItem(TOKEN_KEY);
      showLogin("That token was not accepted.");
      return;
    }
    throw e;
  }
  localStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("openapi").href = withToken("/openapi.json");
  refreshNode();
  refreshJobs();
  refreshStreams();
  timers = [setInterval(refreshNode, 5000), setInterval(refreshJobs, 2000), setInterval(refreshStreams, 5000)];
}

function guard(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (e) {
      if (e instanceof Unauthorized) showLogin("The token was not accepted (changed on the node?).");
      else console.warn(e);
    }
  };
}

// -- node, accelerators, models -----------------------------------------------------------------------------

const refreshNode = guard(async () => {
  const [{ body: info }, { body: models }] = await Promise.all([api("/v1/node"), api("/v1/models")]);
  $("node-id").textContent = info.node_id;
  $("node-version").textContent = `v${info.version}`;
  document.title = `${info.node_id} · cv-worker`;
  const conn = $("conn");
  conn.textContent = info.mqtt.connected ? "MQTT connected" : "MQTT offline";
  conn.className = `pill ${info.mqtt.connected ? "ok" : "bad"}`;
  const facts = [
    ["host", `${info.hostname} (${info.platform})`],
    ["up", duration(info.uptime_s)],
    ["broker", `${info.mqtt.host}:${info.mqtt.port}${info.mqtt.tls ? " (TLS)" : ""}`],
    ["pools", (info.pools || []).join(", ") || "none"],
    ["jobs", `${info.jobs.running.length} running, ${info.jobs.queued} queued, ${info.jobs.workers} workers`],
    ["outbox", `${info.outbox.depth} waiting for the broker`],
    ["boot", info.boot_id],
  ];
  $("node-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));

  const accs = info.accelerators || [];
  $("accelerators").replaceChildren(...(accs.length ? accs.map((a) => el("tr", {},
    el("td", { text: `${a.name} (${a.kind})` }),
    el("td", { text: a.backend ? `${a.backend}${a.device ? ":" + a.device : ""}` : "" }),
    el("td", { class: a.usable ? "ok" : "bad", text: a.usable ? (a.state || "ok") : (a.reason || a.state || "unusable") }),
  )) : [el("tr", {}, el("td", { colSpan: 3, class: "muted", text: "detecting…" }))]));

  const list = models.models || [];
  $("models").replaceChildren(...(list.length ? list.map((m) => el("tr", {},
    el("td", { text: m.name, title: m.description || "" }),
    el("td", { text: m.task || "" }),
    el("td", { text: m.active || "" }),
    el("td", { text: m.backend ? `${m.backend}:${m.device}` : "not loaded" }),
    el("td", { text: m.inference && m.inference.latency_ms && m.inference.latency_ms.p50 != null
      ? `${m.inference.latency_ms.p50.toFixed(1)} ms` : "" }),
  )) : [el("tr", {}, el("td", { colSpan: 5, class: "muted", text: "no models installed" }))]));

  const select = $("try-model");
  const names = list.map((m) => m.name);
  if (select.dataset.names !== names.join(",")) {
    const keep = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(keep)) select.value = keep;
    select.dataset.names = names.join(",");
  }
});

// -- jobs ---------------------------------------------------------------------------------------------------

const refreshJobs = guard(async () => {
  const { body } = await api("/v1/jobs?limit=15");
  const rows = body.jobs.map((j) => {
    const p = j.state === "IN_PROGRESS" && j.progress != null
      ? el("progress", { max: 1, value: j.progress, title: `${Math.round(j.progress * 100)} %` })
      : document.createTextNode(j.progress != null ? `${Math.round(j.progress * 100)} %` : "");
    const state = el("td", { class: `state-${j.state}`, text: j.state });
    if (j.error) state.title = `${j.error.code}: ${j.error.message}`;
    return el("tr", { "data-job": j.job_id }, el("td", { text: j.job_id.slice(0, 12), title: j.job_id }),
      el("td", { text: j.type }), state, el("td", {}, p), el("td", { text: j.source || "" }),
      el("td", { text: ago(j.updated) }));
  });
  $("jobs").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 6, class: "muted", text: "no jobs yet" }))]));
});

// -- streams ------------------------------------------------------------------------------------------------

const refreshStreams = guard(async () => {
  const { body } = await api("/v1/streams");
  const streams = body.streams || [];
  const ids = streams.map((s) => s.stream_id).join(",");
  if (ids !== streamIds) {  // rebuild only when the set changes, or every live view would reconnect
    streamIds = ids;
    $("streams").replaceChildren(...(streams.length ? streams.map((s) => el("div", { class: "stream" },
      el("div", {}, el("strong", { text: s.stream_id }), " ",
        el("span", { class: "muted", id: `stream-facts-${s.stream_id}` })),
      el("img", { src: withToken(`/v1/streams/${encodeURIComponent(s.stream_id)}/mjpeg?fps=5&width=640`),
        alt: `live view of ${s.stream_id}`, loading: "lazy" }),
    )) : [el("p", { class: "muted", text: "no streams running (start one with a stream.start job)" })]));
  }
  for (const s of streams) {
    const f = document.getElementById(`stream-facts-${s.stream_id}`);
    if (f) {
      f.textContent = `${s.state} · ${s.model} · ${(s.processed_fps || 0).toFixed(1)} fps · ` +
        `${s.active_objects} in view${s.last_error ? " · " + s.last_error : ""}`;
      f.className = s.state === "running" ? "muted" : "warn";
    }
  }
});

// -- try a model --------------------------------------------------------------------------------------------

function drawResult(item) {
  const boxes = $("try-boxes");
  boxes.replaceChildren();
  const w = item.width, h = item.height;
  for (const d of item.detections || []) {
    const [x1, y1, x2, y2] = d.box;
    const box = el("div", {
      class: "box", "data-label": d.label, "data-score": d.score,
      "data-x1": x1, "data-y1": y1, "data-x2": x2, "data-y2": y2,
    }, el("span", { text: `${d.label} ${d.score.toFixed(2)}` }));
    Object.assign(box.style, { left: `${(100 * x1) / w}%`, top: `${(100 * y1) / h}%`,
      width: `${(100 * (x2 - x1)) / w}%`, height: `${(100 * (y2 - y1)) / h}%` });
    boxes.append(box);
    for (const [kx, ky] of d.keypoints || []) {
      const kp = el("div", { class: "kp" });
      Object.assign(kp.style, { left: `${(100 * kx) / w}%`, top: `${(100 * ky) / h}%` });
      boxes.append(kp);
    }
  }
  const out = $("try-classes");
  out.replaceChildren();
  const rows = [];
  for (const c of item.classes || []) rows.push([c.label, c.score, c.score]);
  if (item.mask) for (const c of item.mask.classes || []) rows.push([c.label, c.fraction, c.fraction]);
  if (rows.length) {
    out.append(el("table", {}, el("tbody", {}, ...rows.map(([label, value, frac]) => el("tr", { "data-label": label },
      el("td", { text: label }), el("td", { text: Number(value).toFixed(3) }),
      el("td", { style: "width:50%" }, el("div", { class: "bar", style: `width:${Math.round(frac * 100)}%` })))))));
  }
}

async function resultOfJob(jobId) {
  for (;;) {
    const { body: job } = await api(`/v1/jobs/${jobId}`);
    if (!["QUEUED", "IN_PROGRESS"].includes(job.state)) break;
    $("try-status").textContent = `job ${jobId}: ${job.state}…`;
    await new Promise((r) => setTimeout(r, 500));
  }
  const { body } = await api(`/v1/jobs/${jobId}/result`);
  const item = body.results.flatMap((r) => r.items || [])[0];
  if (!item) throw new Error(`job ${jobId} ended ${body.state} without a result`);
  if (!item.ok) throw new Error(`${item.error.code}: ${item.error.message}`);
  return { image: item, job_id: jobId };
}

async function tryModel(ev) {
  ev.preventDefault();
  const file = $("try-image").files[0];
  const model = $("try-model").value;
  if (!file || !model) return;
  const run = $("try-run");
  run.disabled = true;
  $("try-status").className = "muted";
  $("try-status").textContent = `running ${model}…`;
  $("try-boxes").replaceChildren();
  $("try-classes").replaceChildren();
  const img = $("try-img");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  $("try-view").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  const q = new URLSearchParams({ wait: "true" });
  const th = $("try-threshold").value;
  if (th !== "") q.set("threshold", th);
  const t0 = performance.now();
  try {
    let { status, body } = await api(`/v1/predict/${encodeURIComponent(model)}?${q}`, { method: "POST", body: form });
    if (status === 202) body = await resultOfJob(body.job_id);
    drawResult(body.image);
    const n = (body.image.detections || []).length;
    $("try-status").textContent = `${model}: ${body.image.detections ? `${n} detection${n === 1 ? "" : "s"}, ` : ""}` +
      `${body.image.width}×${body.image.height}, inference ${body.image.inference_ms} ms` +
      `${body.backend ? ` on ${body.backend}:${body.device}` : ""}, round trip ${Math.round(performance.now() - t0)} ms`;
    $("try-json").textContent = JSON.stringify(body.image, null, 1);
    $("try-json").hidden = false;
    $("try-view").dataset.done = "1";
  } catch (e) {
    if (e instanceof Unauthorized) { showLogin("The token was not accepted."); return; }
    $("try-status").className = "error";
    $("try-status").textContent = e.message;
  } finally {
    run.disabled = false;
    refreshJobs();
  }
}

// -- boot ---------------------------------------------------------------------------------------------------

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  start();
});
$("logout").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  token = null;
  showLogin("");
});
$("try").addEventListener("submit", tryModel);

(function boot() {
  const url = new URL(location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {  // keep the token out of the address bar and the history
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  token = fromUrl || localStorage.getItem(TOKEN_KEY);
  if (token) start(); else showLogin("");
})();
