// Server-Sent Events read from a fetch() response, so that the request can carry headers
// (Authorization, Last-Event-ID) that EventSource cannot send. The parsing follows the HTML
// standard's "interpreting an event stream": a line ends with CRLF, LF or CR; a line starting
// with ":" is a comment; "event", "data" and "id" are the fields; a blank line dispatches.

/**
 * An incremental parser. `push(text)` takes the stream's text in pieces split anywhere (inside
 * a field name, a value or a CRLF) and calls `onEvent({type, data, id})` for every event:
 * `type` defaults to "message", the data lines are joined with "\n", and `id` is the last
 * event id seen so far ("" when none), as EventSource's lastEventId. As the standard says, an
 * event with no data line is not dispatched (its id still counts), and an unfinished event at
 * the end of the stream is dropped. "retry" is ignored: the reader keeps its own backoff.
 */
export function createParser(onEvent) {
  let partial = ""; // the text after the last line break
  let afterCR = false; // the last piece ended with CR: a LF opening the next one belongs to it
  let type = "";
  let data = [];
  let id = "";

  function dispatch() {
    const event = { type: type || "message", data: data.join("\n"), id };
    const empty = data.length === 0;
    type = "";
    data = [];
    if (!empty) onEvent(event);
  }

  function line(text) {
    if (text === "") {
      dispatch();
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const name = colon < 0 ? text : text.slice(0, colon);
    const value = colon < 0 ? "" : text.slice(colon + 1).replace(/^ /, "");
    if (name === "event") type = value;
    else if (name === "data") data.push(value);
    else if (name === "id" && !value.includes("\0")) id = value;
  }

  function push(text) {
    if (text === "") return;
    if (afterCR && text.startsWith("\n")) text = text.slice(1);
    afterCR = text.endsWith("\r");
    const lines = (partial + text).split(/\r\n|\r|\n/);
    partial = lines.pop();
    lines.forEach(line);
  }

  return { push };
}

/**
 * Reads a response body (a ReadableStream of bytes) as an event stream until it ends, calling
 * `onEvent` as createParser does. It rejects when the read fails (network error, abort).
 */
export async function readEvents(body, onEvent) {
  const parser = createParser(onEvent);
  const decoder = new TextDecoder(); // UTF-8; drops a leading byte order mark, as the standard says
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      parser.push(decoder.decode(value, { stream: true }));
    }
  } catch (error) {
    reader.cancel().catch(() => {});
    throw error;
  }
}
