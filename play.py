"""Play an Atari game inside the world model: every frame on screen is generated, driven live by your keys.

With the bundled model (Pong; CPU is fine; a window opens):
    python play.py
Faster / bigger, on one GPU:
    python play.py --device cuda --steps 2 --fps 30 --scale 8
Another game's model (the checkpoint names its game and actions; the prompt defaults to its sample_data/GAME/):
    python play.py --ckpt checkpoints/breakout_dit.pt                # the bundled Breakout model
    python play.py --ckpt runs/mine/ckpt.pt --prompt data/mine/episode_00000.npz
Record a game, then replay its keys through generate.py (it prints the exact command; same prompt,
seed, steps, --context-noise and --slide give the same frames, bit for bit):
    python play.py --record runs/game.mp4          # also runs/game.actions.pt, runs/game.npz, runs/game.prompt.png
    python generate.py --prompt runs/game.prompt.png --actions runs/game.actions.pt --frames <T+1> --out replay.npz
The real emulator (left) beside the model (right), both fed your keys, the model started from the emulator's frame:
    python play.py --compare
No display (CPU smoke run; prints frames/s):
    python play.py --headless --frames 100 --policy random
In a web browser (a headless server too: it prints the URL; from afar, ssh -L 8000:localhost:8000 host):
    python play.py --serve
    python play.py --serve --port 8001 --record runs/web.mp4     # the server and page: play_web.py

Controls: the arrows and Space (FIRE), mapped from the game's action names (games.KeyMap): the keys held spell
UP/DOWN + RIGHT/LEFT + FIRE (opposite arrows cancel; UPRIGHTFIRE where the game has it), and where the game
lacks that action, the longest one spelled by fewer of the keys, Space kept first (Breakout has no UP and
no RIGHTFIRE: Up+Space and Right+Space fire); no key = NOOP. Pong has no UP or DOWN: there Up = RIGHT (the
paddle goes up), Down = LEFT, and Left/Right do nothing. The window, the page and the start-up line show what
each key does. R restarts from the prompt, P pauses, Esc quits.
With --record, R saves the game so far and the next goes to OUT_2.mp4, OUT_3.mp4, ...; every
game restarts the model's noise from --seed, so each one replays on its own.
Actions follow the recorder's convention: actions[k] is the key state after frame k,
and leads to frame k+1. A key tapped between two frames still counts for the next one.
"""

import dataclasses
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

import games
import utils
from engine import THREADS_HELP, ModelConfig, load_world_model, read_actions, read_prompt, sample_path, set_threads
from utils import arg

COMMANDS = "R: restart   P: pause   Esc: quit"
POLICIES = "auto | keys | random | up | down | noop | file:ACTIONS.pt"


@dataclass
class PlayConfig(ModelConfig):
    prompt: str = arg(
        "", "prompt frame: a PNG/JPG or .npz (its last frame is used); default: the model's game's sample_data"
    )
    seed: int = arg(0, "random seed (the model's noise, --policy random, the emulator)")
    fps: int = arg(
        -1,
        "target frame rate: the game runs as fast as the model allows, up to this; -1: 15 (Pong's own pace) "
        "in a window, 30 with --serve; 0 or --headless: no cap",
    )
    scale: int = arg(6, "window (and recorded video) upscaling of the model's frames")
    record: str = arg("", "save each game as OUT.mp4 (.gif, .npz) + OUT.actions.pt + OUT.npz + OUT.prompt.png")
    compare: bool = arg(False, "run the real ALE emulator (left) beside the model (right), fed the same keys")
    headless: bool = arg(False, "no display: scripted --policy actions for --frames frames, then print frames/s")
    frames: int = arg(0, "stop after this many generated frames (0: play until Esc; required with --headless)")
    policy: str = arg("auto", f"who plays: {POLICIES}; auto = keys in a window, random when --headless")
    screenshot: str = arg("", "save the window as this PNG when the game stops (after --frames, or on Esc)")
    threads: int = arg(0, THREADS_HELP)
    serve: bool = arg(False, "play in a web browser: serve the game's page at --host:--port instead of a window")
    host: str = arg("127.0.0.1", "--serve: the address to listen on (0.0.0.0: every interface, with a warning)")
    port: int = arg(8000, "--serve: the port (0: any free one; the URL is printed)")
    frame_format: str = arg(
        "png",
        "--serve: frames as PNG (~6 KiB) or raw RGB (27 KiB), as fast here (docs/browser.md)",
        choices=["png", "raw"],
    )


