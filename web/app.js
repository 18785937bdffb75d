// The appliance's chat page: a plain client of the same public API that curl and the openai
// client use (/v1/models, /v1/chat/completions with SSE, /v1/uploads, /v1/uploads/{id}/keyframes,
// /v1/stats).
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty-state"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), attachments: $("attachments"), imageInput: $("image-input"),
  videoInput: $("video-input"), videoHint: $("video-hint"), drop: $("drop-overlay"),
  model: $("model-name"), dot: $("status-dot"), apiKey: $("api-key"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), system: $("system-prompt"),
  format: $("answer-format"), logprobs: $("show-logprobs"),
};

const state = {
  model: null,
  limits: { max_side: 1024, video_fps: 2, max_upload_bytes: 0, max_images_per_request: 8 },
  history: [],          // OpenAI messages sent so far (user content may hold image/video parts)
  pending: [],          // attachments for the next message: {kind, url, name, ready, el, keyframes?}
  controller: null,     // AbortController of the running stream
  statsTimer: null,
  live: null,           // {start, firstAt, tokens}
};

// ---- HTTP helpers ------------------------------------------------------------------------------
// Every request of a chat carries its conversation id, so a load balancer in front of several
// appliances keeps the chat (its cached prefix and its uploads) on one replica; a new chat, a new id.
function newConversationId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));      // randomUUID needs a secure context
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
let conversationId = newConversationId();

function authHeaders(extra = {}) {
  const key = els.apiKey.value.trim();
  const headers = { ...extra, "X-Conversation-Id": conversationId };
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${body.error.message} (${resp.status} ${body.error.code})`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${resp.status}`;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders() });
    if (resp.status === 401) {
      els.model.textContent = "API key required (Settings)";
      document.querySelector(".settings").open = true;
      return;
    }
    const card = (await resp.json()).data[0];
    state.model = card.id;
    Object.assign(state.limits, card.appliance || {});
    els.model.textContent = card.id;
  } catch (e) {
    els.model.textContent = "server unreachable";
  }
  const ready = await fetch("/ready", { headers: authHeaders() }).then((r) => r.ok).catch(() => false);
  els.dot.className = "status-dot " + (ready ? "ok" : "wait");
  els.dot.title = ready ? "engine ready" : "engine loading";
  if (!ready) setTimeout(loadModel, 2000);
}

// ---- rendering ---------------------------------------------------------------------------------
if (window.marked) window.marked.use({ gfm: true, breaks: false });
if (window.DOMPurify) {
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
  });
}

function renderMarkdown(el, text) {
  // marked turns markdown into HTML; DOMPurify removes anything executable before it is inserted
  const html = window.marked ? window.marked.parse(text) : text.replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" }[c]));
  el.innerHTML = window.DOMPurify ? window.DOMPurify.sanitize(html) : "";
  el.querySelectorAll("pre").forEach((pre) => {
    const b = document.createElement("button");
    b.type = "button"; b.className = "code-copy"; b.textContent = "Copy";
    const code = pre.querySelector("code") || pre;
    b.onclick = () => copyText(code.innerText, b);
    pre.appendChild(b);
  });
}

function scrollToEnd() { els.messages.scrollTop = els.messages.scrollHeight; }

function addBubble(role) {
  els.empty.hidden = true;
  const wrap = document.createElement("div");
  wrap.className = `msg ${role}`;
  const media = document.createElement("div"); media.className = "msg-media";
  const body = document.createElement("div"); body.className = "msg-body";
  const meta = document.createElement("div"); meta.className = "msg-meta";
  wrap.append(media, body, meta);
  els.messages.appendChild(wrap);
  scrollToEnd();
  return { wrap, media, body, meta };
}

async function copyText(text, button) {
  try { await navigator.clipboard.writeText(text); }
  catch (_) {
    const ta = document.createElement("textarea"); ta.value = text; document.body.appendChild(ta);
    ta.select(); document.execCommand("copy"); ta.remove();
  }
  const old = button.textContent; button.textContent = "Copied"; setTimeout(() => { button.textContent = old; }, 1200);
}

function addActions(bubble, getText) {
  const copy = document.createElement("button");
  copy.type = "button"; copy.className = "ghost small"; copy.textContent = "Copy";
  copy.onclick = () => copyText(getText(), copy);
  const regen = document.createElement("button");
  regen.type = "button"; regen.className = "ghost small regen"; regen.textContent = "Regenerate";
  regen.onclick = regenerate;
  bubble.meta.append(copy, regen);
}

