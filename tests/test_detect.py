"""pong.detect_objects on real Pong frames, checked against ALE RAM and an exact-colour full-resolution detection."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pong  # noqa: E402
from pong import COLOR_BALL, COLOR_OPPONENT, COLOR_PLAYER, FIELD_BOTTOM, FIELD_TOP, detect_objects  # noqa: E402
from utils import resize_frame  # noqa: E402


@pytest.fixture(scope="module")
def played():
    """600 steps of random play, seed 0: raw frames (N, 210, 160, 3) and RAM (N, 128)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", frameskip=4, repeat_action_probability=0.0)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    frames, ram = [obs], [env.unwrapped.ale.getRAM()]
    for _ in range(600):
        obs, *_ = env.step(int(rng.integers(6)))
        frames.append(obs)
        ram.append(env.unwrapped.ale.getRAM())
    return np.stack(frames), np.stack(ram).astype(np.float64)


def exact(frames):
    """Ground truth on raw frames: exact colour matches in the play field -> {name: (pixels, x, y)}."""
    field = frames[:, FIELD_TOP:FIELD_BOTTOM]
    out = {}
    for name, color, cols in (("ball", COLOR_BALL, slice(0, 160)), ("player", COLOR_PLAYER, slice(80, 160)),
                              ("opponent", COLOR_OPPONENT, slice(0, 80))):  # fmt: skip
        m = (field[:, :, cols] == color).all(-1).astype(np.float64)
        n = m.sum((1, 2))
        with np.errstate(invalid="ignore"):
            x = (m.sum(1) * np.arange(160)[cols]).sum(1) / n
            y = (m.sum(2) * np.arange(FIELD_TOP, FIELD_BOTTOM)).sum(1) / n
        out[name] = (n, x, y)
    return out


def test_ram_matches_pixels(played):
    """Ball x = ram[49] - 48.5 and ball y = ram[54] - 12.5 (+-1: the ball is drawn on alternate lines)."""
    frames, ram = played
    n, x, y = exact(frames)["ball"]
    full = n == 8  # the whole 2x4 ball on screen
    assert full.sum() > 300
    assert np.abs(x[full] - (ram[full, 49] - 48.5)).max() == 0
    assert np.abs(y[full] - (ram[full, 54] - 12.5)).max() <= 1


@pytest.mark.parametrize("size", [64, 96, 128])
def test_detection_matches_ground_truth(played, size):
    frames, _ = played
    truth = exact(frames)
    small = np.stack([resize_frame(f, size) for f in frames])
    d = detect_objects(small)
    to_small = lambda v, full_px: (v + 0.5) * size / full_px - 0.5  # pixel-index coordinates  # noqa: E731
    n, x, y = truth["ball"]
    full = n == 8
    assert d["ball_present"][full].all() and not d["ball_present"][n == 0].any()
    assert np.isnan(d["ball_xy"][n == 0]).all()
    err = np.abs(d["ball_xy"][full] - np.stack([to_small(x[full], 160), to_small(y[full], 210)], -1))
    assert err.max() < 1.5 * size / 96, err.max()
    for name in ("player", "opponent"):
        pn, _, py = truth[name]
        seen = pn >= 8  # at least two rows of the paddle below the wall
        assert np.abs(d[f"{name}_y"][seen] - to_small(py[seen], 210)).max() < 2 * size / 96
        assert np.isnan(d[f"{name}_y"][pn == 0]).all()
    # also straight on the raw frames, and with extra leading dims
    raw = detect_objects(frames[full][:10])
    assert np.abs(raw["ball_xy"] - np.stack([x[full][:10], y[full][:10]], -1)).max() < 1e-4
    d2 = detect_objects(small[:20].reshape(4, 5, size, size, 3))
    assert d2["ball_xy"].shape == (4, 5, 2) and d2["player_y"].shape == (4, 5)
    np.testing.assert_array_equal(d2["ball_xy"].reshape(20, 2), d["ball_xy"][:20])


def test_absent_after_a_point(played):
    """After a point the ball leaves the screen: several consecutive frames without it."""
    frames, _ = played
    d = detect_objects(np.stack([resize_frame(f, 96) for f in frames]))
    absent = ~d["ball_present"]
    assert absent[:10].all()  # before the first serve
    runs = np.flatnonzero(np.diff(absent.astype(int)) == 1)
    assert len(runs) >= 3  # several points in 600 steps of random play


def test_haze_neither_moves_nor_makes_a_ball(played):
    """Faint ball-coloured haze, as a VAE leaves beside a blurred paddle, must not drag the ball or fake one."""
    frames, _ = played
    truth = exact(frames)["ball"][0]
    small = np.stack([resize_frame(f, 96) for f in frames])
    with_ball, without = small[truth == 8][:20], small[truth == 0][10:30]
    bg, ball = np.array(pong.COLOR_BACKGROUND, np.float32), np.array(COLOR_BALL, np.float32)

    def haze(f, rows, cols, cover=0.15):
        f = f.astype(np.float32)
        f[rows, cols] = f[rows, cols] + cover * (ball - bg)
        return f.round().astype(np.uint8)

    hazy = lambda fs: np.stack([haze(f, slice(40, 48), slice(82, 83)) for f in fs])  # a column by the player
    assert not detect_objects(hazy(without))["ball_present"].any()
    ref, got = detect_objects(with_ball), detect_objects(hazy(with_ball))
    far = np.abs(ref["ball_xy"][:, 1] - 44) > 10  # haze away from the ball
    assert far.sum() > 5 and got["ball_present"][far].all()
    assert np.abs(got["ball_xy"][far] - ref["ball_xy"][far]).max() < 0.01


def drawn_field(ball=None, paddle_y=None):
    """A raw frame: the walls, the player's paddle at its columns (140-143) from row paddle_y, a 2x4 ball at (x, y)."""
    raw = np.empty((210, 160, 3), np.uint8)
    raw[:] = pong.COLOR_BACKGROUND
    raw[24:FIELD_TOP] = raw[FIELD_BOTTOM:] = COLOR_BALL  # the walls are the ball's white
    if paddle_y is not None:
        raw[paddle_y : paddle_y + 16, 140:144] = COLOR_PLAYER
    if ball is not None:
        raw[ball[1] : ball[1] + 4, ball[0] : ball[0] + 2] = COLOR_BALL
    return raw


def test_ball_crowded_marks_a_ball_beside_a_paddle_or_a_wall():
    """pong.ball_crowded (what train.py vae --ball-oversample draws more often): within 3 px of the ball at 96 px."""
    cases = {
        "mid-field": (drawn_field((80, 110), 60), False),
        "1 raw px from the paddle": (drawn_field((137, 110), 104), True),
        "under the top wall": (drawn_field((80, 35), 60), True),
        "10 raw px (6 px) from the paddle": (drawn_field((128, 110), 104), False),
        "no ball": (drawn_field(None, 104), False),
    }
    frames = np.stack([resize_frame(f, 96) for f, _ in cases.values()])
    assert detect_objects(frames)["ball_present"].tolist() == [True] * 4 + [False]
    assert pong.ball_crowded(frames).tolist() == [crowded for _, crowded in cases.values()]
    assert pong.ball_crowded(frames, reach=7)[3]  # a wider reach takes the paddle 6 px away in
