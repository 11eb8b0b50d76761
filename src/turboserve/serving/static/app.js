// turboserve web page: start a session, play its fMP4 stream with Media Source Extensions,
// change the prompt, pause/resume/close, and watch the cluster (workers, sessions, migrations).
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // {id, token, ws, nextChunk, mediaSource, sourceBuffer, queue, ended}

function setError(msg) { $("error").textContent = msg || ""; }

async function api(method, path, body) {
  const headers = {"Content-Type": "application/json"};
  if (current) headers["Authorization"] = "Bearer " + current.token;
  const res = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = data.error || {};
    throw new Error((e.field ? e.field + ": " : "") + (e.message || res.statusText));
  }
  return data;
}

function setControls(enabled) {
  for (const id of ["set-prompt", "pause", "resume", "close"]) $(id).disabled = !enabled;
}

function pump() {
  const s = current;
  if (!s || !s.sourceBuffer || s.sourceBuffer.updating || s.queue.length === 0) return;
  try {
    s.sourceBuffer.appendBuffer(s.queue.shift());
  } catch (e) {
    // QuotaExceeded: drop played-out media and retry on the next update
    const v = $("video");
    if (v.currentTime > 10) s.sourceBuffer.remove(0, v.currentTime - 5);
  }
}

function openStream(s) {
  const url = new URL(s.streamUrl);
  url.searchParams.set("token", s.token);
  url.searchParams.set("format", "fmp4");
  url.searchParams.set("from_chunk", String(s.nextChunk));
  const ws = new WebSocket(url.toString());
  ws.binaryType = "arraybuffer";
  s.ws = ws;
  let expect = null; // the JSON header the next binary message belongs to
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const msg = JSON.parse(ev.data);
      if (msg.type === "init") {
        expect = msg;
        if (!s.mediaSource) startMedia(s, msg.mime);
      } else if (msg.type === "chunk") {
        expect = msg;
        $("latency").textContent = msg.latency_ms.toFixed(1) + " ms";
        $("worker").textContent = msg.worker;
      } else if (msg.type === "gap") {
        s.nextChunk = msg.last + 1;
      } else if (msg.type === "end") {
        s.ended = true;
        $("state").textContent = msg.state;
        setControls(false);
      } else if (msg.type === "error") {
        setError(msg.message);
      }
      return;
    }
    if (!expect) return;
    if (expect.type === "chunk") {
      s.nextChunk = expect.index + 1;
      $("chunks").textContent = String(s.nextChunk);
      s.queue.push(ev.data);
    } else if (expect.type === "init" && !s.initAppended) {
      s.initAppended = true;
      s.queue.unshift(ev.data);
    }
    expect = null;
    pump();
  };
  ws.onclose = () => {
    // Reconnect from the next chunk: the server replays what we missed, nothing twice.
    if (current === s && !s.ended) setTimeout(() => { if (current === s && !s.ended) openStream(s); }, 500);
  };
}

function startMedia(s, mime) {
  const video = $("video");
  const ms = new MediaSource();
  s.mediaSource = ms;
  video.src = URL.createObjectURL(ms);
  ms.addEventListener("sourceopen", () => {
    try {
      s.sourceBuffer = ms.addSourceBuffer(mime);
    } catch (e) {
      setError("this browser cannot play " + mime + ": " + e.message);
      return;
    }
    s.sourceBuffer.mode = "sequence"; // chunks play back to back, pauses leave no holes
    s.sourceBuffer.addEventListener("updateend", () => {
      pump();
      if (video.paused) video.play().catch(() => {});
    });
    pump();
  });
}

$("create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  setError("");
  if (current && current.ws) { current.ended = true; current.ws.close(); }
  current = null;
  try {
    const body = {prompt: $("prompt").value};
    const max = parseInt($("max-chunks").value || "0", 10);
    if (max > 0) body.max_chunks = max;
    const created = await api("POST", "/v1/sessions", body);
    current = {id: created.id, token: created.token, streamUrl: created.stream_url, nextChunk: 0,
               queue: [], ended: false};
    $("sid").textContent = created.id;
    setControls(true);
    openStream(current);
  } catch (e) {
    setError(e.message);
  }
});

async function control(path, body) {
  if (!current) return;
  setError("");
  try {
    const info = await api("POST", `/v1/sessions/${current.id}/${path}`, body);
    $("state").textContent = info.state;
  } catch (e) { setError(e.message); }
}

$("set-prompt").addEventListener("click", () => control("prompt", {prompt: $("new-prompt").value}));
$("pause").addEventListener("click", () => control("pause"));
$("resume").addEventListener("click", () => control("resume", {}));
$("close").addEventListener("click", async () => {
  if (!current) return;
  try { await api("DELETE", `/v1/sessions/${current.id}`); } catch (e) { setError(e.message); }
});

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

async function refreshCluster() {
  try {
    const c = await (await fetch("/v1/cluster")).json();
    $("cluster-summary").textContent =
      `${c.gpus_ready}/${c.gpus_provisioned} workers ready · policy ${c.policy} · $${c.cost_usd.toFixed(4)}`;
    const body = $("workers").querySelector("tbody");
    body.replaceChildren();
    for (const w of c.workers) {
      const tr = el("tr");
      tr.append(el("td", w.id), el("td", w.device), el("td", w.state), el("td", w.load_ms.toFixed(1)),
                el("td", String(w.batch)));
      const td = el("td");
      for (const sid of w.sessions) td.append(el("span", sid.slice(0, 6), "sess" + (current && sid === current.id ? " mine" : "")));
      tr.append(td);
      body.append(tr);
    }
    const list = $("migrations");
    list.replaceChildren();
    for (const m of c.migrations.slice(-10).reverse()) {
      list.append(el("li", `${m.time_s.toFixed(1)} s: ${m.session_id.slice(0, 6)} ${m.src} → ${m.dst}` +
        (m.ok ? ` (${m.downtime_ms.toFixed(1)} ms down)` : ` aborted: ${m.reason}`)));
    }
    if (current) {
      const info = await api("GET", `/v1/sessions/${current.id}`).catch(() => null);
      if (info) $("state").textContent = info.state;
    }
    $("playback").textContent = $("video").currentTime.toFixed(2) + " s";
    $("health").textContent = "connected";
  } catch (e) {
    $("health").textContent = "server unreachable";
  }
}

setInterval(refreshCluster, 1000);
refreshCluster();