def make_policy(spec, seed, keymap):
    """A scripted player for --policy: frame index -> action index; None for the keyboard."""
    if spec == "keys":
        return None
    if spec == "random":
        rng = np.random.default_rng(seed)
        return lambda k: int(rng.integers(len(keymap.names)))
    if spec == "noop":
        return lambda k: keymap.noop
    if spec in ("up", "down"):  # what the arrow does in this game
        a = keymap.key(spec.capitalize())
        if a == keymap.noop:
            utils.die(f"--policy {spec}: the {spec.capitalize()} arrow does nothing in this game (actions: "
                      f"{', '.join(keymap.names)})")  # fmt: skip
        return lambda k: a
    if spec.startswith("file:"):
        path = spec[len("file:") :]
        if not os.path.isfile(path):
            utils.die(f"--policy {spec}: no such file")
        actions = read_actions(path, len(keymap.names)).tolist()
        if not actions:
            utils.die(f"--policy {spec}: the file holds no actions")
        return lambda k: actions[k % len(actions)]  # repeated to any length, as generate.py does
    utils.die(f"--policy {spec!r}: expected one of {POLICIES}")


def make_env(engine):
    """The model's real game, as the recorder plays it (frameskip 4, sticky actions off, max-pool but in Pong)."""
    try:
        import games

        env = games.AtariEnv(games.resolve(engine.game)[1], frameskip=4, sticky=0.0, max_pool=engine.game != "pong")
    except ImportError:
        utils.die("--compare needs the emulator: pip install gymnasium ale-py")
    except ValueError as e:
        utils.die(f"--compare: the model's game: {e}")
    if env.action_names != engine.action_names:
        env.close()
        utils.die(f"--compare: the emulator's {engine.game} has the actions {env.action_names}, the model's are "
                  f"{engine.action_names}")  # fmt: skip
    return env


class Game:
    """One game: the model's frames (with --compare, the emulator's beside them) and the actions taken."""

    def __init__(self, engine, prompt, env=None, seed=0, keep=False):
        self.engine, self.prompt, self.env, self.seed, self.keep = engine, prompt, env, seed, keep
        self.number = 0
        self.restart()

    def restart(self):
        self.number += 1
        # Each game draws the same noise as a fresh WorldModel, so generate.py replays it from --seed.
        self.engine.gen.manual_seed(self.seed)
        start, self.real = self.prompt, None
        if self.env is not None:
            obs, _ = self.env.reset(seed=self.seed if self.number == 1 else None)
            start = utils.resize_frame(obs, self.engine.frame_size)[None]  # (1, H, W, 3), as the recorder stores it
            self.real = [start[0]]
        self.engine.reset(start[None])  # (B=1, n=1, H, W, 3)
        self.frames, self.actions, self.over = [start[0]], [], False
        self.real_ahead = deque()  # emulator frames whose model frame is still decoding

    def step(self, action):
        """-> whether a model frame was added: it arrives one step late, its decode overlapping the next DiT step."""
        added = self.add(self.engine.step_pipelined(torch.tensor([action], device=self.engine.device)))
        self.actions.append(action)
        if self.env is not None:
            obs, _, terminated, truncated, _ = self.env.step(action)
            self.real_ahead.append(utils.resize_frame(obs, self.engine.frame_size))
            self.over = terminated or truncated
        if not self.keep:  # the whole game is kept only when recording
            del self.frames[:-1]
            if self.real is not None:
                del self.real[:-1]
        return added

    def add(self, frame):
        """A decoded model frame (1, H, W, 3), with the emulator frame of the same step."""
        if frame is not None:
            self.frames.append(frame[0].cpu().numpy())
            if self.real is not None:
                self.real.append(self.real_ahead.popleft())
        return frame is not None

    def finish(self):
        """Wait for the frame still decoding, so the game is complete (before it is saved) -> whether there was one."""
        return self.add(self.engine.flush())

    def panels(self):
        """The latest frames to show, left to right: (emulator,) model."""
        return ([self.real[-1]] if self.real is not None else []) + [self.frames[-1]]


