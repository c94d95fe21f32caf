"""play.py --serve without a browser: a websocket client plays a tiny random model's game. The page, frames
that follow the keys (Pong's and Breakout's mappings), bad messages, one player at a time, a dropped client,
Ctrl-C and SIGTERM, errors."""

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
from test_play import ENV, ROOT, replay, run  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

import play_web  # noqa: E402
import pong  # noqa: E402
from engine import read_prompt  # noqa: E402

TIMEOUT = 120  # for any one event; a busy CI machine only waits longer
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy: the server is on this machine


def start(read_until, tiny, *args):
    """`play.py --serve --port 0` with the tiny model (None: the bundled one) -> (process, port, what it printed),
    once it listens."""
    model = ["--ckpt", str(tiny / "dit.pt"), "--prompt", str(tiny / "prompt.png"), "--steps", "1"] if tiny else []
    argv = [sys.executable, "play.py", "--serve", "--port", "0", *model, *args]
    env = {**ENV, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = read_until(p, p.stdout, r"open http://\S+:(\d+)/", TIMEOUT)
    return p, int(re.search(r"open http://\S+:(\d+)/", seen).group(1)), seen


@pytest.fixture
def serve(read_until, tiny):
    """serve(*args) -> start(...)'s (process, port, printed); each server is killed after the test if still up."""
    started = []

    def go(*args):
        started.append(start(read_until, tiny, *args))
        return started[-1]

    yield go
    for p, _, _ in started:
        p.kill()
        p.communicate()


def player(port, **kw):
    return connect(f"ws://127.0.0.1:{port}/ws", proxy=None, open_timeout=TIMEOUT, **kw)


def next_frame(ws, names=pong.ACTION_NAMES):
    """The next frame -> (number, seq, action name, pixels); control texts in between are skipped. names: the
    model's actions (the tiny model's are Pong's)."""
    while True:
        m = ws.recv(timeout=TIMEOUT)
        if isinstance(m, bytes):
            number, seq, action = play_web.FRAME_HEADER.unpack_from(m)
            return number, seq, names[action], m[play_web.FRAME_HEADER.size :]


def pixels(payload, size=32):
    """A frame's payload, PNG or raw RGB -> (size, size, 3) uint8."""
    if payload[:4] == b"\x89PNG":
        import cv2

        return cv2.cvtColor(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return np.frombuffer(payload, np.uint8).reshape(size, size, 3)


def frame_after(ws, seq, names=pong.ACTION_NAMES):
    """The first frame whose action came from key message `seq` or a later one."""
    while (f := next_frame(ws, names))[1] < seq:
        pass
    return f


def keys(ws, seq, up=False, down=False, left=False, right=False, fire=False):
    ws.send(json.dumps({"keys": [up, down, left, right, fire], "seq": seq}))


def test_the_page_is_self_contained(serve):
    p, port, seen = serve()
    assert f"open http://127.0.0.1:{port}/" in seen and "warning" not in seen  # 127.0.0.1 by default
    with LOCAL.open(f"http://127.0.0.1:{port}/") as r:
        page, headers = r.read().decode(), r.headers
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]  # the browser loads nothing from elsewhere
    assert "<canvas" in page and "image-rendering: pixelated" in page  # crisp nearest-neighbour scaling
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page) and "@import" not in page  # nothing outside
    for key in ("ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight", "Space", "KeyR", "KeyP", "frames/s"):
        assert key in page
    with pytest.raises(urllib.error.HTTPError, match="404"):
        LOCAL.open(f"http://127.0.0.1:{port}/secrets")
    with pytest.raises(InvalidStatus, match="403"):  # another site's page may not play in the user's browser
        player(port, origin="http://evil.example")


