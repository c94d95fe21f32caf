"""Play in a web browser: the server and page behind `play.py --serve`, and (run as a script) the bench
that plays it in a real headless Chromium (chromium.py).

Serve the bundled model, then open the URL it prints (from another machine: ssh -L 8000:localhost:8000 host):
    python play.py --serve
    python play.py --serve --port 8001 --record runs/web.mp4
Bench in headless Chromium (Debian: apt-get install chromium): frames/s in the browser and key-to-frame
latency, raw RGB frames against PNG, each through its own `play.py --serve`:
    python play_web.py
    python play_web.py --screenshot sample_data/browser_screenshot.png     # the README's picture
    python play_web.py --play-args "--steps 1 --threads 1"

How it works. One port serves the page (GET /, play_web.html) and the game's websocket (/ws); the hello
tells the page the game, its action names and what each key does. The game runs on the main thread at a
fixed tick (play.py's --fps: 30 served), skipping the ticks it misses when the model falls behind. Each
tick it takes the newest key state (arrows and Space, and keys tapped since the last tick), maps it to
the game's action (games.KeyMap), steps play.Game and sends the frame as one binary message: FRAME_HEADER,
then raw RGB or a PNG. When the model is ahead of the clock the frame is sent as soon as it is decoded,
not one tick later (play.Game's pipeline). A player's frames go through a one-frame mailbox on a sender
thread: a slow client drops frames, and never stalls the game. One player at a time; a second gets a clear
message and close code 1013.
"""

import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

import games
import play
import utils
from utils import arg

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "play_web.html")
FRAME_HEADER = struct.Struct("<IIB")  # frame number in the game, seq of the keys its action came from, action
MAX_MESSAGE = 1024  # a longer client message is ignored (a key message is ~50 bytes)
MAX_SIZE = 64 * 1024  # the websocket layer closes a connection that sends a larger message (code 1009)
BUSY = 1013  # close code "try again later": someone else is playing
BUSY_REASON = "someone else is playing: one player at a time, reload when they are done"
NO_KEYS = (False,) * len(games.KEYS)  # (up, down, left, right, fire)
# The page's browser refuses anything from elsewhere: its inline script and style, and its own websocket.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"


def parse_message(message):
    """A client message -> ("keys", (up, down, left, right, fire), seq) or ("cmd", "restart" | "pause"); None
    otherwise."""
    if not isinstance(message, str) or len(message) > MAX_MESSAGE:
        return None
    try:
        m = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(m, dict):
        return None
    keys, seq = m.get("keys"), m.get("seq")
    if isinstance(keys, list) and len(keys) == len(NO_KEYS) and all(isinstance(k, bool) for k in keys):
        if type(seq) is int and 0 <= seq < 2**32:
            return "keys", tuple(keys), seq
    if m.get("cmd") in ("restart", "pause"):
        return "cmd", m["cmd"]
    return None


def encode_frame(frame, number, seq, action, fmt):
    """(H, W, 3) uint8 -> a frame message: FRAME_HEADER, then raw RGB bytes or a PNG."""
    if fmt == "png":
        import cv2

        body = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()
    else:
        body = np.ascontiguousarray(frame).tobytes()
    return FRAME_HEADER.pack(number, seq, action) + body