def save_game(game, cfg):
    """Write a game as played: OUT.actions.pt (replayable with generate.py), OUT.npz, OUT.prompt.png, and
    the video, which is encoded on a thread (returned, or None) so that R does not freeze the window."""
    game.finish()
    del game.actions[len(game.frames) - 1 :]  # an action whose frame an interrupt cut off
    if not game.actions:
        return None
    root, ext = os.path.splitext(cfg.record)
    if game.number > 1:
        root = f"{root}_{game.number}"
    frames = np.stack(game.frames)  # (T+1, H, W, 3), the prompt first
    actions = torch.tensor(game.actions, dtype=torch.long)  # (T,), actions[k] leads from frame k to k+1
    arrays = {"frames": frames, "actions": actions.numpy()}
    video = frames
    if game.real is not None:
        arrays["real"] = np.stack(game.real)
        video = np.concatenate([arrays["real"], frames], axis=2)  # real left, model right
    # The small, exact files first: an interrupted video encode loses nothing else.
    utils.atomic_torch_save(actions, root + ".actions.pt")
    utils.atomic_savez(root + ".npz", **arrays)
    import cv2

    utils._atomic(root + ".prompt.png", lambda tmp: cv2.imwrite(tmp, cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR)))
    print(f"wrote {root}.actions.pt, {root}.npz, {root}.prompt.png: {len(frames)} frames")
    flags = f"--steps {cfg.steps} --context-noise {cfg.context_noise} --slide {cfg.slide} "
    flags += f"--guidance {cfg.guidance} --seed {cfg.seed}"
    print(
        f"replay: python generate.py --ckpt {cfg.ckpt} --prompt {root}.prompt.png --actions {root}.actions.pt "
        f"{flags} --frames {len(frames)} --out replay.npz"
    )
    if ext == ".npz":
        return None

    # Not a daemon: even after Ctrl-C the interpreter waits for the video; the atomic write leaves no half file.
    def encode():
        utils.write_video(root + ext, video, cfg.fps or 15, cfg.scale)
        print(f"wrote {root}{ext}")

    writer = threading.Thread(target=encode)
    writer.start()
    return writer


def new_game(game, cfg, writers):
    """R, a game over or (served) a new player: save the game so far when recording, then start from the prompt."""
    if cfg.record:
        writers.append(save_game(game, cfg))
    game.restart()


