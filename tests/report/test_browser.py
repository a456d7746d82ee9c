"""The report in headless Chromium: no console errors, every image loaded, the depth slider redraws.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4), so no websocket library is needed. A screenshot is saved to
``test-artifacts/report-browser.png`` (or ``$DOTA_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dota.report import serve_report

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("DOTA_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (apt-get install chromium)"),
]


class Chromium:
    """Headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, user_data_dir: Path, timeout_s: float = 20.0) -> None:
        self.timeout_s = timeout_s
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_pipes() -> None:  # in the child: its fd 3 reads our commands, fd 4 carries its replies
            a, b = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                f"--user-data-dir={user_data_dir}",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=wire_pipes,
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Runtime", "Page", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read_messages(self, wait_s: float) -> list[dict[str, Any]]:
        ready, _, _ = select.select([self._from_browser], [], [], wait_s)
        if ready:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe: " + self.stderr_tail())
            self._buffer += chunk
        out = []
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            out.append(json.loads(raw))
        return out

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for m in self._read_messages(0.2):
                if m.get("id") == self._next_id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
                self.events.append(m)
        raise TimeoutError(f"no answer to {method} within {self.timeout_s} s")

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for m in self.events[seen:]:
                if m.get("method") == method:
                    return m
            seen = len(self.events)
            self.events.extend(self._read_messages(0.2))
        raise TimeoutError(f"no {method} within {self.timeout_s} s")

    def js(self, expression: str) -> Any:
        r = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session=True
        )
        if "exceptionDetails" in r:
            raise AssertionError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and browser log entries of level error."""
        out = []
        for m in self.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(
                    f"{d.get('text', '')} {(d.get('exception') or {}).get('description', '')} "
                    f"at {d.get('url', '')}:{d.get('lineNumber')}"
                )
            elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def stderr_tail(self) -> str:
        return "" if self.proc.poll() is None else self.proc.stderr.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.proc.stderr.close()


SLICER_STATE = """(() => {
  const s = document.querySelector('.slicer');
  const panel = s.querySelector('canvas[data-panel="ref"]');
  return {slice: s.dataset.slice, label: s.querySelector('.slice-label').textContent,
          ref: panel.toDataURL(), plane: s.querySelector('canvas.plane').toDataURL(),
          value: s.querySelector('input[type=range]').value};
})()"""


def test_report_in_headless_chromium(built_report, tmp_path):
    server, url = serve_report(built_report.parent)
    browser = Chromium(tmp_path / "profile")
    try:
        browser.call("Page.navigate", {"url": url}, session=True)
        browser.wait_event("Page.loadEventFired")

        images = browser.js("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(images) >= 10
        assert [src for src, complete, width in images if not (complete and width > 0)] == []
        assert browser.js("document.querySelectorAll('.slicer').length") == 3

        before = browser.js(SLICER_STATE)
        assert before["slice"] == before["value"] and "depth" in before["label"]
        target = max(int(before["value"]) - 20, 0)
        browser.js(f"""(() => {{ const r = document.querySelector('.slicer input[type=range]');
                     r.value = '{target}'; r.dispatchEvent(new Event('input', {{bubbles: true}})); }})()""")
        after = browser.js(SLICER_STATE)
        assert after["slice"] == str(target)
        assert after["label"] != before["label"]
        assert after["ref"] != before["ref"], "the reference-dose canvas did not change with the slider"
        assert after["plane"] != before["plane"], "the depth marker did not move"

        browser.js("document.getElementById('dose').scrollIntoView()")
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "report-browser.png").write_bytes(base64.b64decode(shot["data"]))
        assert browser.errors() == []

        browser.js(
            "const s = document.createElement('script'); s.textContent = \"throw new Error('probe')\"; "
            "document.body.appendChild(s); console.error('probe')"
        )
        browser.js("1")
        assert len([e for e in browser.errors() if "probe" in e]) == 2, "the error capture itself does not work"
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
