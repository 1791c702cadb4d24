"""Headless Chromium for the tests that look at pages in a real browser.

Two ways to use it:

* ``chromium_command(profile, *flags)`` builds a headless command line for one-shot runs
  (``--dump-dom``, ``--screenshot``); append the URL.
* ``ChromiumPage`` drives one tab over the Chrome DevTools Protocol (CDP, through
  ``websocket-client``) so a test can click and press keys as a user does::

      with ChromiumPage(tmp_path / "profile", width=1280, height=900) as page:
          page.goto(url)                                   # waits for the load event
          page.wait_for("document.querySelector('#queue') !== null", timeout=20)
          page.click("button#confirm-1")                   # real mouse events at the element's centre
          page.press("c"); page.press("Shift+ArrowDown")   # real key events to the focused element
          page.type("#reviewer", "Ana")                    # click to focus, then insert the text
          assert page.text("#status") == "saved"           # innerText
          page.evaluate("document.title")                  # the value (JSON-able), or JavaScriptError
          page.screenshot(tmp_path / "page.png")           # PNG of the viewport, width x height
          page.wait_until(lambda: page.failed_requests, "a failed request")  # reads events meanwhile
          assert page.console_errors == [] and page.failed_requests == []

  Chromium starts with ``--remote-debugging-port=0`` in its own process group; the port is read
  from ``DevToolsActivePort`` in the profile. Leaving the ``with`` block (a failing test too)
  kills the whole process group. Its stderr goes to ``chromium.log`` in the profile, quoted in
  the error when it does not start.

  Clicks and key presses go through ``Input.dispatchMouseEvent``/``Input.dispatchKeyEvent``, so
  the page's handlers see ``event.isTrusted === true``. ``click`` first waits until the element
  exists, is visible, enabled and not covered by another element at its centre (scrolled into
  view), as a user could click it. Every wait has a timeout (the page's ``timeout`` unless given)
  and fails with ``PageError``/``TimeoutError`` naming the selector or condition and the page's URL.

  ``console_errors`` collects console.error/console.assert messages, uncaught exceptions and
  unhandled rejections and the browser's own error log entries (a failed resource load is one
  too); ``failed_requests`` the requests that failed (``error`` set, e.g. ``net::ERR_...``) or got
  an HTTP status >= 400; ``requests`` every URL requested. The browser's own request for
  ``/favicon.ico`` (made for every site, whatever the page links) is listed in ``requests`` only.
  ``dialogs`` lists the alert/confirm/prompt dialogs the page opened: they are answered at once
  (``accept_dialogs``, True unless set), since one left open blocks the page. They all
  accumulate over the page's life; ``clear_logs()`` empties them. One tab only: a popup or a
  link opening a new tab is not followed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

SKIP_REASON = "needs headless Chromium (make test installs it from Debian packages when it can)"


def browser() -> str | None:
    """The Chromium executable, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_command(profile: Path, *flags: str) -> list[str]:
    """Headless Chromium (as root in CI: no sandbox) with a fresh profile; append the URL."""
    return [
        str(browser()),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        *flags,
        f"--user-data-dir={profile}",
    ]