class Player:
    """The connection that plays: its newest keys, the keys tapped and the commands sent since the game last
    looked; and what goes to it: control texts in order, then only the newest frame."""

    def __init__(self, conn, fmt):
        self.conn, self.fmt, self.cond = conn, fmt, threading.Condition()
        self.held, self.tapped, self.seq, self.commands = NO_KEYS, NO_KEYS, 0, []
        self.texts, self.frame, self.closed = [], None, False

    def receive(self, message):
        m = parse_message(message)
        with self.cond:
            if m and m[0] == "keys":  # the newest state wins; a key tapped between two ticks still counts
                self.held, self.seq = m[1], m[2]
                self.tapped = tuple(a or b for a, b in zip(self.tapped, m[1]))
            elif m and len(self.commands) < 16:
                self.commands.append(m[1])

    def take(self):
        """-> (commands, the keys held now or tapped since the last take, seq of the newest keys)."""
        with self.cond:
            out = self.commands, tuple(a or b for a, b in zip(self.held, self.tapped)), self.seq
            self.commands, self.tapped = [], NO_KEYS
        return out

    def offer(self, frame=None, text=None):
        """frame: (image, number, seq, action), replacing one not yet sent; text: a control message."""
        with self.cond:
            if text is not None:
                self.texts.append(text)
            if frame is not None:
                self.frame = frame
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()

    def send_loop(self):
        from websockets.exceptions import ConnectionClosed

        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.closed or self.texts or self.frame is not None)
                if self.closed:
                    return
                texts, frame, self.texts, self.frame = self.texts, self.frame, [], None
            try:
                for text in texts:
                    self.conn.send(text)
                if frame is not None:
                    self.conn.send(encode_frame(*frame, self.fmt))
            except ConnectionClosed:
                return


class Server:
    """play.py --serve: the page and the websocket on one port (server threads); run() plays on the caller's."""

    def __init__(self, cfg, game, keymap):
        from websockets.sync.server import serve

        self.cfg, self.game, self.keymap, self.labels, self.number, self.decode_dt = cfg, game, keymap, deque(), 0, 0.0
        self.lock, self.player, self.changed = threading.Lock(), None, threading.Event()
        with open(PAGE, encoding="utf-8") as f:
            self.page = f.read()
        engine = game.engine
        hello = dict(size=engine.frame_size, scale=cfg.scale, format=cfg.frame_format, game=engine.game,
                     actions=engine.action_names, keys=keymap.keys_text(), every=keymap.actions_text())  # fmt: skip
        self.hello = json.dumps(hello)
        try:
            self.ws = serve(self.handle, cfg.host, cfg.port, process_request=self.route, max_size=MAX_SIZE,
                            compression=None)  # fmt: skip
        except OSError as e:
            utils.die(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({e.strerror or e})")
        self.port = self.ws.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.ws.serve_forever)
        self.thread.start()

    def route(self, conn, request):
        """HTTP before any handshake: / is the page, /ws the game (from the page's own origin), the rest 404."""
        if request.path == "/ws":
            hosts, origins = request.headers.get_all("Host"), request.headers.get_all("Origin")
            if origins and origins != [f"http://{h}" for h in hosts]:  # another site's page in the player's browser
                return conn.respond(403, "the game takes players from its own page only\n")
            return None
        if request.path != "/":
            return conn.respond(404, "not found\n")
        r = conn.respond(200, self.page)
        del r.headers["Content-Type"]
        r.headers["Content-Type"] = "text/html; charset=utf-8"
        r.headers["Content-Security-Policy"] = CSP
        return r

    def handle(self, conn):
        """One websocket, on its own server thread: the player's messages go in, until the player leaves."""
        from websockets.exceptions import ConnectionClosed

        player = Player(conn, self.cfg.frame_format)
        with self.lock:
            busy = self.player is not None
            if not busy:
                self.player = player
        if busy:
            conn.close(BUSY, BUSY_REASON)
            return
        print(f"a player joined from {conn.remote_address[0]}", flush=True)
        # a client that stops reading for 5 s is dropped: a blocked send would hold its thread, and Ctrl-C's shutdown
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        self.changed.set()
        sender = threading.Thread(target=player.send_loop)
        try:
            conn.send(self.hello)
            sender.start()
            for message in conn:
                player.receive(message)
        except ConnectionClosed:  # gone without a goodbye, or a message over MAX_SIZE
            pass
        finally:
            player.close()
            if sender.ident is not None:
                sender.join()
            with self.lock:
                self.player = None
            print("the player left", flush=True)
            self.changed.set()

    def run(self, stop, writers):
        """The game: a step a tick for whoever plays, until a signal (`stop`) or --frames -> frames played."""
        period = 1 / self.cfg.fps if self.cfg.fps else 0.0
        player, paused, played, deadline = None, False, 0, time.perf_counter()
        while not stop and not (self.cfg.frames and played >= self.cfg.frames):
            self.changed.clear()
            if self.player is not player:  # someone joined or left: the next player gets a new game
                player, paused = self.player, False
                self.restart(player, 0, writers)
            if player is None:
                self.changed.wait(0.25)
            else:
                commands, keys, seq = player.take()
                if "restart" in commands:
                    self.restart(player, seq, writers)
                if commands.count("pause") % 2:
                    paused = not paused
                    player.offer(text=json.dumps({"paused": paused}))
            if player is None or paused:
                time.sleep(0.05 if paused else 0)
                deadline = time.perf_counter()
                continue
            deadline += period
            self.step(player, keys, seq, deadline)
            played += 1
            wait = deadline - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                deadline = time.perf_counter()  # behind: the missed ticks are skipped, not caught up
        return played

    def restart(self, player, seq, writers):
        """A new game (the last one saved when recording, as R does in play.py); its prompt goes to the player."""
        if self.game.actions:
            play.new_game(self.game, self.cfg, writers)
        self.labels.clear()  # (action, seq) of each step whose frame is not shown yet
        self.number = 0
        if player is not None:
            player.offer(frame=(self.game.frames[-1], 0, seq, 0))

    def step(self, player, keys, seq, deadline):
        """One tick's step; the newest frame, labelled with its action and keys, goes to the player."""
        action = self.keymap(keys)
        self.labels.append((action, seq))
        shown = self.game.step(action)  # the previous step's frame, if it was not shown yet
        if time.perf_counter() + self.decode_dt < deadline:  # ahead of the clock: this frame now, not next tick
            t = time.perf_counter()
            shown += self.game.finish()
            self.decode_dt = 0.9 * self.decode_dt + 0.1 * (time.perf_counter() - t)
        for _ in range(shown):
            action, seq = self.labels.popleft()
            self.number += 1
        if shown:
            player.offer(frame=(self.game.frames[-1], self.number, seq, action))

    def close(self):
        self.ws.shutdown()  # closes the player's connection (1001, going away)
        self.thread.join()


