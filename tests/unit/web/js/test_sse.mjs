// The chat page's Server-Sent Events parser (lmserve/web/static/sse.js). Run with
// `node --test tests/unit/web/js/test_sse.mjs`; tests/unit/web/test_web_js.py runs every test_*.mjs here.

import assert from "node:assert/strict";
import { test } from "node:test";

import { createParser, readEvents } from "../../../../lmserve/web/static/sse.js";

/** The events the parser dispatches for `pieces`, pushed one after the other. */
function parse(...pieces) {
  const events = [];
  const parser = createParser((event) => events.push(event));
  for (const piece of pieces) parser.push(piece);
  return events;
}

const event = (type, data, id = "") => ({ type, data, id });

const FRAMES = 'id: 1\nevent: message.start\ndata: {"id":"a"}\n\n'
  + ": heartbeat\n\n"
  + 'id: 2\r\nevent: block.delta\r\ndata: {"text":"h\u00e9"}\r\n\r\n'
  + "id: 3\revent: message.stop\rdata: {}\r\r";
const PARSED = [event("message.start", '{"id":"a"}', "1"),
  event("block.delta", '{"text":"h\u00e9"}', "2"), event("message.stop", "{}", "3")];

test("parses the frames the native protocol sends", () => {
  assert.deepEqual(parse(FRAMES), PARSED);
});

test("a piece may end anywhere: inside a name, a value or a CRLF", () => {
  for (let at = 0; at <= FRAMES.length; at += 1) {
    assert.deepEqual(parse(FRAMES.slice(0, at), FRAMES.slice(at)), PARSED, `split at ${at}`);
  }
  assert.deepEqual(parse(...FRAMES), PARSED, "one character at a time");
});

test("a CR at the end of a piece and a LF opening the next are one line break", () => {
  assert.deepEqual(parse("data: 1\r", "\ndata: 2\r", "\n\r", "\n"), [event("message", "1\n2")]);
  assert.deepEqual(parse("data: 1\r", "", "\ndata: 2\n\n"), [event("message", "1\n2")],
    "an empty piece in between");
  assert.deepEqual(parse("data: 1\r\rdata: 2\r\r"), [event("message", "1"), event("message", "2")],
    "lone CRs");
});

test("data lines join with line feeds; one space after the colon is dropped", () => {
  assert.deepEqual(parse("data: a\ndata:\ndata:  b\ndata\n\n"), [event("message", "a\n\n b\n")]);
  assert.deepEqual(parse("data:x\n\n"), [event("message", "x")]);
  assert.deepEqual(parse("data: one: two\n\n"), [event("message", "one: two")]);
});

test("the last id carries over to later events until another id replaces it", () => {
  assert.deepEqual(parse("id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: 9\ndata: d\n\n"), [
    event("message", "a", "7"), event("message", "b", "7"), event("message", "c", ""),
    event("message", "d", "9")]);
  assert.deepEqual(parse("id: 1\ndata: a\n\nid: 2\u00003\ndata: b\n\n"),
    [event("message", "a", "1"), event("message", "b", "1")], "an id with NUL is ignored");
});

test("comments are skipped, also between the fields of an event", () => {
  assert.deepEqual(parse(": heartbeat\n\n:\n\n"), []);
  assert.deepEqual(parse("event: e\n: note\ndata: x\n\n"), [event("e", "x")]);
});

test("an event with no data is not dispatched, but its id counts", () => {
  assert.deepEqual(parse("event: ping\n\n"), []);
  assert.deepEqual(parse("id: 5\nevent: ping\n\ndata: x\n\n"), [event("message", "x", "5")],
    "the type does not carry over, the id does");
});

test("the type resets after each event; retry and unknown fields are ignored", () => {
  assert.deepEqual(parse("event: a\ndata: 1\n\nretry: 10\nfoo: bar\ndata: 2\n\n"),
    [event("a", "1"), event("message", "2")]);
});

test("an event the stream ends inside is dropped", () => {
  assert.deepEqual(parse("data: 1\n\ndata: 2\n"), [event("message", "1")]);
});

/** A byte stream that delivers `chunks` one read at a time. */
function byteStream(chunks) {
  return new ReadableStream({
    pull(controller) {
      if (chunks.length) controller.enqueue(chunks.shift());
      else controller.close();
    },
  });
}

test("readEvents decodes UTF-8 split across reads and drops a byte order mark", async () => {
  const bytes = new TextEncoder().encode("\ufeffdata: \u00e9\u20ac\n\ndata: 2\n\n");
  const chunks = [...bytes].map((byte) => Uint8Array.of(byte));
  const events = [];
  await readEvents(byteStream(chunks), (e) => events.push(e));
  assert.deepEqual(events, [event("message", "\u00e9\u20ac"), event("message", "2")]);
});

test("readEvents rejects when a read fails", async () => {
  const failing = new ReadableStream({
    pull(controller) {
      controller.error(new TypeError("network error"));
    },
  });
  await assert.rejects(readEvents(failing, () => {}), TypeError);
});
