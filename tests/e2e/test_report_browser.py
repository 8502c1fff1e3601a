"""report.html as a person sees it: rendered by headless Chromium, screenshotted, checked for errors.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
ending in NUL on fds 3 and 4), which needs no extra package and reports console messages, uncaught
exceptions, failed loads and every network request as structured events instead of log lines to
grep. The page must:
  * render to a screenshot that is not blank (many distinct colours, not one flat colour);
  * raise no console error, uncaught exception or log error;
  * load nothing from anywhere (self-contained: no resource requests at all);
  * fit a 1280 px laptop window without horizontal scrolling, and print to PDF.
Skipped, with the reason, where Chromium is not installed (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from quantpipe.config import GateRule
from quantpipe.gate import evaluate_gate
from quantpipe.report import load_results, write_report
from tests.report_data import synthetic_results

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((p for p in (shutil.which(n) for n in CHROMIUM_NAMES) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (none of chromium, chromium-browser, google-chrome on PATH); "
           "install it with `apt-get install chromium` to run the browser checks of report.html",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--remote-debugging-pipe", "--mute-audio", "--disable-extensions", "--disable-dev-shm-usage"]
WIDTH, HEIGHT = 1280, 800


@dataclasses.dataclass
class PageCheck:
    screenshot: bytes
    pdf_pages: int
    errors: list[str]
    requests: list[str]
    facts: dict[str, Any]


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, user_data_dir: str, timeout: float = 60.0) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(3, 4), preexec_fn=wire_fds,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.deadline = time.monotonic() + timeout

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
                raise RuntimeError(f"Chromium closed the debugging pipe; its stderr ends with:\n{err}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read_message()
            self.events.append(e)
            if e.get("method") == method:
                return e

    def close(self) -> None:
        with contextlib.suppress(Exception):  # it may already be gone; the process is reaped below either way
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


_FACTS_JS = """JSON.stringify({
  title: document.title,
  plots: document.querySelectorAll('svg.plot').length,
  sections: Array.from(document.querySelectorAll('section h2')).map(h => h.textContent.trim()),
  banner: (document.querySelector('.banner .title') || {}).textContent || '',
  failBadges: document.querySelectorAll('.badge.fail').length,
  skipBadges: document.querySelectorAll('.badge.skip').length,
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
  scripts: document.scripts.length,
  resources: performance.getEntriesByType('resource').map(e => e.name),
  labelOverlaps: (() => {  // variant labels of the accuracy-vs-latency plot whose boxes intersect, as drawn
    const svg = document.querySelector('svg[aria-label="accuracy-vs-latency"]');
    const labels = svg ? Array.from(svg.querySelectorAll('text')).filter(t => /^(ort|trt)-/.test(t.textContent.trim())) : [];
    const boxes = labels.map(t => [t.textContent.trim(), t.getBoundingClientRect()]);
    const hits = [];
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const [a, p] = boxes[i], [b, q] = boxes[j];
      if (p.left < q.right && q.left < p.right && p.top < q.bottom && q.top < p.bottom) hits.push(a + ' / ' + b);
    }
    return {labels: boxes.map(b => b[0]), hits: hits};
  })(),
  environment: (document.querySelector('#environment') || {}).innerText || ''
})"""


def check_page(html: Path, tmp: Path) -> PageCheck:
    """Open `html` in headless Chromium; return its full-page screenshot, PDF page count, errors, requests."""
    dt = DevTools(str(tmp / "chromium-profile"))
    try:
        target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            dt.send(f"{domain}.enable", session=session)
        dt.send("Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        dt.send("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        dt.wait_for("Page.loadEventFired")
        facts = json.loads(dt.send("Runtime.evaluate", {"expression": _FACTS_JS, "returnByValue": True},
                                   session=session)["result"]["value"])
        size = dt.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = dt.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": WIDTH, "height": min(size["height"], 16000), "scale": 1},
        }, session=session)
        pdf = dt.send("Page.printToPDF", {"printBackground": True, "preferCSSPageSize": True}, session=session)
    finally:
        dt.close()
    errors, requests = [], []
    for e in dt.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            errors.append(f"uncaught: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {})}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            errors.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            errors.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if url != html.resolve().as_uri():
                requests.append(url)
    pdf_bytes = base64.b64decode(pdf["data"])
    return PageCheck(base64.b64decode(shot["data"]), pdf_bytes.count(b"/Type /Page") - pdf_bytes.count(b"/Type /Pages"),
                     errors, requests, facts)


def assert_not_blank(png: bytes, name: str, out_dir: Path) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    (out_dir / f"{name}.png").write_bytes(png)  # kept beside the test's tmp files for a person to look at
    width, height = image.size
    assert width == WIDTH and height > HEIGHT, f"{name}: screenshot is {width}x{height}, expected a full page"
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 200, f"{name}: only {len(colours)} distinct colours: the page looks blank"
    background = max(colours)[0] / (width * height)
    assert background < 0.97, f"{name}: {background:.1%} of the screenshot is one colour"
    # Text and plots must reach well down the page, not only the header.
    lower = image.crop((0, height // 2, width, height)).getcolors(maxcolors=1 << 20) or []
    assert len(lower) > 50, f"{name}: the lower half of the page is empty"


RULES = [
    GateRule(variant="ort-int8", metric="top1_drop", max=0.01),
    GateRule(variant="ort-int8", metric="speedup", vs="ort-fp32", min=100),
    GateRule(variant="ort-int8", metric="top1_agreement", min=0.98),
    GateRule(variant="trt-int8", metric="speedup", min=1.5),
]


@pytest.fixture(scope="module")
def synthetic_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PageCheck]:
    tmp = tmp_path_factory.mktemp("report-browser")
    run = tmp / "reports" / "20250101T120000Z"
    results = synthetic_results(run)
    baseline = synthetic_results(tmp / "reports" / "base", run_id="20241201T000000Z", int8_top1=0.98, seed=3)
    results = dataclasses.replace(results, gate=evaluate_gate(results, RULES, baseline))
    paths = write_report(run, results, baseline=baseline)
    return paths["html"], check_page(paths["html"], tmp)


def test_synthetic_report_renders_without_errors(synthetic_page: tuple[Path, PageCheck]) -> None:
    html, page = synthetic_page
    assert page.errors == [], "report.html logged errors in Chromium:\n" + "\n".join(page.errors)
    assert page.requests == [] and page.facts["resources"] == [], f"report.html loads resources: {page.requests}"
    assert page.facts["scripts"] == 0


def test_synthetic_report_screenshot_is_not_blank(synthetic_page: tuple[Path, PageCheck]) -> None:
    html, page = synthetic_page
    assert_not_blank(page.screenshot, "synthetic-report", html.parent)


def test_synthetic_report_shows_verdict_sections_and_plots(synthetic_page: tuple[Path, PageCheck]) -> None:
    _, page = synthetic_page
    f = page.facts
    assert f["banner"].startswith("Gate FAILED: 2 of 4 rules failed"), f["banner"]
    assert f["failBadges"] >= 2 and f["skipBadges"] == 3
    assert f["plots"] == 4  # accuracy-vs-latency, latency distributions, sensitivity, histograms
    for section in ("Verdict", "Variants", "Accuracy vs latency", "Latency distributions", "Per-layer sensitivity",
                    "Activation histograms", "Calibration", "Environment"):
        assert section in f["sections"], f"section {section!r} missing from {f['sections']}"
    assert f["scrollWidth"] <= f["innerWidth"], f"page is {f['scrollWidth']} px wide in a {f['innerWidth']} px window"
    assert_readable(f)


def assert_readable(facts: dict[str, Any]) -> None:
    """Issue 14.9 as seen in Chromium: plot labels that can be read, an Environment table without Python dicts."""
    overlaps = facts["labelOverlaps"]
    assert overlaps["labels"], "no variant labels found in the accuracy-vs-latency plot"
    assert overlaps["hits"] == [], f"accuracy-vs-latency labels overlap: {overlaps['hits']}"
    assert "Environment" in facts["environment"] and "{'" not in facts["environment"], facts["environment"]


def test_synthetic_report_prints(synthetic_page: tuple[Path, PageCheck]) -> None:
    _, page = synthetic_page
    assert 2 <= page.pdf_pages <= 12, f"printing gives {page.pdf_pages} pages"


def test_harness_catches_a_console_error(tmp_path: Path) -> None:
    """The checks above can fail: a page with a script error and a network load is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><title>x</title><img src='http://127.0.0.1:9/missing.png'>"
                   "<script>console.error('boom'); undefined_function();</script>", encoding="utf-8")
    page = check_page(bad, tmp_path)
    assert any("boom" in e for e in page.errors), page.errors
    assert any("undefined_function" in e for e in page.errors), page.errors
    assert any("127.0.0.1:9" in r for r in page.requests), page.requests


def _example_run() -> Path | None:
    """The bundled example's newest run: $QUANTPIPE_EXAMPLE_RUN, or reports/latest of this checkout."""
    latest = Path(os.environ.get("QUANTPIPE_EXAMPLE_RUN") or ROOT / "reports" / "latest")
    return latest.resolve() if (latest / "results.json").is_file() else None


@pytest.mark.skipif(_example_run() is None, reason="no example run in reports/latest (run `quantpipe run pipeline.yaml` first)")
def test_example_run_report_renders(tmp_path: Path) -> None:
    run = _example_run()
    assert run is not None
    # Re-render from its results.json so the page reflects this checkout's templates.
    results = load_results(run)
    out = tmp_path / run.name
    if (run / "calibration").is_dir():  # histograms and thresholds are read from the run directory
        shutil.copytree(run / "calibration", out / "calibration")
    html = write_report(out, results, formats=["html"])["html"]
    page = check_page(html, tmp_path)
    assert page.errors == [], "\n".join(page.errors)
    assert page.requests == []
    assert_not_blank(page.screenshot, "example-report", tmp_path)
    assert_readable(page.facts)

