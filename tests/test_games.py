"""Any Atari game (issue #28): the same scripts record, train, generate, evaluate and play Breakout and
Freeway; and a recording from any source (an .npz of frames and actions with a meta.json) trains without ALE."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import games  # noqa: E402

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TINY = ["--preset", "tiny", "--steps", "10", "--wandb", "disabled"]


def run(*args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_resolve_names_and_action_sets():
    assert games.resolve("Breakout") == games.resolve("ALE/Breakout-v5") == ("breakout", "ALE/Breakout-v5")
    assert games.resolve("space_invaders")[1] == games.resolve("SpaceInvaders")[1] == "ALE/SpaceInvaders-v5"
    with pytest.raises(ValueError, match="did you mean breakout"):
        games.resolve("brekout")
    assert games.action_meanings("ALE/Freeway-v5") == ["NOOP", "UP", "DOWN"]
    assert len(games.action_meanings("ALE/Boxing-v5")) == 18
    # checkpoints and recordings from before issue #28 are Pong's
    assert games.from_config({"env_id": "ALE/Pong-v5"})[1][2] == "RIGHT"
    assert games.from_config({"game": "freeway", "action_names": ["NOOP", "UP", "DOWN"]}) == (
        "freeway",
        ["NOOP", "UP", "DOWN"],
    )
    with pytest.raises(ValueError, match="action_names"):
        games.from_config({"game": "mine"})


def test_max_pool_keeps_flicker():
    """SpaceInvaders draws its shots on alternate frames: the max of the last two raw frames keeps more of them."""
    drawn = {}
    for pool in (False, True):
        env = games.AtariEnv("ALE/SpaceInvaders-v5", max_pool=pool)
        env.reset(seed=0)
        frames = [env.step(1)[0] for _ in range(60)]  # FIRE
        env.close()
        drawn[pool] = np.stack(frames).astype(np.int64).sum()
    assert drawn[True] > drawn[False]


def test_fire_after_reset_and_each_lost_life(tmp_path):
    """Breakout waits for FIRE after the reset and each lost life; the recorder presses it, so random play goes on."""
    run("generate_dataset.py", "--game", "breakout", "--agent", "random", "--episodes", "1", "--epsilon", "0",
        "--frame-size", "32", "--out", str(tmp_path / "b"))  # fmt: skip
    ep = np.load(tmp_path / "b" / "episode_00000.npz")
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["game"] == "breakout" and meta["action_names"] == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert meta["max_pool"] is True and ep["ball_returns"] == -1  # Pong's ball count: not Breakout's
    assert ep["terminated"] and 100 < len(ep["actions"]) < 2000  # the game ended: all 5 lives lost
    # replay the recorded actions: the action after the reset and after each lost life is FIRE (index 1)
    env = games.AtariEnv("ALE/Breakout-v5", max_pool=True)
    lives, serves = env.reset(seed=0)[1]["lives"], [0]
    for k, a in enumerate(ep["actions"]):
        info = env.step(int(a))[4]
        if info["lives"] < lives and k + 1 < len(ep["actions"]):
            serves.append(k + 1)
        lives = info["lives"]
    env.close()
    assert len(serves) == 5 and all(ep["actions"][k] == 1 for k in serves), serves


@pytest.mark.parametrize("game, n_actions", [("Breakout", 4), ("Freeway", 3)])
def test_tiny_end_to_end(tmp_path, game, n_actions):
    """Record, train the tiny VAE and DiT, generate, evaluate and play headless: the action count from the data."""
    data, vae, dit = (str(tmp_path / n) for n in ("data", "vae", "dit"))
    run("generate_dataset.py", "--game", game, "--agent", "random", "--episodes", "3", "--max-episode-frames", "60",
        "--frame-size", "32", "--out", data)  # fmt: skip
    run("train.py", "vae", *TINY, "--data", data, "--out", vae)
    run("train.py", "dit", *TINY, "--data", data, "--vae", vae, "--out", dit)
    ck = torch.load(os.path.join(dit, "ckpt.pt"), weights_only=True)
    names = ck["config"]["action_names"]
    assert ck["config"]["game"] == game.lower() and len(names) == ck["config"]["model"]["action_dim"] == n_actions
    assert torch.load(os.path.join(vae, "ckpt.pt"), weights_only=True)["config"]["game"] == game.lower()
    episode = os.path.join(data, "episode_00000.npz")
    p = run("generate.py", "--ckpt", dit, "--episode", episode, "--frames", "6", "--out", str(tmp_path / "g.npz"))
    assert f"{game.lower()}: actions 0=NOOP" in p.stdout
    assert np.load(tmp_path / "g.npz")["frames"].shape == (6, 32, 64, 3)  # real beside generated
    torch.save(torch.tensor([0, n_actions]), tmp_path / "bad.pt")  # an index past this game's actions
    prompt = tmp_path / "g.npz"  # real beside generated: (6, 32, 64, 3), resized to the model's 32x32
    p = run("generate.py", "--ckpt", dit, "--prompt", str(prompt), "--actions", str(tmp_path / "bad.pt"),
            "--out", str(tmp_path / "x.npz"), check=False)  # fmt: skip
    assert p.returncode != 0 and f"has {n_actions} actions" in p.stderr and "Traceback" not in p.stderr
    run("evaluate.py", "--ckpt", dit, "--data", data, "--out", str(tmp_path / "e"), "--quick")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["derived"]["game"] == game.lower() and m["derived"]["action_names"] == names
    ar, tf = m["autoregressive"], m["teacher_forced"]
    assert {"psnr", "ssim", "moved_psnr", "copy_psnr", "copy_moved_psnr"} <= set(ar)
    assert "copy_psnr" in tf and "psnr_gain_true_vs_shuffled" in m["control"]
    assert "ball_presence" not in ar and "score_held" not in ar  # Pong's metrics only for Pong
    p = run("play.py", "--ckpt", dit, "--prompt", str(prompt), "--headless", "--frames", "4", "--policy", "random")
    assert "frames/s" in p.stdout


def test_own_data_trains_without_ale(tmp_path):
    """The data format is the contract: frames and actions in an .npz, a meta.json naming the actions. Nothing
    else (no rewards, no frame size, no emulator): a made-up game of a square moved by three actions."""
    data = tmp_path / "mine"
    data.mkdir()
    rng = np.random.default_rng(0)
    for e in range(3):
        actions = rng.integers(0, 3, 50)
        y, frames = 12, []
        for a in actions:
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[y : y + 4, 14:18] = (255, 200, 0)
            frames.append(frame)
            y = int(np.clip(y + (a == 1) * -2 + (a == 2) * 2, 0, 28))
        np.savez(data / f"episode_{e:05d}.npz", frames=np.stack(frames), actions=actions)
    (data / "meta.json").write_text(json.dumps({"game": "square", "action_names": ["NOOP", "UP", "DOWN"]}))
    env = {**ENV, "PYTHONPATH": str(tmp_path / "no_ale")}  # a stand-in ale_py that fails to import
    (tmp_path / "no_ale").mkdir()
    (tmp_path / "no_ale" / "ale_py.py").write_text("raise ImportError('no emulator here')\n")
    for args in (
        ["train.py", "vae", *TINY, "--data", str(data), "--out", str(tmp_path / "vae")],
        ["train.py", "dit", *TINY, "--data", str(data), "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "dit")],
        ["generate.py", "--ckpt", str(tmp_path / "dit"), "--episode", str(data / "episode_00001.npz"),
         "--frames", "5", "--out", str(tmp_path / "g.npz")],
    ):  # fmt: skip
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    config = torch.load(tmp_path / "dit" / "ckpt.pt", weights_only=True)["config"]
    assert config["game"] == "square" and config["model"]["action_dim"] == 3
    assert "square: actions 0=NOOP 1=UP 2=DOWN" in p.stdout


def test_bad_meta_is_one_line(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    np.savez(data / "episode_00000.npz", frames=np.zeros((9, 32, 32, 3), np.uint8), actions=np.zeros(9, np.int64))
    (data / "meta.json").write_text(json.dumps({"game": "mine"}))
    p = run("train.py", "vae", *TINY, "--data", str(data), "--out", str(tmp_path / "v"), check=False)
    assert p.returncode != 0 and "action_names" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    (data / "meta.json").write_text(json.dumps({"game": "mine", "action_names": ["A", "B"]}))
    np.savez(data / "episode_00000.npz", frames=np.zeros((9, 32, 32, 3), np.uint8), actions=np.full(9, 2))
    p = run("train.py", "vae", *TINY, "--data", str(data), "--out", str(tmp_path / "v"), check=False)
    assert p.returncode != 0 and "actions outside 0..1" in p.stderr and "Traceback" not in p.stderr


def test_dqn_agent_trains_on_the_game(tmp_path):
    """The SB3 agents train on the recorded game, into a file named after it."""
    agents = tmp_path / "agents"
    run("generate_dataset.py", "--game", "Freeway", "--agent", "dqn", "--train-steps", "200", "--agent-path",
        str(agents / "{agent}_{game}.zip"), "--episodes", "1", "--max-episode-frames", "30", "--frame-size", "32",
        "--out", str(tmp_path / "f"))  # fmt: skip
    assert os.listdir(agents) == ["dqn_freeway.zip"]
    ep = np.load(tmp_path / "f" / "episode_00000.npz")
    assert ep["agent"] == "dqn" and ep["actions"].max() < 3


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "checkpoints", "breakout_dit.pt")), reason="no bundle")
def test_the_bundled_breakout_plays_with_one_command(tmp_path):
    """checkpoints/breakout_dit.pt names its game, so its sample prompt and actions are found without flags."""
    p = run("play.py", "--ckpt", "checkpoints/breakout_dit.pt", "--headless", "--frames", "6")
    assert "breakout: " in p.stdout and "Left: LEFT" in p.stdout and "frames/s" in p.stdout
    run("generate.py", "--ckpt", "checkpoints/breakout_dit.pt", "--frames", "6", "--out", str(tmp_path / "g.npz"))
    frames = np.load(tmp_path / "g.npz")["frames"]
    prompt = cv2_read(os.path.join(ROOT, "sample_data", "breakout", "prompt.png"))
    assert frames.shape == (6, 96, 96, 3) and np.array_equal(frames[0], prompt)


def cv2_read(path):
    import cv2

    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