def live_group_members(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` that are still running (zombies left out; Linux
    /proc, an empty list elsewhere)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members


class PageError(AssertionError):
    """Something the test asked of the page could not be done (element missing, covered, ...)."""


class JavaScriptError(PageError):
    """An expression given to ``ChromiumPage.evaluate`` threw (or its promise rejected)."""


@dataclass(frozen=True)
class FailedRequest:
    url: str
    status: int | None  # the HTTP status (>= 400), None when no response came
    error: str  # Chromium's error text (net::ERR_...), "" when a response came

    def __str__(self) -> str:
        return f"{self.url}: {self.error or self.status}"


# key -> (code, windowsVirtualKeyCode, text typed) for the named keys ``press`` knows.
_NAMED_KEYS: dict[str, tuple[str, int, str]] = {
    "Enter": ("Enter", 13, "\r"),
    "Tab": ("Tab", 9, ""),
    "Escape": ("Escape", 27, ""),
    "Backspace": ("Backspace", 8, ""),
    "Delete": ("Delete", 46, ""),
    " ": ("Space", 32, " "),
    "Space": ("Space", 32, " "),
    "ArrowLeft": ("ArrowLeft", 37, ""),
    "ArrowUp": ("ArrowUp", 38, ""),
    "ArrowRight": ("ArrowRight", 39, ""),
    "ArrowDown": ("ArrowDown", 40, ""),
    "Home": ("Home", 36, ""),
    "End": ("End", 35, ""),
    "PageUp": ("PageUp", 33, ""),
    "PageDown": ("PageDown", 34, ""),
}
# modifier -> (CDP modifier bit, code, windowsVirtualKeyCode)
_MODIFIERS: dict[str, tuple[int, str, int]] = {
    "Alt": (1, "AltLeft", 18),
    "Control": (2, "ControlLeft", 17),
    "Meta": (4, "MetaLeft", 91),
    "Shift": (8, "ShiftLeft", 16),
}
_MODIFIER_ALIASES = {"Ctrl": "Control", "Cmd": "Meta"}
# US layout punctuation: char -> (code, windowsVirtualKeyCode)
_PUNCTUATION: dict[str, tuple[str, int]] = {
    "-": ("Minus", 189), "=": ("Equal", 187), "[": ("BracketLeft", 219), "]": ("BracketRight", 221),
    ";": ("Semicolon", 186), "'": ("Quote", 222), ",": ("Comma", 188), ".": ("Period", 190),
    "/": ("Slash", 191), "\\": ("Backslash", 220), "`": ("Backquote", 192),
    "?": ("Slash", 191), "!": ("Digit1", 49), "@": ("Digit2", 50), "#": ("Digit3", 51),
}


def _key_event(key: str, modifiers: int) -> dict[str, Any]:
    """The Input.dispatchKeyEvent fields (less ``type``) of one key."""
    if key in _NAMED_KEYS:
        code, vk, text = _NAMED_KEYS[key]
        key = " " if key == "Space" else key
    elif len(key) == 1 and key.isascii() and key.isalpha():
        if modifiers & 8:
            key = key.upper()
        code, vk, text = f"Key{key.upper()}", ord(key.upper()), key
    elif len(key) == 1 and key.isdigit():
        code, vk, text = f"Digit{key}", ord(key), key
    elif key in _PUNCTUATION:
        code, vk = _PUNCTUATION[key]
        text = key
    else:
        raise ValueError(f"press() does not know the key {key!r}; known: letters, digits, {sorted(_NAMED_KEYS)}, {sorted(_PUNCTUATION)}")
    if modifiers & (1 | 2 | 4):  # Ctrl+C and the like are shortcuts: they type nothing
        text = ""
    event: dict[str, Any] = {"key": key, "code": code, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk, "modifiers": modifiers}
    if text:
        event["text"] = event["unmodifiedText"] = text
    return event


# Runs in the page: where to click ``selector``, or why it cannot be clicked yet.
_CLICK_TARGET_JS = """
(selector) => {
  const el = document.querySelector(selector);
  if (!el) return {problem: 'no element matches it'};
  el.scrollIntoView({block: 'center', inline: 'center'});
  const rects = el.getClientRects();
  const box = el.getBoundingClientRect();
  const style = getComputedStyle(el);
  if (!rects.length || box.width === 0 || box.height === 0 || style.visibility === 'hidden')
    return {problem: 'the element is not visible'};
  if (el.disabled) return {problem: 'the element is disabled'};
  const x = box.left + box.width / 2, y = box.top + box.height / 2;
  const hit = document.elementFromPoint(x, y);
  if (!hit) return {problem: `its centre (${x}, ${y}) is outside the viewport`};
  if (hit !== el && !el.contains(hit)) {
    const what = hit.tagName.toLowerCase() + (hit.id ? '#' + hit.id : '') +
      (typeof hit.className === 'string' && hit.className ? '.' + hit.className.trim().split(/\\s+/).join('.') : '');
    return {problem: `another element (${what}) covers its centre`};
  }
  return {x, y};
}
"""