// ---- attachments -------------------------------------------------------------------------------
function shrinkImage(file, maxSide) {
  // decode in the browser, draw at most maxSide px on the longest side, re-encode as a data URL
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => {
      const scale = Math.min(1, maxSide / Math.max(img.naturalWidth, img.naturalHeight));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
      canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      URL.revokeObjectURL(url);
      const type = file.type === "image/png" ? "image/png" : "image/jpeg";
      resolve({ dataUrl: canvas.toDataURL(type, 0.9), width: canvas.width, height: canvas.height });
    };
    img.onerror = () => { URL.revokeObjectURL(url); reject(new Error(`${file.name}: not a readable image`)); };
    img.src = url;
  });
}

function attachmentChip(name) {
  const el = document.createElement("div");
  el.className = "chip";
  const remove = document.createElement("button");
  remove.type = "button"; remove.className = "chip-remove"; remove.title = "Remove"; remove.textContent = "×";
  el.appendChild(remove);
  const label = document.createElement("span"); label.className = "chip-label"; label.textContent = name;
  el.appendChild(label);
  els.attachments.appendChild(el);
  return { el, remove, label };
}

async function attachImage(file) {
  const images = state.pending.filter((a) => a.kind === "image").length;
  if (images >= state.limits.max_images_per_request) { flash(`At most ${state.limits.max_images_per_request} images per message`); return; }
  const chip = attachmentChip(file.name || "pasted image");
  const item = { kind: "image", name: file.name || "image", ready: false, el: chip.el };
  state.pending.push(item);
  chip.remove.onclick = () => removeAttachment(item);
  try {
    const { dataUrl, width, height } = await shrinkImage(file, state.limits.max_side || 1024);
    item.url = dataUrl; item.ready = true;
    const thumb = document.createElement("img");
    thumb.className = "thumb"; thumb.src = dataUrl; thumb.alt = item.name;
    chip.el.insertBefore(thumb, chip.label);
    chip.label.textContent = `${width}×${height}`;
  } catch (e) { removeAttachment(item); flash(e.message); }
}

function attachVideo(file) {
  if (state.limits.max_upload_bytes && file.size > state.limits.max_upload_bytes) {
    flash(`${file.name} is larger than the server accepts (${fmtBytes(state.limits.max_upload_bytes)})`); return;
  }
  const chip = attachmentChip(file.name);
  const bar = document.createElement("progress"); bar.max = 100; bar.value = 0;
  chip.el.insertBefore(bar, chip.label);
  chip.el.classList.add("video");
  const item = { kind: "video", name: file.name, ready: false, el: chip.el, keyframes: null };
  state.pending.push(item);
  const xhr = new XMLHttpRequest();
  chip.remove.onclick = () => { xhr.abort(); removeAttachment(item); };
  xhr.open("POST", "/v1/uploads");
  const key = els.apiKey.value.trim();
  if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
  xhr.setRequestHeader("X-Conversation-Id", conversationId);     // the upload lives on the chat's replica
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total); };
  xhr.onload = () => {
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (_) { /* ignore */ }
    if (xhr.status !== 200 || !body || !body.url) {
      removeAttachment(item);
      flash(body && body.error ? body.error.message : `upload failed (HTTP ${xhr.status})`);
      return;
    }
    item.url = body.url; item.ready = true; bar.value = 100;
    chip.el.classList.add("done");
    chip.label.textContent = `${file.name} · ${fmtBytes(body.bytes)}`;
    item.keyframes = fetchKeyframes(body.id);
    showKeyframes(chip.el, item.keyframes);
  };
  xhr.onerror = () => { removeAttachment(item); flash("upload failed: network error"); };
  const form = new FormData();
  form.append("file", file, file.name);
  xhr.send(form);
  els.videoHint.hidden = false;
  els.videoHint.textContent = `Videos are sampled on the server at up to ${state.limits.video_fps} keyframes per second, ` +
    `each shrunk to ${state.limits.max_side} px; long videos are thinned to fit the context.`;
}

