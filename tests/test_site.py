"""The built website, opened in headless Chromium the way a learner opens it.

Run after `jupyter-book build .`; skipped (with the reason) when the site has not been built.
For every page: the title, math typeset by the bundled MathJax, every image loaded, solutions
hidden until their toggle is clicked, and no request to any host but the local server.
Screenshots land in `_build/screenshots/` for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHAPTERS = re.findall(r"file:\s*book/(\S+)", (ROOT / "_toc.yml").read_text())

# CI sets LESSONS_SITE_REQUIRED=1 right after building, so there a missing site or browser fails.
_missing = [why for ok, why in [
    ((SITE / "index.html").exists(), "the site is not built: run `jupyter-book build .` first"),
    (Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)"),
] if not ok]
if _missing and os.environ.get("LESSONS_SITE_REQUIRED") == "1":
    raise RuntimeError("; ".join(_missing))
pytestmark = pytest.mark.skipif(bool(_missing), reason="; ".join(_missing))


def _notebook_title(name: str) -> str:
    cells = json.loads((ROOT / "book" / f"{name}.ipynb").read_text())["cells"]
    first = "".join(cells[0]["source"])
    return first.lstrip().splitlines()[0].lstrip("# ").strip()


def _has_math(name: str) -> bool:
    cells = json.loads((ROOT / "book" / f"{name}.ipynb").read_text())["cells"]
    return any("$" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            cwd=SITE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


def open_page(browser, url):
    """Open ``url``; return the page and the list of every URL it requested."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, requests


def assert_local_only(requests, base):
    foreign = [u for u in requests if not u.startswith((base, "data:", "blob:", "about:"))]
    assert not foreign, f"the page requested non-local URLs: {foreign[:5]}"


def typeset_math_count(page) -> int:
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
    page.evaluate("() => MathJax.startup.promise")
    return page.locator("mjx-container").count()


RAW_MATH_JS = """() => {
  const main = document.querySelector('main') || document.body;
  const copy = main.cloneNode(true);
  copy.querySelectorAll('pre, code, script, style, mjx-container, .cell_output, .output').forEach(e => e.remove());
  return copy.innerText;
}"""


def test_home_page(server, browser):
    page, requests = open_page(browser, f"{server}/index.html")
    assert "LLMs from Attention to RLHF" in page.title()
    assert page.locator("nav.bd-links a").count() >= len(CHAPTERS)
    assert_local_only(requests, server)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "index.png"))
    page.close()


@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_page(server, browser, name):
    page, requests = open_page(browser, f"{server}/book/{name}.html")

    assert _notebook_title(name) in page.title(), f"title {page.title()!r}"

    if _has_math(name):
        assert typeset_math_count(page) > 0, "no MathJax output on a page whose source has math"
    text = page.evaluate(RAW_MATH_JS)
    for raw in ("$$", "\\(", "\\["):
        assert raw not in text, f"untypeset math {raw!r} left in the page text"

    images = page.locator("main img")
    assert images.count() > 0, "a chapter should show at least one figure"
    broken = page.evaluate("() => [...document.querySelectorAll('main img')]"
                           ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    assert not broken, f"images that did not load: {broken}"

    assert page.locator("a.btn-download-source-button, .btn-download-source-button").count() > 0, \
        "no 'download .ipynb' button"

    solutions = page.locator("div.solution.dropdown")
    assert solutions.count() >= 3, "expected the exercises' solutions on the page"
    first = solutions.first
    body = first.locator("section, .cell, p:not(.admonition-title)").first
    assert not body.is_visible(), "a solution is visible before its toggle is clicked"
    first.scroll_into_view_if_needed()
    first.locator("button.toggle-button").first.click()
    body.wait_for(state="visible", timeout=5_000)
    assert body.is_visible(), "a solution stays hidden after its toggle is clicked"

    assert_local_only(requests, server)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.close()