class ChromiumPage:
    """One headless Chromium tab driven over CDP; use it as a context manager (module docstring)."""

    def __init__(self, profile: Path | str, width: int = 1280, height: int = 900, timeout: float = 30, start_timeout: float = 60) -> None:
        self.profile = Path(profile)
        self.width, self.height = width, height
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.console_errors: list[str] = []
        self.failed_requests: list[FailedRequest] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []  # "confirm: Delete it?" and the like, answered at once
        self.accept_dialogs = True  # how alert/confirm/prompt are answered (prompt with its default)
        self._proc: subprocess.Popen | None = None
        self.pid: int | None = None  # Chromium's, also its process group's id
        self._ws: Any = None
        self._session = ""
        self._next_id = 0
        self._events_seen: list[str] = []  # method names, for waits on events
        self._request_urls: dict[str, str] = {}
        self._favicon_requests: set[str] = set()

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> ChromiumPage:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def log_path(self) -> Path:
        return self.profile / "chromium.log"

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def start(self) -> None:
        import websocket  # websocket-client, the dev extra

        if browser() is None:
            raise PageError(SKIP_REASON)
        self.profile.mkdir(parents=True, exist_ok=True)
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        cmd = chromium_command(
            self.profile,
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            f"--window-size={self.width},{self.height}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--metrics-recording-only",
            "--mute-audio",
            "about:blank",
        )
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._proc.pid
        deadline = time.monotonic() + self.start_timeout
        lines: list[str] = []
        while len(lines) < 2:
            if self._proc.poll() is not None:
                raise PageError(f"Chromium exited ({self._proc.returncode}) before opening its DevTools port: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise PageError(f"Chromium did not write {port_file} in {self.start_timeout:.0f} s: {self._log_tail()}")
            time.sleep(0.05)
            try:
                lines = port_file.read_text().split()
            except OSError:
                pass
        port, path = lines[0], lines[1]
        self._ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=self.start_timeout, suppress_origin=True)
        targets = self._call("Target.getTargets")["targetInfos"]
        pages = [t["targetId"] for t in targets if t["type"] == "page"]
        target = pages[0] if pages else self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._call(f"{domain}.enable")
        self._call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1, mobile=False)
        self._call("Emulation.setFocusEmulationEnabled", enabled=True)  # focus/blur as in a focused window

    def close(self) -> None:
        """Close the connection and kill Chromium's process group (safe to call twice)."""
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self._ws = None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 10  # its renderers and helpers go too
            while live_group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    # -- the protocol --------------------------------------------------------------------------

    def _send(self, method: str, params: dict[str, Any], session: bool) -> int:
        if self._ws is None:
            raise PageError(f"{method}: the browser is not running (use ChromiumPage as a context manager)")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session and self._session:
            message["sessionId"] = self._session
        self._ws.send(json.dumps(message))
        return self._next_id

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any] | None:
        """One message (events are recorded on the way), or None when ``deadline`` has passed."""
        import websocket

        left = deadline - time.monotonic()
        if left <= 0:
            return None
        self._ws.settimeout(min(left, 1.0))
        try:
            raw = self._ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketException, OSError) as e:
            alive = self._proc is not None and self._proc.poll() is None
            raise PageError(f"lost the connection to Chromium ({e!r}; it is {'running' if alive else 'gone'}) while waiting for {waiting_for}: {self._log_tail()}") from e
        message = json.loads(raw)
        if "method" in message:
            self._on_event(message["method"], message.get("params", {}))
        return message

    def _call(self, method: str, timeout: float | None = None, _session: bool = True, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result; raise PageError on a protocol error."""
        timeout = self.timeout if timeout is None else timeout
        ident = self._send(method, params, _session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._receive(deadline, method)
            if message is not None and message.get("id") == ident:
                if "error" in message:
                    raise PageError(f"{method} failed on {self._url_for_errors()}: {message['error']}")
                return message.get("result", {})
        raise TimeoutError(f"Chromium did not answer {method} in {timeout:g} s (page {self._url_for_errors()})")

    def _pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what} (page {self._url_for_errors()})")
            self._receive(deadline, what)

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        self._events_seen.append(method)
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            parts = [str(a.get("value", a.get("description", a.get("type")))) for a in params.get("args", [])]
            self.console_errors.append(f"console.{params['type']}: {' '.join(parts)}")
        elif method == "Page.javascriptDialogOpening":
            # A dialog blocks the page's JavaScript until answered: answer it now (the reply is not awaited).
            self.dialogs.append(f"{params.get('type')}: {params.get('message')}")
            answer: dict[str, Any] = {"accept": self.accept_dialogs}
            if params.get("type") == "prompt":
                answer["promptText"] = params.get("defaultPrompt", "")
            self._send("Page.handleJavaScriptDialog", answer, True)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.console_errors.append(f"uncaught: {text} ({details.get('url', '')}:{details.get('lineNumber', '?')})")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error" and entry.get("networkRequestId") not in self._favicon_requests:
                self.console_errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".rstrip())
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            self._request_urls[params.get("requestId", "")] = url
            self.requests.append(url)
            if params.get("type") == "Other" and urlsplit(url).path == "/favicon.ico" and params.get("initiator", {}).get("type") == "other":
                self._favicon_requests.add(params.get("requestId", ""))
        elif params.get("requestId") in self._favicon_requests:
            pass  # the browser asks every site for /favicon.ico by itself; a page's own icon link is checked
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            if int(response.get("status", 0)) >= 400:
                self.failed_requests.append(FailedRequest(response.get("url", ""), int(response["status"]), ""))
        elif method == "Network.loadingFailed":
            url = self._request_urls.get(params.get("requestId", ""), "?")
            self.failed_requests.append(FailedRequest(url, None, params.get("errorText", "failed") + (" (canceled)" if params.get("canceled") else "")))

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Read the browser's events until the Python ``predicate`` holds (say, on
        ``failed_requests``); a TimeoutError names ``what`` and the page otherwise."""
        self._pump(predicate, self.timeout if timeout is None else timeout, what)

    def _url_for_errors(self) -> str:
        if self._ws is None or not self._session:
            return "(no page)"
        try:
            ident = self._send("Runtime.evaluate", {"expression": "location.href", "returnByValue": True}, True)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                message = self._receive(deadline, "the page URL")
                if message is not None and message.get("id") == ident:
                    return str(message.get("result", {}).get("result", {}).get("value", "?"))
        except Exception:  # noqa: BLE001 - only for an error message
            pass
        return "(unknown URL)"

    # -- what tests use -----------------------------------------------------------------------

    def clear_logs(self) -> None:
        self.console_errors.clear()
        self.failed_requests.clear()
        self.requests.clear()
        self.dialogs.clear()

    def goto(self, url: str, timeout: float | None = None) -> None:
        """Open ``url`` and wait for its load event."""
        timeout = self.timeout if timeout is None else timeout
        self._events_seen.clear()
        result = self._call("Page.navigate", timeout=timeout, url=url)
        if result.get("errorText"):
            raise PageError(f"could not open {url}: {result['errorText']}")
        if "loaderId" not in result:  # same-document navigation (#fragment): no load event
            return
        self._pump(lambda: "Page.loadEventFired" in self._events_seen, timeout, f"the load event of {url}")

    def reload(self, timeout: float | None = None) -> None:
        timeout = self.timeout if timeout is None else timeout
        self._events_seen.clear()
        self._call("Page.reload", timeout=timeout)
        self._pump(lambda: "Page.loadEventFired" in self._events_seen, timeout, "the load event after reload")

    @property
    def url(self) -> str:
        return str(self.evaluate("location.href"))

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression (promises awaited, returned as JSON); raise
        JavaScriptError with the exception's text when it throws."""
        result = self._call(
            "Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True, awaitPromise=True, userGesture=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            raise JavaScriptError(f"{expression!r} threw on {self._url_for_errors()}: {text}")
        return result.get("result", {}).get("value")

    def _call_function(self, function: str, *args: Any, timeout: float | None = None) -> Any:
        return self.evaluate(f"({function})(...{json.dumps(list(args))})", timeout=timeout)

    def wait_for(self, condition: str, timeout: float | None = None, interval: float = 0.1) -> Any:
        """Poll the JavaScript ``condition`` until it is truthy and return its value; an
        exception counts as not yet (the last one is quoted when the wait times out)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = "never evaluated"
        while True:
            try:
                value = self.evaluate(condition, timeout=max(deadline - time.monotonic(), 5))
                if value:
                    return value
                last = f"last value {value!r}"
            except JavaScriptError as e:
                last = f"last error: {str(e).split(': ', 1)[-1]}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {condition!r} on {self._url_for_errors()} ({last})")
            time.sleep(interval)

    def _element(self, selector: str, timeout: float | None) -> None:
        timeout = self.timeout if timeout is None else timeout
        try:
            self.wait_for(f"document.querySelector({json.dumps(selector)}) !== null", timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {selector!r} on {self._url_for_errors()}: no element matches it") from None

    def click(self, selector: str, timeout: float | None = None, click_count: int = 1) -> None:
        """A real left click at the centre of the element ``selector`` matches, once it is
        visible, enabled and uncovered (scrolled into view first)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            target = self._call_function(_CLICK_TARGET_JS, selector, timeout=max(deadline - time.monotonic(), 5))
            if "problem" not in target:
                break
            if time.monotonic() > deadline:
                raise PageError(f"cannot click {selector!r} on {self._url_for_errors()} after {timeout:g} s: {target['problem']}")
            time.sleep(0.1)
        x, y = target["x"], target["y"]
        self._call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for count in range(1, click_count + 1):
            self._call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=count)
            self._call("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", buttons=0, clickCount=count)

    def press(self, key: str, modifiers: tuple[str, ...] = ()) -> None:
        """Press and release one key on the focused element (the page's body when none is):
        a letter, digit, punctuation or a named key (Enter, Escape, Tab, ArrowDown, ...), with
        modifiers given as ``"Shift+ArrowDown"``/``"Control+Enter"`` or ``modifiers=("Shift",)``."""
        *prefix, main = key.split("+") if len(key) > 1 else [key]
        names = [_MODIFIER_ALIASES.get(m, m) for m in (*prefix, *modifiers)]
        unknown = [m for m in names if m not in _MODIFIERS]
        if unknown:
            raise ValueError(f"press({key!r}): unknown modifiers {unknown}; known: {sorted(_MODIFIERS)}")
        bits = 0
        for name in names:
            bit, code, vk = _MODIFIERS[name]
            bits |= bit
            self._call("Input.dispatchKeyEvent", type="rawKeyDown", key=name, code=code, windowsVirtualKeyCode=vk, modifiers=bits)
        event = _key_event(main, bits)
        # keyDown with text is Chromium's keydown + keypress + the text typed (an extra "char" would type it twice)
        self._call("Input.dispatchKeyEvent", type="keyDown" if "text" in event else "rawKeyDown", **event)
        self._call("Input.dispatchKeyEvent", type="keyUp", **{k: v for k, v in event.items() if k not in ("text", "unmodifiedText")})
        for name in reversed(names):
            bit, code, vk = _MODIFIERS[name]
            bits &= ~bit
            self._call("Input.dispatchKeyEvent", type="keyUp", key=name, code=code, windowsVirtualKeyCode=vk, modifiers=bits)

    def type(self, selector: str, text: str, clear: bool = False, keys: bool = False, timeout: float | None = None) -> None:
        """Click ``selector`` to focus it and type ``text`` at the caret (``clear``: replace
        what the field holds). The text goes in as one Input.insertText (a trusted ``input``
        event), or key by key with ``keys=True`` (keydown/keypress/input/keyup per character)."""
        self.click(selector, timeout=timeout)
        focused = self._call_function("(s) => document.activeElement === document.querySelector(s)", selector)
        if not focused:
            raise PageError(f"clicking {selector!r} on {self._url_for_errors()} did not focus it")
        if clear:
            self._call_function("(s) => { const el = document.querySelector(s); el.select ? el.select() : document.execCommand('selectAll'); }", selector)
        if keys:
            for char in text:
                self.press(char)
        else:
            self._call("Input.insertText", text=text)

    def text(self, selector: str, timeout: float | None = None) -> str:
        """The innerText of the element ``selector`` matches (waiting for it to exist)."""
        self._element(selector, timeout)
        return str(self._call_function("(s) => document.querySelector(s).innerText", selector))

    def screenshot(self, path: Path | str) -> Path:
        """Save the viewport (width x height CSS pixels) as a PNG at ``path``."""
        data = self._call("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
