// The native protocol, as the page uses it: GET P, POST P stream/, GET P stream/{id}/ through
// EventSource, DELETE P stream/{id}/. See docs/native-protocol.md.

export const FRAMES = ["message.start", "block.start", "block.delta", "block.stop",
  "message.delta", "error", "message.stop"];

/** An HTTP or network failure, carrying the native error body's fields when there is one. */
export class ApiError extends Error {
  constructor(status, type, message, retryAfter = 0) {
    super(message);
    this.status = status;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

export function createApi(base) {
  const streamUrl = (id) => `${base}stream/${encodeURIComponent(id)}/`;
  return {
    info: () => request("GET", base),
    start: (body) => request("POST", `${base}stream/`, body),
    cancel: (id) => request("DELETE", streamUrl(id)),
    follow: (id, after, handlers) => follow(streamUrl(id), after, handlers),
    probe: (id) => probe(streamUrl(id)),
  };
}

async function request(method, url, body) {
  let response;
  try {
    response = await fetch(url, {
      method,
      cache: "no-store",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch {
    throw new ApiError(0, "network", "Cannot reach the server.");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw errorFrom(response, data);
  return data;
}

function errorFrom(response, data) {
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

/**
 * Why a stream URL cannot be read: null when it answers 200 (EventSource may try again),
 * otherwise the ApiError built from its error body.
 */
async function probe(url) {
  const abort = new AbortController();
  try {
    const response = await fetch(url, { cache: "no-store", signal: abort.signal });
    if (response.ok) return null;
    return errorFrom(response, await response.json().catch(() => null));
  } catch {
    return new ApiError(0, "network", "Cannot reach the server.");
  } finally {
    abort.abort();
  }
}

/**
 * Reads one stream and hands every frame with an id above `after` to `handlers.frame(name,
 * data, id)`. EventSource reconnects by itself with Last-Event-ID after a network blip; a
 * fresh reader (after a page reload) starts from the first frame, and the id check drops
 * what was already applied, so nothing is shown twice. `handlers.connection(state)` hears
 * "open" and "reconnecting"; `handlers.failed()` hears that the browser gave up (an HTTP error
 * such as 404 for an expired stream). Returns { close() }.
 */
function follow(url, after, handlers) {
  const source = new EventSource(url);
  let last = after;
  const onFrame = (name) => (event) => {
    const id = event.lastEventId === "" ? null : Number(event.lastEventId);
    if (id !== null && id <= last) return;
    if (id !== null) last = id;
    let data = {};
    try {
      data = JSON.parse(event.data);
    } catch {
      data = {};
    }
    if (name === "message.stop") source.close();
    handlers.frame(name, data, id);
  };
  for (const name of FRAMES) {
    if (name !== "error") source.addEventListener(name, onFrame(name));
  }
  const protocolError = onFrame("error");
  // "error" names both the protocol's error frame (a MessageEvent with data) and the
  // browser's connection-error event (a plain Event).
  source.addEventListener("error", (event) => {
    if (typeof event.data === "string") protocolError(event);
    else if (source.readyState === EventSource.CLOSED) handlers.failed();
    else handlers.connection("reconnecting");
  });
  source.addEventListener("open", () => handlers.connection("open"));
  return { close: () => source.close() };
}