class Screen:
    """The pygame window (SDL's dummy driver with --headless): game panels scaled up, over a status bar."""

    def __init__(self, n_panels, size, scale, headless, labels=(), title="GameNGen-Mini", controls=(COMMANDS,)):
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        if headless:
            os.environ["SDL_VIDEODRIVER"] = "dummy"
        import pygame

        self.pg, self.labels, self.title, self.controls = pygame, labels, title, list(controls)
        self.panel_w, self.game_h = size * scale, size * scale
        width = n_panels * self.panel_w
        no_window = "no display to open a window on: set DISPLAY, or use --headless"
        chosen = os.environ.get("SDL_VIDEODRIVER")
        if not (headless or chosen or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            if sys.platform.startswith("linux"):
                utils.die(no_window)
        try:
            pygame.display.init()
        except pygame.error as e:
            utils.die(f"cannot open a window ({e}): set DISPLAY, or use --headless")
        if not (headless or chosen) and pygame.display.get_driver() in ("offscreen", "dummy"):
            utils.die(no_window)  # SDL's fallback: an invisible window nobody could play in
        self.font = self._fit_font(self.controls + ["99.9 frames/s (model 99.9/s)  DOWNRIGHTFIRE"], width - 8)
        bar = (1 + len(self.controls)) * self.font.get_linesize() + 6 if self.font else 0
        try:
            self.surface = pygame.display.set_mode((width, self.game_h + bar))
        except pygame.error as e:
            utils.die(f"cannot open a window ({e}): set DISPLAY, or use --headless")
        pygame.display.set_caption(" | ".join([title] + self.controls))
        self.shown = 0

    def _fit_font(self, lines, width):
        """The largest default font up to 18 px in which every line fits; None when fonts are unavailable."""
        try:
            self.pg.font.init()
            for px in range(18, 9, -1):
                font = self.pg.font.Font(None, px)
                if max(font.size(s)[0] for s in lines) <= width:
                    break
            return font
        except Exception:  # pygame without SDL_ttf, or no default font: the caption carries the text
            return None

    def poll(self):
        """-> (commands in order, (up, down, left, right, fire)): a key held now or tapped since the last poll."""
        pg = self.pg
        commands, tapped = [], set()
        for e in pg.event.get():
            if e.type == pg.QUIT:
                commands.append("quit")
            elif e.type == pg.KEYDOWN:
                tapped.add(e.key)
                command = {pg.K_ESCAPE: "quit", pg.K_r: "restart", pg.K_p: "pause"}.get(e.key)
                if command:
                    commands.append(command)
        held, keys = pg.key.get_pressed(), (pg.K_UP, pg.K_DOWN, pg.K_LEFT, pg.K_RIGHT, pg.K_SPACE)  # games.KEYS' order
        return commands, tuple(bool(held[k]) or k in tapped for k in keys)

    def draw(self, panels, status):
        pg = self.pg
        img = np.ascontiguousarray(np.concatenate(panels, axis=1).swapaxes(0, 1))  # (W, H, 3), as pygame wants
        game = pg.transform.scale(pg.surfarray.make_surface(img), (len(panels) * self.panel_w, self.game_h))
        self.surface.fill((0, 0, 0))
        self.surface.blit(game, (0, 0))
        if self.font:
            for i, label in enumerate(self.labels):
                self.surface.blit(self.font.render(label, True, (255, 255, 255), (0, 0, 0)), (i * self.panel_w + 3, 3))
            for i, line in enumerate([status] + self.controls):
                text = self.font.render(line, True, (230, 230, 230))
                self.surface.blit(text, (4, self.game_h + 3 + i * self.font.get_linesize()))
        elif self.shown % 15 == 0:  # no fonts: the frame rate goes in the caption
            pg.display.set_caption(" | ".join([self.title, status] + self.controls))
        pg.display.flip()
        self.shown += 1

    def save(self, path):
        self.pg.image.save(self.surface, path)


# -----------------------------------------------------------------------------


def main(cfg):
    # Ctrl-C and SIGTERM (`kill`) end the game between two frames, so the recording is saved whole.
    stop = utils.INTERRUPTS.install()
    device = utils.pick_device(cfg.device)
    if cfg.headless and cfg.frames < 1:
        utils.die(f"--headless needs --frames N (N >= 1), found {cfg.frames}")
    if cfg.frames < 0 or cfg.fps < -1 or cfg.scale < 1 or cfg.steps < 1:
        utils.die("--frames must be >= 0, --fps >= -1, --scale and --steps >= 1")
    if cfg.serve and (cfg.headless or cfg.compare or cfg.screenshot or cfg.policy not in ("auto", "keys")):
        utils.die("--serve is played with the browser's keys: drop --headless, --compare, --screenshot and --policy")
    if cfg.serve and not 0 <= cfg.port <= 65535:
        utils.die(f"--port {cfg.port}: expected 0..65535 (0: any free port)")
    if cfg.fps == -1:  # the default: Pong's own pace in a window, a 30 Hz tick in the browser
        cfg = dataclasses.replace(cfg, fps=30 if cfg.serve else 15)
    if cfg.record and os.path.splitext(cfg.record)[1].lower() not in (".mp4", ".gif", ".npz"):
        utils.die(f"--record {cfg.record}: use a .mp4, .gif or .npz file name")
    if cfg.screenshot and not cfg.screenshot.lower().endswith(".png"):
        utils.die(f"--screenshot {cfg.screenshot}: use a .png file name")
    policy_spec = ("random" if cfg.headless else "keys") if cfg.policy == "auto" else cfg.policy
    if cfg.headless and policy_spec == "keys":
        utils.die("--policy keys needs a window: drop --headless, or pick a scripted policy")
    utils.seed_everything(cfg.seed)

    set_threads(cfg.threads, device)
    engine = load_world_model(cfg, device)
    keymap = games.KeyMap(engine.game, engine.action_names)
    policy = make_policy(policy_spec, cfg.seed, keymap)
    print(f"{engine.game}: {keymap.keys_text()}; every action: {keymap.actions_text()}", flush=True)
    size = engine.frame_size
    prompt = None if cfg.compare else read_prompt(cfg.prompt or sample_path(engine.game, "prompt"), size)[-1:]
    env = make_env(engine) if cfg.compare else None
    game = Game(engine, prompt, env, cfg.seed, keep=bool(cfg.record))
    if cfg.serve:  # the browser is the screen
        import play_web

        return play_web.serve(cfg, game, keymap, stop)
    labels = ("emulator", "model") if cfg.compare else ()
    screen = Screen(2 if cfg.compare else 1, size, cfg.scale, cfg.headless, labels, f"GameNGen-Mini: {engine.game}",
                    [keymap.keys_text(), COMMANDS])  # fmt: skip
    clock = screen.pg.time.Clock()

    played, busy, paused, action = 0, 0.0, False, 0
    recent = deque(maxlen=30)  # timestamps of the latest frames shown: the achieved rate
    model_dt, writers = None, []  # writers: the threads encoding finished games' videos
    who = f"--policy {policy_spec}" if policy else "the keyboard"
    print(f"playing on {device} (steps {cfg.steps}, {size}x{size}), driven by {who}", flush=True)
    shown_at = None  # --headless prints its progress after the first frame, then every 5 s
    try:
        while not stop:
            commands, keys = screen.poll()
            if "quit" in commands:
                break
            if commands.count("pause") % 2:  # P pressed twice while the model was busy: no change
                paused = not paused
                recent.clear()
            if "restart" in commands or game.over:
                new_game(game, cfg, writers)
                recent.clear()
            if paused:
                screen.draw(game.panels(), "PAUSED (P to resume)")
                clock.tick(20)
                continue
            t0 = time.perf_counter()
            action = policy(played) if policy else keymap(keys)
            game.step(action)
            dt = time.perf_counter() - t0
            model_dt = dt if model_dt is None else 0.9 * model_dt + 0.1 * dt
            recent.append(time.perf_counter())
            rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
            status = f"{rate:.1f} frames/s (model {1 / model_dt:.1f}/s)  {engine.action_names[action]}"
            screen.draw(game.panels(), status)
            played += 1
            if cfg.headless and (shown_at is None or time.perf_counter() - shown_at > 5):
                shown_at = time.perf_counter()
                print(f"played {played} frames", flush=True)
            if not cfg.headless and cfg.fps:
                clock.tick(cfg.fps)  # the cap; headless runs flat out, so it measures the model
            busy += time.perf_counter() - t0
            if cfg.frames and played >= cfg.frames:
                break
    except KeyboardInterrupt:  # a second signal stops mid-frame; the game so far is still saved
        pass
    finally:  # Esc, window closed, --frames reached, Ctrl-C: the game so far is saved
        if cfg.record:
            writers.append(save_game(game, cfg))
        if cfg.screenshot:
            utils._atomic(cfg.screenshot, screen.save)
            print(f"wrote {cfg.screenshot}")
        if env is not None:
            env.close()
        for w in filter(None, writers):
            w.join()
    if stop:
        print(f"interrupted ({stop.name})")
    print(f"played {played} frames at {played / max(busy, 1e-9):.1f} frames/s ({device}, steps {cfg.steps})")


if __name__ == "__main__":
    main(utils.parse_config(PlayConfig, description=__doc__.splitlines()[0]))