def test_frames_follow_the_keys(serve, tiny):
    p, port, _ = serve()
    with player(port) as ws:
        hello = json.loads(ws.recv(timeout=TIMEOUT))
        assert hello["size"] == 32 and hello["actions"] == pong.ACTION_NAMES and hello["format"] == "png"
        assert hello["game"] == "pong" and hello["keys"] == "Up: RIGHT  Down: LEFT  Space: FIRE"  # the page shows them
        assert "RIGHTFIRE: Up+Space" in hello["every"]
        first = next_frame(ws)
        assert first[0] == 0 and np.array_equal(pixels(first[3]), read_prompt(str(tiny / "prompt.png"), 32)[0])
        assert [next_frame(ws)[2] for _ in range(3)] == ["NOOP"] * 3
        keys(ws, 1, up=True)
        f = frame_after(ws, 1)
        assert f[2] == "RIGHT" and f[0] > first[0]  # Up is Pong's RIGHT: the player's paddle goes up
        assert {next_frame(ws)[2] for _ in range(3)} == {"RIGHT"}  # held: it stays
        keys(ws, 2, down=True, fire=True)
        assert frame_after(ws, 2)[2] == "LEFTFIRE"
        keys(ws, 3, right=True, fire=True)  # Left/Right do nothing in Pong
        assert frame_after(ws, 3)[2] == "FIRE"
        keys(ws, 4, up=True)  # a tap, released at once: it still counts for the next frame
        keys(ws, 5)
        assert frame_after(ws, 4)[2] == "RIGHT" and frame_after(ws, 5)[2] == "NOOP"
        ws.send(json.dumps({"cmd": "restart"}))
        while next_frame(ws)[0] != 0:  # the game starts again from the prompt
            pass
        ws.send(json.dumps({"cmd": "pause"}))
        while ws.recv(timeout=TIMEOUT) != json.dumps({"paused": True}):
            pass
        ws.send(json.dumps({"cmd": "pause"}))
        while ws.recv(timeout=TIMEOUT) != json.dumps({"paused": False}):
            pass
        assert next_frame(ws)[2] == "NOOP"


def test_keys_play_breakout(read_until, tiny_breakout):
    """A model of another game: the hello names its actions and keys, which the frames' actions follow."""
    p, port, seen = start(read_until, tiny_breakout)
    names = ["NOOP", "FIRE", "RIGHT", "LEFT"]
    try:
        assert "breakout: Left: LEFT  Right: RIGHT  Space: FIRE" in seen  # printed at start-up too
        with player(port) as ws:
            hello = json.loads(ws.recv(timeout=TIMEOUT))
            assert hello["game"] == "breakout" and hello["actions"] == names
            assert hello["keys"] == "Left: LEFT  Right: RIGHT  Space: FIRE"
            for seq, (pressed, want) in enumerate([({"left": True}, "LEFT"), ({"up": True, "fire": True}, "FIRE"),
                                                   ({"right": True}, "RIGHT"), ({"up": True}, "NOOP")], 1):  # fmt: skip
                keys(ws, seq, **pressed)
                assert frame_after(ws, seq, names)[2] == want, pressed
    finally:
        p.kill()
        p.communicate()


def test_bad_messages_are_ignored(serve, read_until):
    p, port, _ = serve()
    bad = [b"\x00\xff binary", "not json", "[" * 1000, "null", "[]", json.dumps({"keys": "up", "seq": 1}),
           json.dumps({"keys": [1, 0, 0, 0, 0], "seq": 1}), json.dumps({"keys": [True, False], "seq": 1}),
           json.dumps({"keys": [True, False, False], "seq": 1}),  # the three keys (up, down, fire) of before
           json.dumps({"keys": [True] + [False] * 4, "seq": -1}), json.dumps({"keys": [True] + [False] * 4}),
           json.dumps({"keys": [True] + [False] * 4, "seq": 2**40}), json.dumps({"cmd": "quit"}),
           json.dumps({"keys": [True] + [False] * 4, "seq": 1, "pad": "x" * 10_000})]  # fmt: skip
    with player(port) as ws:
        ws.recv(timeout=TIMEOUT)
        for m in bad:
            ws.send(m)
        keys(ws, 7, down=True)  # the connection and the game go on: every bad message left the keys alone
        f = frame_after(ws, 1)
        assert f[1] == 7 and f[2] == "LEFT"
        ws.send("x" * (play_web.MAX_SIZE + 1))  # too large for the websocket layer: that connection is closed
        with pytest.raises(ConnectionClosed) as e:
            while True:
                ws.recv(timeout=TIMEOUT)
        assert e.value.rcvd.code == 1009
    read_until(p, p.stdout, "the player left", TIMEOUT)
    with player(port) as ws:  # and the server takes the next player, in a new game
        ws.recv(timeout=TIMEOUT)
        # the prompt (frame 0) is sent first; on a busy machine the first tick's frame may already have
        # replaced it in the one-frame mailbox (the newest frame wins), so 0 or 1, never the old game's count
        assert next_frame(ws)[0] in (0, 1) and f[0] >= 1
    assert p.poll() is None


