"""evaluate.py: SSIM, the score-change detectors on recorded frames, the action convention with a
perfect (oracle) world model, end to end on a tiny untrained model, and one-line errors."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

import dataset  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
import pong  # noqa: E402
import utils  # noqa: E402


def run(*args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """Two recorded 32x32 episodes long enough for a few points, and a tiny untrained DiT + VAE."""
    from dit import DiT_models
    from uvit_vae import build_vae

    d = tmp_path_factory.mktemp("eval")
    data = str(d / "held")
    run(
        "generate_dataset.py",
        "--agent",
        "random",
        "--episodes",
        "2",
        "--max-episode-frames",
        "150",
        "--frame-size",
        "32",
        "--seed",
        "123",
        "--out",
        data,
    )
    torch.manual_seed(0)
    vae = build_vae("pong", ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)
    dit = DiT_models["tiny"](input_h=4, input_w=4, window=4)
    vae_cfg = {"kind": "vae", "model": vae.config, "scaling_factor": 1.0}
    dit_cfg = {"kind": "dit", "model": dit.config, "latent_scale": 1.0, "vae_path": "vae.pt"}
    for name, m, cfg in (("vae.pt", vae, vae_cfg), ("dit.pt", dit, dit_cfg)):
        sd = m.state_dict()
        torch.save(
            {"model": sd, "ema": sd, "optimizer": {}, "step": 3, "config": cfg, "version": utils.CKPT_VERSION}, d / name
        )
    eps = [dataset.load_episode(f) for f in dataset.list_episodes(data)]
    return {"dir": d, "data": data, "dit": str(d / "dit.pt"), "vae": str(d / "vae.pt"), "eps": eps}


def test_ssim_identical_is_one_and_noise_lowers_it(heldout):
    frames = heldout["eps"][0]["frames"][:6].reshape(2, 3, 32, 32, 3)  # any leading dims
    assert metrics.ssim(frames, frames).shape == (2, 3)
    np.testing.assert_allclose(metrics.ssim(frames, frames), 1.0, atol=1e-12)
    rng = np.random.default_rng(0)
    noisy = lambda s: np.clip(frames + rng.normal(0, s, frames.shape), 0, 255).astype(np.uint8)
    weak, strong = noisy(8), noisy(40)
    mild, bad = metrics.ssim(frames, weak), metrics.ssim(frames, strong)
    assert (mild < 0.999).all() and (bad < mild).all()
    np.testing.assert_allclose(metrics.ssim(weak, frames), mild, atol=1e-12)  # symmetric
    assert utils.psnr(frames, frames).min() > 99 and (utils.psnr(frames, strong) < utils.psnr(frames, weak)).all()


def test_score_detectors_find_the_recorded_points(heldout):
    """On real frames both detectors fire within +-2 frames of every recorded point, for the right scorer."""
    n_points = 0
    for ep in heldout["eps"]:
        frames, rewards = ep["frames"], ep["rewards"]
        # rewards[k] belongs to the step that produced frames[k]; a point needs GONE frames after it to be seen
        points = [(k, int(rewards[k] > 0)) for k in np.nonzero(rewards)[0] if k + 2 + pong.GONE < len(frames)]
        n_points += len(points)
        for digits in (False, True):
            found = pong.score_events(frames, pong.detect_objects(frames), digits=digits)
            found = [e for e in found if e[0] > 1]  # frames[0] is the reset screen, drawn differently
            assert pong.match_events(points, found) == len(points), (digits, points, found)
            assert pong.match_events(found, points) == len(found), (digits, points, found)  # no false events
    assert n_points >= 2, "the recording should contain points; change its seed"


def test_serves_follow_every_real_point_and_no_frozen_one(heldout):
    """ball_serves: on real frames the next ball comes 15-17 frames after every point (the game's fixed delay);
    a rollout that freezes the empty field after a point never serves; a point too late to judge is skipped."""
    n = 0
    for ep in heldout["eps"]:
        frames = ep["frames"][1:]  # frames[0] is the reset screen
        det = pong.detect_objects(frames)
        events = pong.score_events(frames, det)
        delays = pong.serve_delays(det["ball_present"], events)
        assert len(delays) == sum(k + pong.SERVE_WAIT < len(frames) for k, _ in events)
        assert all(15 <= d <= 17 for d in delays), delays  # 17: a 32 px frame can miss the ball's first frame
        n += len(delays)
        if delays:
            k = events[0][0]
            frozen = np.concatenate([frames[:k], np.repeat(frames[k : k + 1], len(frames) - k, 0)])
            seen = pong.detect_objects(frozen)["ball_present"]
            assert np.isnan(pong.serve_delays(seen, events[:1])[0])
    assert n >= 1, "the recording should contain a point with 24 frames after it; change its seed"


class Oracle:
    """A perfect world model of the recorded episodes: checks what it is given, answers with the real frames.

    It relies on evaluate.run feeding start points in order, so it knows which row is which.
    """

    def __init__(self, eps, points):
        self.eps, self.todo, self.device, self.gen = eps, list(points), torch.device("cpu"), torch.Generator()

    def reset(self, prompt, prompt_actions):
        self.rows, self.todo, self.k = self.todo[: len(prompt)], self.todo[len(prompt) :], 0
        n = prompt.shape[1]
        for row, (e, s) in enumerate(self.rows):  # prompt: frames s-n+1..s and the n-1 actions between them
            np.testing.assert_array_equal(prompt[row], self.eps[e]["frames"][s - n + 1 : s + 1])
            np.testing.assert_array_equal(prompt_actions[row], self.eps[e]["actions"][s - n + 1 : s])

    def step(self, actions):
        for row, (e, s) in enumerate(self.rows):  # actions[j] is taken after frame j and leads to frame j+1
            assert actions[row].item() == self.eps[e]["actions"][s + self.k]
        self.k += 1
        return torch.from_numpy(np.stack([self.eps[e]["frames"][s + self.k] for e, s in self.rows]))


@pytest.mark.parametrize("prompt", [1, 3])
def test_perfect_model_scores_perfectly(heldout, prompt):
    """The action convention and the metric pipeline: the real game, replayed, gets perfect rollout metrics."""
    eps, T = heldout["eps"], 40
    points = evaluate.spread(eps, prompt - 1, T, 12)
    cfg = evaluate.EvalConfig(batch=5)
    gen = evaluate.run(Oracle(eps, points), eps, points, prompt, T, evaluate.recorded(eps, T), cfg, "oracle")
    real = evaluate.take(eps, points, 0, T + 1)
    m = metrics.rollout_block(real, np.concatenate([real[:, :1], gen], 1), [1, 8, T], pong=True)
    assert min(m["psnr_curve"]) > 99 and min(m["moved_psnr"].values()) > 99
    assert max(m["copy_psnr"].values()) < 99 and max(m["copy_moved_psnr"].values()) < 40  # the game moves
    assert m["ball_presence"] == 1.0 and m["ball_spurious"] == 0.0
    assert all(v == 0 for k in ("ball", "player", "opponent") for v in m[f"{k}_error_px"].values() if np.isfinite(v))
    for key in ("score_events", "score_digits"):
        s = m[key]
        assert s["n_real"] > 0 and s["n_real"] == s["n_generated"] == s["n_matched"], (key, s)
    assert m["ball_hit_rate"] == m["ball_hit_rate_first16"] == m["ball_presence_first16"] == 1.0
    assert m["ball_spurious_first16"] == 0.0
    serves = m["ball_serves"]
    assert serves["n_real"] == serves["n_generated"] and serves["real_delay"] == serves["generated_delay"]
    assert m["score_held"] and all(v == 1.0 for v in m["score_held"].values()), m["score_held"]


def test_ball_hit_rate_counts_balls_within_4_px(heldout):
    """A model that freezes the start frame hits only where the real ball is still within 4 px of where it was."""
    eps, T = heldout["eps"], 20
    points = evaluate.spread(eps, 0, T, 12)
    real = evaluate.take(eps, points, 0, T + 1)
    frozen = np.repeat(real[:, :1], T + 1, axis=1)
    m = metrics.rollout_block(real, frozen, [1, T], pong=True)
    d = pong.detect_objects(real)
    seen = d["ball_present"][:, 1:]
    near = np.linalg.norm(d["ball_xy"][:, 1:] - d["ball_xy"][:, :1], axis=-1) <= 4  # NaN: a miss
    assert seen.any() and 0 < m["ball_hit_rate"] < 1
    assert m["ball_hit_rate"] == pytest.approx(near[seen].mean())
    # frozen is the copy-the-start-frame baseline itself: every metric equals its baseline's
    assert m["psnr"] == m["copy_psnr"] and m["moved_psnr"] == m["copy_moved_psnr"] and m["ssim"] == m["copy_ssim"]
    tf = metrics.next_frame_block(real[:, 1], real[:, 0], prev=real[:, 0])  # next frame = the last one
    assert tf["psnr"] == tf["copy_psnr"] and tf["moved_psnr"] == tf["copy_moved_psnr"] < 40


def test_end_to_end_quick(heldout):
    out = heldout["dir"] / "out"
    p = run(
        "evaluate.py",
        "--ckpt",
        heldout["dit"],
        "--data",
        heldout["data"],
        "--out",
        str(out),
        "--quick",
        "--sweep-steps",
        "1,2",
        "--sweep-context-noise",
        "50",
    )
    assert "PSNR" in p.stdout and "frames/s" in p.stdout
    m = json.loads((out / "metrics.json").read_text())
    for key in (
        "config",
        "argv",
        "checkpoint",
        "device",
        "data",
        "counts",
        "vae",
        "teacher_forced",
        "autoregressive",
        "autoregressive_one_frame",
        "control",
        "speed",
        "sweeps",
        "null_reasons",
    ):
        assert key in m, key
    assert m["checkpoint"]["step"] == 3 and m["checkpoint"]["path"] == os.path.abspath(heldout["dit"])
    assert m["data"]["episodes"] == 2 and m["data"]["frames"] == sum(len(ep["frames"]) for ep in heldout["eps"])
    assert m["counts"]["rollouts"] == 4 and m["config"]["horizon"] == 8 and "--quick" not in m["argv"]
    ar, one = m["autoregressive"], m["autoregressive_one_frame"]
    assert set(ar["psnr"]) == {"1", "4", "8"} and len(ar["psnr_curve"]) == 8
    assert set(one) == set(ar)  # from one frame: the same metrics (an untrained DiT ignores its context)
    assert m["derived"]["prompt"] == 3 and "one frame" in p.stdout and "hit rate" in p.stdout
    for key in ("ball_error_px", "player_error_px", "opponent_error_px"):
        assert set(ar[key]) == {"1", "4", "8"}
    assert {"precision", "recall", "n_real", "n_generated"} <= set(ar["score_events"])
    assert {"up_moves_up", "down_moves_down", "up_above_down", "psnr_gain_true_vs_shuffled"} <= set(m["control"])
    assert 0 < m["vae"]["psnr"] < 100 and -1 <= m["teacher_forced"]["ssim"] <= 1
    assert m["speed"]["frames_per_s_batch1"] > 0 and m["speed"]["device"].startswith("cpu")
    assert [r["steps"] for r in m["sweeps"]["steps"]] == [1, 2] and m["sweeps"]["context_noise"][0][
        "context_noise"
    ] == 50
    assert m["config"]["steps"] == 2 and m["sweeps"]["steps"][1]["ar_psnr"] == ar["psnr"]  # default: measured once

    def nulls(x, path=""):
        if isinstance(x, dict):
            return [n for k, v in x.items() for n in nulls(v, f"{path}.{k}".lstrip("."))]
        if isinstance(x, list):
            return [n for v in x for n in nulls(v, path)]
        return [path] if x is None else []

    reasons = m["null_reasons"]
    assert all(p in reasons for p in nulls({k: v for k, v in m.items() if k != "null_reasons"}))
    assert "cannot be computed" not in reasons.values()  # every null has its specific reason
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vae_only_measures_the_decoder_and_nothing_else(heldout, tmp_path):
    """--vae-only (to compare decoders): the VAE's block and the run's header, no rollout, no plot."""
    p = run("evaluate.py", "--ckpt", heldout["dit"], "--data", heldout["data"], "--out", str(tmp_path / "v"),
            "--quick", "--vae-only")  # fmt: skip
    m = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert "teacher_forced" not in m and "autoregressive" not in m and not (tmp_path / "v" / "metrics.png").exists()
    keys = {"score_read_opponent", "score_read_player", "psnr", "ball_presence", "ball_presence_crowded"}
    assert keys <= set(m["vae"])
    assert p.stdout.startswith(f"VAE {heldout['vae']}")  # the report names the VAE it measured
    auto = utils.pick_precision("auto", "cpu", auto_cpu=evaluate.engines.AUTO_CPU_BF16)  # bf16 on this CPU
    assert m["precision"] == auto and m["counts"] == {"vae_frames": 16} and "score read" in p.stdout


def test_wrong_kind_checkpoint_is_one_line(heldout, tmp_path):
    p = run("evaluate.py", "--ckpt", heldout["vae"], "--data", heldout["data"], "--out", str(tmp_path), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "'vae'" in p.stderr, p.stderr


def test_bad_input_dies_with_one_line(heldout, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(ckpt=str(tmp_path / "nope.pt")), "nope.pt"),
        (dict(data=str(tmp_path / "missing")), "missing"),
        (dict(data=str(empty)), "empty"),
        (dict(horizon=1000), "--horizon"),
        (dict(sweep_steps="1,two"), "--sweep-steps"),
        (dict(context=9), "--context"),
    ]
    for overrides, needle in cases:
        kw = dict(ckpt=heldout["dit"], data=heldout["data"], out=str(tmp_path / "out"), **evaluate.PRESETS["quick"])
        with pytest.raises(SystemExit) as e:
            evaluate.main(evaluate.EvalConfig(**{**kw, **overrides}))
        err = capsys.readouterr().err
        assert e.value.code != 0 and len(err.strip().splitlines()) == 1 and needle in err, (overrides, err)


def test_ctrl_c_is_one_line_and_writes_nothing(heldout, tmp_path, read_until):
    out = tmp_path / "cut"
    p = subprocess.Popen(
        [sys.executable, "evaluate.py", "--ckpt", heldout["dit"], "--data", heldout["data"], "--out", str(out),
         "--quick", "--rollouts", "100000", "--horizon", "100"],
        cwd=ROOT, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        read_until(p, p.stdout, "rollouts")  # each phase prints a line off a terminal: wait for the rollouts
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and err.strip().splitlines() == [
        f"error: interrupted (SIGINT); nothing written to {out}"
    ]
    assert not out.exists()
