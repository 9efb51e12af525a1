"""The playground page at GET /, in a real browser: Debian's Chromium driven by Playwright (never `playwright
install`: it downloads a browser). Skipped, with the reason, where /usr/bin/chromium or playwright is missing;
.ci/run installs both.

Two server processes: the wide GPT-NeoX (hidden 256: a long answer takes seconds) with a chat template and an API
key, and a copy of it without a template or key. One browser for the module.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import serving

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
KEY = "sk-playground"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def artifacts(wide_artifact, tmp_path_factory):
    """The wide artifact (a chat template) and a copy of it without one."""
    from neodeploy.core.files import sha256

    bare = tmp_path_factory.mktemp("playground") / "bare"
    shutil.copytree(wide_artifact, bare)
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    manifest = json.loads((bare / "neodeploy.json").read_text())
    manifest["files"]["tokenizer_config.json"] = sha256(bare / "tokenizer_config.json")
    (bare / "neodeploy.json").write_text(json.dumps(manifest))
    return wide_artifact, bare


@pytest.fixture(scope="module")
def servers(artifacts):
    with serving(artifacts[0], KEY, "--max-running", "2") as (_, keyed), serving(artifacts[1], "") as (_, bare):
        yield [keyed, bare]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip("Debian's Chromium is not installed (apt-get install chromium); .ci/run installs it")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


class Page:
    """One tab on a server, recording console errors and every URL it requests."""

    def __init__(self, browser, url):
        # bypass_csp lets the test's own scripts (frame counting, waits) run; the page's policy is checked apart.
        self.context = browser.new_context(viewport={"width": 1366, "height": 768}, bypass_csp=True)
        self.page = self.context.new_page()
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(url + "/")

    def idle(self, timeout=30_000):
        self.page.wait_for_function("() => document.getElementById('send').disabled === false && "
                                    "document.getElementById('stat-finish').textContent.length > 1", timeout=timeout)

    def ask(self, prompt, mode=None, **fields):
        """Pick a mode, fill parameter fields (by element id), type the prompt; then Send is clicked by the caller."""
        if mode:
            self.page.get_by_role("button", name=mode).click()
        for field, value in fields.items():
            self.page.fill(f"#{field}", str(value))
        self.page.get_by_label("Prompt").fill(prompt)

    def close(self):
        self.context.close()


def _use_key(tab):
    form = tab.page.locator("#key-form")
    form.wait_for(state="visible")
    tab.page.fill("#api-key", KEY)
    tab.page.get_by_role("button", name="Use key").click()
    tab.page.locator("#model-name", has_text="tiny").wait_for()


def test_the_page_is_offline_asks_for_the_key_and_offers_chat(browser, servers):
    url = servers[0]
    tab = Page(browser, url)
    try:
        assert tab.page.get_by_label("Prompt").is_visible()
        assert tab.page.get_by_role("log").count() == 1
        _use_key(tab)
        assert tab.page.get_by_role("button", name="Chat").is_visible()
        assert tab.page.locator("#mode-chat").get_attribute("aria-pressed") == "true"
        facts = tab.page.locator("#facts").inner_text()
        assert "gpt_neox" in facts and "passed" in facts and "2048 tokens" in facts
        assert tab.page.evaluate("sessionStorage.getItem('neodeploy-api-key')") == KEY
        assert tab.page.evaluate("localStorage.length") == 0
        tab.ask("Hello!", max_tokens=5)
        tab.page.get_by_role("button", name="Send").click()
        tab.idle()
        assert tab.page.locator(".turn.user").count() == 1 and tab.page.locator(".turn.assistant").count() == 1
    finally:
        tab.close()
    assert not tab.errors, tab.errors
    assert tab.requests and all(u.startswith(url + "/") for u in tab.requests), tab.requests
    page = httpx.get(url + "/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from elsewhere


def test_a_completion_streams_and_ends_equal_to_the_api(browser, servers):
    url = servers[0]
    tab = Page(browser, url)
    try:
        _use_key(tab)
        tab.ask("Once upon a time", "Completion", temperature=0, max_tokens=1500, top_p=1, top_k=0)
        tab.page.evaluate("""() => { window.lengths = []; const tick = () => {
            const o = document.querySelector('#log .turn:last-child .output');
            window.lengths.push(o ? o.textContent.length : 0);
            if (!window.stopFrames) requestAnimationFrame(tick); }; requestAnimationFrame(tick); }""")
        tab.page.get_by_role("button", name="Send").click()
        tab.idle(60_000)
        lengths = tab.page.evaluate("() => { window.stopFrames = true; return window.lengths; }")
        shown = tab.page.locator("#log .turn:last-child .output").inner_text()
        finish = tab.page.locator("#stat-finish").inner_text()
    finally:
        tab.close()
    grew = sum(1 for a, b in zip(lengths, lengths[1:]) if b > a)
    assert grew >= 3, f"the text grew in {grew} frames only"
    want = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json={
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0}).json()["choices"][0]
    assert shown == want["text"].strip("\n") or shown == want["text"]
    assert finish == want["finish_reason"]


def test_stop_cancels_on_the_server(browser, servers):
    url = servers[0]
    tab = Page(browser, url)
    try:
        _use_key(tab)
        tab.ask("Tell a long story", "Completion", max_tokens=2000)
        tab.page.get_by_role("button", name="Send").click()
        tab.page.wait_for_function("() => (document.querySelector('#log .turn:last-child .output') || {}).textContent"
                                   "?.length > 20")
        tab.page.get_by_role("button", name="Stop").click()
        tab.page.locator("#stat-finish", has_text="cancelled").wait_for(timeout=10_000)
    finally:
        tab.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics").text
        if "neodeploy_running_requests 0.0" in metrics:
            break
        time.sleep(0.05)
    assert "neodeploy_running_requests 0.0" in metrics
    assert 'neodeploy_requests_total{outcome="cancelled"}' in metrics


def test_a_bad_parameter_shows_the_servers_message(browser, servers):
    tab = Page(browser, servers[0])
    try:
        _use_key(tab)
        tab.ask("Hi", temperature=5)
        tab.page.get_by_role("button", name="Send").click()
        banner = tab.page.get_by_role("alert")
        banner.wait_for(state="visible")
        assert "temperature must be in [0, 2]" in banner.inner_text()
        tab.page.fill("#temperature", "0.7")
        tab.page.fill("#json-schema", '{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                                      '"required": ["ok"], "additionalProperties": false}')
        tab.page.get_by_role("button", name="Completion").click()
        tab.page.get_by_role("button", name="Send").click()
        tab.idle()
        assert json.loads(tab.page.locator("#log .turn:last-child .output").inner_text()) in ({"ok": True},
                                                                                              {"ok": False})
    finally:
        tab.close()


def test_completion_only_without_a_template_and_no_key_asked(browser, servers):
    tab = Page(browser, servers[1])
    try:
        tab.page.locator("#model-name", has_text="tiny").wait_for()
        assert not tab.page.locator("#key-form").is_visible()
        assert not tab.page.get_by_role("button", name="Chat").is_visible()
        assert tab.page.locator("#mode-completion").get_attribute("aria-pressed") == "true"
        tab.ask("Hello", max_tokens=4)
        tab.page.get_by_role("button", name="Send").click()
        tab.idle()
        assert tab.page.locator("#stat-tokens").inner_text() == "4"
    finally:
        tab.close()
    assert not tab.errors, tab.errors


def test_no_ui_turns_the_page_off(artifacts):
    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    options = ServeOptions(artifacts[1], "tiny", ui=False)
    app = create_app(options, ServerState(options))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.get("/"), await c.get("/static/playground.js")

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's event loop
        page, script = pool.submit(asyncio.run, go()).result()
    assert page.status_code == 404 and page.json()["error"]["code"] == "not_found" and script.status_code == 404
