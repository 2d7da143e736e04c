// The model picker: the models of `lmserve serve` (GET /models/) with their load states;
// choosing one opens its chat page. An app's page (no /models/ list) shows no picker.

const STATUS = { unloaded: "not loaded", loading: "loading", loaded: "loaded", failed: "failed" };

function label(model) {
  const progress = model.status === "loading" && model.progress > 0
    ? ` ${Math.round(model.progress * 100)}%` : "";
  return `${model.name} · ${STATUS[model.status] ?? model.status}${progress}`;
}

/** `list()` gives GET /models/; `current` is this page's resource path. */
export function createPicker(select, current, list) {
  let timer = null;

  async function refresh() {
    clearTimeout(timer);
    let models;
    try {
      models = (await list()).data;
    } catch {
      return; // not lmserve serve, or the key is missing: the header says why
    }
    if (!Array.isArray(models) || !models.some((m) => m.path === current)) return;
    select.replaceChildren(...models.map((model) => {
      const option = document.createElement("option");
      option.value = model.path;
      option.textContent = label(model);
      option.dataset.status = model.status;
      return option;
    }));
    select.value = current;
    select.hidden = false;
    // While a model loads, follow its progress; otherwise refresh when the list is opened.
    if (models.some((m) => m.status === "loading")) timer = setTimeout(refresh, 1000);
  }

  select.addEventListener("focus", refresh);
  select.addEventListener("change", () => {
    if (select.value !== current) window.location.assign(`${select.value}chat/`);
  });
  return { refresh };
}
