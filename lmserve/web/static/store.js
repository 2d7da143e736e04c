// The conversation, the settings and the stream in progress, kept in localStorage per resource.
//
// Saved shape (version 1):
//   messages: [{role: "user", content} |
//              {role: "assistant", blocks: [{channel, text, done}], stop_reason, usage,
//               error: {type, message}, timing: {sent, first, end}, resumed}]
//   settings: {system, temperature, maxTokens} (strings, "" = the server's default),
//             reasoning (true, false, or null for the server's default) and apiKey ("": none)
//   pending:  {id, index, last} while an answer streams, so a reload can resume it.

const VERSION = 1;

export function createStore(base) {
  const key = `lmserve.chat:${base}`;
  return {
    key,
    load() {
      try {
        return normalize(JSON.parse(localStorage.getItem(key) ?? "null"));
      } catch {
        return normalize(null);
      }
    },
    save(state) {
      try {
        localStorage.setItem(key, JSON.stringify({ version: VERSION, ...state }));
        return true;
      } catch {
        return false; // quota exceeded or storage disabled: the page keeps working in memory
      }
    },
  };
}

const str = (value, fallback = "") => (typeof value === "string" ? value : fallback);
const obj = (value) => (value && typeof value === "object" && !Array.isArray(value) ? value : null);

/** Whatever is stored (possibly from an older page, or edited by hand) as a valid state. */
function normalize(saved) {
  const data = obj(saved) && saved.version === VERSION ? saved : {};
  const messages = Array.isArray(data.messages) ? data.messages.map(message).filter(Boolean) : [];
  const settings = obj(data.settings) ?? {};
  const pending = obj(data.pending);
  const index = pending && Number.isInteger(pending.index) ? pending.index : -1;
  const resumable = pending && typeof pending.id === "string" && messages[index]?.role === "assistant";
  return {
    messages,
    settings: {
      system: str(settings.system),
      temperature: str(settings.temperature),
      maxTokens: str(settings.maxTokens),
      reasoning: typeof settings.reasoning === "boolean" ? settings.reasoning : null,
      apiKey: str(settings.apiKey),
    },
    pending: resumable ? { id: pending.id, index, last: Number.isFinite(pending.last) ? pending.last : -1 } : null,
  };
}

function message(raw) {
  const m = obj(raw);
  if (!m) return null;
  if (m.role === "user") return { role: "user", content: str(m.content) };
  if (m.role !== "assistant") return null;
  const blocks = Array.isArray(m.blocks) ? m.blocks.map(obj).filter(Boolean) : [];
  return {
    role: "assistant",
    blocks: blocks.map((b) => ({ channel: str(b.channel, "output"), text: str(b.text),
      done: b.done === true })),
    stop_reason: typeof m.stop_reason === "string" ? m.stop_reason : null,
    usage: obj(m.usage),
    error: obj(m.error) && { type: str(m.error.type), message: str(m.error.message) },
    timing: obj(m.timing) ?? {},
    resumed: m.resumed === true,
  };
}
