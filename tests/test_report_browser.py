"""The report renders in a real browser: headless Chromium, driven over the DevTools protocol.

Chromium is started with ``--remote-debugging-pipe`` (protocol messages on fds 3 and 4, no
network port, no extra Python package). The test opens the page in a 1400 × 1000 px window and
collects every console error, uncaught exception, failed load and network request, then asks
the page how many tables and images it has, whether each image decoded (``naturalWidth > 0``)
and where the findings' summary (the overview and its table) ends: on the first screen, for the
report of an addition run, a text run and a run of checkpoints made outside polca.

The screenshots of docs/report.md come from the same code:

    python tests/test_report_browser.py runs/demo-addition/report/index.html docs/report-addition.png
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_report import make_run
from typer.testing import CliRunner

from polca.cli import app
from polca.report import write_report

try:  # the tiny Hugging Face series of test_analyze (a fixture), when transformers is there
    from test_analyze import data
except pytest.skip.Exception:
    @pytest.fixture
    def data():
        pytest.skip("the outside run is a Hugging Face series: needs transformers")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe")
WIDTH, FOLD = 1400, 1000  # the window, and the height of its first screen (px)
PAGE_FACTS = """JSON.stringify({
  tables: document.querySelectorAll('table').length,
  details: document.querySelectorAll('details').length,
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
  width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
  summary: (() => { const s = document.querySelector('#found table');
                    return s ? s.getBoundingClientRect().bottom + window.scrollY : null; })(),
  overview: (() => { const o = document.querySelector('#found p');
                     return o ? o.textContent : null; })(),
})"""


def _high_fd(fd: int) -> int:
    """``fd`` moved to a number ≥ 10, so it cannot collide with Chromium's fds 3 and 4."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Chromium:
    """A headless Chromium and a DevTools-protocol connection over its debugging pipe."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="polca-chromium-")
        to_chrome, self._send_fd = (_high_fd(fd) for fd in os.pipe())
        self._recv_fd, from_chrome = (_high_fd(fd) for fd in os.pipe())
        args = " ".join((*FLAGS, f"--user-data-dir={self.profile}"))
        # the shell puts the pipe ends on fds 3 and 4, where Chromium expects them
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" {args} 3<&{to_chrome} 4>&{from_chrome}', executable],
            pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome)
        os.close(from_chrome)
        self.events: list[dict] = []
        self._buffer, self._id = b"", 0

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._send_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") != self._id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method} failed: {reply['error']}")
            else:
                return reply["result"]

    def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._receive())
        return next(e for e in self.events if e.get("method") == method)

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._recv_fd], [], [], left)[0]:
                raise TimeoutError(f"chromium sent nothing for {self.timeout} s")
            chunk = os.read(self._recv_fd, 1 << 20)
            if not chunk:
                stderr = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"chromium exited: {stderr[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        os.close(self._send_fd)
        os.close(self._recv_fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def open_page(path: Path) -> tuple[dict, list[str], list[str], bytes]:
    """Load ``path`` in headless Chromium: (page facts, problems, request URLs, PNG screenshot).

    Problems are console errors and assertions, uncaught exceptions, and log errors (failed
    loads, blocked requests)."""
    browser = Chromium(CHROMIUM)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {
            "width": WIDTH, "height": FOLD, "deviceScaleFactor": 1, "mobile": False},
            session=session)
        browser.call("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        facts = json.loads(browser.call("Runtime.evaluate", {
            "expression": PAGE_FACTS, "returnByValue": True}, session=session)["result"]["value"])
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
    finally:
        browser.close()
    problems, requests = [], []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(params["exceptionDetails"].get("exception", {}).get(
                "description", params["exceptionDetails"]["text"]))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            problems.append(" ".join(str(a.get("value", a.get("description")))
                                     for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            problems.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    return facts, problems, requests, base64.b64decode(shot["data"])


def check_page(path: Path) -> tuple[dict, bytes]:
    """Open a report: no problem, no request but the page, every image decoded, the summary
    on the first screen. Returns the page facts and the first screen."""
    facts, problems, requests, screenshot = open_page(path)
    assert problems == []
    # besides its inline data: images the page requests only itself: no network, not a font
    assert [url for url in requests if not url.startswith("data:")] == [path.resolve().as_uri()]
    assert facts["images"] and all(i["complete"] and i["width"] > 0 for i in facts["images"])
    assert facts["summary"] is not None and 0 < facts["summary"] <= FOLD, facts["summary"]
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n")
    return facts, screenshot


def test_addition_report_renders_with_the_summary_first(tmp_path):
    run = make_run(tmp_path / "run")
    facts, _ = check_page(write_report(run.root))
    assert facts["tables"] >= 8 and facts["details"] >= 3
    assert len(facts["images"]) >= 6
    assert facts["overview"].startswith("1 of 1 clusterings")


def test_text_report_renders_with_the_summary_first(tmp_path):
    from test_report_text import planted_run

    from polca.config import parse_config
    from polca.stages.evaluate import run_evaluate

    run = planted_run(tmp_path / "text")
    cfg = parse_config({"name": "planted", "task": {"kind": "text"}})
    run_evaluate(SimpleNamespace(run=run, cfg=cfg), progress=False)
    check_page(write_report(run.root))
    assert "POS-labelled clusters" in run.report_path().read_text()


def test_outside_run_report_renders_with_the_summary_first(tmp_path, data):
    result = CliRunner().invoke(app, [str(a) for a in (
        "analyze", "--hf", data["gpt2"] / "checkpoint-*", "--probe", data["probe"],
        "--basis-sample", data["sample"], "--tokenizer", data["tokenizer"], "--name", "outside",
        "--runs", tmp_path, "--quiet", "--set", "decompose.lca=false",
        "--set", "cluster.trajectories=['loss', 'polca']")])
    assert result.exit_code == 0, result.output
    page = tmp_path / "outside" / "report" / "index.html"
    check_page(page)
    text = page.read_text()
    # an outside run is never told to train or to compute progress measures
    assert "polca train" not in text and "polca measures" not in text
    assert "d_model" not in text.split('id="configuration"')[1]


if __name__ == "__main__":  # the first screen of a report, for the docs
    import sys

    _, page, png = sys.argv
    Path(png).write_bytes(open_page(Path(page))[3])
