// DOM for messages: user text, assistant blocks (Markdown), reasoning, errors and usage lines.

import { renderMarkdown } from "./markdown.js";

const STOP_NOTES = {
  max_tokens: "reached max tokens",
  cancelled: "stopped",
  tool_use: "asked for a tool",
  interrupted: "interrupted",
};

function el(tag, children = [], className = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

function button(label, action, title) {
  const b = el("button", [label], "link-button");
  b.type = "button";
  b.dataset.action = action;
  if (title) b.title = title;
  return b;
}

/** The visible answer: every non-reasoning block, in order. */
export function outputText(message) {
  return message.blocks.filter((b) => b.channel !== "reasoning").map((b) => b.text).join("");
}

/** Decode speed from the first token to the last; null when it was not watched live. */
export function tokensPerSecond(message) {
  const { first, end } = message.timing;
  const tokens = message.usage?.output_tokens;
  if (message.resumed || !first || !end || !(tokens > 1) || end <= first) return null;
  return (tokens - 1) / ((end - first) / 1000);
}

export function usageLine(message) {
  const parts = [];
  const usage = message.usage;
  if (usage && Number.isFinite(usage.output_tokens)) {
    parts.push(`${usage.output_tokens} token${usage.output_tokens === 1 ? "" : "s"}`);
  }
  const rate = tokensPerSecond(message);
  if (rate !== null) parts.push(`${rate.toFixed(1)} tok/s`);
  const { sent, end } = message.timing;
  if (sent && end && !message.resumed) parts.push(`${((end - sent) / 1000).toFixed(1)} s`);
  if (usage && Number.isFinite(usage.input_tokens)) {
    const cached = usage.cached_tokens ? `, ${usage.cached_tokens} cached` : "";
    parts.push(`prompt ${usage.input_tokens}${cached}`);
  }
  const note = STOP_NOTES[message.stop_reason];
  if (note) parts.push(note);
  return parts.join(" · ");
}

export function messageView(message, index) {
  const article = el("article", [], `msg ${message.role}`);
  article.dataset.index = String(index);
  if (message.role === "user") {
    article.append(el("h2", ["You"], "visually-hidden"),
      el("div", [message.content], "bubble"));
  }
  return article;
}

/** (Re)draws an assistant message; `streaming` while its answer is still arriving. */
export function drawAssistant(article, message, { streaming, last }) {
  const opened = reasoningState(article);
  const body = [el("h2", ["Assistant"], "visually-hidden")];
  message.blocks.forEach((block, k) => {
    if (block.channel === "reasoning") body.push(reasoningView(block, k, opened[k]));
    else if (block.text) body.push(el("div", [renderMarkdown(block.text)], "md"));
  });
  const hasOutput = message.blocks.some((b) => b.text);
  if (streaming && !hasOutput) body.push(el("div", [el("span"), el("span"), el("span")], "typing"));
  if (message.error) {
    body.push(el("div", [el("strong", ["Error: "]), message.error.message || message.error.type],
      "msg-error"));
  }
  body.push(footer(message, streaming, last));
  article.replaceChildren(...body);
  article.classList.toggle("streaming", streaming);
  article.setAttribute("aria-busy", String(streaming));
}

function footer(message, streaming, last) {
  const meta = el("footer", [], "meta");
  if (streaming) {
    const tokens = message.usage?.output_tokens;
    meta.append(el("span", [tokens ? `${tokens} tokens…` : "Generating…"], "usage"));
    return meta;
  }
  meta.append(el("span", [usageLine(message)], "usage"));
  if (outputText(message)) meta.append(button("Copy", "copy-answer", "Copy this answer"));
  if (last) meta.append(button("Retry", "retry", "Generate this answer again"));
  return meta;
}

/** Which reasoning panels the reader opened or closed by hand, by block index. */
function reasoningState(article) {
  const state = {};
  for (const details of article.querySelectorAll("details.reasoning")) {
    if (String(details.open) !== details.dataset.auto) state[details.dataset.block] = details.open;
  }
  return state;
}

function reasoningView(block, index, userOpen) {
  const auto = !block.done;
  const details = el("details", [
    el("summary", [block.done ? "Reasoning" : "Thinking…"]),
    el("div", [renderMarkdown(block.text)], "md"),
  ], "reasoning");
  details.open = userOpen ?? auto;
  details.dataset.auto = String(auto);
  details.dataset.block = String(index);
  return details;
}

/** Copies `text`, falling back to a hidden textarea where the Clipboard API is unavailable. */
export async function copyText(text, trigger) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    const area = el("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    ok = document.execCommand("copy");
    area.remove();
  }
  if (trigger) {
    const label = trigger.textContent;
    trigger.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { trigger.textContent = label; }, 1500);
  }
  return ok;
}
