"""generate_dataset.py as a user runs it: recording, alignment, resume after kill -9, errors, agents."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataset  # noqa: E402
from utils import parse_config, resize_frame  # noqa: E402

KEYS = {"frames", "actions", "rewards", "dones", "t_index", "seed", "last_reward", "ball_returns"}


def run(*args, check=True, timeout=300):
    p = subprocess.run([sys.executable, "generate_dataset.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def replay(ep, size):
    """Step a fresh env with the recorded seed and actions: (resized frames, rewards, last reward)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", frameskip=4, repeat_action_probability=0.0)
    obs, _ = env.reset(seed=int(ep["seed"]))
    frames, rewards = [resize_frame(obs, size)], [0.0]
    for a in ep["actions"]:
        obs, r, *_ = env.step(int(a))
        frames.append(resize_frame(obs, size))
        rewards.append(r)
    return np.stack(frames[:-1]), np.array(rewards[:-1], np.float32), rewards[-1]


def test_record_shapes_and_alignment(tmp_path):
    out = str(tmp_path / "rec")
    log = run("--agent", "random", "--episodes", "2", "--max-episode-frames", "100", "--workers", "2",
              "--seed", "7", "--out", out).stdout  # fmt: skip
    assert "recorded 2 episodes, 200 frames" in log
    files = dataset.list_episodes(out)
    assert [os.path.basename(f) for f in files] == ["episode_00000.npz", "episode_00001.npz"]
    for j, f in enumerate(files):
        ep = dataset.load_episode(f)
        assert KEYS <= set(ep)
        n = len(ep["frames"])
        assert n == 100 and ep["seed"] == 7 + j
        assert ep["frames"].shape == (n, 96, 96, 3) and ep["frames"].dtype == np.uint8
        assert ep["actions"].dtype == np.int64 and ep["actions"].shape == (n,)
        assert ep["rewards"].dtype == np.float32 and ep["rewards"][0] == 0
        assert ep["dones"].dtype == bool and ep["dones"][-1] and not ep["dones"][:-1].any()
        assert ep["t_index"].dtype == np.int64 and (ep["t_index"] == np.arange(n)).all()
        # frames[k+1] is what actions[k] produced from frames[k]; rewards[k] came with frames[k]
        frames, rewards, last = replay(ep, 96)
        assert (frames == ep["frames"]).all()
        assert (rewards == ep["rewards"]).all() and last == ep["last_reward"]
        assert len(set(ep["actions"].tolist())) == 6
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["complete"] and meta["frame_size"] == 96 and meta["env_id"] == "ALE/Pong-v5"
    assert meta["total"]["frames"] == 200 and len(meta["per_episode"]) == 2
    assert sum(meta["total"]["action_histogram"].values()) == 200


