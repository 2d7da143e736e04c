"""The chat page in Debian's headless Chromium, driven by Playwright, against the real server.

The page talks the native protocol at P = /models/smollm2/. Exactness checks compare what the
page kept (localStorage) with a fresh replay of the same stream from the server, so a resumed
or reconnected answer must match it character for character: nothing lost, nothing repeated.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

from tests.model.conftest import Server, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no system Chromium at {CHROMIUM} (apt package chromium)")

P = "/models/smollm2/"
KEY = f"lmserve.chat:{P}"
LONG = "Count from 1 to 300, separated by commas."
SCREENSHOT = os.environ.get("LMSERVE_CHAT_SCREENSHOT")  # e.g. docs/chat-page.png


@pytest.fixture(scope="module")
def browser() -> Iterator:
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser, server):
    # bypass_csp lets Playwright evaluate its own scripts; escaping is tested on its own, and
    # the page's policy is checked separately.
    context = browser.new_context(viewport={"width": 1100, "height": 820}, bypass_csp=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(f"{server.url}{P}chat/")
    tab.wait_for_selector("#status[data-state=ready]")
    yield tab
    cancel_pending(server, tab)
    context.close()
    assert not errors, errors


def cancel_pending(server, tab) -> None:
    """A test that stopped mid-answer leaves its stream generating on the server (streams
    outlive their readers); cancel it so the next test finds the server idle."""
    pending = (tab.evaluate(f"JSON.parse(localStorage.getItem({json.dumps(KEY)}))") or {}).get(
        "pending")
    if pending and pending.get("id"):
        httpx.delete(f"{server.url}{P}stream/{pending['id']}/", timeout=30)


def stored(page) -> dict:
    return page.evaluate(f"JSON.parse(localStorage.getItem({json.dumps(KEY)}))")


def configure(page, **settings: str) -> None:
    """Fills the settings panel (temperature, max_tokens, system) and closes it."""
    page.click("#settings-toggle")
    for name, value in settings.items():
        page.fill({"max_tokens": "#max-tokens"}.get(name, f"#{name}"), value)
    page.click("#settings-toggle")


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_streaming_text(page) -> None:
    page.wait_for_selector("article.assistant.streaming > .md", timeout=60_000)


def wait_answered(page, timeout: float = 120_000) -> dict:
    page.wait_for_function(
        f"""() => {{ const s = JSON.parse(localStorage.getItem({json.dumps(KEY)}));
                    const m = s && s.messages.at(-1);
                    return s && !s.pending && m && m.role === 'assistant' && m.stop_reason; }}""",
        timeout=timeout)
    page.wait_for_selector("#send:not([hidden])")
    return stored(page)["messages"][-1]


def output(message: dict) -> str:
    return "".join(b["text"] for b in message["blocks"] if b["channel"] != "reasoning")


def replay(server, stream_id: str) -> tuple[str, dict]:
    """The stream's output text and its message.stop data, read again from the start."""
    text, stop, event = [], {}, None
    with httpx.stream("GET", f"{server.url}{P}stream/{stream_id}/", timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "block.delta":
                data = json.loads(line[6:])
                if data.get("channel", "output") == "output":
                    text.append(data["text"])
            elif line.startswith("data: ") and event == "message.stop":
                stop = json.loads(line[6:])
    return "".join(text), stop


def start_long_answer(page, max_tokens: str = "120") -> str:
    """Asks for a long answer and returns its stream id once text is arriving."""
    configure(page, temperature="0", max_tokens=max_tokens)
    ask(page, LONG)
    wait_streaming_text(page)
    return stored(page)["pending"]["id"]


def test_streams_an_answer_through_the_two_step_protocol(page, server):
    configure(page, temperature="0", max_tokens="48", system="You answer briefly.")
    with page.expect_request(lambda r: r.url.endswith(f"{P}stream/") and r.method == "POST") as req:
        ask(page, "Name three colors.")
    body = req.value.post_data_json
    assert body["transport"] == "conversation"
    assert body["messages"] == [{"role": "system", "content": "You answer briefly."},
                                {"role": "user", "content": "Name three colors."}]
    assert {k: v for k, v in body["params"].items() if k != "reasoning"} == {
        "temperature": 0, "max_tokens": 48}
    assert page.locator("#stop").is_visible() or stored(page)["pending"] is None
    message = wait_answered(page)
    assert message["stop_reason"] in ("stop", "max_tokens") and output(message).strip()
    assert 0 < message["usage"]["output_tokens"] <= 48
    meta = page.inner_text("article.assistant .meta")
    assert f"{message['usage']['output_tokens']} tokens" in meta and "prompt" in meta
    if message["usage"]["output_tokens"] > 1:
        assert "tok/s" in meta
    assert page.locator("article.assistant > .md").inner_text().strip()
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_second_turn_sends_the_whole_history(page):
    configure(page, temperature="0", max_tokens="16")
    ask(page, "Say hello.")
    first = output(wait_answered(page))
    with page.expect_request(lambda r: r.url.endswith(f"{P}stream/") and r.method == "POST") as req:
        ask(page, "Again.")
    assert req.value.post_data_json["messages"] == [
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": first},
        {"role": "user", "content": "Again."}]
    wait_answered(page)
    assert page.locator("article.msg").count() == 4


def test_stop_cancels_the_generation(page, server):
    stream_id = start_long_answer(page, max_tokens="3000")
    page.click("#stop")
    message = wait_answered(page)
    assert message["stop_reason"] == "cancelled"
    assert message["usage"]["output_tokens"] < 3000
    assert "stopped" in page.inner_text("article.assistant .meta")
    text, stop = replay(server, stream_id)
    assert stop["stop_reason"] == "cancelled" and output(message) == text


def test_reload_restores_the_conversation(page):
    configure(page, temperature="0", max_tokens="24")
    ask(page, "Name a fruit.")
    before = wait_answered(page)
    shown = page.inner_text("#messages")
    page.reload()
    page.wait_for_selector("article.assistant .meta")
    assert page.inner_text("#messages") == shown
    assert stored(page)["messages"][-1] == before
    assert page.input_value("#max-tokens") == "24"  # settings are kept too
    page.click("#new-chat")
    assert page.locator("article.msg").count() == 0 and stored(page)["messages"] == []


def test_reload_mid_answer_resumes_without_duplicates(page, server):
    stream_id = start_long_answer(page)
    page.wait_for_function("document.querySelector('article.assistant > .md').innerText.length > 20")
    page.reload()
    page.wait_for_selector("article.assistant")
    message = wait_answered(page)
    assert message["resumed"] is True
    text, stop = replay(server, stream_id)
    assert output(message) == text and message["stop_reason"] == stop["stop_reason"]
    assert message["usage"] == stop["usage"]
    assert page.inner_text("article.assistant > .md").strip()


def first_frames(url: str, count: int) -> str:
    """The first `count` frames of a stream, as a connection that then drops would carry."""
    lines: list[str] = []
    with httpx.stream("GET", url, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if line == "" and sum(x.startswith("id: ") for x in lines) >= count:
                break
    return "\n".join(lines) + "\n"


def test_dropped_connection_reconnects_without_duplicates(page, server):
    reads: list[str | None] = []  # each read's Last-Event-ID

    def cut_first_read(route) -> None:
        reads.append(route.request.headers.get("last-event-id"))
        if len(reads) > 1:
            route.continue_()
        else:
            route.fulfill(status=200, content_type="text/event-stream",
                          body=first_frames(route.request.url, 12))

    page.route("**/stream/*/", cut_first_read)
    stream_id = start_long_answer(page)
    page.wait_for_selector("#banner:not([hidden])")
    assert "reconnecting" in page.inner_text("#banner").lower()
    message = wait_answered(page)
    assert reads[:2] == [None, "12"]  # the reconnection asks only for what it has not seen
    assert page.locator("#banner").is_hidden()
    text, stop = replay(server, stream_id)
    assert output(message) == text and message["stop_reason"] == stop["stop_reason"]


def test_loading_server_shows_a_message_then_sends(page, server):
    loading = {"status": "loading", "name": "smollm2", "params": {}, "reasoning": False}
    refused = {"error": {"type": "loading", "message": "the model is loading", "param": None}}
    page.route(f"{server.url}{P}", lambda route: route.fulfill(status=200, json=loading))
    page.route(f"{server.url}{P}stream/", lambda route: route.fulfill(
        status=503, json=refused, headers={"Retry-After": "1"}))
    configure(page, temperature="0", max_tokens="16")
    ask(page, "Say hi.")
    page.wait_for_selector("#banner:not([hidden])")
    assert "loading" in page.inner_text("#banner").lower()
    assert page.get_attribute("#status", "data-state") == "loading"
    page.unroute(f"{server.url}{P}")
    page.unroute(f"{server.url}{P}stream/")
    message = wait_answered(page)
    assert output(message).strip() and page.locator("#banner").is_hidden()


def test_request_errors_are_shown_with_the_servers_message(page):
    configure(page, max_tokens="100000")
    ask(page, "Hello")
    message = wait_answered(page)
    assert message["stop_reason"] == "error" and message["error"]["message"]
    shown = page.inner_text("article.assistant .msg-error")
    assert message["error"]["message"] in shown
    page.click("#settings-toggle")
    page.fill("#max-tokens", "8")
    page.click("button[data-action=retry]")
    assert wait_answered(page)["stop_reason"] in ("stop", "max_tokens")
    assert page.locator(".msg-error").count() == 0


XSS = ('<script>window.__xss = 1</script> <img src=x onerror="window.__xss = 2"> '
       '[link](javascript:window.__xss=3) <a href="javascript:alert(1)">a</a>\n\n'
       '```html\n<img src=y onerror="window.__xss = 4">\n```\n\n| <b>x</b> |\n|---|\n| y |')


def test_model_output_is_never_markup(page):
    state = {"version": 1, "settings": {}, "pending": None, "messages": [
        {"role": "user", "content": "<img src=u onerror=\"window.__xss = 5\">"},
        {"role": "assistant", "blocks": [{"channel": "reasoning", "text": XSS, "done": True},
                                         {"channel": "output", "text": XSS, "done": True}],
         "stop_reason": "stop", "usage": None, "error": None, "timing": {}}]}
    page.evaluate(f"localStorage.setItem({json.dumps(KEY)}, {json.dumps(json.dumps(state))})")
    page.reload()
    page.wait_for_selector("article.assistant > .md")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    hrefs = page.eval_on_selector_all("#messages a", "links => links.map(a => a.href)")
    assert all(h.startswith(("http://", "https://")) for h in hrefs)
    text = page.inner_text("article.assistant")
    assert "<script>window.__xss = 1</script>" in text and 'onerror="window.__xss = 4"' in text
    assert "<img src=u" in page.inner_text("article.user")


A = 'target="_blank" rel="noopener noreferrer nofollow"'


def code(lang: str, text: str) -> str:
    data = f' data-lang="{lang}"' if lang else ""
    return ('<div class="code"><div class="code-head"><span class="code-lang">'
            f'{lang or "text"}</span><button class="copy" type="button" data-action="copy-code" '
            f'aria-label="Copy {lang or "code"} to the clipboard">Copy</button></div><pre><code'
            f"{data}>{text}</code></pre></div>")


CASES = [
    ("# Title\n## Sub #", "<h2>Title</h2><h3>Sub</h3>"),
    ("Title\n===\ntext", "<h2>Title</h2><p>text</p>"),
    ("**b** *i* _i_ __b__ ~~d~~ `c`",
     "<p><strong>b</strong> <em>i</em> <em>i</em> <strong>b</strong> <del>d</del> <code>c</code></p>"),
    ("***x*** *a **b** c* snake_case_name 2 * 3 * 4 \\*no\\*",
     "<p><strong><em>x</em></strong> <em>a <strong>b</strong> c</em> snake_case_name "
     "2 * 3 * 4 *no*</p>"),
    ("Unclosed **bold and `code", "<p>Unclosed **bold and `code</p>"),
    ("one  \ntwo\nthree", "<p>one<br>two\nthree</p>"),
    ("[ok](https://a.b/c?d=1&e=2 \"T\") [bad](javascript:alert(1)) [rel](/x) <https://c.d>",
     f'<p><a href="https://a.b/c?d=1&amp;e=2" {A} title="T">ok</a> <span>bad</span> '
     f'<span>rel</span> <a href="https://c.d/" {A}>https://c.d</a></p>'),
    ("see https://e.x/p). ![alt](https://e.x/i.png)",
     f'<p>see <a href="https://e.x/p" {A}>https://e.x/p</a>). <a href="https://e.x/i.png" {A}>'
     'alt</a></p>'),
    ("1. one\n2. two\n   - a *b*\n   - c\n\n3) x",
     "<ol><li>one</li><li>two<ul><li>a <em>b</em></li><li>c</li></ul></li></ol>"
     '<ol start="3"><li>x</li></ol>'),
    ("Steps:\n1. one\n2. two\n\n- p\n\n  more\n- q",
     "<p>Steps:</p><ol><li>one</li><li>two</li></ol>"
     "<ul><li><p>p</p><p>more</p></li><li><p>q</p></li></ul>"),
    ("- [ ] todo\n- [x] done",
     '<ul><li class="task"><input type="checkbox" disabled=""> todo</li>'
     '<li class="task"><input type="checkbox" disabled=""> done</li></ul>'),
    ("> quote\n> more\n\n---", "<blockquote><p>quote\nmore</p></blockquote><hr>"),
    ("```python\nif a < b:\n\tprint('<b>')\n```\nafter",
     code("python", "if a &lt; b:\n\tprint('&lt;b&gt;')") + "<p>after</p>"),
    ("```\nstill streaming", code("", "still streaming").replace('class="code"',
                                                                  'class="code open"')),
    ("| a | b | c |\n|:--|:-:|--:|\n| `x` | **y** | \\| |\n| 1 |",
     '<div class="table-wrap"><table><thead><tr><th>a</th><th class="align-center">b</th>'
     '<th class="align-right">c</th></tr></thead><tbody><tr><td><code>x</code></td>'
     '<td class="align-center"><strong>y</strong></td><td class="align-right">|</td></tr>'
     '<tr><td>1</td><td class="align-center"></td><td class="align-right"></td></tr>'
     "</tbody></table></div>"),
    ("<script>alert(1)</script> <img src=x onerror=alert(1)> &amp;",
     "<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(1)&gt; &amp;amp;</p>"),
]


def test_markdown_rendering(page, server):
    html = page.evaluate(
        """async ([url, cases]) => {
             const { renderMarkdown } = await import(url);
             return cases.map((src) => {
               const box = document.createElement("div");
               box.append(renderMarkdown(src));
               return box.innerHTML; }); }""",
        [f"{server.url}{P}chat/assets/markdown.js", [src for src, _ in CASES]])
    for (src, expected), got in zip(CASES, html, strict=True):
        assert got == expected, src


def test_screenshot(page, tmp_path):
    configure(page, temperature="0", max_tokens="160")
    ask(page, "What are three benefits of running a language model locally? Use a list.")
    wait_answered(page)
    ask(page, "Write a Python function that reverses a string, with a short explanation.")
    wait_answered(page)
    page.mouse.move(600, 400)  # no hover highlight on the header buttons
    path = SCREENSHOT or str(tmp_path / "chat-page.png")
    page.screenshot(path=path)
    assert os.path.getsize(path) > 10_000


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = str(tmp_path_factory.mktemp("keyed"))
    srv = start_server(tmp, "smollm2", "--parallel", "1", "--ctx", "1024", "--threads", "2",
                       "--data-dir", tmp, "--api-key", "sekret")
    yield srv
    stop_server(srv)


def test_api_key_setting_lets_the_page_stream(browser, keyed_server):
    context = browser.new_context(bypass_csp=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(f"{keyed_server.url}{P}chat/")  # the page and its assets need no key
    tab.wait_for_selector("#status[data-state=unauthorized]")
    assert "needs an API key" in tab.inner_text("#banner")
    assert tab.is_visible("#api-key") and tab.get_attribute("#api-key", "type") == "password"
    tab.fill("#api-key", "wrong")
    tab.press("#api-key", "Tab")  # "change": the page asks again at once
    tab.wait_for_selector("#banner:has-text('did not accept the API key')")
    tab.fill("#api-key", "sekret")
    tab.press("#api-key", "Tab")
    tab.wait_for_selector("#status[data-state=ready]")
    assert tab.get_attribute("#api-key", "aria-invalid") is None
    tab.fill("#temperature", "0")  # the settings panel is open: it asked for the key
    tab.fill("#max-tokens", "16")
    with tab.expect_request(lambda r: "/stream/" in r.url and r.method == "GET") as read:
        ask(tab, "Say hi.")
    headers = read.value.all_headers()
    assert headers["authorization"] == "Bearer sekret"
    message = wait_answered(tab)
    assert message["stop_reason"] in ("stop", "max_tokens") and output(message).strip()
    assert stored(tab)["settings"]["apiKey"] == "sekret"
    tab.reload()  # the key is kept: no question this time
    tab.wait_for_selector("#status[data-state=ready]")
    assert tab.locator("#settings").is_hidden()
    context.close()
    assert not errors, errors


@pytest.fixture(scope="module")
def library_server(tmp_path_factory: pytest.TempPathFactory, model_path: str
                   ) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("library")
    models = tmp / "models"
    models.mkdir()
    os.symlink(model_path, models / "alpha.gguf")
    (models / "broken.gguf").write_bytes(b"not a model")
    srv = start_server(str(tmp), "--models-dir", str(models), "--parallel", "1", "--ctx", "1024",
                       "--threads", "2", "--store", "memory", "--keep-alive", "1h")
    yield srv
    stop_server(srv)


def test_model_picker_shows_the_library_and_an_on_demand_load(browser, library_server):
    context = browser.new_context(bypass_csp=True)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(f"{library_server.url}/models/alpha/chat/")
    tab.wait_for_selector("#status[data-state=unloaded]")
    assert "loads when you send a message" in tab.inner_text("#banner")
    tab.wait_for_selector("#model-picker:not([hidden])")
    options = tab.eval_on_selector_all("#model-picker option",
                                       "os => os.map(o => [o.value, o.dataset.status])")
    assert options == [["/models/alpha/", "unloaded"], ["/models/broken/", "failed"]]
    assert tab.input_value("#model-picker") == "/models/alpha/"
    # every state the header pill shows, in order (the load's is set before the message goes)
    tab.evaluate("""() => { window.states = [];
        new MutationObserver(() => window.states.push(
            document.querySelector('#status').dataset.state))
          .observe(document.querySelector('#status'), {attributes: true}); }""")
    configure(tab, temperature="0", max_tokens="8")
    ask(tab, "Say hi.")
    tab.wait_for_function("""() => { const s = JSON.parse(localStorage.getItem(
        'lmserve.chat:/models/alpha/')); const m = s && s.messages.at(-1);
        return s && !s.pending && m && m.role === 'assistant' && m.stop_reason; }""",
                          timeout=120_000)
    tab.wait_for_selector("#status[data-state=ready]")
    states = tab.evaluate("window.states")
    assert "loading" in states and states.index("loading") < states.index("ready"), states
    tab.focus("#model-picker")  # the list is read again when opened
    tab.wait_for_selector("#model-picker option[value='/models/alpha/'][data-status=loaded]",
                          state="attached")
    tab.select_option("#model-picker", "/models/broken/")
    tab.wait_for_url("**/models/broken/chat/")
    tab.wait_for_selector("#status[data-state=failed]")
    context.close()
    assert not errors, errors
