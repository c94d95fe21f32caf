"""play.py: headless runs on a tiny random model, recordings that generate.py replays frame for frame,
the emulator beside the model, Ctrl-C saving the game, the keys mapped from a game's action names (Pong,
Breakout, Freeway, the full 18), and one-line errors."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import games
import pong
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One intra-op thread: a tiny model gains nothing from more, and on a busy 2-core machine
# OpenMP threads waiting on each other made these runs 20x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, check=True, timeout=120):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert r.returncode == 0, f"{args} failed:\n{r.stdout}\n{r.stderr}"
    return r


def play(tiny, *args, **kw):
    return run("play.py", "--ckpt", str(tiny / "dit.pt"), "--prompt", str(tiny / "prompt.png"), *args, **kw)


def replay(tiny, out, actions, seed, steps, frames, slide, prompt=None):
    run("generate.py", "--ckpt", str(tiny / "dit.pt"), "--prompt", str(prompt or tiny / "prompt.png"),
        "--actions", str(actions), "--seed", str(seed), "--steps", str(steps), "--frames", str(frames),
        "--slide", slide, "--out", str(out))  # fmt: skip
    return np.load(out)["frames"]


def test_headless_prints_frames_per_second(tiny):
    r = play(tiny, "--headless", "--frames", "5", "--steps", "2")
    assert "played 5 frames at" in r.stdout and "frames/s (cpu, steps 2)" in r.stdout, r.stdout


@pytest.mark.parametrize("slide", ["chunk", "exact"])  # generate.py's default, and another
def test_record_replays_through_generate(tiny, tmp_path, slide):
    out = tmp_path / "game.mp4"
    args = ["--frames", "8", "--steps", "2", "--seed", "3", "--slide", slide, "--policy", "random"]
    play(tiny, "--headless", *args, "--record", str(out))  # 8 frames: the 4-frame window moves several times
    assert out.stat().st_size > 0 and (tmp_path / "game.prompt.png").is_file()
    actions = torch.load(tmp_path / "game.actions.pt", weights_only=True)
    assert actions.dtype == torch.int64 and actions.shape == (8,) and len(set(actions.tolist())) > 1
    rec = np.load(tmp_path / "game.npz")
    played = rec["frames"]
    assert played.shape == (9, 32, 32, 3) and played.dtype == np.uint8
    assert np.array_equal(rec["actions"], actions.numpy())
    again = replay(tiny, tmp_path / "replay.npz", tmp_path / "game.actions.pt", 3, 2, 9, slide)
    assert np.array_equal(again, played)
    # the equality means something: other actions, or another seed, give other frames
    from engine import ModelConfig, load_world_model, read_prompt

    prompt = read_prompt(str(tiny / "prompt.png"), 32)
    assert np.array_equal(read_prompt(str(tmp_path / "game.prompt.png"), 32), prompt)  # a self-contained recording
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed, a in ((3, (actions + 1) % pong.NUM_ACTIONS), (4, actions)):
            engine = load_world_model(ModelConfig(ckpt=str(tiny / "dit.pt"), steps=2, seed=seed, slide=slide), "cpu")
            assert not np.array_equal(engine.rollout(prompt, a), played)
    finally:
        torch.set_num_threads(threads)


def test_restart_replays_the_same_game(tiny):
    """R: the model starts again from the prompt with the seed's noise, so each game replays on its own."""
    import play
    from engine import ModelConfig, load_world_model, read_prompt

    engine = load_world_model(ModelConfig(ckpt=str(tiny / "dit.pt"), steps=1, seed=7), "cpu")
    game = play.Game(engine, read_prompt(str(tiny / "prompt.png"), 32), keep=True)
    keys = [2, 3, 0, 1, 5, 4, 2]
    for a in keys:
        game.step(a)
    first = np.stack(game.frames)
    game.restart()
    assert game.number == 2 and game.actions == [] and len(game.frames) == 1
    for a in keys:
        game.step(a)
    assert np.array_equal(np.stack(game.frames), first)
    game.restart()
    for a in keys[:3] + [0] * 4:  # and it does depend on the keys
        game.step(a)
    assert not np.array_equal(np.stack(game.frames), first)


def test_file_policy_plays_the_recorded_keys(tiny, tmp_path):
    torch.save(torch.tensor([2, 3, 3, 0]), tmp_path / "keys.pt")
    play(
        tiny,
        "--headless",
        "--frames",
        "4",
        "--policy",
        f"file:{tmp_path / 'keys.pt'}",
        "--record",
        str(tmp_path / "g.npz"),
    )
    assert torch.load(tmp_path / "g.actions.pt", weights_only=True).tolist() == [2, 3, 3, 0]
    assert not (tmp_path / "g.mp4").exists()


