"""play.py --serve in a real headless Chromium, driven over the DevTools protocol (chromium.py): frames arrive
at 20/s or more, ArrowUp changes the action of the next frames, a second visitor reads why they cannot play,
a Breakout model's page shows its keys and plays them, and a screenshot of the bundled model's game is crisp
and looks like Pong.

The frames/s check runs the tiny random model of test_play.py: the server's 30 Hz tick then bounds the rate,
not the model, which on a busy 2-core CI machine can fall below 20 frames/s (docs/browser.md). The screenshot
needs the bundled model (random weights draw no Pong); it waits for frames, not for a rate. Skips only where no
chromium is installed, and says so: .ci/run installs Debian's chromium, so CI runs it."""

import json
import re

import numpy as np
import pytest

pytest.importorskip("websockets")
import test_serve  # noqa: E402

import pong  # noqa: E402
from chromium import Chromium, find_chromium  # noqa: E402

BINARY = find_chromium()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
serve = test_serve.serve  # the fixture: a server of the tiny random model (conftest.tiny)
TIMEOUT = test_serve.TIMEOUT


@pytest.fixture(scope="module")
def browser():
    with Chromium(BINARY, timeout=TIMEOUT) as b:
        yield b


def rate(browser, frames=30):
    """Frames drawn a second by the page, over the next `frames` frames (the page's own clock)."""
    f0, t0 = browser.evaluate("[stats.frames, performance.now()]")
    browser.wait(f"stats.frames >= {f0 + frames}", f"{frames} more frames", TIMEOUT)
    f1, t1 = browser.evaluate("[stats.frames, performance.now()]")
    return (f1 - f0) / (t1 - t0) * 1000


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_frames_arrive_and_arrow_up_changes_the_action(browser, serve, read_until, fmt):
    p, port, _ = serve("--frame-format", fmt)
    url = f"http://127.0.0.1:{port}/"
    with test_serve.player(port) as ws:  # someone already plays: the page says so
        ws.recv(timeout=TIMEOUT)
        browser.open(url)
        browser.wait("stats.closed === 1013", "the page's websocket refused", TIMEOUT)
        assert "one player at a time" in browser.evaluate("document.getElementById('message').textContent")
    read_until(p, p.stdout, "the player left", TIMEOUT)
    browser.open(url)
    browser.wait("stats.frames >= 10", "10 frames drawn", TIMEOUT)
    best = max(rate(browser) for _ in range(3))  # the best of three 30-frame spans: a busy machine stalls at times
    assert best >= 20, f"{best:.4g} frames/s in the browser"
    status = browser.evaluate("document.getElementById('status').textContent")
    assert float(re.match(r"([-+.\deE]+) frames/s · NOOP", status).group(1)) > 0, status  # shown on the page
    assert browser.evaluate("document.getElementById('keys').textContent") == "Up: RIGHT  Down: LEFT  Space: FIRE"

    browser.key("ArrowUp", True)
    browser.wait("stats.latencies.length >= 1", "a frame after ArrowUp", TIMEOUT)
    assert browser.evaluate("stats.action") == "RIGHT"  # Up is Pong's RIGHT: the player's paddle goes up
    n = browser.evaluate("stats.frames")
    browser.wait(f"stats.frames >= {n + 3}", "3 more frames", TIMEOUT)
    assert browser.evaluate("stats.action") == "RIGHT"  # held: the next frames keep it
    assert "RIGHT" in browser.evaluate("document.getElementById('status').textContent")
    browser.key("ArrowUp", False)
    browser.wait("stats.action === 'NOOP'", "NOOP after ArrowUp is released", TIMEOUT)


def test_a_breakout_models_page_shows_and_plays_its_keys(browser, read_until, tiny_breakout):
    p, port, _ = test_serve.start(read_until, tiny_breakout)
    try:
        browser.open(f"http://127.0.0.1:{port}/")
        browser.wait("stats.frames >= 3", "3 frames drawn", TIMEOUT)
        shown = "['keys', 'every'].map((id) => document.getElementById(id).textContent)"
        text = browser.evaluate(f"[document.title, ...{shown}]")
        assert text[:2] == ["GameNGen-Mini: neural breakout", "Left: LEFT  Right: RIGHT  Space: FIRE"], text
        assert text[2].startswith("every action: NOOP: no key  FIRE: Space"), text
        for code, action in (("ArrowLeft", "LEFT"), ("ArrowRight", "RIGHT")):
            n = browser.evaluate("stats.latencies.length")
            browser.key(code, True)
            browser.wait(f"stats.latencies.length > {n}", f"a frame after {code}", TIMEOUT)
            assert browser.evaluate("stats.action") == action
            browser.key(code, False)
            browser.wait("stats.action === 'NOOP'", f"NOOP after {code} is released", TIMEOUT)
    finally:
        p.kill()
        p.communicate()


def test_a_screenshot_of_the_bundled_model_is_crisp_and_looks_like_pong(browser, read_until, tmp_path):
    import cv2

    p, port, _ = test_serve.start(read_until, None)  # the bundled model
    try:
        browser.open(f"http://127.0.0.1:{port}/")
        browser.wait("stats.frames >= 10", "10 frames drawn", TIMEOUT)
        hello = json.loads(browser.evaluate("JSON.stringify({size: canvas.width, css: canvas.style.width})"))
        browser.screenshot(str(tmp_path / "canvas.png"), "canvas")
    finally:
        p.kill()
        p.communicate()
    shot = cv2.cvtColor(cv2.imread(str(tmp_path / "canvas.png")), cv2.COLOR_BGR2RGB)
    assert hello == {"size": 96, "css": "576px"} and shot.shape == (576, 576, 3)
    blocks = shot.reshape(96, 6, 96, 6, 3)
    crisp = (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3, 4)).mean()
    assert crisp > 0.99, f"only {crisp:.1%} of the 6x6 blocks are one colour: not nearest-neighbour scaling"
    frame = np.ascontiguousarray(blocks[:, 0, :, 0])  # (96, 96, 3), the model's frame
    field = (np.abs(frame.astype(int) - pong.COLOR_BACKGROUND).max(-1) < 16).mean()
    found = pong.detect_objects(frame)
    assert field > 0.5, f"{field:.1%} of the pixels have Pong's field colour"
    assert np.isfinite(found["player_y"]) and np.isfinite(found["opponent_y"]), found  # both paddles
