"""The chat page: one HTML document and the static assets it loads.

The page lives at `P chat/` and loads every asset from `P chat/assets/<name>` (see `ASSETS`),
so nothing comes from outside the server. This module has no web-framework imports: the routes
call `chat_page()` and `asset()` and wrap the results in responses.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources

ASSET_PREFIX = "chat/assets/"
"""Where the assets live, relative to the resource path P."""

MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

ASSETS: tuple[str, ...] = (
    "chat.css",
    "chat.js",  # the entry point; it imports the modules below (ES modules, same folder)
    "answer.js",
    "api.js",
    "inline.js",
    "markdown.js",
    "picker.js",
    "server.js",
    "settings.js",
    "sse.js",
    "store.js",
    "ui.js",
    "view.js",
)
"""Every file the page requests, each served at `P chat/assets/<name>`."""

PAGE_MEDIA_TYPE = "text/html; charset=utf-8"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""A policy the route may send as a header; the page also carries it (minus frame-ancestors,
which browsers ignore in a meta tag) so model output can never load or run anything."""


def chat_page(base_path: str, title: str) -> str:
    """The page for the resource mounted at `base_path` (e.g. "/models/smollm2/")."""
    base = base_path if base_path.endswith("/") else base_path + "/"
    config = json.dumps({"base": base, "title": title}, ensure_ascii=True)
    attr = html.escape  # quote=True: safe inside a double-quoted attribute
    return (
        _template()
        .replace("{{title}}", html.escape(title, quote=False))
        .replace("{{csp}}", attr(_META_POLICY))
        .replace("{{config}}", attr(config))
        .replace("{{assets}}", attr(base + ASSET_PREFIX))
    )


def asset(name: str) -> tuple[bytes, str]:
    """The bytes and media type of one asset; KeyError for a name not in `ASSETS`."""
    if name not in ASSETS:
        raise KeyError(name)
    return _read_asset(name), MEDIA_TYPES["." + name.rsplit(".", 1)[-1]]


_META_POLICY = CONTENT_SECURITY_POLICY.replace("; frame-ancestors 'none'", "")


@cache
def _template() -> str:
    return resources.files(__name__).joinpath("chat.html").read_text(encoding="utf-8")


@cache
def _read_asset(name: str) -> bytes:
    return resources.files(__name__).joinpath("static", name).read_bytes()