def test_resume_after_kill(tmp_path):
    out, ref = str(tmp_path / "rec"), str(tmp_path / "ref")
    args = ["--agent", "random", "--episodes", "4", "--max-episode-frames", "250", "--seed", "3"]
    p = subprocess.Popen([sys.executable, "generate_dataset.py", *args, "--out", out], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    first = os.path.join(out, "episode_00000.npz")
    deadline = time.time() + 120
    while not os.path.exists(first) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = [f for f in os.listdir(out) if f.startswith("episode_")]
    assert 1 <= len(done) < 4, "the kill should land mid-run"
    open(os.path.join(out, ".tmp-stray-episode_00003.npz"), "wb").write(b"half a file")
    log = run(*args, "--out", out).stdout
    assert f"recording {4 - len(done)} of 4 episodes" in log
    files = dataset.list_episodes(out)
    assert len(files) == 4 and not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    # the resumed recording is identical to an uninterrupted one
    import generate_dataset

    generate_dataset.main(parse_config(generate_dataset.Config, [*args, "--out", ref]))
    for f, g in zip(files, dataset.list_episodes(ref)):
        a, b = dataset.load_episode(f), dataset.load_episode(g)
        assert all(np.array_equal(a[k], b[k]) for k in ("frames", "actions", "rewards", "dones"))


def call_main(capsys, *args):
    """generate_dataset.main in this process: (exit code, stderr) of a run that must exit."""
    import generate_dataset

    cfg = parse_config(generate_dataset.Config, list(args))
    with pytest.raises(SystemExit) as e:
        generate_dataset.main(cfg)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--game", "ALE/NoSuchGame-v5"], "--game: unknown game 'ALE/NoSuchGame-v5'"),
        (["--game", "brekout"], "did you mean breakout?"),
        (["--game", "Breakout", "--agent", "tracker"], "--agent tracker plays Pong only"),
        (["--frame-size", "0"], "positive multiple of 8"),
        (["--frame-size", "-16"], "positive multiple of 8"),
        (["--frame-size", "100"], "positive multiple of 8 (the VAE downsamples by 8), got 100"),
        (["--episodes", "0"], "--episodes must be >= 1"),
        (["--epsilon", "1.5"], "--epsilon must be a probability"),
        (["--out", "BLOCKED"], "cannot write to --out"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, args, message):
    (tmp_path / "a_file").write_text("x")
    args = [str(tmp_path / "a_file" / "sub") if a == "BLOCKED" else a for a in args]  # a dir under a file
    code, err = call_main(capsys, "--agent", "random", "--out", str(tmp_path / "rec"), *args)
    assert code != 0 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err


def test_bad_input_as_a_user_sees_it(tmp_path):
    """Through the real command line: one line on stderr, non-zero exit, no traceback, nothing written."""
    p = run("--frame-size", "100", "--out", str(tmp_path / "rec"), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --frame-size must be a positive multiple of 8 (the VAE "
                                             "downsamples by 8), got 100"]  # fmt: skip
    assert not os.path.exists(tmp_path / "rec")


def test_existing_out_with_other_frame_size(tmp_path, capsys):
    out = str(tmp_path / "rec")
    run("--agent", "random", "--episodes", "1", "--max-episode-frames", "20", "--frame-size", "32", "--out", out)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    code, err = call_main(capsys, "--agent", "random", "--episodes", "2", "--frame-size", "64", "--out", out)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "frame_size=32, not 64" in err
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before


def test_dqn_trains_once_then_reuses(tmp_path):
    agent, out = str(tmp_path / "agents" / "dqn.zip"), str(tmp_path / "rec")
    common = ["--agent", "dqn", "--train-steps", "200", "--agent-path", agent, "--max-episode-frames", "30"]
    log = run(*common, "--episodes", "1", "--out", out).stdout
    assert "trained dqn for 200 steps" in log and os.path.isfile(agent)
    mtime = os.path.getmtime(agent)
    log = run(*common, "--episodes", "2", "--out", out).stdout
    assert "reusing trained dqn agent" in log and "trained dqn for" not in log
    assert os.path.getmtime(agent) == mtime
    assert (
        len(dataset.list_episodes(out)) == 2 and dataset.load_episode(dataset.list_episodes(out)[1])["agent"] == "dqn"
    )


def test_tracker_returns_the_ball_more_than_random(tmp_path):
    returns = {}
    for agent in ("tracker", "random"):
        out = str(tmp_path / agent)
        run("--agent", agent, "--episodes", "1", "--max-episode-frames", "400", "--frame-size", "64", "--out", out)
        returns[agent] = json.load(open(os.path.join(out, "meta.json")))["total"]["ball_returns"]
    assert returns["tracker"] >= 1 and returns["tracker"] > returns["random"], returns


def test_count_returns():
    from pong import count_returns

    nan = np.nan
    hit = [122, 126, 130, 134, 138, 138, 134, 130, 126]  # the player's paddle sends it back (width 160)
    opponent_hit = [34, 30, 26, 22, 22, 26, 30]
    point = [146, 150, 154, nan, nan, nan, nan, 80, 76, 72]  # missed: out on the right, served back leftwards
    flicker = [126, 130, nan, 138, 134, 130]  # one frame without the ball still counts
    assert count_returns(np.array(hit, float), 160) == 1
    assert count_returns(np.array(hit + opponent_hit + hit, float), 160) == 2
    assert count_returns(np.array(opponent_hit + point, float), 160) == 0
    assert count_returns(np.array(flicker, float), 160) == 1


@pytest.mark.parametrize("size", [32, 64, 96, 128, 168])
def test_frame_resizer_matches_resize_frame(size):
    """Resizing only the changed blocks gives the bytes of resizing each frame whole (168 enlarges: whole)."""
    from utils import FrameResizer

    rng = np.random.default_rng(size)
    frames = [rng.integers(0, 256, (210, 160, 3), np.uint8)]  # noise: every weight of every block matters
    for _ in range(40):
        f = frames[-1].copy()
        for _ in range(rng.integers(0, 4)):  # a few rectangles change, across block borders or not
            y, x = rng.integers(0, 210), rng.integers(0, 160)
            f[y : y + rng.integers(1, 20), x : x + rng.integers(1, 12)] = rng.integers(0, 256, 3, np.uint8)
        frames.append(f)
    resizer = FrameResizer(size, frames[0].shape)
    got = np.concatenate([resizer(frames[:7]), resizer(frames[7:8]), resizer(frames[8:])])  # state across chunks
    assert np.array_equal(got, np.stack([resize_frame(f, size) for f in frames]))
