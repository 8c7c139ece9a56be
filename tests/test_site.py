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


# -----------------------------------------------------------------------------
# the boxes that run the course's models in the page (_static/llm/): typed into as a reader
# would, and checked against lessons_lib in PyTorch

MODELS = SITE / "_static" / "models"
BOX_STRINGS = [
    "Hello world, it's 2026!   Ready?", "  two leading spaces, three trailing   ",
    "digits 1234567 3.14159 $1,234,567.89", "accents: naïve café, Ærøskøbing, Đặng",
    "emoji 👋🌍 ❤️‍🔥 🇫🇷 👩🏽‍💻", "東京 Ромео και Ιουλιέτα\ttab\nnewline",
]


def open_box(browser, server, chapter, kind):
    page, requests = open_page(browser, f"{server}/book/{chapter}.html")
    box = page.locator(f".llm-box[data-box={kind}]")
    assert box.count() == 1, f"no {kind} box on {chapter}"
    wait_for_box(box, ("ready", "done"))
    return page, requests, box


def wait_for_box(box, states, timeout=60_000):
    box.page.wait_for_function(
        "([el, states]) => states.includes(el.dataset.state) || el.dataset.state === 'error'",
        arg=[box.element_handle(), list(states)], timeout=timeout)
    state = box.get_attribute("data-state")
    assert state != "error", box.locator(".llm-status").inner_text()


def run_box(box, button):
    box.evaluate("el => { el.dataset.state = 'clicked'; }")
    box.locator(button).click()
    wait_for_box(box, ("done",), timeout=120_000)
    return float(box.get_attribute("data-tokens-per-second"))


def test_tokenizer_box(server, browser):
    from lessons_lib import web
    from lessons_lib.tokenizers import tiktoken_gpt2

    page, requests, box = open_box(browser, server, "02_tokenization", "tokenizer")
    ours = web.load_tokenizer(MODELS / "shakespeare_bpe.json")
    gpt2 = web.load_tokenizer(MODELS / "gpt2.json")
    reference = tiktoken_gpt2()
    assert ours.vocab_size == 1024 and gpt2.vocab_size == 50257
    for text in BOX_STRINGS:
        box.locator("textarea").fill(text)
        shown = box.locator(".llm-ids").evaluate_all("els => els.map(e => e.dataset.ids)")
        ids = [json.loads(s) for s in shown]
        assert ids[0] == ours.encode(text), text
        assert ids[1] == gpt2.encode(text) == reference.encode(text), text
        # each token shown as ch. 2's show_tokens does: its text, bytes of a cut character
        # as escapes, a newline as a return arrow
        pieces = box.locator(".llm-token").evaluate_all("els => els.map(e => e.textContent)")
        want = [tok.decode_bytes([i]).decode("utf-8", errors="backslashreplace")
                .replace("\n", "\u21b5\n") for tok, row in [(ours, ids[0]), (gpt2, ids[1])]
                for i in row]
        assert pieces == want, text
    assert_local_only(requests, server)
    SHOTS.mkdir(parents=True, exist_ok=True)
    box.screenshot(path=str(SHOTS / "box-tokenizer.png"))
    page.close()


def greedy_checked(model, prompt, new_tokens, got, stop_ids=()):
    """The page's greedy tokens against PyTorch's, up to the first step (if any) where the two
    best logits are within float32 rounding of each other; there a tie may break either way."""
    from lessons_lib import web

    want, gaps = web.greedy_tokens(model, prompt, new_tokens, stop_ids)
    agree = next((i for i, g in enumerate(gaps) if g < 1e-4), len(want))
    assert agree >= min(len(want), 20), f"near-ties too early: {gaps[:agree + 1]}"
    assert got[:agree] == want[:agree]
    if agree == len(want):
        assert got == want
    return agree


def test_generation_box(server, browser):
    from lessons_lib import web

    page, requests, box = open_box(browser, server, "07_pretraining", "generate")
    model, tok, _ = web.load_gpt(MODELS / "shakespeare.safetensors")
    box.locator("input[type=checkbox]").check()
    speeds = []
    for prompt, n in [("ROMEO:\n", 150), ("To be, or not to be", 40)]:
        box.locator("textarea").fill(prompt)
        box.locator("input[type=number]").nth(2).fill(str(n))     # new tokens
        speeds.append(run_box(box, "button.llm-go"))
        got = json.loads(box.locator(".llm-output").get_attribute("data-ids"))
        greedy_checked(model, tok.encode(prompt), n, got)
        shown = box.locator(".llm-output").inner_text()
        assert shown == prompt + tok.decode(got)
    # sampling: the page's own random numbers, the same text for the same seed
    box.locator("input[type=checkbox]").uncheck()
    texts = []
    for _ in range(2):
        run_box(box, "button.llm-go")
        texts.append(box.locator(".llm-output").get_attribute("data-ids"))
    assert texts[0] == texts[1]
    # a setting that makes no sense is refused with the reason, and the box still works
    box.locator("input[type=number]").first.fill("0")           # temperature
    box.locator("button.llm-go").click()
    assert box.get_attribute("data-state") == "error"
    assert "temperature must be a number > 0" in box.locator(".llm-status").inner_text()
    box.locator("input[type=number]").first.fill("0.8")
    run_box(box, "button.llm-go")
    print(f"generation box: {speeds} tokens per second")
    assert_local_only(requests, server)
    box.screenshot(path=str(SHOTS / "box-generate.png"))
    page.close()


def test_chat_box(server, browser):
    from lessons_lib import web

    page, requests, box = open_box(browser, server, "17_your_assistant", "chat")
    box.locator("input[type=checkbox]").check()
    options = box.locator("select option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["assistant_base.safetensors", "assistant_sft.safetensors",
                       "assistant_rl.safetensors"]
    speeds = {}
    for file in options:
        model, tok, template = web.load_gpt(MODELS / file)
        box.locator("select").select_option(file)
        wait_for_box(box, ("ready",))
        for message in ["Write a positive review.", "Insult Peter."]:
            box.locator("input.llm-input").fill(message)
            speeds[file] = run_box(box, "button.llm-go")
            got = json.loads(box.locator(".llm-transcript").get_attribute("data-ids"))
            prompt = template.encode_prompt(tok, message)
            greedy_checked(model, prompt, model.config.block_size - len(prompt), got,
                           template.stop_ids(tok))
            answer = box.locator(".llm-reply").last.inner_text().split("> ", 1)[1]
            # U+FFFD: a character cut by the window, replaced a little differently by each
            text = template.response_text(tok, got)
            assert answer.replace("\ufffd", "").strip() == text.replace("\ufffd", "").strip()
    print(f"chat box: {speeds} tokens per second")
    assert_local_only(requests, server)
    box.screenshot(path=str(SHOTS / "box-chat.png"))
    page.close()
