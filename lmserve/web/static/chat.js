// The chat page's controller: sends the conversation, follows the answer's stream, keeps
// everything in localStorage, and resumes an answer that was streaming when the page reloaded.

import { ApiError, createApi } from "./api.js";
import { createStore } from "./store.js";
import { copyText, drawAssistant, messageView, outputText } from "./view.js";

const config = JSON.parse(document.body.dataset.config);
const api = createApi(config.base);
const store = createStore(config.base);
const state = store.load();
const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), messages: $("messages"), empty: $("empty"), form: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), banner: $("banner"),
  status: $("status"), model: $("model"), live: $("live"), settings: $("settings"),
  toggle: $("settings-toggle"), newChat: $("new-chat"), system: $("system"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), reasoning: $("reasoning"),
  reasoningField: $("reasoning-field"),
};

const server = { status: "unknown", info: null, error: null, watching: false };
const banners = { server: "", stream: "" };
let active = null; // the answer being generated: {index, message, id, reader, cancelRequested}
let drawQueued = false;
let saveTimer = 0;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- persistence ---------------------------------------------------------------------------

function persistNow() {
  clearTimeout(saveTimer);
  saveTimer = 0;
  store.save(state);
}

function persistSoon() {
  if (!saveTimer) saveTimer = setTimeout(persistNow, 250);
}

// ---- drawing -------------------------------------------------------------------------------

function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

function drawMessage(article, message, index) {
  const last = index === state.messages.length - 1;
  drawAssistant(article, message, { streaming: active?.message === message, last: last && !active });
}

function renderAll() {
  ui.messages.replaceChildren(...state.messages.map((message, index) => {
    const article = messageView(message, index);
    if (message.role === "assistant") drawMessage(article, message, index);
    return article;
  }));
  ui.empty.hidden = state.messages.length > 0;
  scrollToEnd();
}

function scheduleDraw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    if (!active) return;
    const article = ui.messages.querySelector(`[data-index="${active.index}"]`);
    const stick = nearBottom();
    if (article) drawMessage(article, active.message, active.index);
    if (stick) scrollToEnd();
  });
}

function showBanner() {
  const text = banners.server || banners.stream;
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

function announce(text) {
  ui.live.textContent = text;
}

function setBusy(busy) {
  const stopHadFocus = document.activeElement === ui.stop;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (stopHadFocus && !busy) ui.prompt.focus();
}

// ---- server status -------------------------------------------------------------------------

const STATUS_TEXT = { ready: "Ready", loading: "Loading model…", pending: "Loading model…",
  failed: "Model failed", offline: "Offline", error: "Unavailable", unknown: "Connecting…" };

function showServer() {
  const { status, info, error } = server;
  ui.status.textContent = STATUS_TEXT[status] ?? status;
  ui.status.dataset.state = status;
  banners.server = {
    loading: "The model is loading. Messages you send now go out as soon as it is ready.",
    pending: "The model is loading. Messages you send now go out as soon as it is ready.",
    failed: "The model failed to load; see the server log.",
    offline: "Cannot reach the server. Retrying…",
    error: error ? `The server answered: ${error.message}` : "",
  }[status] ?? "";
  showBanner();
  if (!info) return;
  const model = info.model ?? {};
  const facts = [model.name || info.verbose_name || info.name, model.quantization,
    model.context_length ? `${model.context_length} ctx` : ""].filter(Boolean);
  ui.model.textContent = facts.join(" · ");
  const defaults = info.params ?? {};
  ui.temperature.placeholder = defaults.temperature !== undefined
    ? `${defaults.temperature} (default)` : "default";
  ui.maxTokens.placeholder = defaults.max_tokens !== undefined
    ? `${defaults.max_tokens} (default)` : "default";
  ui.reasoningField.hidden = !info.reasoning;
  if (state.settings.reasoning === null) ui.reasoning.checked = defaults.reasoning === true;
}

async function refreshInfo() {
  try {
    server.info = await api.info();
    server.status = server.info.status;
    server.error = null;
  } catch (error) {
    server.status = error.status === 0 ? "offline" : "error";
    server.error = error;
  }
  showServer();
}

/** Polls GET P until the model is ready (backing off to 5 s); one watcher at a time. */
async function watchServer() {
  if (server.watching) return;
  server.watching = true;
  for (let delay = 1000; ; delay = Math.min(delay * 1.5, 5000)) {
    await refreshInfo();
    if (server.status === "ready") break;
    await sleep(delay);
  }
  server.watching = false;
}

// ---- generating ----------------------------------------------------------------------------

function conversation(upto) {
  const messages = [];
  const system = state.settings.system.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const message of state.messages.slice(0, upto)) {
    const content = message.role === "user" ? message.content : outputText(message);
    if (content.trim()) messages.push({ role: message.role, content });
  }
  return messages;
}

