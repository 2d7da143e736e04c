// The page's fixed elements and the small helpers that change them.

const $ = (id) => document.getElementById(id);

export const ui = {
  log: $("log"), messages: $("messages"), empty: $("empty"), form: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), banner: $("banner"),
  status: $("status"), model: $("model"), live: $("live"), settings: $("settings"),
  toggle: $("settings-toggle"), newChat: $("new-chat"), system: $("system"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), reasoning: $("reasoning"),
  reasoningField: $("reasoning-field"), apiKey: $("api-key"), picker: $("model-picker"),
};

// One banner line; the server's state (loading, offline) outranks the stream's (reconnecting).
const banners = { server: "", stream: "" };

export function setBanner(kind, text) {
  banners[kind] = text;
  const shown = banners.server || banners.stream;
  ui.banner.textContent = shown;
  ui.banner.hidden = !shown;
}

/** Says `text` to screen readers (a polite live region). */
export function announce(text) {
  ui.live.textContent = text;
}

/** Swaps Send for Stop while an answer streams. */
export function setBusy(busy) {
  const stopHadFocus = document.activeElement === ui.stop;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (stopHadFocus && !busy) ui.prompt.focus();
}

export function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
}

export function scrollToEnd() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

/** Grows the message box with its text, up to a limit (then it scrolls). */
export function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 240)}px`;
}

export function toggleSettings(open = ui.settings.hidden) {
  ui.settings.hidden = !open;
  ui.toggle.setAttribute("aria-expanded", String(open));
}
