"""The browser page beyond what test_conformance.py runs through its file inputs: what it shows
about the model and the speed, the Fetch button, a page without cross-origin isolation (one
thread, and a note why), and a screenshot of a story from the session's trained model
(results/web.png; docs/web.png in the README is a copy of one)."""

import shutil
import threading

import pytest

from tests.common import ROOT, STORIES260K
from tests.runtimes.models import c_ids, need, write_id_tokenizer
from tests.runtimes.runners import load_serve

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("rt", ["browser"], indirect=True)]
SCREENSHOT = ROOT / "results" / "web.png"  # ignored by git: tests leave the tree clean


@pytest.fixture
def served(rt):
    """stories260K and a 512-id tokenizer where the page's Fetch button looks (models/)."""
    shutil.copy(need(STORIES260K), rt.models / "model.bin")
    write_id_tokenizer(rt.models / "tokenizer.bin", 512)
    return rt.models


def fetch(pg, model="models/model.bin", tok="models/tokenizer.bin", loaded="Loaded"):
    pg.fill("#modelUrl", model)
    pg.fill("#tokUrl", tok)
    pg.click("#loadUrls")
    pg.wait_for_function(f"document.getElementById('modelInfo').textContent.includes({loaded!r}) || "
                         "!document.getElementById('error').hidden", timeout=30000)


def generate(pg, steps, temperature=0.0, prompt=""):
    """The ids the page generated (BOS first), from its hidden #ids output."""
    pg.fill("#prompt", prompt)
    pg.fill("#steps", str(steps))
    pg.fill("#temperature", str(temperature))
    pg.click("#generate")
    pg.wait_for_function("document.body.dataset.done", timeout=60000)
    assert pg.get_attribute("body", "data-done") == "1", pg.inner_text("#error")
    return [1] + [int(i) for i in pg.eval_on_selector("#ids", "e => JSON.parse(e.value)")]


@pytest.mark.parametrize("threads", [1, 2])
def test_shows_the_model_and_the_speed(rt, work, threads):
    p = rt.run([work.stories260k(), "-z", "ids512.bin", "-n", 256, "-t", 0], work.path, threads=threads)
    assert p.returncode == 0, p.stderr
    info = rt.page.inner_text("#modelInfo")
    assert "dim 64, 5 layers, 8 heads (4 kv), vocab 512, seq_len 512, version 0 fp32" in info
    assert info.endswith(f"; {threads} thread{'s' if threads > 1 else ''}.")
    assert f"tok/s, 256 tokens (SIMD128, {threads} thread" in rt.page.inner_text("#stats")


def test_fetched_from_server_seeded_and_screenshot(rt, served, trained_model, synthetic_data):
    pg = rt.page
    fetch(pg)
    ids = generate(pg, 300, temperature=0.8, prompt="once upon a time")
    assert len(ids) > 50
    assert ids == generate(pg, 300, temperature=0.8, prompt="once upon a time")  # same seed, same story
    # the screenshot: a trained model and its own tokenizer, so the story reads as text
    shutil.copy(trained_model, served / "story.bin")
    shutil.copy(synthetic_data / "tok512.bin", served / "story_tok.bin")
    fetch(pg, "models/story.bin", "models/story_tok.bin", loaded="vocab 512, seq_len 256")
    generate(pg, 200, temperature=0.8, prompt="Once upon a time")
    assert "Once upon a time" in pg.inner_text("#story")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    pg.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10000
    assert not rt.errors


def test_fetched_bad_model_shows_the_error(rt, served):
    (served / "cut.bin").write_bytes((served / "model.bin").read_bytes()[:5000])
    fetch(rt.page, "models/cut.bin")
    assert not rt.page.is_hidden("#error")
    assert "model.bin" in rt.page.inner_text("#error") and "needs" in rt.page.inner_text("#error")
    fetch(rt.page, "models/missing.bin")
    assert "models/missing.bin: HTTP 404" in rt.page.inner_text("#error")


def test_without_isolation_one_thread_and_a_note(rt, served):
    """A server without COOP/COEP: no shared memory, so the page runs 1 thread and says why."""
    server = load_serve().make_server(0, served, quiet=True, isolated=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = rt.page.context.browser.new_page()
    try:
        other.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        other.fill("#threads", "2")
        fetch(other)
        info = other.inner_text("#modelInfo")
        assert "; 1 thread (more threads need a cross-origin isolated page" in info
        assert [i for i in generate(other, 64) if i != 2] == c_ids(STORIES260K, 64)
    finally:
        other.close()
        server.shutdown()
