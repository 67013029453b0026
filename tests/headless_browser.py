"""A real headless Chromium driven over the DevTools protocol on a pipe (no extra packages):
load a page, collect every console message, exception and log error, read the DOM, take a
full-page screenshot.

`--remote-debugging-pipe` makes Chromium read commands on fd 3 and write replies and events on
fd 4, each a JSON message ended by a NUL byte.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """The browser's path, installing Debian's `chromium` when it is missing and we may;
    otherwise (None, why not)."""
    path = find_chromium()
    if path:
        return path, ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed and this user cannot apt-get install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if r.returncode != 0:
                return None, f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not install chromium: {e}"
    path = find_chromium()
    return (path, "") if path else (None, "apt-get installed chromium but no binary was found")


@dataclass
class PageResult:
    problems: list[str] = field(default_factory=list)  # console errors, exceptions, log errors
    value: object = None  # what the evaluated expression returned
    screenshot: Path | None = None


class DevTools:
    def __init__(self, browser: str, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        cmd_r, self._cmd_w = os.pipe()  # we write commands; the browser reads them on fd 3
        self._evt_r, evt_w = os.pipe()  # the browser writes on fd 4
        self._user_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"autoknow-chromium-{os.getpid()}-{time.time_ns()}"
        args = [browser, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--mute-audio",
                f"--user-data-dir={self._user_dir}", "about:blank"]

        def child_fds():  # in the child, before exec: the two pipe ends become fds 3 and 4
            high_r, high_w = os.dup(cmd_r), os.dup(evt_w)  # so neither overwrites the other
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        # close_fds=False: the pipes are close-on-exec, only the dup2 copies (3, 4) pass exec
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=child_fds,
                                     close_fds=False)
        os.close(cmd_r)
        os.close(evt_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._evt_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._user_dir, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the browser in time")
            ready, _, _ = select.select([self._evt_r], [], [], left)
            if ready:
                chunk = os.read(self._evt_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed its DevTools pipe")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout_s
        for i, e in enumerate(self.events):
            if e.get("method") == method and e.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            m = self._read_message(deadline)
            if m.get("method") == method and m.get("sessionId") == session:
                return m
            self.events.append(m)


def _problems(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            out.append(f"console.{p['type']}: {text}")
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            entry = p["entry"]
            out.append(f"log {entry.get('source')}/{entry.get('level')}: {entry.get('text')}")
    return out


def load_page(browser: str, url: str, expression: str, screenshot: Path | None = None,
              width: int = 1300) -> PageResult:
    """Open `url`, wait for its load event, evaluate `expression` (a JSON-returning value),
    screenshot the whole page; every console error, exception and error log entry on the way
    is returned in `problems`."""
    dt = DevTools(browser)
    try:
        target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            dt.send(f"{domain}.enable", session=session)
        dt.send("Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        dt.events.clear()
        dt.send("Page.navigate", {"url": url}, session)
        dt.wait_event("Page.loadEventFired", session)
        value = dt.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                        session).get("result", {}).get("value")
        shot = None
        if screenshot is not None:
            size = dt.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            data = dt.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000),
                         "scale": 1}}, session)["data"]
            screenshot.write_bytes(base64.b64decode(data))
            shot = screenshot
        time.sleep(0.2)  # late console messages (none expected: the page has no script)
        dt.send("Runtime.evaluate", {"expression": "1"}, session)
        return PageResult(problems=_problems(dt.events), value=value, screenshot=shot)
    finally:
        dt.close()
