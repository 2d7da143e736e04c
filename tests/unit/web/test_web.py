"""The chat page's Python side: the HTML with its injected config, the packaged assets, and the
page's routes on a server with API keys.

The page's JavaScript modules are tested under Node (tests/unit/web/test_web_js.py) and its
behaviour (Markdown, streaming, resume, the API key) in a browser: tests/model/test_chat_page.py.
"""

from __future__ import annotations

import html
import json
import re
import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from lmserve import web
from tests.unit.fakes import FakeRunner
from tests.unit.dialects.sglang.test_sglang import client as app_client

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = resources.files("lmserve.web")


class Tags(HTMLParser):
    """Every start tag with its attributes, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(page)
    return parser.tags


def config_of(page: str) -> dict:
    (body,) = [attrs for tag, attrs in parse(page) if tag == "body"]
    return json.loads(body["data-config"])


def test_page_loads_its_assets_from_the_resource_path():
    page = web.chat_page("/models/smollm2/", "SmolLM2")
    assert page.startswith("<!doctype html>")
    assert "<title>SmolLM2</title>" in page and "{{" not in page
    tags = parse(page)
    script = [a["src"] for t, a in tags if t == "script"]
    sheets = [a["href"] for t, a in tags if t == "link" and a.get("rel") == "stylesheet"]
    assert script == ["/models/smollm2/chat/assets/chat.js"]
    assert sheets == ["/models/smollm2/chat/assets/chat.css"]
    assert config_of(page) == {"base": "/models/smollm2/", "title": "SmolLM2"}


def test_every_url_in_the_page_is_served_by_lmserve():
    for tag, attrs in parse(web.chat_page("/llm/", "x")):
        for name in ("src", "href"):
            url = attrs.get(name)
            if url is not None:
                assert url.startswith(("/llm/chat/assets/", "#", "data:")), (tag, url)


def test_base_path_gets_its_trailing_slash():
    assert config_of(web.chat_page("/llm", "x"))["base"] == "/llm/"
    assert '"/llm/chat/assets/chat.js"' in web.chat_page("/llm", "x")


@pytest.mark.parametrize("base, title", [
    ('/a"b/', 'say "hi"'),
    ("/x'/", "it's"),
    ("/</script><script>alert(1)</script>/", "<img src=x onerror=alert(1)>"),
    ("/&amp;/", "Tom & Jerry &lt;3"),
])
def test_base_path_and_title_are_escaped(base, title):
    page = web.chat_page(base, title)
    assert config_of(page) == {"base": base, "title": title}
    tags = parse(page)
    assert [t for t, _ in tags].count("script") == 1 and [t for t, _ in tags].count("img") == 0
    assert f"<title>{html.escape(title, quote=False)}</title>" in page
    src = [a["src"] for t, a in tags if t == "script"]
    assert src == [f"{base}chat/assets/chat.js"]


def test_page_carries_the_content_security_policy():
    (meta,) = [a for t, a in parse(web.chat_page("/p/", "x"))
               if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    policy = meta["content"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "frame-ancestors" in web.CONTENT_SECURITY_POLICY  # header only: ignored in a meta tag


@pytest.mark.parametrize("name", web.ASSETS)
def test_assets_exist_with_their_media_types(name):
    data, media_type = web.asset(name)
    assert data and data == PACKAGE.joinpath("static", name).read_bytes()
    expected = "text/javascript" if name.endswith(".js") else "text/css"
    assert media_type == f"{expected}; charset=utf-8"


@pytest.mark.parametrize("name", ["nope.js", "../__init__.py", "chat.html", "", "static/chat.js"])
def test_unknown_assets_are_refused(name):
    with pytest.raises(KeyError):
        web.asset(name)


def test_assets_list_every_module_the_page_imports():
    static = {p.name for p in PACKAGE.joinpath("static").iterdir() if p.name.endswith((".js", ".css"))}
    assert static == set(web.ASSETS)
    for name in web.ASSETS:
        text = web.asset(name)[0].decode()
        for imported in re.findall(r'from\s+"\./([^"]+)"', text):
            assert imported in web.ASSETS, (name, imported)


def test_assets_load_nothing_from_outside():
    for name in web.ASSETS:
        text = web.asset(name)[0].decode()
        assert "://" not in text, name  # no CDN, no external font
        assert "@import" not in text and "url(" not in text, name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, name
        assert "eval(" not in text and "document.write" not in text, name


def test_assets_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["lmserve.web"]
    files = ["chat.html", *(f"static/{name}" for name in web.ASSETS)]
    for path in files:
        assert any(fnmatch(path, pattern) for pattern in patterns), path


def sse_frames(text: str) -> list[tuple[int, str]]:
    """(id, event) of every frame in an event stream's text."""
    frames, fields = [], {}
    for line in text.splitlines():
        if line == "" and fields:
            frames.append((int(fields["id"]), fields["event"]))
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value
    return frames


def test_with_api_keys_the_page_is_open_and_its_requests_need_the_key():
    key = {"Authorization": "Bearer sekret"}
    with app_client(FakeRunner(n_ctx=512), api_keys=("sekret",)) as c:
        base = "/models/tiny/"
        page = c.get(f"{base}chat/")
        assert page.status_code == 200 and config_of(page.text)["base"] == base
        for name in web.ASSETS:
            assert c.get(f"{base}{web.ASSET_PREFIX}{name}").content == web.asset(name)[0]
        r = c.get(f"{base}{web.ASSET_PREFIX}nope.js")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        assert c.get("/chat/", follow_redirects=False).headers["location"] == f"{base}chat/"

        r = c.get(base)  # what the page shows as "API key needed"
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication"
        assert c.get(base, headers=key).json()["status"] == "ready"
        body = {"transport": "chat", "prompt": "hi", "params": {"max_tokens": 3}}
        assert c.post(f"{base}stream/", json=body).status_code == 401
        ident = c.post(f"{base}stream/", json=body, headers=key).json()["id"]
        url = f"{base}stream/{ident}/"
        assert c.get(url).status_code == 401
        assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        frames = sse_frames(c.get(url, headers=key).text)
        assert frames[0][1] == "message.start" and frames[-1][1] == "message.stop"
        resumed = sse_frames(c.get(url, headers={**key, "Last-Event-ID": "2"}).text)
        assert resumed == [f for f in frames if f[0] > 2]
        assert c.delete(url).status_code == 401
        assert c.delete(url, headers=key).json()["id"] == ident
