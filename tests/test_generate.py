"""generate.py: the cached sampler equals the naive one, the CLI writes what it says, bad input gets one line."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import engine  # noqa: E402
import utils  # noqa: E402
from dit import DiT_models  # noqa: E402
from uvit_vae import build_vae  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
S = 32  # frame size


def randomize(model, seed):
    """Undo the zero init (adaLN-Zero, zero output layer) so the model computes something non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    vae = randomize(build_vae("pong", ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8), 0)
    dit = randomize(DiT_models["tiny"](input_h=S // 8, input_w=S // 8, window=4), 1)
    sd = lambda m: {k: v.clone() for k, v in m.state_dict().items()}
    vae_ck = {
        "model": sd(vae),
        "ema": sd(vae),
        "optimizer": {},
        "step": 0,
        "version": utils.CKPT_VERSION,
        "config": {"kind": "vae", "model": vae.config, "scaling_factor": 1.0},
    }
    dit_ck = {
        "model": sd(dit),
        "ema": sd(dit),
        "optimizer": {},
        "step": 0,
        "version": utils.CKPT_VERSION,
        "config": {"kind": "dit", "model": dit.config, "latent_scale": 1.0, "vae_path": "vae.pt"},
    }
    torch.save(vae_ck, d / "vae.pt")
    torch.save(dit_ck, d / "dit.pt")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (12, S, S, 3), dtype=np.uint8)
    np.savez(
        d / "episode_00000.npz",
        frames=frames,
        actions=rng.integers(0, 6, 12),
        rewards=np.zeros(12, np.float32),
        dones=np.arange(12) == 11,
        t_index=np.arange(12),
    )
    import cv2

    cv2.imwrite(str(d / "prompt.png"), frames[0][..., ::-1])
    torch.save(torch.tensor([2, 3, 0, 1, 4, 5]), d / "actions.pt")
    return d


def make_engine(ckpts, naive=False, **kw):
    """engine.load_world_model on the tiny checkpoints; kw: ModelConfig fields (steps, seed, slide, ...)."""
    return engine.load_world_model(engine.ModelConfig(ckpt=str(ckpts / "dit.pt"), **kw), "cpu", naive=naive)


@pytest.mark.parametrize("slide", ["exact", "chunk"])
def test_cached_equals_naive_past_the_window(ckpts, slide):
    """10 frames with a 4-frame window: the cache is trimmed and re-encoded several times."""
    prompt = np.load(ckpts / "episode_00000.npz")["frames"][:2]
    actions = torch.tensor([1, 2, 3, 2, 2, 3, 3, 0, 4, 5, 1])
    out = {}
    for cached in (True, False):
        eng = make_engine(ckpts, naive=not cached, steps=3, context_noise=20, seed=7, slide=slide)
        out[cached] = eng.rollout(prompt, actions)
    assert out[True].shape == (12, S, S, 3)
    assert not np.array_equal(out[True][2], out[True][3])  # it generated something that changes
    np.testing.assert_allclose(out[True].astype(int), out[False].astype(int), atol=1)


def test_stream_window_differs_from_exact_only_after_the_window(ckpts):
    prompt = np.load(ckpts / "episode_00000.npz")["frames"][:1]
    actions = torch.tensor([1, 2, 3, 2, 2, 3, 3, 0])
    out = {}
    for w in ("exact", "stream"):
        out[w] = make_engine(ckpts, steps=2, seed=3, slide=w).rollout(prompt, actions)
    np.testing.assert_allclose(
        out["exact"][:4].astype(int), out["stream"][:4].astype(int), atol=1
    )  # window not full yet


def test_pipelined_decoding_gives_the_same_frames_one_call_late(ckpts):
    prompt = np.load(ckpts / "episode_00000.npz")["frames"][:1]
    actions = torch.tensor([1, 2, 3, 2, 2, 3, 3, 0])
    ref = make_engine(ckpts, steps=2, seed=5).rollout(prompt, actions)[1:]
    eng = make_engine(ckpts, steps=2, seed=5)
    eng.reset(prompt[None])
    got = [eng.step_pipelined(actions[k : k + 1]) for k in range(len(actions))]
    assert got[0] is None
    got = got[1:] + [eng.flush()]
    np.testing.assert_array_equal(np.concatenate([f.numpy() for f in got]), ref)
    assert eng.flush() is None


def test_warm_start_denoises_the_previous_frame_from_its_level(ckpts, tmp_path):
    """--warm-start L: each frame's first DDIM step sees the previous frame's latent noised to level L (the prompt's
    last frame, then each generated one), labelled L, and the steps run from L down; 0 starts from pure noise."""
    import diffusion

    prompt = np.load(ckpts / "episode_00000.npz")["frames"][:2]
    for level in (0, 600):
        eng = make_engine(ckpts, steps=2, seed=4, warm_start=level, precision="fp32")
        seen, predict = [], eng._predict
        eng._predict = lambda x, tt, a, seen=seen, predict=predict: (
            seen.append((x.clone(), tt.clone())) or predict(x, tt, a)
        )
        eng.reset(prompt[None], np.array([[3]]))
        prev = eng.encode(prompt[None, -1:])  # (1, 1, C, h, w)
        for k in range(3):
            gen = torch.Generator().manual_seed(0)
            gen.set_state(eng.gen.get_state())
            noise = torch.randn(prev.shape, generator=gen)  # the draw step_latent makes next
            z = eng.step_latent(torch.tensor([k % 6]))
            (x, tt), (_, tt2) = seen[-2:]
            want = noise if level == 0 else diffusion.q_sample(prev, torch.tensor([[level]]), noise, eng.ac)
            assert torch.allclose(x, want, atol=1e-6), (level, k)
            assert [tt.item(), tt2.item()] == diffusion.ddim_timesteps(2, start=level or 999)[:2]
            prev = z[:, None]
    bad = run("--ckpt", str(ckpts / "dit.pt"), "--warm-start", "1000", "--out", str(tmp_path / "x.mp4"))
    assert bad.returncode != 0 and "--warm-start 1000" in bad.stderr.strip().splitlines()[-1]


def test_cpu_decode_runs_a_trace_of_the_eager_decoder(ckpts):
    """On a CPU, decode() runs a TorchScript trace made once per latent shape (so step_pipelined's decode thread
    does not hold Python's lock at every layer): the same frames as the eager decoder, to the bit."""
    for precision in ("fp32", "bf16"):
        eng = make_engine(ckpts, precision=precision)
        for B in (1, 3, 1):
            z = torch.randn(B, eng.dit.in_channels, eng.dit.input_h, eng.dit.input_w)
            with torch.no_grad():
                assert torch.equal(eng.decode(z), eng._decode(z)), (precision, B)
        assert sorted(k[0] for k in eng._traced) == [1, 3]


def test_action_guidance_scales_the_action_effect(ckpts):
    """guidance 0 samples without the new frame's action, 1 is the plain model, 3 pushes further from 0."""
    prompt = np.load(ckpts / "episode_00000.npz")["frames"][:1]
    first = {}
    for g in (0.0, 1.0, 3.0):
        for a in (2, 3):
            eng = make_engine(ckpts, steps=2, seed=1, guidance=g)
            eng.reset(prompt[None])
            first[g, a] = eng.step_latent(torch.tensor([a]))
    assert torch.equal(first[0.0, 2], first[0.0, 3])
    gap = {g: (first[g, 2] - first[g, 3]).abs().mean().item() for g in (1.0, 3.0)}
    assert 0 < gap[1.0] < gap[3.0]


def run(*args):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)