def serve(cfg, game, keymap, stop):
    """play.py --serve: serve until Ctrl-C or SIGTERM (`stop`), then save the game when recording."""
    server = Server(cfg, game, keymap)
    if cfg.host in ("0.0.0.0", "::", ""):
        print(f"warning: --host {cfg.host!r} lets anyone who can reach this machine play (and load it); "
              "from afar, ssh -L is safer", flush=True)  # fmt: skip
        host = socket.gethostname()
    else:
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"open http://{host}:{server.port}/ in a browser (one player at a time; Ctrl-C stops)", flush=True)
    writers, played, t0 = [], 0, time.perf_counter()
    try:
        played = server.run(stop, writers)
    except KeyboardInterrupt:  # a second signal
        pass
    finally:
        server.close()
        if cfg.record:
            writers.append(play.save_game(game, cfg))
        for w in filter(None, writers):
            w.join()
    if stop:
        print(f"interrupted ({stop.name})")
    print(f"served {played} frames in {time.perf_counter() - t0:.4g} s")


# -----------------------------------------------------------------------------
# the bench: python play_web.py


@dataclass
class BenchConfig:
    """Frames/s in a real browser and key-to-frame latency, one `play.py --serve` per frame format and round."""

    formats: str = arg("raw,png", "frame formats to compare, each through its own server (play.py --frame-format)")
    rounds: int = arg(2, "rounds of every format, interleaved, so that other work on the machine hits them alike")
    seconds: float = arg(10.0, "how long to measure each server, pressing keys all along")
    play_args: str = arg("", "more play.py flags for the servers, e.g. '--steps 1 --ckpt runs/dit/ckpt.pt'")
    screenshot: str = arg("", "save the page as this PNG at the end (the last server)")
    chromium: str = arg("", "the Chromium binary; empty: chromium (or chromium-browser, google-chrome) on PATH")
    seed: int = arg(0, "seed of the random pauses before each key press")


