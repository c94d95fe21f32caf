"""pong.py's score reader: every score at every frame size, every frame of recorded episodes, and the metrics on it."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dataset  # noqa: E402
import metrics  # noqa: E402
import pong  # noqa: E402
import utils  # noqa: E402


def drawn(opponent, player, size):
    """A frame of the field with this score, drawn as the game draws it and resized as the recorder does."""
    raw = np.empty((pong.ATARI_H, pong.ATARI_W, 3), np.uint8)
    raw[:] = pong.COLOR_BACKGROUND
    pong.draw_score(raw, opponent, 0)
    pong.draw_score(raw, player, 1)
    return utils.resize_frame(raw, size)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_reads_every_score_at_every_size(size):
    scores = [(a, b) for a in range(22) for b in (0, 7, 13, 21)] + [(b, a) for a in range(22) for b in (3, 18)]
    frames = np.stack([drawn(a, b, size) for a, b in scores])
    np.testing.assert_array_equal(pong.read_score(frames), np.array(scores))
    assert (pong.read_score(np.zeros((2, size, size, 3), np.uint8)) == -1).all()  # not the field: no reading


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One episode at 32x32 and one at 96x96, long enough for the opponent to reach 20 and the player to score."""
    d = tmp_path_factory.mktemp("pong")
    eps = {}
    for size in (32, 96):
        out = str(d / f"s{size}")
        cmd = ["generate_dataset.py", "--agent", "tracker", "--epsilon", "0.25", "--episodes", "1", "--seed", "0"]
        cmd += ["--max-episode-frames", "1500", "--frame-size", str(size), "--workers", "1", "--out", out]
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, capture_output=True, timeout=300)
        eps[size] = dataset.load_episode(dataset.list_episodes(out)[0])
    return eps


@pytest.mark.parametrize("size", [32, 96])
def test_reads_every_recorded_frame_right(recorded, size):
    """The truth is the episode's rewards from 0-0; the digits change on the reward's frame or the next one."""
    ep = recorded[size]
    read = pong.read_score(ep["frames"])
    now, next_frame = (pong.score_from_rewards(ep["rewards"], lag) for lag in (0, 1))
    assert (read[0] == -1).all()  # the reset screen shows no score
    ok = (read == now).all(-1) | (read == next_frame).all(-1)
    assert ok[1:].all(), np.nonzero(~ok[1:])[0][:10] + 1
    assert now[-1, 0] >= 5 and now[-1, 1] >= 1, now[-1]  # the episode covers several points of both sides


def test_score_metrics_count_a_wrong_digit(recorded):
    """score_read and score_held fall when a generated frame shows another score."""
    ep = recorded[96]
    real = ep["frames"][None, 1:41]  # (1, 1 + 39, ...): one rollout, its start and 39 steps
    gen = real.copy()
    gen[0, 20:, : pong.strip_rows(96)] = drawn(19, 19, 96)[: pong.strip_rows(96)]  # the score shown wrong from step 20
    same_score = (pong.read_score(real[0]) == pong.read_score(real[0, 0])).all()
    held = metrics.rollout_block(real, gen, [1, 19, 20, 39], pong=True)["score_held"]
    assert same_score and held == {"1": 1.0, "19": 1.0, "20": 0.0, "39": 0.0}
    read = pong.score_read(real[0], gen[0])
    assert read == {"score_read_opponent": 0.5, "score_read_player": 0.5}  # frames 20..39 of 0..39 wrong
