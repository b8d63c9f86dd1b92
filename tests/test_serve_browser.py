"""The page in a real browser: `python -m lingmao.serve` started as a user starts it, headless Chromium (the
distribution's `chromium`, driven by Playwright) writes an acrostic 五绝 on the page, and the poem shown is checked.

LINGMAO_SERVE_MODEL=DIR serves that export instead of the test's tiny untrained model; LINGMAO_SCREENSHOT=PATH
saves the screenshot there (default: the test's temporary folder). docs/serve.md says how docs/serve.png was made.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from lingmao import load_model
from lingmao.serve.marks import poem_marks
from tests.conftest import kill_session, start_module

pytestmark = pytest.mark.slow


def needed(module: str, reason: str):
    """The module, or a skip; CI installs the browser's driver (.ci/run), so there a missing one fails the test.
    Imported when a test runs, not when the file is collected: a run of the fast tests only needs none of it."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=reason)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAN = "[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U000323af]"
HEADS = "春夏秋冬"
SEED = 7


@pytest.fixture(scope="module")
def served_model(model_dir) -> Path:
    return Path(os.environ["LINGMAO_SERVE_MODEL"]).resolve() if os.environ.get("LINGMAO_SERVE_MODEL") else model_dir


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    """The app as a user runs it, on a free port (port=0; the URL is read from its log)."""
    needed("fastapi", "the serve extra is not installed: pip install -e '.[serve]'")
    cwd = tmp_path_factory.mktemp("serve-cwd")
    process = start_module("lingmao.serve", f"model_dir={served_model}", "port=0", "device=cpu", cwd=cwd,
                           env={"OMP_NUM_THREADS": "1"}, stdout=None)
    log: list[str] = []
    found = threading.Event()

    def read_log() -> None:
        for line in process.stderr:
            log.append(line)
            if "serving on" in line:
                found.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        if not found.wait(60):
            pytest.fail("the server did not start:\n" + "".join(log))
        url = re.search(r"serving on (http://\S+)", "".join(log)).group(1)
        assert "(this machine only;" in "".join(log), log  # localhost unless told otherwise, and says so
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            kill_session(process)
    reader.join(10)
    # SIGTERM (as a service manager stops it): one line, exit code 0, no traceback.
    assert process.returncode == 0 and "Traceback" not in "".join(log), "".join(log)
    assert log[-1].strip() == "INFO SIGTERM: stopped", log[-3:]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "the chromium package is not installed (apt-get install chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    sync_api = needed("playwright.sync_api", "Playwright is not installed: pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def test_acrostic_wujue_on_the_page(server, browser, served_model, tmp_path):
    context = browser.new_context(viewport={"width": 1100, "height": 720}, locale="zh-CN")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.rstrip("/"))
    page = context.new_page()
    page.goto(server)
    page.wait_for_selector('#form option[value="wujue"]', state="attached")
    assert page.locator("#form optgroup[label^='词'] option").count() > 10  # the ci tunes are offered
    page.select_option("#form", "wujue")
    page.fill("#acrostic", HEADS)
    page.fill("#seed", str(SEED))
    page.click("#generate")
    card = page.wait_for_selector(".poem.done", timeout=60_000)

    shown = page.eval_on_selector_all(
        ".poem.done .line", "rows => rows.map(r => Array.from(r.querySelectorAll('.c'), c => c.textContent).join(''))"
    )
    lines = [x for x in re.split("[，。]", "".join(shown)) if x]
    assert len(lines) == 4 and all(re.fullmatch(f"{HAN}{{5}}", x) for x in lines), shown
    assert [x[0] for x in lines] == list(HEADS)
    text = card.get_attribute("data-text")
    # What the page shows is what the model writes with the page's settings (temperature 0.8, top_p 0.9) ...
    expected = load_model(served_model).generate(form="wujue", acrostic=HEADS, seed=SEED, temperature=0.8)[0]
    assert text == expected and "".join(shown) == text.replace("\n", "")
    # ... and it arrived as a stream, one event per token (the characters, the punctuation, the line break).
    assert int(card.get_attribute("data-tokens")) == len(text)
    marks = page.eval_on_selector_all(".poem.done .cell .m", "ms => ms.map(m => m.textContent.trim()).join('')")
    assert len(marks) == 20 and set(marks) <= set("○●◐◌")
    assert page.locator(".poem.done .cell.r-ok").count() >= 2  # the rhymes of lines 2 and 4 at least
    screenshot = Path(os.environ.get("LINGMAO_SCREENSHOT") or tmp_path / "serve.png")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    page.click(".poem.done button.copy")
    assert page.evaluate("navigator.clipboard.readText()") == text

    page.fill("#acrostic", "ab")  # a bad request: its one-line reason on the page
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.inner_text("#error").startswith("error: acrostic:")
    context.close()


def test_repeats_are_marked_on_the_page(server, browser):
    """重韵 and 重字 as the page draws them. Generated verse never repeats a rhyme (by construction), so the page's
    stream request is answered here with the events the server sends for a text that does, with the server's own
    marks (`poem_marks`) of it: 霜 ends lines 2 and 4 (重韵), 明, 月 and 头 come twice (重字)."""
    text = "床前明月光，疑是地上霜。\n举头望明月，低头思故霜。"
    events = [{"event": "start", "seed": 1, "num_samples": 1, "prompt": ""},
              *({"event": "token", "sample": 0, "text": ch} for ch in text),
              {"event": "done", "seed": 1, "form": None, "tune": None, "poems": [poem_marks(text)],
               "new_tokens": len(text), "seconds": 0.1, "stopped": None}]
    body = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
    page = browser.new_page()
    page.route("**/api/generate/stream", lambda route: route.fulfill(status=200, body=body,
                                                                     content_type="application/x-ndjson"))
    page.goto(server)
    page.wait_for_selector('#form option[value="wujue"]', state="attached")
    page.click("#generate")
    page.wait_for_selector(".poem.done")

    def shown(kind: str) -> str:
        return "".join(page.eval_on_selector_all(f".poem.done .cell.{kind} .c", "cs => cs.map(c => c.textContent)"))

    assert shown("rep-rhyme") == "霜霜" and shown("rep-char") == "明月头明月头"
    assert page.get_attribute(".poem.done .cell.rep-rhyme", "title").endswith("重韵")
    assert "重韵" in page.inner_text(".poem.done .verdict")
    page.close()
