"""A headless Chromium driven over the DevTools protocol, with nothing but a websocket: open a page, press
keys, evaluate JavaScript, take screenshots. tests/test_browser.py and the bench of play_web.py use it.

    with Chromium(find_chromium()) as browser:
        browser.open("http://127.0.0.1:8000/")
        browser.wait("stats.frames >= 30", "30 frames")
        browser.key("ArrowUp", True)
        browser.screenshot("page.png")

Debian's chromium (apt-get install chromium; .ci/run installs it). Run as root it needs --no-sandbox; the
other flags keep it from calling home (no updates, sync, QUIC or background requests) and from slowing a
page it thinks is in the background. Each instance gets a fresh profile, deleted on close.
"""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import utils

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--no-proxy-server",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio",
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding", "--window-size=640,800",
    "--remote-debugging-port=0",
]  # fmt: skip
KEY_CODES = {"ArrowUp": ("ArrowUp", 38), "ArrowDown": ("ArrowDown", 40), "ArrowLeft": ("ArrowLeft", 37),
             "ArrowRight": ("ArrowRight", 39), "Space": (" ", 32), "KeyR": ("r", 82), "KeyP": ("p", 80)}  # fmt: skip


def find_chromium(path=""):
    """The Chromium to drive: `path`, else Debian's chromium (or chromium-browser, google-chrome) on PATH; None."""
    for name in [path] if path else ["chromium", "chromium-browser", "google-chrome"]:
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless Chromium with a fresh profile, driven over its DevTools websocket: open a page, press
    keys, evaluate JavaScript, take screenshots. `with Chromium(path) as browser:` removes it all after."""

    def __init__(self, binary, timeout=60):
        from websockets.sync.client import connect

        self.dir, self.timeout, self.id, self.session = tempfile.mkdtemp(prefix="chromium-"), timeout, 0, None
        self.exit = contextlib.ExitStack()  # the DevTools websocket, once open
        self.log = open(os.path.join(self.dir, "log.txt"), "w+")
        profile = os.path.join(self.dir, "profile")
        argv = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
        env = {**os.environ, "TMPDIR": self.dir}  # its singleton socket's folder goes too, on close
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env)
        try:
            # Chromium writes its port and the browser's websocket path once it listens: wait for that file
            port_file, deadline = os.path.join(profile, "DevToolsActivePort"), time.monotonic() + timeout
            while len(lines := self._read(port_file).split()) < 2:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{binary} did not start its DevTools within {timeout} s: {self._log()}")
                time.sleep(0.05)
            url = f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            self.ws = self.exit.enter_context(connect(url, max_size=None, proxy=None, open_timeout=timeout))
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    def _log(self):
        return self._read(self.log.name)[-2000:]

    def call(self, method, **params):
        """One DevTools command -> its result (events in between are dropped)."""
        self.id += 1
        msg = {"id": self.id, "method": method, "params": params}
        self.ws.send(json.dumps(msg | ({"sessionId": self.session} if self.session else {})))
        while True:
            reply = json.loads(self.ws.recv(timeout=self.timeout))
            if reply.get("id") == self.id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('exception', r['exceptionDetails'])}")
        return r["result"].get("value")

    def wait(self, expression, what, timeout=120):
        """Wait for an event in the page: until `expression` is truthy -> its value; a timeout names `what`."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                page = self.evaluate("document.body ? document.body.innerText : ''")
                raise TimeoutError(f"no {what} within {timeout} s; the page says: {page!r}")
            time.sleep(0.02)
        return value

    def open(self, url):
        """Load the game's page at `url` (the page before it is gone once this returns)."""
        self.call("Page.navigate", url=url)
        ready = (
            f"location.href === {json.dumps(url)} && window.stats !== undefined && document.readyState === 'complete'"
        )
        self.wait(ready, f"the page at {url}", 60)

    def key(self, code, down):
        """Press (down) or release a key, by its KeyboardEvent.code: ArrowUp, ArrowDown, Space, KeyR, KeyP."""
        key, vk = KEY_CODES[code]
        self.call("Input.dispatchKeyEvent", type="keyDown" if down else "keyUp", key=key, code=code,
                  windowsVirtualKeyCode=vk)  # fmt: skip

    def screenshot(self, path, selector=None):
        """Save the page (or the element at `selector`) as a PNG, atomically."""
        import base64

        kw = {}
        if selector:
            r = self.evaluate(f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
            r = json.loads(r)
            kw["clip"] = dict(x=r["x"], y=r["y"], width=r["width"], height=r["height"], scale=1)
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png", **kw)["data"])
        utils._atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(png))

    def close(self):
        self.exit.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