def test_cli_writes_mp4_gif_and_npz(ckpts, tmp_path):
    common = [
        "--ckpt",
        str(ckpts / "dit.pt"),
        "--prompt",
        str(ckpts / "prompt.png"),
        "--actions",
        str(ckpts / "actions.pt"),
        "--frames",
        "9",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    p = run(*common, "--out", str(tmp_path / "a.npz"))
    assert p.returncode == 0, p.stderr
    frames = np.load(tmp_path / "a.npz")["frames"]
    assert frames.shape == (9, S, S, 3) and frames.dtype == np.uint8
    p = run(*common, "--out", str(tmp_path / "a.mp4"), "--scale", "2")
    assert p.returncode == 0, p.stderr
    import imageio.v3 as iio

    video = iio.imread(tmp_path / "a.mp4")
    assert video.shape[:3] == (9, 2 * S, 2 * S)
    p = run(*common, "--out", str(tmp_path / "a.gif"), "--batch", "2")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "a_0.gif").exists() and (tmp_path / "a_1.gif").exists()
    # the same seed gives the same frames
    p = run(*common, "--out", str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["frames"], frames)


def test_cli_replays_an_episode_side_by_side(ckpts, tmp_path):
    p = run(
        "--ckpt",
        str(ckpts / "dit.pt"),
        "--episode",
        str(ckpts / "episode_00000.npz"),
        "--start",
        "2",
        "--frames",
        "6",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "r.npz"),
    )
    assert p.returncode == 0, p.stderr
    assert np.load(tmp_path / "r.npz")["frames"].shape == (6, S, 2 * S, 3)
    assert "PSNR" in p.stdout