// ---- keyframes: what the model will see of a video ------------------------------------------------
function fmtTime(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m}:${(s - 60 * m).toFixed(1).padStart(4, "0")}`;
}

async function fetchKeyframes(uploadId) {
  // the server runs the engine's own frame selection on the upload (once; cached per upload)
  const resp = await fetch(`/v1/uploads/${encodeURIComponent(uploadId)}/keyframes`, { headers: authHeaders() });
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

function keyframeStrip(kf) {
  const strip = document.createElement("div"); strip.className = "keyframe-strip";
  for (const f of kf.frames) {
    const fig = document.createElement("figure"); fig.className = "keyframe";
    const img = document.createElement("img"); img.src = f.thumbnail; img.alt = `frame at ${fmtTime(f.time)}`;
    const cap = document.createElement("figcaption"); cap.textContent = fmtTime(f.time);
    fig.append(img, cap);
    strip.appendChild(fig);
  }
  return strip;
}

function keyframeNote(kf) {
  const n = (kf.frame_times || kf.frames).length;
  const note = document.createElement("div"); note.className = "keyframes-note";
  note.textContent = `${n} keyframes · ${kf.visual_tokens} visual tokens`;
  note.title = `Fused in ${kf.pairs.length} pairs of frames (grid ${kf.grid_thw.join("×")} patches); the strip ` +
    `shows ${kf.frames.length} of them. ${kf.frames_decoded} frames decoded in ${kf.mode} mode.`;
  return note;
}

function showKeyframes(container, promise) {
  // a placeholder now; the strip and its note (or why there is none) when the preview arrives
  const box = document.createElement("div"); box.className = "keyframes";
  const wait = document.createElement("div"); wait.className = "keyframes-note"; wait.textContent = "reading keyframes…";
  box.appendChild(wait);
  container.appendChild(box);
  promise.then((kf) => { box.replaceChildren(keyframeStrip(kf), keyframeNote(kf)); scrollToEnd(); },
    (e) => { wait.classList.add("warn"); wait.textContent = `no keyframe preview: ${e.message}`; });
}

function removeAttachment(item) {
  state.pending = state.pending.filter((a) => a !== item);
  item.el.remove();
  if (!state.pending.some((a) => a.kind === "video")) els.videoHint.hidden = true;
}

function attachFiles(files) {
  for (const f of files) {
    if (f.type.startsWith("image/")) attachImage(f);
    else if (f.type.startsWith("video/")) attachVideo(f);
    else flash(`${f.name}: only images and videos can be attached`);
  }
}

function flash(text) {
  const b = addBubble("error");
  b.body.textContent = text;
}

// ---- chat --------------------------------------------------------------------------------------
function requestBody() {
  const msgs = [];
  const sys = els.system.value.trim();
  if (sys) msgs.push({ role: "system", content: sys });
  const body = { model: state.model || "default", messages: msgs.concat(state.history), stream: true,
                 stream_options: { include_usage: true } };
  const t = parseFloat(els.temperature.value); if (!Number.isNaN(t)) body.temperature = t;
  const m = parseInt(els.maxTokens.value, 10); if (m > 0) body.max_tokens = m;
  if (els.format.value === "json_object") body.response_format = { type: "json_object" };
  if (els.logprobs.checked) { body.logprobs = true; body.top_logprobs = 3; }
  return body;
}

async function onSubmit(ev) {
  ev.preventDefault();
  if (state.controller) return;
  const text = els.prompt.value.trim();
  if (state.pending.some((a) => !a.ready)) { flash("Wait for the attachments to finish loading"); return; }
  if (!text && !state.pending.length) return;
  // Attachments first, in the order they were attached, then the text: the order of Qwen's own
  // demos, which models trained on them answer best.
  const content = [];
  const user = addBubble("user");
  for (const a of state.pending) {
    if (a.kind === "image") {
      content.push({ type: "image_url", image_url: { url: a.url } });
      const img = document.createElement("img"); img.src = a.url; img.alt = a.name; img.className = "thumb big";
      user.media.appendChild(img);
    } else {
      content.push({ type: "video_url", video_url: { url: a.url } });
      const card = document.createElement("div"); card.className = "video-card";
      const tag = document.createElement("span"); tag.className = "video-tag"; tag.textContent = `▶ ${a.name}`;
      card.appendChild(tag);
      if (a.keyframes) showKeyframes(card, a.keyframes);   // the same preview the chip showed
      user.media.appendChild(card);
    }
    a.el.remove();
  }
  if (text) content.push({ type: "text", text });
  user.body.textContent = text;
  state.pending = []; els.videoHint.hidden = true;
  els.prompt.value = ""; autosize();
  state.history.push({ role: "user", content: content.length === 1 && text ? text : content });
  await streamAnswer();
}

async function regenerate() {
  if (state.controller) return;
  const last = state.history[state.history.length - 1];
  if (!last || last.role !== "assistant") return;
  state.history.pop();
  const bubbles = els.messages.querySelectorAll(".msg.assistant");
  if (bubbles.length) bubbles[bubbles.length - 1].remove();
  await streamAnswer();
}

function setBusy(busy) {
  els.send.hidden = busy; els.stop.hidden = !busy;
  document.body.classList.toggle("busy", busy);
  document.querySelectorAll(".regen").forEach((b) => { b.disabled = busy; });
}

async function streamAnswer() {
  const bubble = addBubble("assistant");
  bubble.wrap.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  state.live = { start: performance.now(), firstAt: null, tokens: 0 };
  setBusy(true); startStats(500);
  let text = "", finish = null, usage = null, failed = null, frame = 0;
  const tokens = [];                  // {token, logprob, top_logprobs} when probabilities were asked
  const calls = [];                   // tool calls (name, arguments), should the answer make any
  const json = els.format.value === "json_object";
  const paint = () => { frame = 0; renderMarkdown(bubble.body, text); scrollToEnd(); };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(requestBody()),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {        // one SSE event per blank-line-terminated block
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { failed = chunk.error.message; continue; }
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.logprobs && choice.logprobs.content) tokens.push(...choice.logprobs.content);
          for (const tc of (choice.delta && choice.delta.tool_calls) || []) {
            if (!calls[tc.index]) calls[tc.index] = { name: "", arguments: "" };
            if (tc.function && tc.function.name) calls[tc.index].name = tc.function.name;
            if (tc.function && tc.function.arguments) calls[tc.index].arguments += tc.function.arguments;
          }
          if (choice.delta && choice.delta.content) {
            if (state.live.firstAt === null) state.live.firstAt = performance.now();
            state.live.tokens += 1;
            text += choice.delta.content;
            if (!frame) frame = requestAnimationFrame(paint);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      updateLive();
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else failed = e.message;
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (json && text) renderJson(bubble.body, text); else renderMarkdown(bubble.body, text);
    if (calls.length) showToolCalls(bubble, calls);
    if (tokens.length) showTokens(bubble, tokens);
    bubble.wrap.classList.remove("streaming");
    if (usage) state.live.tokens = usage.completion_tokens;
    updateLive();
    state.controller = null;
    setBusy(false); startStats(5000);
  }
  if (failed && !text) {
    bubble.wrap.classList.add("error"); bubble.body.textContent = failed;
    state.history.pop();               // let the user edit and resend
    return;
  }
  state.history.push({ role: "assistant", content: text });
  const notes = [];
  if (finish === "length") notes.push("stopped at max tokens");
  if (finish === "stopped") notes.push("stopped by you");
  if (failed) notes.push(`error: ${failed}`);
  if (usage) notes.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` +
    (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens ? `, ${usage.prompt_tokens_details.cached_tokens} cached` : ""));
  const note = document.createElement("span"); note.className = "note"; note.textContent = notes.join(" · ");
  bubble.meta.appendChild(note);
  addActions(bubble, () => text);
}