def test_compare_runs_the_emulator_beside_the_model(tiny, tmp_path):
    pytest.importorskip("ale_py")
    r = play(tiny, "--compare", "--headless", "--frames", "3", "--steps", "1", "--record", str(tmp_path / "c.mp4"))
    assert "played 3 frames" in r.stdout
    rec = np.load(tmp_path / "c.npz")
    assert rec["real"].shape == rec["frames"].shape == (4, 32, 32, 3)
    assert np.array_equal(rec["real"][0], rec["frames"][0])  # the model starts from the emulator's first frame
    assert rec["real"][1:].std() > 0


def test_compare_plays_the_models_game(tiny_breakout, tmp_path):
    """The emulator runs the game the checkpoint names, as the recorder does (max-pooled but in Pong); a game ALE
    does not know is a one-line error."""
    pytest.importorskip("ale_py")
    import games

    play(tiny_breakout, "--compare", "--headless", "--frames", "2", "--steps", "1", "--seed", "5",
         "--record", str(tmp_path / "c.npz"))  # fmt: skip
    env = games.AtariEnv("ALE/Breakout-v5", frameskip=4, max_pool=True)
    first = utils.resize_frame(env.reset(seed=5)[0], 32)
    real = [first] + [utils.resize_frame(env.step(a)[0], 32) for a in torch.load(tmp_path / "c.actions.pt")]
    env.close()
    assert np.array_equal(np.load(tmp_path / "c.npz")["real"], np.stack(real))
    ck = torch.load(tiny_breakout / "dit.pt", weights_only=True)
    ck["config"]["game"] = "nosuchgame"
    torch.save(ck, tmp_path / "dit.pt")
    (tmp_path / "vae.pt").symlink_to(tiny_breakout / "vae.pt")
    r = run("play.py", "--ckpt", str(tmp_path / "dit.pt"), "--compare", "--headless", "--frames", "1", check=False)
    assert r.returncode != 0 and r.stderr.startswith("error: --compare: the model's game: unknown game 'nosuchgame'")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_the_game(tiny, tmp_path, sig, read_until):
    args = ["play.py", "--ckpt", str(tiny / "dit.pt"), "--prompt", str(tiny / "prompt.png"), "--headless",
            "--frames", "100000", "--steps", "1", "--record", str(tmp_path / "k.npz")]  # fmt: skip
    env = {**ENV, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    try:
        # wait for events, not for time: "played 1 frames" comes after the first frame, on any machine
        seen = read_until(p, p.stdout, r"played 1 frames")
        assert "playing" in seen
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert f"interrupted ({sig.name})" in out and "Traceback" not in err
    n = len(torch.load(tmp_path / "k.actions.pt", weights_only=True))
    assert n > 0 and np.load(tmp_path / "k.npz")["frames"].shape[0] == n + 1


FULL = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE",
        "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE"]  # fmt: skip


def spell(game, names):
    """-> f("up", "space", ...) = the action name those keys give in that game (games.KeyMap)."""

    keymap = games.KeyMap(game, names)
    return lambda *keys: names[keymap(tuple(k.lower() in keys for k in games.KEYS))]