def test_bad_inputs_get_one_line(ckpts, tmp_path):
    torch.save(torch.zeros(5, 4), tmp_path / "dim.pt")
    torch.save(torch.tensor([0, 1, 9]), tmp_path / "range.pt")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    base = [
        "--ckpt",
        str(ckpts / "dit.pt"),
        "--prompt",
        str(ckpts / "prompt.png"),
        "--actions",
        str(ckpts / "actions.pt"),
        "--frames",
        "3",
        "--out",
        str(tmp_path / "o.npz"),
    ]

    def with_(**kw):
        args = list(base)
        for k, v in kw.items():
            args[args.index("--" + k) + 1] = v
        return args

    os.makedirs(tmp_path / "lonely", exist_ok=True)
    lonely = tmp_path / "lonely" / "dit.pt"
    ck = torch.load(ckpts / "dit.pt", weights_only=True)
    ck["config"]["vae_path"] = "/nowhere/vae.pt"
    torch.save(ck, lonely)
    ck = torch.load(ckpts / "dit.pt", weights_only=True)
    torch.save({**ck, "version": utils.CKPT_VERSION + 1}, tmp_path / "future.pt")
    cases = {
        "(T, 6)": with_(actions=str(tmp_path / "dim.pt")),
        "[0, 6)": with_(actions=str(tmp_path / "range.pt")),
        "not a readable image": with_(prompt=str(tmp_path / "bad.png")),
        "expected a 'dit' checkpoint": with_(ckpt=str(ckpts / "vae.pt")),
        "cannot find the VAE": with_(ckpt=str(lonely)),
        "this code reads up to": with_(ckpt=str(tmp_path / "future.pt")),
        "--cuda-graph needs a CUDA device": base + ["--cuda-graph", "--device", "cpu"],
    }
    for needle, args in cases.items():
        p = run(*args)
        assert p.returncode != 0, needle
        assert "Traceback" not in p.stderr, p.stderr
        assert needle in p.stderr, (needle, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_version_1_checkpoint_loads_as_version_2(ckpts, tmp_path):
    """Version 1 called the window length max_frames: such a run still loads, and generates the same frames."""
    ck = torch.load(ckpts / "dit.pt", weights_only=True)
    model = dict(ck["config"]["model"])
    model["max_frames"] = model.pop("window")
    torch.save({**ck, "version": 1, "config": {**ck["config"], "model": model}}, tmp_path / "dit.pt")
    (tmp_path / "vae.pt").write_bytes((ckpts / "vae.pt").read_bytes())
    prompt, actions = np.load(ckpts / "episode_00000.npz")["frames"][:1], torch.tensor([1, 2, 3, 2, 2, 3])
    old = engine.load_world_model(engine.ModelConfig(ckpt=str(tmp_path / "dit.pt"), seed=2), "cpu")
    assert old.window == 4 and utils.load_checkpoint(str(tmp_path / "dit.pt"))["config"]["model"]["window"] == 4
    np.testing.assert_array_equal(old.rollout(prompt, actions), make_engine(ckpts, seed=2).rollout(prompt, actions))


def test_cli_accepts_several_prompt_frames(ckpts, tmp_path):
    frames = np.load(ckpts / "episode_00000.npz")["frames"][:3]
    np.savez(tmp_path / "p.npz", frames=frames)
    p = run(
        "--ckpt",
        str(ckpts / "dit.pt"),
        "--prompt",
        str(tmp_path / "p.npz"),
        "--actions",
        str(ckpts / "actions.pt"),
        "--frames",
        "7",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "o.npz"),
    )
    assert p.returncode == 0, p.stderr
    out = np.load(tmp_path / "o.npz")["frames"]
    assert out.shape == (7, S, S, 3)
    np.testing.assert_array_equal(out[:3], frames)  # the prompt frames come first, unchanged


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_writes_the_frames_made_so_far(ckpts, tmp_path, sig, read_until):
    """Ctrl-C (or SIGTERM) mid-rollout: one line, no traceback, and the frames made so far in --out."""
    out = tmp_path / "cut.npz"
    p = subprocess.Popen(
        [sys.executable, "generate.py", "--ckpt", str(ckpts / "dit.pt"), "--prompt", str(ckpts / "episode_00000.npz"),
         "--frames", "1000000", "--steps", "1", "--out", str(out)],
        cwd=ROOT, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = read_until(p, p.stderr, r"\| *([2-9]|\d\d+)/\d+ \[")  # tqdm's count: wait for frames, not for time
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 128 + sig and "Traceback" not in seen + stderr, stderr
    m = re.search(r"interrupted \(\w+\) after (\d+) of 1000000 frames", stdout)
    assert m, stdout
    assert len(np.load(out)["frames"]) == int(m.group(1)) >= 2