// A JSON answer (response_format json_object) shown as indented code, never as markdown.
function renderJson(el, text) {
  let shown = text;
  try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* cut short: as sent */ }
  const pre = document.createElement("pre"); const code = document.createElement("code");
  code.className = "json"; code.textContent = shown; pre.appendChild(code);
  el.replaceChildren(pre);
}

function showToolCalls(bubble, calls) {
  for (const c of calls) {
    const pre = document.createElement("pre"); pre.className = "tool-call";
    pre.textContent = `${c.name}(${c.arguments})`;
    bubble.body.appendChild(pre);
  }
}

function pct(p) { return p >= 0.001 ? `${(100 * p).toFixed(1)}%` : `${p.toExponential(1)}`; }

// Each token of the answer, shaded by its probability (the model's own, before the sampler's
// settings or a JSON grammar narrowed the choice); hovering shows the likeliest alternatives.
function showTokens(bubble, tokens) {
  const box = document.createElement("details"); box.className = "logprobs";
  const sum = document.createElement("summary");
  const mean = tokens.reduce((a, t) => a + Math.exp(t.logprob), 0) / tokens.length;
  sum.textContent = `Token probabilities (${tokens.length} tokens, mean ${(100 * mean).toFixed(0)}%)`;
  box.appendChild(sum);
  const strip = document.createElement("div"); strip.className = "token-strip";
  for (const t of tokens) {
    const span = document.createElement("span"); span.className = "tok";
    const p = Math.exp(t.logprob);
    span.textContent = t.token;
    span.dataset.p = String(p);
    span.style.setProperty("--p", p.toFixed(3));
    span.title = [`${JSON.stringify(t.token)} ${pct(p)}`].concat(
      (t.top_logprobs || []).map((a) => `${JSON.stringify(a.token)} ${pct(Math.exp(a.logprob))}`)).join("\n");
    strip.appendChild(span);
  }
  box.appendChild(strip);
  bubble.meta.appendChild(box);
}