def test_keys_map_to_pong_actions(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    import play

    name = spell("pong", pong.ACTION_NAMES)
    assert name() == "NOOP" and name("space") == "FIRE"
    assert name("up") == "RIGHT" and name("down") == "LEFT"  # up = RIGHT = paddle up
    assert name("up", "space") == "RIGHTFIRE" and name("down", "space") == "LEFTFIRE"
    assert name("up", "down") == "NOOP" and name("up", "down", "space") == "FIRE"
    assert name("left") == name("right") == "NOOP" and name("up", "left") == "RIGHT"  # Left/Right do nothing here
    keymap = games.KeyMap("pong", pong.ACTION_NAMES)
    assert keymap.keys_text() == "Up: RIGHT  Down: LEFT  Space: FIRE"
    assert "RIGHTFIRE: Up+Space" in keymap.actions_text() and "NOOP: no key" in keymap.actions_text()
    screen = play.Screen(1, 32, 2, headless=True)
    pg = screen.pg
    for key in (pg.K_UP, pg.K_RIGHT, pg.K_SPACE, pg.K_p):  # taps between two frames still count
        pg.event.post(pg.event.Event(pg.KEYDOWN, key=key))
    commands, keys = screen.poll()
    assert commands == ["pause"] and keys == (True, False, False, True, True)  # (up, down, left, right, fire)
    pg.event.post(pg.event.Event(pg.KEYDOWN, key=pg.K_ESCAPE))
    assert screen.poll()[0] == ["quit"]
    pg.display.quit()


def test_keys_map_to_any_games_actions():

    breakout = spell("breakout", ["NOOP", "FIRE", "RIGHT", "LEFT"])
    assert [breakout(), breakout("space"), breakout("right"), breakout("left")] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert breakout("up", "space") == "FIRE" and breakout("down", "left") == "LEFT"  # no UP/DOWN: the rest still acts
    assert breakout("right", "space") == "FIRE" and breakout("up") == breakout("left", "right") == "NOOP"  # Space fires
    keys_text = games.KeyMap("breakout", ["NOOP", "FIRE", "RIGHT", "LEFT"]).keys_text()
    assert keys_text == "Left: LEFT  Right: RIGHT  Space: FIRE"  # Up and Down do nothing: not shown
    freeway = spell("freeway", ["NOOP", "UP", "DOWN"])
    assert [freeway("up"), freeway("down"), freeway("space"), freeway("left")] == ["UP", "DOWN", "NOOP", "NOOP"]
    assert freeway("up", "space") == "UP" and freeway("down", "right", "space") == "DOWN"
    assert games.KeyMap("freeway", ["NOOP", "UP", "DOWN"]).keys_text() == "Up: UP  Down: DOWN"
    full = spell("boxing", FULL)
    assert full("up", "right", "space") == "UPRIGHTFIRE" and full("down", "left") == "DOWNLEFT"
    assert full("left", "space") == "LEFTFIRE" and full("up", "down", "right") == "RIGHT"  # opposites cancel
    assert full("up", "down", "left", "right") == "NOOP" and full("up", "down", "left", "right", "space") == "FIRE"
    assert set(games.KeyMap("boxing", FULL).table.values()) == set(range(18))  # every action has its keys
    # some combinations missing: the fewest keys dropped, Space kept first, then Up/Down over Left/Right
    some = spell("some", ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "RIGHTFIRE", "DOWNRIGHT"])
    assert some("up", "right", "space") == "RIGHTFIRE" and some("down", "right", "space") == "RIGHTFIRE"
    assert some("down", "right") == "DOWNRIGHT"
    assert some("up", "left", "space") == "FIRE" and some("up", "right") == "UP" and some("down", "space") == "FIRE"
    # Pong's aliases are Pong's: another game with Pong's action names moves with Left/Right
    assert spell("other", pong.ACTION_NAMES)("up") == "NOOP" and spell("other", pong.ACTION_NAMES)("right") == "RIGHT"


def test_a_game_that_is_not_pong(tiny, tiny_breakout, tmp_path):
    """A Breakout model: the mapping printed, its keys' actions played, --policy over its 4 actions, errors."""
    r = play(tiny_breakout, "--headless", "--frames", "6", "--steps", "1", "--policy", "random", "--record",
             str(tmp_path / "b.npz"))  # fmt: skip
    assert "breakout: Left: LEFT  Right: RIGHT  Space: FIRE; every action: NOOP: no key  FIRE: Space" in r.stdout
    actions = torch.load(tmp_path / "b.actions.pt", weights_only=True).tolist()
    assert len(actions) == 6 and max(actions) <= 3 and len(set(actions)) > 1
    assert "pong: Up: RIGHT  Down: LEFT  Space: FIRE;" in play(tiny, "--headless", "--frames", "1").stdout
    torch.save(torch.tensor([3, 5]), tmp_path / "six.pt")  # Pong's LEFTFIRE: no such action in Breakout
    for args, why in ((["--policy", "up"], "the Up arrow does nothing in this game"),
                      (["--policy", f"file:{tmp_path / 'six.pt'}"], "must be in [0, 4)")):  # fmt: skip
        r = play(tiny_breakout, "--headless", "--frames", "1", *args, check=False)
        assert r.returncode != 0 and r.stderr.startswith("error:") and why in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_errors_are_one_line(tiny, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for args in (["--ckpt", str(tmp_path / "missing.pt")], ["--prompt", str(bad)], ["--policy", "sideways"]):
        r = run("play.py", "--ckpt", str(tiny / "dit.pt"), "--headless", "--frames", "1", *args, check=False)
        assert r.returncode != 0 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("taken_back", [False, True], ids=["inherited-ignored", "ignored-then-taken-back"])
def test_an_ignored_sigint_stays_ignored_and_tests_take_it_back(taken_back):
    """The cause of the old flake: a `make test` started in the background hands every child an ignored
    SIGINT, which Python keeps through exec, so Ctrl-C never reached play.py. Interrupts.install keeps
    it ignored as Python does; a parent that calls utils.take_back_sigint (conftest.py, stress.py)
    gives its children the default again. The ignored start is made here as a shell makes it: ignore,
    then exec."""
    code = "import signal, utils; utils.INTERRUPTS.install(); print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    argv = [sys.executable, "-c", code]
    if taken_back:  # a parent started ignoring SIGINT takes it back, then starts the child
        parent = "import subprocess, sys, utils; utils.take_back_sigint(); subprocess.run(sys.argv[1:], check=True)"
        argv = [sys.executable, "-c", parent, *argv]
    shell = "import os, signal, sys; signal.signal(2, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", shell, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.stdout.strip() == str(not taken_back), r.stderr
