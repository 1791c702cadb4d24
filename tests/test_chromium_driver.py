"""The DevTools driver of tests/chromium.py (ChromiumPage) against a small page served here by
python's http.server on 127.0.0.1: real clicks and key presses (the page's handlers see
``event.isTrusted``), typing, JavaScript errors, console errors, failed requests, screenshots,
and Chromium's process group gone when a test fails inside the ``with`` block."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chromium import SKIP_REASON, ChromiumPage, FailedRequest, JavaScriptError, PageError, browser, live_group_members
from health import wait_healthy

pytestmark = [pytest.mark.server, pytest.mark.skipif(browser() is None, reason=SKIP_REASON)]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>driver test</title>
<style>
  #covered { position: relative; }
  #overlay { position: absolute; left: 0; top: 0; width: 100%; height: 100%; background: #fff; }
  #spacer { height: 3000px; }
</style></head>
<body>
  <div id="covered"><button id="hidden-under">under the overlay</button><div id="overlay"></div></div>
  <p id="status">idle</p>
  <p id="keys"></p>
  <input id="name" autocomplete="off">
  <p id="typed"></p>
  <button id="throw">throw</button>
  <button id="disabled" disabled>never</button>
  <button id="ask" onclick="this.textContent = confirm('Delete it?') ? 'deleted' : 'kept'">ask</button>
  <div id="spacer"></div>
  <button id="far" onclick="this.textContent = 'far ' + event.isTrusted">far below</button>
<script>
  window.keys = [];
  document.getElementById('status').addEventListener('click', () => {});
  document.body.insertAdjacentHTML('afterbegin', '<button id="go">go</button>');
  document.getElementById('go').addEventListener('click', (event) => {
    document.getElementById('status').textContent = event.isTrusted ? 'clicked by a user' : 'clicked by a script';
  });
  document.addEventListener('keydown', (event) => {
    if (event.target.id === 'name') return;
    window.keys.push({key: event.key, trusted: event.isTrusted, shift: event.shiftKey, ctrl: event.ctrlKey});
    document.getElementById('keys').textContent = window.keys.map(k => k.key).join(' ');
  });
  document.getElementById('name').addEventListener('input', (event) => {
    document.getElementById('typed').textContent = event.target.value + (event.isTrusted ? ' (trusted)' : ' (untrusted)');
  });
  document.getElementById('throw').addEventListener('click', () => { throw new Error('handler broke'); });
  console.error('boom', 42);
  fetch('/missing.json').catch(() => {});
  fetch('http://127.0.0.1:CLOSED_PORT/nothing-listens').catch(() => {});
</script>
</body></html>
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]) -> Iterator[str]:
    """The test page at <site>/index.html, served by http.server in its own process group."""
    root = tmp_path_factory.mktemp("site")
    closed = free_port()
    (root / "index.html").write_text(PAGE.replace("CLOSED_PORT", str(closed)))
    (root / "health").write_text("ok")  # for wait_healthy
    port = free_port()
    log = root.parent / "http.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, log, timeout=30, proc=proc, interval=0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def shared_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromiumPage]:
    with ChromiumPage(tmp_path_factory.mktemp("profile"), width=800, height=600) as page:
        yield page


@pytest.fixture
def page(shared_page: ChromiumPage, site: str) -> ChromiumPage:
    """The shared browser on a freshly loaded test page, its logs emptied before the load."""
    shared_page.clear_logs()
    shared_page.goto(f"{site}/index.html")
    return shared_page


def test_a_real_click_runs_the_handler_as_a_user_click(page: ChromiumPage) -> None:
    assert page.text("#status") == "idle"
    page.click("#go")
    assert page.text("#status") == "clicked by a user"
    # Far below the fold: scrolled into view first.
    page.click("#far")
    assert page.text("#far") == "far true"
    assert page.evaluate("window.scrollY") > 1000


def test_click_refuses_what_a_user_could_not_click_naming_the_selector_and_page(page: ChromiumPage, site: str) -> None:
    for selector, problem in [
        ("#hidden-under", "another element (div#overlay) covers its centre"),
        ("#disabled", "the element is disabled"),
        ("#no-such-thing", "no element matches it"),
    ]:
        with pytest.raises(PageError) as caught:
            page.click(selector, timeout=0.5)
        assert f"cannot click {selector!r} on {site}/index.html" in str(caught.value) and problem in str(caught.value)
    with pytest.raises(TimeoutError, match=rf"timed out after 0.5 s waiting for '#no-such-thing' on {site}/index.html"):
        page.text("#no-such-thing", timeout=0.5)


def test_dialogs_are_answered_and_listed(page: ChromiumPage) -> None:
    page.click("#ask")
    assert page.text("#ask") == "deleted" and page.dialogs == ["confirm: Delete it?"]
    page.accept_dialogs = False
    try:
        page.click("#ask")
        assert page.text("#ask") == "kept"
    finally:
        page.accept_dialogs = True


def test_key_presses_reach_the_page_as_trusted_events(page: ChromiumPage) -> None:
    for key in ("c", "7", "Enter", "Escape", "ArrowDown", "Shift+ArrowDown", "Control+s", "?"):
        page.press(key)
    keys = page.evaluate("window.keys")
    main = [k for k in keys if k["key"] not in ("Shift", "Control")]
    assert [k["key"] for k in main] == ["c", "7", "Enter", "Escape", "ArrowDown", "ArrowDown", "s", "?"]
    assert all(k["trusted"] for k in keys)
    assert [(k["shift"], k["ctrl"]) for k in main][5:7] == [(True, False), (False, True)]
    assert page.text("#keys").startswith("c 7 Enter Escape ArrowDown")
    with pytest.raises(ValueError, match="unknown modifiers"):
        page.press("Hyper+x")


def test_typing_into_an_input(page: ChromiumPage) -> None:
    page.type("#name", "Ana")
    assert page.evaluate("document.querySelector('#name').value") == "Ana"
    assert page.text("#typed") == "Ana (trusted)"
    page.type("#name", "Bo", clear=True, keys=True)  # replaces, key by key
    assert page.evaluate("document.querySelector('#name').value") == "Bo"
    assert page.evaluate("document.activeElement.id") == "name"
    page.press("Backspace")
    assert page.text("#typed") == "B (trusted)"
    assert page.evaluate("window.keys") == []  # the page's own handler ignored keys in the field


def test_evaluate_returns_values_and_raises_the_javascript_error(page: ChromiumPage, site: str) -> None:
    assert page.evaluate("({a: [1, 'two', null], b: true})") == {"a": [1, "two", None], "b": True}
    assert page.evaluate("new Promise(r => setTimeout(() => r(5), 50))") == 5
    assert page.evaluate("undefined") is None
    assert page.url == f"{site}/index.html"
    with pytest.raises(JavaScriptError) as caught:
        page.evaluate("missingFunction(1)")
    message = str(caught.value)
    assert "ReferenceError: missingFunction is not defined" in message and f"{site}/index.html" in message
    with pytest.raises(JavaScriptError, match="Error: nope"):
        page.evaluate("Promise.reject(new Error('nope'))")
    # A wait that never comes true names the condition, the page and the last value.
    with pytest.raises(TimeoutError) as waited:
        page.wait_for("document.title === 'other'", timeout=0.5)
    assert "\"document.title === 'other'\"" in str(waited.value) and f"{site}/index.html" in str(waited.value)
    assert "last value False" in str(waited.value)
    assert page.wait_for("document.querySelector('#go').textContent") == "go"


def test_console_errors_and_failed_requests_are_collected(page: ChromiumPage, site: str) -> None:
    page.click("#throw")
    page.wait_until(lambda: any("handler broke" in e for e in page.console_errors), "the handler's exception")
    errors = "\n".join(page.console_errors)
    assert "console.error: boom 42" in errors
    assert "uncaught: Error: handler broke" in errors
    page.wait_until(lambda: len(page.failed_requests) >= 2, "the two failed fetches")
    with pytest.raises(TimeoutError, match=f"timed out after 0.2 s waiting for a third failure .*page {site}/index.html"):
        page.wait_until(lambda: len(page.failed_requests) >= 3, "a third failure", timeout=0.2)
    failed = {r.url: r for r in page.failed_requests}
    assert failed[f"{site}/missing.json"] == FailedRequest(f"{site}/missing.json", 404, "")
    (refused,) = [r for url, r in failed.items() if url.endswith("/nothing-listens")]
    assert refused.status is None and refused.error == "net::ERR_CONNECTION_REFUSED"
    assert set(failed) == {f"{site}/missing.json", refused.url}, "the browser's own /favicon.ico request is not the page's failure"
    assert all(url.startswith("http://127.0.0.1:") for url in page.requests)
    page.clear_logs()
    assert page.console_errors == [] and page.failed_requests == [] and page.requests == [] and page.dialogs == []


def test_screenshot_is_a_png_of_the_requested_size(site: str, tmp_path: Path) -> None:
    with ChromiumPage(tmp_path / "profile", width=640, height=480) as page:
        page.goto(f"{site}/index.html")
        shot = page.screenshot(tmp_path / "page.png")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (640, 480)
    assert len(data) > 1000


def test_chromium_is_killed_when_the_test_fails_inside(tmp_path: Path, free_port: Callable[[], int]) -> None:
    with pytest.raises(RuntimeError, match="the test failed"):
        with ChromiumPage(tmp_path / "profile") as page:
            pid = page.pid
            assert pid is not None and os.getpgid(pid) == pid and len(live_group_members(pid)) > 1  # with its helpers
            raise RuntimeError("the test failed")
    assert live_group_members(pid) == []
    with pytest.raises(PageError, match="not running"):
        page.evaluate("1")
    # An address nothing answers is a clear error, not a hang.
    with ChromiumPage(tmp_path / "profile2") as page, pytest.raises(PageError, match="could not open .*ERR_CONNECTION_REFUSED"):
        page.goto(f"http://127.0.0.1:{free_port()}/")