function params() {
  const out = {};
  const temperature = ui.temperature.value.trim();
  const maxTokens = ui.maxTokens.value.trim();
  if (temperature !== "") out.temperature = Number(temperature);
  if (maxTokens !== "") out.max_tokens = Number(maxTokens);
  if (server.info?.reasoning) out.reasoning = ui.reasoning.checked;
  return out;
}

function settingsValid() {
  for (const input of [ui.temperature, ui.maxTokens]) {
    if (!input.checkValidity()) {
      toggleSettings(true);
      input.reportValidity();
      return false;
    }
  }
  return true;
}

async function generate() {
  const history = conversation(state.messages.length);
  const message = { role: "assistant", blocks: [], stop_reason: null, usage: null, error: null,
    timing: { sent: Date.now() }, resumed: false };
  state.messages.push(message);
  const run = { index: state.messages.length - 1, message, id: null, reader: null,
    cancelRequested: false };
  active = run;
  setBusy(true);
  renderAll();
  persistNow();
  const id = await startStream(run, { transport: "conversation", messages: history,
    params: params() });
  if (active !== run) {
    if (id) api.cancel(id).catch(() => {});
    return;
  }
  if (!id) return;
  run.id = id;
  state.pending = { id, index: run.index, last: -1 };
  persistNow();
  follow(run);
  if (run.cancelRequested) stop();
}

/** POST P stream/, waiting out a loading model; null after recording a failure. */
async function startStream(run, body) {
  for (;;) {
    try {
      return (await api.start(body)).id;
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      if (active !== run) return null;
      if (error.type !== "loading" || run.cancelRequested) {
        finish(run, run.cancelRequested ? { stop_reason: "cancelled" } : { error });
        if (error.status === 0) watchServer();
        return null;
      }
      server.status = "loading";
      showServer();
      while (active === run && !run.cancelRequested && server.status !== "ready") {
        await sleep(Math.max(error.retryAfter, 1) * 1000);
        await refreshInfo();
      }
      if (active !== run) return null;
      if (run.cancelRequested) {
        finish(run, { stop_reason: "cancelled" });
        return null;
      }
    }
  }
}

function follow(run) {
  run.reader = api.follow(run.id, state.pending.last, {
    frame: (name, data, id) => { if (active === run) applyFrame(run, name, data, id); },
    connection: (how) => {
      banners.stream = how === "reconnecting" ? "Connection lost; reconnecting…" : "";
      showBanner();
    },
    failed: () => { if (active === run) streamLost(run); },
  });
}

function block(message, index, channel) {
  const at = Number.isInteger(index) ? index : Math.max(message.blocks.length - 1, 0);
  while (message.blocks.length <= at) {
    message.blocks.push({ channel: channel ?? "output", text: "", done: false });
  }
  return message.blocks[at];
}

function applyFrame(run, name, data, id) {
  const message = run.message;
  if (name === "block.start") block(message, data.index, data.channel);
  else if (name === "block.delta") {
    block(message, data.index, data.channel).text += data.text ?? "";
    message.timing.first ??= Date.now();
  } else if (name === "block.stop") block(message, data.index).done = true;
  else if (name === "message.delta" && data.usage) message.usage = data.usage;
  else if (name === "error") {
    message.error = { type: data.type ?? "internal", message: data.message ?? "Generation failed." };
  } else if (name === "message.stop") {
    finish(run, { stop_reason: data.stop_reason ?? "stop", usage: data.usage });
    return;
  }
  if (id !== null) state.pending.last = id;
  scheduleDraw();
  persistSoon();
}

/** The browser gave up on the stream: reopen it if it still exists, else say why. */
async function streamLost(run) {
  run.reader.close();
  const error = await api.probe(run.id);
  if (active !== run) return;
  run.retries = (run.retries ?? 0) + 1;
  if (!error && run.retries <= 3) {
    follow(run);
    return;
  }
  const gone = error?.status === 404;
  finish(run, { stop_reason: "interrupted", error: gone
    ? new ApiError(404, "not_found", "This answer can no longer be resumed: its stream expired.")
    : error ?? new ApiError(0, "network", "The answer's stream could not be read.") });
}

