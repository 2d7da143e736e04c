// The resource's state from GET P: shown in the header, and polled until the model is ready.

import { markKey, showDefaults } from "./settings.js";
import { setBanner, ui } from "./ui.js";

const STATUS_TEXT = { ready: "Ready", loading: "Loading model…", pending: "Loading model…",
  unloaded: "Not loaded",
  failed: "Model failed", offline: "Offline", error: "Unavailable", unauthorized: "API key needed",
  unknown: "Connecting…" };
const LOADING = "The model is loading. Messages you send now go out as soon as it is ready.";
const BANNERS = { loading: LOADING, pending: LOADING,
  unloaded: "The model is not loaded; it loads when you send a message.",
  offline: "Cannot reach the server. Retrying…",
  failed: "The model failed to load; see the server log." };

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** The state GET P's failure leaves: offline, unauthorized (a 401: the key) or error. */
function failedStatus(error) {
  if (error.status === 0) return "offline";
  return error.status === 401 ? "unauthorized" : "error";
}

function bannerText({ status, error }) {
  if (status === "unauthorized") return error.message; // api.js says what to do about the key
  if (status === "error" && error) return `The server answered: ${error.message}`;
  return BANNERS[status] ?? "";
}

export function createServer(api, settings) {
  const server = { status: "unknown", info: null, error: null };
  let watching = false;
  let awaitingLoad = false; // a message went to an unloaded model: its load is under way

  function show() {
    const { status, info } = server;
    const progress = info && status === "loading" && info.progress > 0
      ? ` ${Math.round(info.progress * 100)}%` : "";
    ui.status.textContent = (STATUS_TEXT[status] ?? status) + progress;
    ui.status.dataset.state = status;
    setBanner("server", bannerText(server));
    if (status !== "offline") markKey(status === "unauthorized");
    if (!info) return;
    const model = info.model ?? {};
    ui.model.textContent = [model.name || info.verbose_name || info.name, model.quantization,
      model.context_length ? `${model.context_length} ctx` : ""].filter(Boolean).join(" · ");
    showDefaults(info, settings);
  }

  async function refresh() {
    try {
      server.info = await api.info();
      server.status = server.info.status;
      server.error = null;
    } catch (error) {
      server.status = failedStatus(error);
      server.error = error;
    }
    show();
  }

  /** Polls GET P until the model is ready, backing off to 5 s; one watcher at a time. */
  async function watch() {
    if (watching) return;
    watching = true;
    for (let delay = 1000; ; delay = Math.min(delay * 1.5, 5000)) {
      await refresh();
      if (server.status === "ready" || (server.status === "unloaded" && !awaitingLoad)) break;
      await sleep(delay);
    }
    watching = false;
  }

  /** A generation endpoint answered 503 "loading": say so and watch until ready. */
  function loading() {
    server.status = "loading";
    show();
    watch();
  }

  /** A message goes to a model that is not loaded: its load starts; show its progress. */
  function loadingOnDemand() {
    if (server.status !== "unloaded") return;
    awaitingLoad = true;
    loading();
  }

  /** The server answered the message (it waited for the load): show the model's state. */
  function settled() {
    if (!awaitingLoad) return;
    awaitingLoad = false;
    refresh();
  }

  return { state: server, show, refresh, watch, loading, loadingOnDemand, settled };
}
