// The native protocol, as the page uses it: GET P, POST P stream/, GET P stream/{id}/ (read with
// fetch as Server-Sent Events, see sse.js), DELETE P stream/{id}/. Every request carries the API
// key from the settings when one is set. See docs/native-protocol.md.

import { readEvents } from "./sse.js";

export const FRAMES = ["message.start", "block.start", "block.delta", "block.stop",
  "message.delta", "error", "message.stop"];

const KEY_NEEDED = "This server needs an API key: enter it under Settings.";
const KEY_REFUSED = "The server did not accept the API key: check it under Settings.";
const KEY_UNSENDABLE = "The API key under Settings has characters other than ASCII letters, "
  + "digits, punctuation and spaces: check it.";

/** Pauses between reconnections: doubling from the first to the longest. */
const RECONNECT = { first: 1000, longest: 8000 };
/** 429 and 5xx answers to a stream read, in a row, before the reader gives up. */
const TRANSIENT_LIMIT = 5;

/** An HTTP or network failure, carrying the native error body's fields when there is one. */
export class ApiError extends Error {
  constructor(status, type, message, retryAfter = 0) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

/**
 * Fresh headers for a request: Authorization when there is a key. A key that a header cannot
 * carry is an ApiError (fetch would fail as if the server were unreachable).
 */
function authorization(key) {
  if (!key) return {};
  if (!/^[\x20-\x7e]+$/.test(key)) throw new ApiError(401, "authentication", KEY_UNSENDABLE);
  return { Authorization: `Bearer ${key}` };
}

/** `apiKey()` gives the key to send, read at each request ("" or null: none). */
export function createApi(base, apiKey = () => "") {
  const streamUrl = (id) => `${base}stream/${encodeURIComponent(id)}/`;
  const auth = () => authorization(apiKey());
  return {
    info: () => request("GET", base, auth),
    models: () => request("GET", "/models/", auth), // lmserve serve's library (the picker)
    start: (body) => request("POST", `${base}stream/`, auth, body),
    cancel: (id) => request("DELETE", streamUrl(id), auth),
    follow: (id, after, handlers) => follow(streamUrl(id), after, handlers, auth),
  };
}

async function request(method, url, auth, body) {
  const headers = auth();
  if (body) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      cache: "no-store",
      headers,
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch {
    throw new ApiError(0, "network", "Cannot reach the server.");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw errorFrom(response, data, "Authorization" in headers);
  return data;
}

/** The ApiError for an error answer; a 401 says what to do about the key. */
function errorFrom(response, data, sentKey) {
  if (response.status === 401) {
    return new ApiError(401, "authentication", sentKey ? KEY_REFUSED : KEY_NEEDED);
  }
  const retryAfter = Number(response.headers.get("Retry-After")) || 0;
  const error = data && data.error;
  if (error && typeof error === "object") {
    const where = error.param ? ` (${error.param})` : "";
    return new ApiError(response.status, error.type || "internal",
      `${error.message || response.statusText}${where}`, retryAfter);
  }
  const text = typeof error === "string" ? error : `HTTP ${response.status} ${response.statusText}`;
  return new ApiError(response.status, "http", text.trim(), retryAfter);
}

const transient = (status) => status === 429 || status >= 500;

/** Resolves after `ms`, or at once when `signal` aborts. */
function pause(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

/**
 * Calls a handler. What it throws is reported as uncaught, as an EventSource listener's error
 * would be, instead of passing for a network error and breaking the read.
 */
function notify(handler, ...args) {
  try {
    handler(...args);
  } catch (error) {
    setTimeout(() => { throw error; });
  }
}

function parseData(text) {
  try {
    return JSON.parse(text);
  } catch {
    return {};
  }
}

/**
 * Reads one stream and hands every frame with an id above `after` to `handlers.frame(name,
 * data, id)`. Each request sends the API key and, once an id is known (`after`, then each
 * frame's), `Last-Event-ID`, so the server sends only newer frames; the id check still drops
 * any frame already applied. After a network error, or a response that ends before
 * message.stop, it reconnects with growing pauses: `handlers.connection(state)` hears
 * "reconnecting", then "open" on every successful connection. An error status ends it with
 * `handlers.failed(error)` (an ApiError: 404 when the stream expired, 401 for the key); 429 and
 * 5xx are retried first, a few times in a row. message.stop or close() ends it quietly.
 * Returns { close() }.
 */
function follow(url, after, handlers, auth) {
  const abort = new AbortController();
  const signal = abort.signal;
  let last = after;
  let delay = RECONNECT.first;

  function onEvent({ type, data, id: lastEventId }) {
    if (signal.aborted || !FRAMES.includes(type)) return;
    const id = lastEventId === "" ? null : Number(lastEventId);
    if (id !== null && id <= last) return;
    if (id !== null) last = id;
    delay = RECONNECT.first; // the stream moves: a later drop is a fresh blip
    if (type === "message.stop") abort.abort();
    notify(handlers.frame, type, parseData(data), id);
  }

  /** One request, read to its end; throws an ApiError for an error status. */
  async function connect() {
    const headers = { Accept: "text/event-stream", ...auth() };
    if (last >= 0) headers["Last-Event-ID"] = String(last);
    const response = await fetch(url, { headers, cache: "no-store", signal });
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw errorFrom(response, data, "Authorization" in headers);
    }
    notify(handlers.connection, "open");
    await readEvents(response.body, onEvent);
  }

  async function run() {
    let refusals = 0;
    while (!signal.aborted) {
      try {
        await connect();
        refusals = 0;
      } catch (error) {
        if (signal.aborted) return;
        const refused = error instanceof ApiError;
        refusals = refused ? refusals + 1 : 0;
        if (refused && (!transient(error.status) || refusals >= TRANSIENT_LIMIT)) {
          notify(handlers.failed, error);
          return;
        }
      }
      if (signal.aborted) return;
      notify(handlers.connection, "reconnecting");
      await pause(delay, signal);
      delay = Math.min(delay * 2, RECONNECT.longest);
    }
  }

  run();
  return { close: () => abort.abort() };
}
