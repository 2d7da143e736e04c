// The chat page's native protocol client (lmserve/web/static/api.js) against a scripted fetch:
// the API key on every request, and the stream reader's ids, reconnections and failures.

import assert from "node:assert/strict";
import { afterEach, test } from "node:test";

import { createApi } from "../../../../lmserve/web/static/api.js";

const realFetch = globalThis.fetch;
afterEach(() => { globalThis.fetch = realFetch; });

/** Answers each fetch with the next of `replies` (a Response, an Error to throw, or a function
 * of the request's init giving one) and records every request as {url, headers}. */
function scriptFetch(replies) {
  const requests = [];
  globalThis.fetch = async (url, init = {}) => {
    requests.push({ url, method: init.method ?? "GET", headers: { ...init.headers } });
    let reply = replies.shift();
    if (typeof reply === "function") reply = reply(init);
    if (reply instanceof Error) throw reply;
    assert.ok(reply, `unexpected request to ${url}`);
    return reply;
  };
  return requests;
}

const frame = (id, event, data) => `id: ${id}\nevent: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
const sse = (...frames) => new Response(frames.join(""),
  { headers: { "Content-Type": "text/event-stream" } });
const json = (status, body) => new Response(JSON.stringify(body),
  { status, headers: { "Content-Type": "application/json" } });
const UNAUTHORIZED = { error: { type: "authentication", message: "invalid or missing API key" } };

/** An event stream that stays open until the request is aborted, as a real fetch body does. */
const hanging = (text) => (init) => new Response(new ReadableStream({
  start(controller) {
    controller.enqueue(new TextEncoder().encode(text));
    init.signal.addEventListener("abort", () => {
      controller.error(new DOMException("The operation was aborted.", "AbortError"));
    });
  },
}));

/** Follows stream "s1" after `after`; resolves with what the handlers heard once it ends. */
function followed(api, after, until = "stop") {
  const heard = { frames: [], connection: [], failed: null };
  return new Promise((resolve) => {
    api.follow("s1", after, {
      frame: (name, data, id) => {
        heard.frames.push([id, name, data]);
        if (name === "message.stop" && until === "stop") resolve(heard);
      },
      connection: (state) => heard.connection.push(state),
      failed: (error) => {
        heard.failed = error;
        resolve(heard);
      },
    });
  });
}

test("requests carry the key as a bearer token when one is set", async () => {
  let key = "";
  const api = createApi("/llm/", () => key);
  const requests = scriptFetch([json(200, { status: "ready" }), json(201, { id: "s1" }),
    json(200, { id: "s1", cancelled: true })]);
  await api.info();
  key = "sekret";
  assert.deepEqual(await api.start({ prompt: "hi" }), { id: "s1" });
  await api.cancel("s1");
  assert.deepEqual(requests.map((r) => [r.method, r.url, r.headers.Authorization]), [
    ["GET", "/llm/", undefined], ["POST", "/llm/stream/", "Bearer sekret"],
    ["DELETE", "/llm/stream/s1/", "Bearer sekret"]]);
  assert.equal(requests[1].headers["Content-Type"], "application/json");
});

test("a 401 says whether the key is missing or refused", async () => {
  let key = "";
  const api = createApi("/llm/", () => key);
  scriptFetch([json(401, UNAUTHORIZED), json(401, UNAUTHORIZED)]);
  await assert.rejects(api.info(), { status: 401, type: "authentication",
    message: /needs an API key.*Settings/ });
  key = "wrong";
  await assert.rejects(api.info(), { status: 401, message: /did not accept the API key/ });
});

test("a key no header can carry is refused before any request", async () => {
  const requests = scriptFetch([]);
  const api = createApi("/llm/", () => "s\u00e9kret\u201d");
  await assert.rejects(api.info(), { status: 401, message: /characters other than ASCII/ });
  const heard = await followed(api, -1);
  assert.equal(heard.failed.status, 401);
  assert.deepEqual(requests, []);
});

test("follow sends the key, reconnects after an early end with Last-Event-ID, skips repeats",
  async () => {
    const requests = scriptFetch([
      sse(frame(1, "message.start", { id: "s1" }), frame(2, "block.delta", { text: "a" })),
      sse(frame(2, "block.delta", { text: "a" }), ": heartbeat\n\n",
        frame(3, "block.delta", { text: "b" }), frame(4, "message.stop", { stop_reason: "stop" }),
        frame(5, "block.delta", { text: "after the end" })),
    ]);
    const heard = await followed(createApi("/llm/", () => "k"), -1);
    assert.deepEqual(heard.frames, [[1, "message.start", { id: "s1" }],
      [2, "block.delta", { text: "a" }], [3, "block.delta", { text: "b" }],
      [4, "message.stop", { stop_reason: "stop" }]]);
    assert.deepEqual(heard.connection, ["open", "reconnecting", "open"]);
    assert.deepEqual(requests.map((r) => r.url), ["/llm/stream/s1/", "/llm/stream/s1/"]);
    assert.deepEqual(requests.map((r) => r.headers.Authorization), ["Bearer k", "Bearer k"]);
    assert.deepEqual(requests.map((r) => r.headers["Last-Event-ID"]), [undefined, "2"]);
  });

test("follow resumes after a known id and reconnects after a network error", async () => {
  const requests = scriptFetch([
    new TypeError("Failed to fetch"),
    sse(frame(6, "block.delta", { text: "old" }), frame(7, "message.stop", {})),
  ]);
  const heard = await followed(createApi("/llm/"), 6);
  assert.deepEqual(heard.frames, [[7, "message.stop", {}]]);
  assert.deepEqual(heard.connection, ["reconnecting", "open"]);
  assert.deepEqual(requests.map((r) => r.headers["Last-Event-ID"]), ["6", "6"]);
  assert.equal(requests[0].headers.Authorization, undefined);
});

test("an error status ends the reader at once: 401 and 404", async () => {
  for (const [status, body, message] of [
    [401, UNAUTHORIZED, /did not accept the API key/],
    [404, { error: { type: "not_found", message: "no stream" } }, /no stream/]]) {
    const requests = scriptFetch([json(status, body)]);
    const heard = await followed(createApi("/llm/", () => "k"), -1);
    assert.equal(heard.failed.status, status);
    assert.match(heard.failed.message, message);
    assert.deepEqual(heard.connection, []);
    assert.equal(requests.length, 1, "no retry");
  }
});

test("a 503 is retried before the reader gives up", async () => {
  const busy = { error: { type: "overloaded", message: "busy" } };
  scriptFetch([json(503, busy), sse(frame(1, "message.stop", {}))]);
  const heard = await followed(createApi("/llm/"), -1);
  assert.equal(heard.failed, null);
  assert.deepEqual(heard.connection, ["reconnecting", "open"]);
});

test("close() aborts the request and nothing is heard after it", async () => {
  let signal = null;
  scriptFetch([(init) => {
    signal = init.signal;
    return hanging(frame(1, "message.start", {}))(init);
  }]);
  const api = createApi("/llm/");
  const heard = [];
  let reader = null;
  await new Promise((resolve) => {
    reader = api.follow("s1", -1, {
      frame: (name) => { heard.push(name); resolve(); },
      connection: (state) => heard.push(state),
      failed: () => heard.push("failed"),
    });
  });
  reader.close();
  assert.equal(signal.aborted, true);
  await new Promise((resolve) => setTimeout(resolve, 1200)); // longer than the first retry pause
  assert.deepEqual(heard, ["open", "message.start"]);
});