// ---- live panel --------------------------------------------------------------------------------
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function updateLive() {
  const l = state.live; if (!l) return;
  if (l.firstAt !== null) {
    $("stat-ttft").textContent = `${((l.firstAt - l.start) / 1000).toFixed(2)} s`;
    const secs = (performance.now() - l.firstAt) / 1000;
    if (secs > 0.05 && l.tokens > 1) $("stat-tps").textContent = ((l.tokens - 1) / secs).toFixed(1);
  }
}

async function refreshStats() {
  try {
    const resp = await fetch("/v1/stats", { headers: authHeaders() });
    if (!resp.ok) return;
    const s = await resp.json();
    $("stat-kv").textContent = `${s.kv_blocks_used} / ${s.kv_blocks_total}`;
    $("stat-kv-bar").style.width = `${s.kv_blocks_total ? (100 * s.kv_blocks_used) / s.kv_blocks_total : 0}%`;
    $("stat-running").textContent = s.requests_running;
    $("stat-queue").textContent = s.requests_waiting;
    $("stat-cpu").textContent = `${s.cpu_percent.toFixed(0)} %`;
    $("stat-rss").textContent = fmtBytes(s.rss_bytes);
    $("stat-gpu").textContent = s.gpu_memory_bytes === null ? "n/a" : fmtBytes(s.gpu_memory_bytes);
    $("stat-device").textContent = s.device;
  } catch (_) { /* the next poll will tell */ }
}

function startStats(every) {
  clearInterval(state.statsTimer);
  refreshStats();
  state.statsTimer = setInterval(refreshStats, every);
}

// ---- wiring ------------------------------------------------------------------------------------
function autosize() {
  els.prompt.style.height = "auto";
  els.prompt.style.height = `${Math.min(els.prompt.scrollHeight, 200)}px`;
}

function wire() {
  els.apiKey.value = localStorage.getItem("appliance.apiKey") || "";
  els.apiKey.addEventListener("change", () => { localStorage.setItem("appliance.apiKey", els.apiKey.value.trim()); loadModel(); });
  els.composer.addEventListener("submit", onSubmit);
  els.stop.addEventListener("click", () => state.controller && state.controller.abort());
  els.prompt.addEventListener("input", autosize);
  els.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); els.composer.requestSubmit(); }
  });
  $("attach-image").onclick = () => els.imageInput.click();
  $("attach-video").onclick = () => els.videoInput.click();
  els.imageInput.onchange = () => { attachFiles(els.imageInput.files); els.imageInput.value = ""; };
  els.videoInput.onchange = () => { attachFiles(els.videoInput.files); els.videoInput.value = ""; };
  $("clear-chat").onclick = () => {
    if (state.controller) state.controller.abort();
    state.history = []; els.messages.querySelectorAll(".msg").forEach((m) => m.remove()); els.empty.hidden = false;
    if (!state.pending.length) conversationId = newConversationId();   // pending uploads keep their replica
  };
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { e.preventDefault(); attachFiles(files); }
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth += 1; els.drop.hidden = false; });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) els.drop.hidden = true; });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault(); depth = 0; els.drop.hidden = true;
    if (e.dataTransfer && e.dataTransfer.files.length) attachFiles(e.dataTransfer.files);
  });
  loadModel();
  startStats(5000);
}

wire();
