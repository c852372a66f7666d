"""The browser page (runtimes/web/, `make web`) end to end in headless Chromium: pick the
stories260K fixture and a 512-piece tokenizer with the file inputs, generate
greedily in the Web Worker, with 1 thread and with 2 (a helper worker on shared
memory), and check the ids against the C runtime. Saves a screenshot of the page
with a story from the session's trained model (results/web.png; docs/web.png in
the README is a copy of one)."""

import importlib.util
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.runtimes.zigweb_util import ROOT, STORIES260K, c_greedy, make, need, write_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "results" / "web.png"  # ignored by git: tests leave the tree clean
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def chromium():
    if not CHROMIUM.exists():  # try Debian's package once (needs root and apt)
        subprocess.run(["make", "-s", "-C", str(ROOT), "web-deps"], capture_output=True, timeout=600)
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed and `make web-deps` could not install it (needs root and apt-get)")
    return str(CHROMIUM)


def load_serve():
    spec = importlib.util.spec_from_file_location("serve", ROOT / "runtimes" / "web" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    return serve


@pytest.fixture(scope="module")
def site(tmp_path_factory, trained_model, synthetic_data):
    make("web-build")
    serve = load_serve()
    models = tmp_path_factory.mktemp("models")
    shutil.copy(need(STORIES260K), models / "model.bin")
    write_tokenizer(models / "tokenizer.bin", 512)
    shutil.copy(trained_model, models / "story.bin")  # a model that writes readable stories
    shutil.copy(synthetic_data / "tok512.bin", models / "story_tok.bin")
    server = serve.make_server(0, models, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", models
    server.shutdown()


@pytest.fixture(scope="module")
def page(site):
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1000, "height": 820})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(site[0])
        yield pg, errors
        browser.close()


def generate(pg, steps, temperature=0.0, prompt=""):
    pg.fill("#prompt", prompt)
    pg.fill("#steps", str(steps))
    pg.fill("#temperature", str(temperature))
    pg.click("#generate")
    pg.wait_for_function("document.body.dataset.done", timeout=60000)
    assert pg.get_attribute("body", "data-done") == "1", pg.inner_text("#error")
    return [1] + [int(i) for i in pg.eval_on_selector("#ids", "e => JSON.parse(e.value)")]


@pytest.mark.parametrize("threads", [1, 2])
def test_file_picker_greedy_ids_match_c(page, site, threads):
    pg, errors = page
    _, models = site
    pg.fill("#threads", str(threads))
    pg.set_input_files("#modelFile", str(models / "model.bin"))
    pg.set_input_files("#tokFile", str(models / "tokenizer.bin"))
    pg.click("#loadFiles")
    pg.wait_for_selector("#generate:not([disabled])", timeout=30000)
    info = pg.inner_text("#modelInfo")
    assert "dim 64, 5 layers, 8 heads (4 kv), vocab 512, seq_len 512" in info
    assert f"; {threads} thread{'s' if threads > 1 else ''}." in info  # not a silent fallback to 1
    ids = generate(pg, 256)
    want = c_greedy(STORIES260K, 256)
    assert [i for i in ids if i != 2] == want
    assert len(pg.inner_text("#story")) > 200
    assert f"tok/s, 256 tokens (SIMD128, {threads} thread" in pg.inner_text("#stats")
    assert not errors


def test_without_isolation_one_thread_and_a_note(page, site):
    """A server without COOP/COEP: no shared memory, so the page runs 1 thread and says why."""
    pg, errors = page
    serve = load_serve()
    server = serve.make_server(0, site[1], quiet=True, isolated=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = pg.context.browser.new_page()
    try:
        other.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        other.fill("#threads", "2")
        other.click("#loadUrls")
        other.wait_for_function("document.getElementById('modelInfo').textContent.startsWith('Loaded')",
                                timeout=30000)
        info = other.inner_text("#modelInfo")
        assert "; 1 thread (more threads need a cross-origin isolated page" in info
        assert [i for i in generate(other, 64) if i != 2] == c_greedy(STORIES260K, 64)
    finally:
        other.close()
        server.shutdown()


def test_fetched_from_server_seeded_and_screenshot(page):
    pg, errors = page
    pg.click("#loadUrls")  # default URLs: models/model.bin, models/tokenizer.bin
    pg.wait_for_function("document.getElementById('modelInfo').textContent.startsWith('Loaded')", timeout=30000)
    ids = generate(pg, 300, temperature=0.8, prompt="once upon a time")
    assert len(ids) > 50
    assert ids == generate(pg, 300, temperature=0.8, prompt="once upon a time")  # same seed, same story
    # the screenshot: a trained model and its own tokenizer, so the story reads as text
    pg.fill("#modelUrl", "models/story.bin")
    pg.fill("#tokUrl", "models/story_tok.bin")
    pg.click("#loadUrls")
    pg.wait_for_function("document.getElementById('modelInfo').textContent.includes('vocab 512, seq_len 256')",
                         timeout=30000)
    generate(pg, 200, temperature=0.8, prompt="Once upon a time")
    assert "Once upon a time" in pg.inner_text("#story")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    pg.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10000
    assert not errors


def test_bad_model_shows_the_error(page, site):
    pg, _ = page
    _, models = site
    (models / "cut.bin").write_bytes((models / "model.bin").read_bytes()[:5000])
    pg.fill("#modelUrl", "models/cut.bin")
    pg.click("#loadUrls")
    pg.wait_for_selector("#error:not([hidden])", timeout=30000)
    assert "needs" in pg.inner_text("#error")
    pg.fill("#modelUrl", "models/model.bin")