function finish(run, { stop_reason = "error", usage, error } = {}) {
  const message = run.message;
  message.stop_reason = error && stop_reason === "error" ? "error" : stop_reason;
  if (usage) message.usage = usage;
  if (error) message.error = { type: error.type, message: error.message };
  message.timing.end ??= Date.now();
  run.reader?.close();
  clearTimeout(run.stopTimer);
  active = null;
  state.pending = null;
  banners.stream = "";
  showBanner();
  persistNow();
  setBusy(false);
  renderAll();
  announce(message.error ? `Error: ${message.error.message}`
    : message.stop_reason === "cancelled" ? "Stopped." : "Answer complete.");
}

/** DELETE P stream/{id}/: the stream then ends with stop_reason "cancelled". */
async function stop() {
  const run = active;
  if (!run) return;
  run.cancelRequested = true;
  if (!run.id) return; // generate() stops it as soon as the POST answers
  // If the final frame never comes (server gone), stop waiting for it.
  run.stopTimer = setTimeout(() => { if (active === run) finish(run, { stop_reason: "cancelled" }); },
    5000);
  try {
    await api.cancel(run.id);
  } catch {
    if (active === run) finish(run, { stop_reason: "cancelled" });
  }
}

function send() {
  const text = ui.prompt.value;
  if (active || !text.trim() || !settingsValid()) return;
  state.messages.push({ role: "user", content: text });
  ui.prompt.value = "";
  autosize();
  generate();
}

function retry() {
  if (active || state.messages.at(-1)?.role !== "assistant") return;
  state.messages.pop();
  generate();
}

function newChat() {
  if (active) {
    const run = active;
    run.cancelRequested = true;
    if (run.id) api.cancel(run.id).catch(() => {});
    run.reader?.close();
    active = null;
    setBusy(false);
  }
  state.messages = [];
  state.pending = null;
  banners.stream = "";
  showBanner();
  persistNow();
  renderAll();
  ui.prompt.focus();
}

/** After a reload: follow the answer that was streaming, skipping frames already applied. */
function resume() {
  const pending = state.pending;
  state.messages.forEach((message, index) => {
    if (message.role === "assistant" && !message.stop_reason && index !== pending?.index) {
      message.stop_reason = "interrupted";
    }
  });
  if (!pending) return;
  const message = state.messages[pending.index];
  message.resumed = true;
  active = { index: pending.index, message, id: pending.id, reader: null, cancelRequested: false };
  setBusy(true);
  follow(active);
}

// ---- wiring --------------------------------------------------------------------------------

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

function toggleSettings(open = ui.settings.hidden) {
  ui.settings.hidden = !open;
  ui.toggle.setAttribute("aria-expanded", String(open));
}

function bindSetting(input, key, read = () => input.value) {
  input.addEventListener("input", () => {
    state.settings[key] = read();
    persistSoon();
  });
}

/** Another tab changed the conversation: show it, unless this tab is streaming an answer. */
function onStorage(event) {
  if (event.key !== store.key || active) return;
  const fresh = store.load();
  state.messages = fresh.messages;
  renderAll();
}

function onMessagesClick(event) {
  const target = event.target.closest("button[data-action]");
  if (!target) return;
  const article = target.closest("article");
  const message = state.messages[Number(article?.dataset.index)];
  if (target.dataset.action === "copy-code") {
    copyText(target.closest(".code").querySelector("code").textContent, target);
  } else if (target.dataset.action === "copy-answer" && message) {
    copyText(outputText(message), target);
  } else if (target.dataset.action === "retry") {
    retry();
  }
}

function wire() {
  ui.system.value = state.settings.system;
  ui.temperature.value = state.settings.temperature;
  ui.maxTokens.value = state.settings.maxTokens;
  ui.reasoning.checked = state.settings.reasoning === true;
  bindSetting(ui.system, "system");
  bindSetting(ui.temperature, "temperature");
  bindSetting(ui.maxTokens, "maxTokens");
  bindSetting(ui.reasoning, "reasoning", () => ui.reasoning.checked);
  ui.form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  ui.prompt.addEventListener("input", autosize);
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && active) stop();
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.toggle.addEventListener("click", () => toggleSettings());
  ui.messages.addEventListener("click", onMessagesClick);
  window.addEventListener("pagehide", () => { if (saveTimer) persistNow(); });
  window.addEventListener("storage", onStorage);
}

wire();
resume();
renderAll();
showServer();
watchServer();
ui.prompt.focus();