def start_server(args, timeout=300):
    """`python play.py --serve --port 0 ARGS` -> (process, URL), once it prints its URL."""
    argv = [sys.executable, os.path.join(HERE, "play.py"), "--serve", "--port", "0", *args]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.monotonic() + timeout, ""
    while not (url := next((w for w in seen.split() if w.startswith("http://")), None)):
        line = p.stdout.readline()  # the server prints a line per event; it ends on an error
        if not line or time.monotonic() > deadline:
            p.kill()
            utils.die(f"the server did not start: {(seen + p.stdout.read()).strip().splitlines()[-1:]}")
        seen += line
    return p, url


def measure(browser, url, seconds, rng):
    """Open the page, then press ArrowUp and ArrowDown in turn for `seconds` -> the browser's figures."""
    browser.open(url)
    browser.wait("stats.frames >= 30", "30 frames drawn (the warm-up)")
    f0, b0, t0 = browser.evaluate("[stats.frames, stats.bytes, performance.now()]")
    presses, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        time.sleep(rng.uniform(0, 0.05))  # a press at any moment of the 33 ms tick, as a player's would be
        code = ("ArrowUp", "ArrowDown")[presses % 2]
        browser.key(code, True)
        presses += 1
        browser.wait(f"stats.latencies.length >= {presses}", f"a frame after key press {presses}", 60)
        n = browser.evaluate("stats.frames")
        browser.key(code, False)
        browser.wait(f"stats.frames >= {n + 3}", "3 frames after a key release", 60)
    f1, b1, t1, lat = browser.evaluate("[stats.frames, stats.bytes, performance.now(), stats.latencies]")
    return dict(fps=(f1 - f0) / ((t1 - t0) / 1000), kib=(b1 - b0) / (f1 - f0) / 1024, presses=presses,
                median=np.median(lat), p90=np.percentile(lat, 90), max=max(lat))  # fmt: skip


def main(cfg):
    import random

    from chromium import Chromium, find_chromium

    binary = find_chromium(cfg.chromium)
    if binary is None:
        utils.die(f"--chromium {cfg.chromium or 'chromium'}: not found (Debian: apt-get install chromium)")
    formats = cfg.formats.split(",")
    if set(formats) - {"raw", "png"} or cfg.rounds < 1 or cfg.seconds <= 0:
        utils.die(f"--formats {cfg.formats}: expected raw, png or both, comma-separated; --rounds >= 1, --seconds > 0")
    rng, rows = random.Random(cfg.seed), []
    with Chromium(binary) as browser:
        print(f"{browser.evaluate('navigator.userAgent')}, {os.cpu_count()} CPUs", flush=True)
        for i, fmt in enumerate(formats * cfg.rounds):
            server, url = start_server(["--frame-format", fmt, *shlex.split(cfg.play_args)])
            try:
                rows.append(dict(format=fmt, **measure(browser, url, cfg.seconds, rng)))
                if cfg.screenshot and i == len(formats) * cfg.rounds - 1:
                    browser.screenshot(cfg.screenshot, "body")
                    print(f"wrote {cfg.screenshot}")
            finally:
                server.send_signal(signal.SIGTERM)
                server.communicate(timeout=60)
            print(" ".join(f"{k} {utils.fmt(v)}" for k, v in rows[-1].items()), flush=True)
    print("frames/s in the browser; KiB a frame; key-to-frame latency in ms (keydown to the frame drawn)")
    print("format  frames/s  KiB/frame  presses  median     p90     max")
    for r in rows:
        print(f"{r['format']:>6} {r['fps']:9.4g} {r['kib']:10.4g} {r['presses']:8d} {r['median']:7.4g} {r['p90']:7.4g} "
              f"{r['max']:7.4g}")  # fmt: skip


if __name__ == "__main__":
    main(utils.parse_config(BenchConfig, description=BenchConfig.__doc__))