def test_one_player_at_a_time_and_a_dropped_player_frees_the_game(serve, read_until, tmp_path):
    p, port, _ = serve("--record", str(tmp_path / "g.npz"))
    with player(port) as first:
        first.recv(timeout=TIMEOUT)
        keys(first, 1, up=True)
        frame_after(first, 1)
        with player(port) as second, pytest.raises(ConnectionClosed) as e:
            second.recv(timeout=TIMEOUT)
        assert e.value.rcvd.code == 1013 and "one player at a time" in e.value.rcvd.reason  # the page shows it
        assert next_frame(first)[2] == "RIGHT"  # the first player plays on
        first.close_socket()  # gone mid-game, without a goodbye
        read_until(p, p.stdout, r"wrote \S+g\.actions\.pt", TIMEOUT)  # the player left; its game is saved
        actions = torch.load(tmp_path / "g.actions.pt", weights_only=True)
        assert np.load(tmp_path / "g.npz")["frames"].shape[0] == len(actions) + 1
        assert pong.ACTION_NAMES.index("RIGHT") in actions.tolist()
    with player(port) as third:  # the next player gets a new game from the prompt
        third.recv(timeout=TIMEOUT)
        assert next_frame(third)[0] == 0 and next_frame(third)[0] > 0
    assert p.poll() is None


@pytest.mark.parametrize("sig,host,fmt", [(signal.SIGINT, "0.0.0.0", "png"), (signal.SIGTERM, "127.0.0.1", "raw")],
                         ids=["SIGINT-every-interface", "SIGTERM-raw"])  # fmt: skip
def test_signals_stop_the_server_and_save_the_game(serve, read_until, tiny, tmp_path, sig, host, fmt):
    args = ["--host", host, "--seed", "3", "--frame-format", fmt, "--record", str(tmp_path / "k.npz")]
    p, port, seen = serve(*args)
    assert ("warning: --host '0.0.0.0'" in seen) == (host == "0.0.0.0")
    with player(port) as ws:
        ws.recv(timeout=TIMEOUT)
        keys(ws, 1, up=True)
        sent = [frame_after(ws, 1)]
        keys(ws, 2, down=True)
        sent.append(frame_after(ws, 2))
        p.send_signal(sig)
        with pytest.raises(ConnectionClosed) as e:
            while True:
                ws.recv(timeout=TIMEOUT)
        assert e.value.rcvd.code == 1001  # going away
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0 and f"interrupted ({sig.name})" in out and "Traceback" not in err, err
    played = np.load(tmp_path / "k.npz")["frames"]
    actions = torch.load(tmp_path / "k.actions.pt", weights_only=True)
    assert len(played) == len(actions) + 1 and {2, 3} <= set(actions.tolist())
    for number, _, action, payload in sent:  # what went out is the game: its frames, and the actions behind them
        assert np.array_equal(pixels(payload), played[number])
        assert pong.ACTION_NAMES[actions[number - 1]] == action
    if sig == signal.SIGTERM:  # the served game replays bit for bit through generate.py, as play.py's do
        again = replay(tiny, tmp_path / "r.npz", tmp_path / "k.actions.pt", 3, 1, len(played), "chunk",
                       prompt=tmp_path / "k.prompt.png")  # fmt: skip
        assert np.array_equal(again, played)


def test_serve_errors_are_one_line(tiny):
    taken = socket.create_server(("127.0.0.1", 0))
    cases = [["--headless", "--frames", "1"], ["--policy", "random"], ["--port", "70000"],
             ["--port", str(taken.getsockname()[1])]]  # fmt: skip
    with taken:
        for args in cases:
            r = run("play.py", "--serve", "--ckpt", str(tiny / "dit.pt"), *args, check=False)
            one_line = r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
            assert r.returncode != 0 and one_line, (args, r.stderr)
