// Inline Markdown (emphasis, code, links) straight to DOM nodes. Model output only ever becomes
// text nodes and a fixed set of elements; no string is ever parsed as HTML.

const ESCAPABLE = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
const BARE_URL = /^https?:\/\/[^\s<>"]+/;
const AUTOLINK = /^<(https?:\/\/[^\s<>]+)>/;
const WORD = /[\p{L}\p{N}]/u;
const SPACE = /\s/;

/** The href for `raw` when it is an absolute http(s) URL, otherwise null. */
export function safeUrl(raw) {
  try {
    const url = new URL(raw.trim());
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function el(tag, children, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children);
  return node;
}

function anchor(href, children) {
  const a = el("a", children);
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

/** Parses `text` into an array of nodes; `links: false` inside link text (no nested links). */
export function inline(text, links = true) {
  const out = [];
  let plain = "";
  const flush = () => {
    if (plain) out.push(document.createTextNode(plain));
    plain = "";
  };
  const emit = (node) => {
    flush();
    out.push(node);
  };
  const unmatched = {}; // marker -> the earliest position from which no closer was found
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    const found = parseAt(text, i, c, links, unmatched);
    if (found) {
      if (found.trimBefore) plain = plain.replace(/ +$/, "");
      emit(found.node);
      i = found.end;
    } else if (c === "\\" && ESCAPABLE.includes(text[i + 1] ?? "\n")) {
      plain += text[i + 1];
      i += 2;
    } else {
      plain += c;
      i += 1;
    }
  }
  flush();
  return out;
}

function parseAt(text, i, c, links, unmatched) {
  switch (c) {
    case "`": return codeSpan(text, i);
    case "*": case "_": case "~": return emphasis(text, i, c, links, unmatched);
    case "[": return links ? link(text, i, false) : null;
    case "!": return links && text[i + 1] === "[" ? link(text, i + 1, true) : null;
    case "<": return links ? autolink(text, i) : null;
    case "h": return links ? bareUrl(text, i) : null;
    case "\n": return lineBreak(text, i);
    case "\\": return text[i + 1] === "\n" ? { node: el("br", []), end: i + 2 } : null;
    default: return null;
  }
}

function runLength(text, i, c) {
  let n = 0;
  while (text[i + n] === c) n++;
  return n;
}

function codeSpan(text, i) {
  const n = runLength(text, i, "`");
  let j = text.indexOf("`".repeat(n), i + n);
  while (j !== -1 && runLength(text, j, "`") !== n) {
    j = text.indexOf("`".repeat(n), j + runLength(text, j, "`"));
  }
  if (j === -1) return { node: document.createTextNode("`".repeat(n)), end: i + n };
  let code = text.slice(i + n, j).replace(/\n/g, " ");
  if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
  return { node: el("code", [code]), end: j + n };
}

const STYLES = { "*": ["em", "strong"], "_": ["em", "strong"], "~": [null, "del"] };

function canOpen(text, j, run, c) {
  if (SPACE.test(text[j + run] ?? " ")) return false;
  return c !== "_" || j === 0 || !WORD.test(text[j - 1]);
}

function canClose(text, j, run, c, from) {
  if (j <= from || SPACE.test(text[j - 1])) return false;
  return c !== "_" || !WORD.test(text[j + run] ?? " ");
}

function emphasis(text, i, c, links, unmatched) {
  const run = runLength(text, i, c);
  if ((c === "~" && run !== 2) || !canOpen(text, i, run, c)) return null;
  // The outer pair takes the first markers of the opening run and the last of the closing run,
  // so ***x*** is strong(em(x)).
  const size = Math.min(run, 2);
  // No closer after some position means none after a later one either: without this memo a
  // long run of lone markers would cost quadratic time on every redraw.
  const key = c + size;
  if (i + run >= (unmatched[key] ?? Infinity)) return null;
  const close = findCloser(text, i + run, c, size, true);
  if (close === -1) {
    unmatched[key] = i + run;
    return null;
  }
  const children = inline(text.slice(i + size, close), links);
  return { node: el(STYLES[c][size - 1], children), end: close + size };
}

/** Where the closing run of `size` markers starts, skipping pairs nested inside (one level). */
function findCloser(text, from, c, size, skipNested) {
  let j = from;
  while ((j = text.indexOf(c, j)) !== -1) {
    const run = runLength(text, j, c);
    if (text[j - 1] === "\\") {
      j += 1;
      continue;
    }
    const closes = canClose(text, j, run, c, from);
    if (closes && run === size) return j;
    if (skipNested && run !== size && canOpen(text, j, run, c)) {
      const inner = Math.min(run, 2);
      const nested = findCloser(text, j + run, c, inner, false);
      if (nested !== -1) {
        j = nested + inner;
        continue;
      }
    }
    if (closes && run > size) return j + run - size;
    j += run;
  }
  return -1;
}

function matchingBracket(text, open) {
  let depth = 0;
  for (let j = open; j < text.length; j++) {
    if (text[j] === "\\") { j++; continue; }
    if (text[j] === "`") { j += runLength(text, j, "`") - 1; continue; }
    if (text[j] === "[") depth++;
    if (text[j] === "]" && --depth === 0) return j;
  }
  return -1;
}

function destination(text, i) {
  const m = /^\(\s*(<[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+("[^"]*"|'[^']*'))?\s*\)/
    .exec(text.slice(i));
  if (!m) return null;
  const url = m[1].startsWith("<") ? m[1].slice(1, -1) : m[1];
  return { url, title: m[2] ? m[2].slice(1, -1) : "", end: i + m[0].length };
}

function link(text, open, image) {
  const close = matchingBracket(text, open);
  if (close === -1 || text[close + 1] !== "(") return null;
  const dest = destination(text, close + 1);
  if (!dest) return null;
  const label = text.slice(open + 1, close);
  const href = safeUrl(dest.url);
  // Images are never loaded (no remote requests from model output): they become links.
  const children = image ? [label || dest.url] : inline(label, false);
  if (!href) return { node: el("span", children), end: dest.end };
  const a = anchor(href, children);
  if (dest.title) a.title = dest.title;
  return { node: a, end: dest.end };
}

function autolink(text, i) {
  if (!text.startsWith("<http", i)) return null;
  const m = AUTOLINK.exec(text.slice(i, i + 2048));
  const href = m && safeUrl(m[1]);
  return href ? { node: anchor(href, [m[1]]), end: i + m[0].length } : null;
}

function bareUrl(text, i) {
  if (!text.startsWith("http", i)) return null;
  if (i > 0 && (WORD.test(text[i - 1]) || text[i - 1] === "/")) return null;
  const m = BARE_URL.exec(text.slice(i));
  if (!m) return null;
  let url = m[0].replace(/[.,:;!?'*_~]+$/, "");
  while (url.endsWith(")") && count(url, "(") < count(url, ")")) url = url.slice(0, -1);
  const href = safeUrl(url);
  return href ? { node: anchor(href, [url]), end: i + url.length } : null;
}

function count(s, ch) {
  return s.split(ch).length - 1;
}

function lineBreak(text, i) {
  const hard = / {2,}$/.test(text.slice(0, i));
  return { node: hard ? el("br", []) : document.createTextNode("\n"), end: i + 1,
           trimBefore: true };
}
