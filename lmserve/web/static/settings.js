// The settings panel: system prompt, temperature, max tokens, reasoning and the API key, kept in
// the state.

import { toggleSettings, ui } from "./ui.js";

/** Fills the fields from `settings` and writes every edit back, then calls `changed()`. */
export function bindSettings(settings, changed) {
  const fields = [
    [ui.system, "system", () => ui.system.value],
    [ui.temperature, "temperature", () => ui.temperature.value],
    [ui.maxTokens, "maxTokens", () => ui.maxTokens.value],
    [ui.reasoning, "reasoning", () => ui.reasoning.checked],
    [ui.apiKey, "apiKey", () => ui.apiKey.value.trim()],
  ];
  ui.system.value = settings.system;
  ui.temperature.value = settings.temperature;
  ui.maxTokens.value = settings.maxTokens;
  ui.reasoning.checked = settings.reasoning === true;
  ui.apiKey.value = settings.apiKey;
  for (const [input, key, read] of fields) {
    input.addEventListener("input", () => {
      settings[key] = read();
      changed();
    });
  }
}

/** Shows the resource's defaults as placeholders, and the reasoning switch where it applies. */
export function showDefaults(info, settings) {
  const defaults = info.params ?? {};
  const hint = (value) => (value !== undefined ? `${value} (default)` : "default");
  ui.temperature.placeholder = hint(defaults.temperature);
  ui.maxTokens.placeholder = hint(defaults.max_tokens);
  ui.reasoningField.hidden = !info.reasoning;
  if (settings.reasoning === null) ui.reasoning.checked = defaults.reasoning === true;
}

/** The request's params: only what the reader set; the resource's defaults fill the rest. */
export function requestParams(info) {
  const params = {};
  const temperature = ui.temperature.value.trim();
  const maxTokens = ui.maxTokens.value.trim();
  if (temperature !== "") params.temperature = Number(temperature);
  if (maxTokens !== "") params.max_tokens = Number(maxTokens);
  if (info?.reasoning) params.reasoning = ui.reasoning.checked;
  return params;
}

/** False (after pointing at the field) when a number field holds an invalid value. */
export function settingsValid() {
  for (const input of [ui.temperature, ui.maxTokens]) {
    if (!input.checkValidity()) {
      toggleSettings(true);
      input.reportValidity();
      return false;
    }
  }
  return true;
}

/**
 * Marks the API key field while the server refuses the key (or wants one), opening the settings
 * when that starts; unmarks it once a key is accepted.
 */
export function markKey(refused) {
  if (refused && ui.apiKey.getAttribute("aria-invalid") !== "true") toggleSettings(true);
  if (refused) ui.apiKey.setAttribute("aria-invalid", "true");
  else ui.apiKey.removeAttribute("aria-invalid");
}
