// The chat page's controller: sends the conversation, follows the answer's stream, keeps
// everything in localStorage, and resumes an answer that was streaming when the page reloaded.

import { applyFrame, newAnswer } from "./answer.js";
import { ApiError, createApi } from "./api.js";
import { createPicker } from "./picker.js";
import { createServer, sleep } from "./server.js";
import { bindSettings, requestParams, settingsValid } from "./settings.js";
import { createStore } from "./store.js";
import {
  announce, autosize, nearBottom, scrollToEnd, setBanner, setBusy, toggleSettings, ui,
} from "./ui.js";
import { copyText, drawAssistant, messageView, outputText } from "./view.js";

const config = JSON.parse(document.body.dataset.config);
const store = createStore(config.base);
const state = store.load();
const api = createApi(config.base, () => state.settings.apiKey);
const server = createServer(api, state.settings);
const picker = createPicker(ui.picker, config.base, api.models);
let active = null; // the answer being generated: {index, message, id, reader, cancelRequested}
let drawQueued = false;
let saveTimer = 0;

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

async function generate() {
  const history = conversation(state.messages.length);
  const message = newAnswer();
  state.messages.push(message);
  const run = { index: state.messages.length - 1, message, id: null, reader: null,
    cancelRequested: false };
  active = run;
  setBusy(true);
  renderAll();
  persistNow();
  const id = await startStream(run, { transport: "conversation", messages: history,
    params: requestParams(server.state.info) });
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
  server.loadingOnDemand(); // an unloaded model loads now; the answer waits for it
  for (;;) {
    try {
      const { id } = await api.start(body);
      server.settled();
      picker.refresh();
      return id;
    } catch (error) {
      server.settled();
      if (!(error instanceof ApiError)) throw error;
      if (active !== run) return null;
      if (error.type !== "loading" || run.cancelRequested) {
        finish(run, run.cancelRequested ? { stop_reason: "cancelled" } : { error });
        if (error.status === 0 || error.status === 401) server.watch();
        return null;
      }
      server.loading();
      while (active === run && !run.cancelRequested && server.state.status !== "ready") {
        await sleep(1000);
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
    frame: (name, data, id) => { if (active === run) onFrame(run, name, data, id); },
    connection: (how) => {
      setBanner("stream", how === "reconnecting" ? "Connection lost; reconnecting…" : "");
    },
    failed: (error) => { if (active === run) streamLost(run, error); },
  });
}

function onFrame(run, name, data, id) {
  if (name === "message.stop") {
    finish(run, { stop_reason: data.stop_reason ?? "stop", usage: data.usage });
    return;
  }
  applyFrame(run.message, name, data);
  if (id !== null) state.pending.last = id;
  scheduleDraw();
  persistSoon();
}

/** The stream answered an error status the reader does not retry: say why the answer stopped. */
function streamLost(run, error) {
  if (error.status === 401) server.watch(); // the header and the settings ask for the key
  finish(run, { stop_reason: "interrupted", error: error.status === 404
    ? new ApiError(404, "not_found", "This answer can no longer be resumed: its stream expired.")
    : error });
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
  setBanner("stream", "");
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
  setBanner("stream", "");
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
  bindSettings(state.settings, persistSoon);
  ui.apiKey.addEventListener("change", () => server.refresh()); // try a new key at once
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
server.show();
server.watch();
picker.refresh();
ui.prompt.focus();
