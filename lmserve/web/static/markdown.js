// Block-level Markdown (headings, lists, quotes, fenced code, tables) straight to DOM nodes.
// Like inline.js, it never parses a string as HTML: model output stays text.

import { inline } from "./inline.js";

const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const SETEXT = /^ {0,3}(=+|-+)[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:([ \t]+)(.*))?$/;
const TASK = /^\[([ xX])\][ \t]+/;
const DELIMITER_ROW = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

/** Renders Markdown source into a DocumentFragment. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  fragment.append(...blocks(lines));
  return fragment;
}

function el(tag, children = [], className = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

const isBlank = (line) => line.trim() === "";
const indentOf = (line) => line.length - line.trimStart().length;

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) i += 1;
    else if (FENCE.test(line)) i = codeBlock(lines, i, out);
    else if (HEADING.test(line)) i = heading(lines, i, out);
    else if (RULE.test(line)) { out.push(el("hr")); i += 1; }
    else if (QUOTE.test(line)) i = blockquote(lines, i, out);
    else if (ITEM.test(line)) i = list(lines, i, out);
    else if (tableStarts(lines, i)) i = table(lines, i, out);
    else i = paragraph(lines, i, out);
  }
  return out;
}

/** Whether `line` starts a block that may interrupt a paragraph. */
function interrupts(lines, i) {
  const line = lines[i];
  if (FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line)) return true;
  const item = ITEM.exec(line);
  if (item && item[4] && (!/\d/.test(item[2]) || /^1[.)]$/.test(item[2]))) return true;
  return tableStarts(lines, i);
}

function codeBlock(lines, i, out) {
  const [, indent, fence, lang] = FENCE.exec(lines[i]);
  const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
  const body = [];
  let j = i + 1;
  for (; j < lines.length && !closing.test(lines[j]); j++) {
    const line = lines[j];
    body.push(line.slice(Math.min(indent.length, indentOf(line))));
  }
  out.push(codeView(body.join("\n"), lang, j >= lines.length));
  return j + 1;
}

/** A code block with its language and a copy button (view.js handles the click). */
export function codeView(code, lang, open = false) {
  const label = el("span", [lang || "text"], "code-lang");
  const copy = el("button", ["Copy"], "copy");
  copy.type = "button";
  copy.dataset.action = "copy-code";
  copy.setAttribute("aria-label", `Copy ${lang || "code"} to the clipboard`);
  const codeEl = el("code", [code]);
  if (lang) codeEl.dataset.lang = lang;
  const block = el("div", [el("div", [label, copy], "code-head"), el("pre", [codeEl])], "code");
  if (open) block.classList.add("open");
  return block;
}

function headingEl(level, text) {
  // The page title is the only h1; message headings start one level below.
  return el(`h${Math.min(level + 1, 6)}`, inline(text));
}

function heading(lines, i, out) {
  const [, marks, text] = HEADING.exec(lines[i]);
  out.push(headingEl(marks.length, text ?? ""));
  return i + 1;
}

function paragraph(lines, i, out) {
  const body = [lines[i].trimStart()];
  let j = i + 1;
  for (; j < lines.length && !isBlank(lines[j]); j++) {
    const setext = SETEXT.exec(lines[j]);
    if (setext) {
      out.push(headingEl(setext[1][0] === "=" ? 1 : 2, body.join("\n").trim()));
      return j + 1;
    }
    if (interrupts(lines, j)) break;
    body.push(lines[j].trimStart());
  }
  out.push(el("p", inline(body.join("\n").trimEnd())));
  return j;
}

function blockquote(lines, i, out) {
  const body = [];
  let j = i;
  for (; j < lines.length && !isBlank(lines[j]); j++) {
    if (QUOTE.test(lines[j])) body.push(lines[j].replace(QUOTE, ""));
    else if (interrupts(lines, j)) break;
    else body.push(lines[j]);
  }
  out.push(el("blockquote", blocks(body)));
  return j;
}

function list(lines, i, out) {
  const first = ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const marker = first[2].slice(-1); // "-", "*", "+", "." or ")": another one starts a new list
  const listEl = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) listEl.start = parseInt(first[2], 10);
  const items = [];
  let loose = false;
  let j = i;
  const sibling = (line) => {
    const item = ITEM.exec(line ?? "");
    return item && item[2].slice(-1) === marker && item[1].length <= first[1].length + 3 && item;
  };
  while (j < lines.length) {
    const item = sibling(lines[j]);
    if (!item) break;
    const { body, next, gap } = itemBody(lines, j, item);
    if (gap && sibling(lines[next])) loose = true;
    if (body.slice(1).some(isBlank)) loose = true;
    items.push(body);
    j = next;
  }
  for (const body of items) listEl.append(itemView(body, loose));
  out.push(listEl);
  return j;
}

/** The lines of one list item, de-indented to its content column. */
function itemBody(lines, j, item) {
  const markerIndent = item[1].length;
  const spacing = item[3] ?? " ";
  const width = !item[4] || spacing.length > 4 ? 1 : spacing.length;
  const column = markerIndent + item[2].length + width;
  const body = [item[4] ?? ""];
  let k = j + 1;
  for (; k < lines.length; k++) {
    const line = lines[k];
    const indent = indentOf(line);
    if (isBlank(line)) body.push("");
    else if (indent >= column) body.push(line.slice(column));
    else if (ITEM.test(line)) {
      if (indent <= markerIndent) break; // the next item of this list
      body.push(line.slice(indent));
    }
    else if (!isBlank(body[body.length - 1]) && !interrupts(lines, k)) body.push(line.trim());
    else break;
  }
  let gap = false;
  while (body.length > 1 && isBlank(body[body.length - 1])) {
    body.pop();
    gap = true;
  }
  return { body, next: k, gap };
}

function itemView(body, loose) {
  const li = el("li");
  const task = TASK.exec(body[0]);
  if (task) {
    const box = el("input");
    box.type = "checkbox";
    box.disabled = true;
    box.checked = task[1] !== " ";
    li.append(box, " ");
    li.classList.add("task");
    body = [body[0].slice(task[0].length), ...body.slice(1)];
  }
  for (const node of blocks(body)) {
    if (!loose && node.tagName === "P") li.append(...node.childNodes);
    else li.append(node);
  }
  return li;
}

function tableStarts(lines, i) {
  if (i + 1 >= lines.length || !lines[i].includes("|")) return false;
  const delimiter = lines[i + 1];
  if (!delimiter.includes("|") && !lines[i].trim().startsWith("|")) return false;
  return DELIMITER_ROW.test(delimiter) && cells(lines[i]).length === cells(delimiter).length;
}

function cells(row) {
  let text = row.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  return text.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function alignment(cell) {
  if (cell.startsWith(":") && cell.endsWith(":")) return "align-center";
  if (cell.endsWith(":")) return "align-right";
  return "";
}

function table(lines, i, out) {
  const header = cells(lines[i]);
  const aligns = cells(lines[i + 1]).map(alignment);
  const row = (values, tag) => el("tr", header.map((_, k) =>
    el(tag, inline(values[k] ?? ""), aligns[k])));
  const body = [];
  let j = i + 2;
  for (; j < lines.length && !isBlank(lines[j]) && lines[j].includes("|"); j++) {
    if (FENCE.test(lines[j]) || HEADING.test(lines[j]) || QUOTE.test(lines[j])) break;
    body.push(row(cells(lines[j]), "td"));
  }
  const tableEl = el("table", [el("thead", [row(header, "th")]), el("tbody", body)]);
  out.push(el("div", [tableEl], "table-wrap"));
  return j;
}
