"""The upload page in headless Debian Chromium, driven over the DevTools protocol (websockets), against the real
Serve application on loopback. Chromium comes from scripts/setup-test-deps.sh."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.http_fixture import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page_service(ray_local, tmp_path_factory):
    from ray import serve

    from inference.serve import start
    from jobkit.config import config_from_dict

    root = tmp_path_factory.mktemp("page")
    folder = make_checkpoint(root / "student", student=True)
    cfg = config_from_dict({}, [f"serve.port={free_port()}", "serve.replica_cpus=1", "inference.device=cpu",
                                f"inference.checkpoint={folder}"])
    url = start(cfg)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with remote debugging on a free loopback port; yields the DevTools HTTP base URL."""
    assert Path(CHROMIUM).exists(), "chromium missing: run `bash scripts/setup-test-deps.sh`"
    profile = tmp_path_factory.mktemp("chromium-profile")
    port = free_port()
    proc = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/json/version", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("headless chromium did not start") from None
            time.sleep(0.3)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


class DevTools:
    """Minimal DevTools-protocol client: numbered commands over one page websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, **params):
        self.next_id += 1
        msg_id = self.next_id
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        status = await self.evaluate("document.getElementById('status').textContent")
        raise TimeoutError(f"timed out waiting for {expression}; page status: {status}")


def page_ws_url(base: str) -> str:
    with urllib.request.urlopen(f"{base}/json/list", timeout=10) as resp:
        targets = json.load(resp)
    pages = [t for t in targets if t.get("type") == "page"]
    assert pages, targets
    return pages[0]["webSocketDebuggerUrl"]


def test_upload_shows_input_and_result_side_by_side_with_mode_steps_and_slider(page_service, browser, photos, tmp_path):
    import websockets

    photo = tmp_path / "photo.jpg"
    Image.open(photos[2]).convert("RGB").resize((36, 26), Image.BICUBIC).save(photo, quality=92)

    async def drive():
        async with websockets.connect(page_ws_url(browser), max_size=2**24) as ws:
            dt = DevTools(ws)
            await dt.send("Page.enable")
            await dt.send("Page.navigate", url=f"{page_service}/")
            await dt.wait_for("document.readyState === 'complete' && !!document.getElementById('file')", 60)
            # the server's choices arrive from GET ./options: only the student's mode, steps within max_steps
            await dt.wait_for("document.body.dataset.options === '1'", 30)
            choices = await dt.evaluate(
                "(() => { const m = document.getElementById('mode'), s = document.getElementById('steps');"
                " s.value = '999'; s.dispatchEvent(new Event('change'));"
                " const clamped = s.value; s.value = '2';"
                " return {mode: m.value, disabled: [...m.options].filter(o => o.disabled).map(o => o.value),"
                " max: s.max, clamped: clamped, limits: document.getElementById('limits').textContent}; })()")
            doc = await dt.send("DOM.getDocument")
            node = await dt.send("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")
            await dt.send("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(photo)])
            await dt.wait_for("document.getElementById('result-img').dataset.ready === '1'", 90)
            # the before/after slider: the input covers the result left of the slider's position
            await dt.wait_for("document.getElementById('compare-after').naturalWidth > 0", 30)
            slider = await dt.evaluate(
                "(() => { const r = document.getElementById('compare-range'); r.value = '30';"
                " r.dispatchEvent(new Event('input'));"
                " const a = document.getElementById('compare-after'), b = document.getElementById('compare-before');"
                " const ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();"
                " return {visible: !document.getElementById('compare-section').hidden,"
                " after: [a.naturalWidth, a.naturalHeight], before: [b.naturalWidth, b.naturalHeight],"
                " overlaid: Math.abs(ra.left - rb.left) < 1 && Math.abs(ra.width - rb.width) < 1"
                " && Math.abs(ra.height - rb.height) < 1,"
                " clip: getComputedStyle(b).clipPath,"
                " line: document.getElementById('compare-line').style.left}; })()")
            info = await dt.evaluate(
                "(() => { const i = document.getElementById('input-img'), r = document.getElementById('result-img');"
                " const a = i.getBoundingClientRect(), b = r.getBoundingClientRect();"
                " return {input: [i.naturalWidth, i.naturalHeight], result: [r.naturalWidth, r.naturalHeight],"
                " side_by_side: Math.abs(a.top - b.top) < 2 && b.left > a.right - 1,"
                " caption: document.getElementById('result-size').textContent,"
                " status: document.getElementById('status').textContent}; })()")
            return choices, slider, info

    choices, slider, info = asyncio.run(drive())
    assert choices["mode"] == "onestep" and choices["disabled"] == ["multistep"], choices
    assert choices["max"] == "50" and choices["clamped"] == "50" and "at most 50 steps" in choices["limits"], choices
    assert "onestep, 2 step(s)" in info["status"], info            # the chosen steps reached the server
    assert slider["visible"] and slider["after"] == [144, 104] and slider["before"] == [36, 26], slider
    assert slider["overlaid"] and slider["clip"] == "inset(0px 70% 0px 0px)" and slider["line"] == "30%", slider
    assert info["input"] == [36, 26], info
    assert info["result"] == [144, 104], info
    assert info["side_by_side"], info
    assert info["caption"] == "144\u00d7104" and info["status"].startswith("Done"), info
