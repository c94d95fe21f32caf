"""train.py end to end on CPU: record, train the tiny VAE, train the tiny DiT; resume; torchrun; bad input."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402
from train import PRESETS  # noqa: E402

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(*args, check=True, **kw):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(log):
    return [float(m) for m in re.findall(r"step +\d+ loss ([0-9.eE+-]+)", log)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny recorded dataset, a tiny trained VAE and a tiny trained DiT, shared by the tests below."""
    d = tmp_path_factory.mktemp("train")
    data = str(d / "data")
    run(
        "generate_dataset.py",
        "--agent",
        "random",
        "--episodes",
        "3",
        "--max-episode-frames",
        "40",
        "--frame-size",
        "32",
        "--out",
        data,
        "--workers",
        "1",
    )
    vae = run("train.py", "vae", "--preset", "tiny", "--data", data, "--out", str(d / "vae"), "--wandb", "disabled")
    dit = run(
        "train.py",
        "dit",
        "--preset",
        "tiny",
        "--data",
        data,
        "--vae",
        str(d / "vae"),
        "--out",
        str(d / "dit"),
        "--wandb",
        "disabled",
    )
    return {
        "dir": d,
        "data": data,
        "vae": str(d / "vae"),
        "dit": str(d / "dit"),
        "vae_log": vae.stdout,
        "dit_log": dit.stdout,
    }


def test_tiny_pipeline_writes_checkpoints(pipeline):
    for kind in ("vae", "dit"):
        ck = torch.load(os.path.join(pipeline[kind], "ckpt.pt"), map_location="cpu", weights_only=True)
        assert set(ck) >= {"model", "ema", "optimizer", "step", "config", "version"}
        assert ck["config"]["kind"] == kind and ck["step"] == ck["config"]["train"]["steps"]
        assert os.path.isfile(os.path.join(pipeline[kind], "log.txt"))
        assert os.path.isfile(os.path.join(pipeline[kind], "config.json"))
    dit = torch.load(os.path.join(pipeline["dit"], "ckpt.pt"), map_location="cpu", weights_only=True)
    assert os.path.samefile(dit["config"]["vae_path"], os.path.join(pipeline["vae"], "ckpt.pt"))
    assert any(f.startswith("sample_") for f in os.listdir(pipeline["dit"]))  # the rollout sample was written
    # the latent cache was built once, next to the data, and is reused by a second run
    assert os.listdir(os.path.join(pipeline["data"], "latents"))


@pytest.mark.parametrize("kind", ["vae", "dit"])
def test_overfit_one_batch_halves_the_loss(pipeline, kind, tmp_path):
    extra = ["--vae", pipeline["vae"], "--sample-every", "0"] if kind == "dit" else []
    p = run(
        "train.py",
        kind,
        "--preset",
        "tiny",
        "--data",
        pipeline["data"],
        "--out",
        str(tmp_path / kind),
        "--overfit",
        "--steps",
        "120",
        "--log-every",
        "10",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--wandb",
        "disabled",
        *extra,
    )
    ls = losses(p.stdout)
    assert len(ls) >= 10
    assert ls[-1] < 0.5 * ls[0], ls


def test_resume_continues_exactly(pipeline, tmp_path):
    """A run killed partway and resumed ends with the same weights as an uninterrupted run, in bf16 (where the
    CPU does it fast; else fp32): autocast leaves the weights, optimizer and checkpoints in fp32."""
    common = [
        "--precision",
        "bf16",
        "--preset",
        "tiny",
        "--data",
        pipeline["data"],
        "--vae",
        pipeline["vae"],
        "--steps",
        "30",
        "--save-every",
        "1",
        "--eval-every",
        "1000",
        "--sample-every",
        "0",
        "--wandb",
        "disabled",
    ]
    run("train.py", "dit", *common, "--out", str(tmp_path / "a"))
    out_b = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "dit", *common, "--out", str(out_b)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = out_b / "ckpt.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < 30, killed_at
    p = run("train.py", "dit", *common, "--out", str(out_b), "--resume")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert b["step"] == 30
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    # the optimizer state was restored, not restarted: Adam's step counters match
    steps_a = [s["step"] for s in a["optimizer"]["state"].values()]
    steps_b = [s["step"] for s in b["optimizer"]["state"].values()]
    assert steps_a == steps_b and float(steps_a[0]) == 30
    precision = "bf16" if utils.fast_bf16("cpu") else "fp32"
    assert a["config"]["precision"] == b["config"]["precision"] == precision
    assert all(v.dtype == torch.float32 for k in ("model", "ema") for v in b[k].values() if v.is_floating_point())
    assert f"x1, {precision}, from step {killed_at}" in p.stdout


def start_and_signal(args, sig, at_step, torchrun=False):
    """Start `train.py dit ARGS` (log line every step), send `sig` once step `at_step` is logged; -> (rc, stdout)."""
    cmd = [sys.executable, "train.py", "dit", *args, "--log-every", "1"]
    if torchrun:
        cmd[:1] = [shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun", "--standalone",
                   "--nproc_per_node=2"]  # fmt: skip
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    try:
        for line in p.stdout:  # waits for the event (a logged step), not for time
            seen.append(line)
            m = re.match(r"step +(\d+) loss", line)
            if m and int(m.group(1)) >= at_step:
                p.send_signal(sig)
                break
        out, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    return p.returncode, "".join(seen) + out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_saves_then_resume_ends_with_the_same_weights(pipeline, tmp_path, sig):
    """A scheduler's signal at a random step: the step in flight ends, the checkpoint is written, the exit
    line says so; --resume then ends exactly where an uninterrupted run ends."""
    common = ["--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"], "--steps", "30",
              "--save-every", "1000", "--eval-every", "1000", "--sample-every", "0", "--wandb", "disabled"]  # fmt: skip
    run("train.py", "dit", *common, "--out", str(tmp_path / "a"))
    at = random.Random().randint(3, 25)
    rc, out = start_and_signal([*common, "--out", str(tmp_path / "b")], sig, at)
    assert rc == 128 + sig, (rc, out[-2000:])
    m = re.search(rf"stopped by {sig.name} after step (\d+): checkpoint .* saved; continue with --resume", out)
    assert m, out[-2000:]
    stopped_at = int(m.group(1))
    assert at <= stopped_at < 30, (at, stopped_at)
    ck = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ck["step"] == stopped_at
    p = run("train.py", "dit", *common, "--out", str(tmp_path / "b"), "--resume")
    assert f"from step {stopped_at}" in p.stdout
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert b["step"] == 30
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)


def test_torchrun_sigterm_stops_every_rank_and_rank0_saves(pipeline, tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the step to stop after, rank 0 saves, and
    --resume under torchrun finishes the run."""
    common = ["--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"], "--out", str(tmp_path / "d"),
              "--steps", "40", "--save-every", "1000", "--eval-every", "1000", "--sample-every", "0",
              "--device", "cpu", "--wandb", "disabled"]  # fmt: skip
    rc, out = start_and_signal(common, signal.SIGTERM, 3, torchrun=True)
    m = re.search(r"stopped by (SIGTERM|a signal to another rank) after step (\d+)", out)
    assert m and rc != 0, (rc, out[-2000:])
    stopped_at = int(m.group(2))
    assert torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)["step"] == stopped_at < 40
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "train.py", "dit", *common, "--resume"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"from step {stopped_at}" in p.stdout
    assert torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)["step"] == 40


def test_torchrun_two_processes_gloo(pipeline, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    out = tmp_path / "ddp"
    p = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            "dit",
            "--preset",
            "tiny",
            "--data",
            pipeline["data"],
            "--vae",
            pipeline["vae"],
            "--out",
            str(out),
            "--steps",
            "4",
            "--save-every",
            "4",
            "--eval-every",
            "4",
            "--sample-every",
            "0",
            "--device",
            "cpu",
            "--wandb",
            "disabled",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and ck["config"]["world_size"] == 2
    assert [f for f in os.listdir(out) if f.endswith(".pt")] == ["ckpt.pt"]


def one_line_error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_bad_inputs(pipeline, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run("train.py", "vae", "--preset", "tiny", "--data", str(empty), "--out", str(tmp_path / "x"), check=False)
    one_line_error(p, str(empty))
    p = run(
        "train.py",
        "dit",
        "--preset",
        "tiny",
        "--data",
        pipeline["data"],
        "--vae",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "y"),
        check=False,
    )
    one_line_error(p, "nope")
    # resuming with an incompatible model config
    p = run(
        "train.py",
        "dit",
        "--preset",
        "tiny",
        "--data",
        pipeline["data"],
        "--vae",
        pipeline["vae"],
        "--out",
        pipeline["dit"],
        "--resume",
        "--model",
        "S",
        check=False,
    )
    one_line_error(p, "--resume")
    # a VAE checkpoint where a DiT is expected
    shutil.copytree(pipeline["vae"], tmp_path / "wrong")
    p = run(
        "train.py",
        "dit",
        "--preset",
        "tiny",
        "--data",
        pipeline["data"],
        "--vae",
        pipeline["vae"],
        "--out",
        str(tmp_path / "wrong"),
        "--resume",
        check=False,
    )
    one_line_error(p, "'vae'")


def test_compiled_training_saves_the_bare_model(pipeline, tmp_path):
    """--compile (inductor, here on the CPU as on a GPU): it trains, and the checkpoint holds the bare module's
    weights (no _orig_mod. prefixes), so generation and --resume load it as any other."""
    out = str(tmp_path / "c")
    run("train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"], "--out", out,
        "--compile", "--steps", "6", "--log-every", "3", "--sample-every", "0", "--wandb", "disabled")  # fmt: skip
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    ref = torch.load(os.path.join(pipeline["dit"], "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ck["step"] == 6 and set(ck["model"]) == set(ref["model"]) == set(ck["ema"])
    assert not all(torch.equal(ck["model"][k], ref["model"][k]) for k in ref["model"])


def test_corrupt_episode_and_bad_init_are_one_line(pipeline, tmp_path):
    """A truncated episode file in --data is named in one line (both kinds); so is an --init that does not fit."""
    data = tmp_path / "data"
    shutil.copytree(pipeline["data"], data)
    shutil.rmtree(data / "latents", ignore_errors=True)  # no cache yet: the corrupt file is met while building it
    ep = data / "episode_00001.npz"
    ep.write_bytes(ep.read_bytes()[: ep.stat().st_size // 2])
    p = run("train.py", "vae", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "v"), check=False)
    one_line_error(p, "episode_00001.npz")
    p = run("train.py", "dit", "--preset", "tiny", "--data", str(data), "--vae", pipeline["vae"],
            "--out", str(tmp_path / "d"), check=False)  # fmt: skip
    one_line_error(p, "episode_00001.npz")
    ck = torch.load(os.path.join(pipeline["vae"], "ckpt.pt"), map_location="cpu", weights_only=True)
    ck["ema"]["stray.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "odd.pt")
    p = run("train.py", "vae", "--preset", "tiny", "--data", pipeline["data"], "--init", str(tmp_path / "odd.pt"),
            "--out", str(tmp_path / "o"), check=False)  # fmt: skip
    one_line_error(p, "--init")


def test_help_shows_each_kind_its_own_options_and_real_defaults():
    """train.py vae --help and dit --help list only their kind's flags, with the preset's values as defaults."""
    default = "gpu" if torch.cuda.is_available() else "cpu"
    vae, dit = (run("train.py", kind, "--help").stdout for kind in ("vae", "dit"))
    tiny = run("train.py", "dit", "--preset", "tiny", "--help").stdout
    # a flag's help line: after "options:", up to the next flag
    flag = lambda text, name: " ".join(text.split("options:")[1].split(f"--{name} ", 1)[1].split("--", 1)[0].split())
    assert "--fg-weight" in vae and "--decoder-only" in vae and "--window" not in vae and "--vae " not in vae
    assert "--window" in dit and "--vae " in dit and "--kl-weight" not in dit and "--crop" not in dit
    # the same flag name, each kind's own meaning and default: the VAE's preset sets 50 or 100, the DiT's 0
    assert f"(default: {PRESETS['vae'][default]['fg_weight']})" in flag(vae, "fg-weight")
    assert "(default: 0.0)" in flag(dit, "fg-weight") and "latent cells" in flag(dit, "fg-weight")
    for kind, text in (("vae", vae), ("dit", dit)):  # the preset's steps, not the dataclass's 1000
        assert f"(default: {PRESETS[kind][default]['steps']})" in flag(text, "steps")
    assert f"(default: {PRESETS['vae'][default]['model']})" in flag(vae, "model")
    assert f"(default: {PRESETS['dit'][default]['window']})" in flag(dit, "window")
    assert "(default: 4)" in flag(tiny, "window") and "(default: tiny)" in flag(tiny, "model")
    assert f"(default: {default})" in flag(dit, "preset")


def test_decoder_finetune_keeps_the_encoder(pipeline, tmp_path):
    """--init + --decoder-only: the encoder (so the latents a DiT learned) is untouched, the decoder learns."""
    out = str(tmp_path / "ft")
    args = ["train.py", "vae", "--preset", "tiny", "--data", pipeline["data"], "--wandb", "disabled"]
    run(*args, "--init", pipeline["vae"], "--decoder-only", "--steps", "10", "--out", out)
    load = lambda d: torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True)
    old, new = load(pipeline["vae"]), load(out)
    enc = [k for k in old["ema"] if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in old["ema"] if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    assert all(torch.equal(old["ema"][k], new["model"][k]) for k in enc)
    assert not all(torch.equal(old["ema"][k], new["model"][k]) for k in dec)
    assert new["config"]["scaling_factor"] == old["config"]["scaling_factor"]
    one_line_error(run(*args, "--decoder-only", "--out", str(tmp_path / "x"), check=False), "--init")
    one_line_error(run(*args, "--init", pipeline["dit"], "--out", str(tmp_path / "y"), check=False), "'dit'")


def test_latent_noise_decodes_noised_latents(pipeline, tmp_path):
    """--latent-noise S (issue #26): the decoder trains on the latent plus Gaussian noise of a random std up to S
    latent stds (the batch's, so that scaling the latents up cannot drown it); 0 decodes the latent as it is."""
    import dataclasses

    from tasks import VAETask
    from train import VAEConfig

    cfg = VAEConfig(data=pipeline["data"], model="tiny", init=pipeline["vae"], decoder_only=True, batch_size=16)
    seen = []
    for noise in (0.0, 3.0):
        task = VAETask(dataclasses.replace(cfg, latent_noise=noise), torch.device("cpu"), True)
        hook = task.model.post_quant_conv.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
        x = task.train.sample(16, torch.Generator().manual_seed(0))["frames"][:, 0]
        mean = task.model.encode(x).mean.detach()
        task.loss(task.model, torch.Generator().manual_seed(0))  # draws the same batch x
        hook.remove()
        seen[-1] = (seen[-1] - mean) / mean.std()  # the added noise, in latent stds
    assert torch.equal(seen[0], torch.zeros_like(seen[0]))
    std = seen[1].flatten(1).std(1)  # one std a frame, uniform in (0, 3)
    assert 0 < std.min() < std.max() < 3.3 and std.max() > 1.0 and std.std() > 0.2
    # the whole VAE too (the encoder learns against it); a negative level is refused
    args = ["train.py", "vae", "--preset", "tiny", "--data", pipeline["data"], "--wandb", "disabled", "--steps", "3"]
    run(*args, "--init", pipeline["vae"], "--latent-noise", "0.1", "--out", str(tmp_path / "full"))
    one_line_error(run(*args, "--latent-noise", "-1", "--out", str(tmp_path / "x"), check=False), "--latent-noise")


def test_lighter_decoder_keeps_the_encoder(pipeline, tmp_path):
    """--decoder lite: a new, smaller decoder learns against the frozen encoder; generation loads it."""
    from engine import load_vae

    out = str(tmp_path / "lite")
    args = ["train.py", "vae", "--preset", "tiny", "--data", pipeline["data"], "--wandb", "disabled"]
    run(*args, "--init", pipeline["vae"], "--decoder-only", "--decoder", "lite", "--steps", "10", "--out", out)
    load = lambda d: torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True)
    old, new = load(pipeline["vae"]), load(out)
    assert new["config"]["model"]["decoder"]["ch"] == 16
    enc = [k for k in old["ema"] if k.startswith(("encoder.", "quant_conv."))]
    assert enc and all(torch.equal(old["ema"][k], new["model"][k]) for k in enc)
    n_dec = lambda sd: sum(v.numel() for k, v in sd.items() if k.startswith("decoder."))
    assert n_dec(new["ema"]) != n_dec(old["ema"])
    vae = load_vae(os.path.join(out, "ckpt.pt"), "cpu")
    assert vae.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 32, 32)
    one_line_error(
        run(*args, "--init", pipeline["vae"], "--decoder", "lite", "--out", str(tmp_path / "x"), check=False),
        "--decoder-only",
    )
    bad = run(
        *args,
        "--init",
        pipeline["vae"],
        "--decoder-only",
        "--decoder",
        "huge",
        "--out",
        str(tmp_path / "y"),
        check=False,
    )
    one_line_error(bad, "huge")


def test_dit_init_starts_from_the_trained_weights(pipeline, tmp_path):
    """train.py dit --init RUN starts from RUN's EMA weights (lr 0: nothing moves); wrong runs are refused."""
    out = str(tmp_path / "ft")
    args = ["train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"]]
    args += ["--wandb", "disabled", "--steps", "2", "--sample-every", "0"]
    run(*args, "--init", pipeline["dit"], "--lr", "0", "--out", out)
    load = lambda d: torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True)
    old, new = load(pipeline["dit"]), load(out)
    assert all(torch.equal(old["ema"][k], new["model"][k]) for k in old["ema"])
    one_line_error(run(*args, "--init", pipeline["vae"], "--out", str(tmp_path / "x"), check=False), "'vae'")
    other = run(*args, "--init", pipeline["dit"], "--model", "XS", "--out", str(tmp_path / "y"), check=False)
    one_line_error(other, "--init")


def test_dit_init_on_another_vae_needs_init_new_vae(pipeline, tmp_path):
    """A DiT trained on one VAE's latents starts on another's (its encoder fine-tuned) only with --init-new-vae."""
    vae2 = str(tmp_path / "vae2")
    run("train.py", "vae", "--preset", "tiny", "--data", pipeline["data"], "--wandb", "disabled", "--steps", "2",
        "--init", pipeline["vae"], "--latent-noise", "0.2", "--out", vae2)  # fmt: skip
    args = ["train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", vae2, "--init", pipeline["dit"]]
    args += ["--wandb", "disabled", "--steps", "2", "--sample-every", "0", "--lr", "0"]
    one_line_error(run(*args, "--out", str(tmp_path / "x"), check=False), "--init-new-vae")
    run(*args, "--init-new-vae", "--out", str(tmp_path / "ft"))
    load = lambda d: torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True)
    old, new = load(pipeline["dit"]), load(str(tmp_path / "ft"))
    assert all(torch.equal(old["ema"][k], new["model"][k]) for k in old["ema"])
    assert new["config"]["vae_path"] == os.path.abspath(os.path.join(vae2, "ckpt.pt"))


def test_dit_init_may_lengthen_the_window(pipeline, tmp_path):
    """The window holds no weights (RoPE over time): --init a 4-frame run into a 6-frame one, same weights."""
    out = str(tmp_path / "long")
    args = ["train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"]]
    run(*args, "--wandb", "disabled", "--steps", "1", "--sample-every", "0", "--lr", "0", "--window", "6",
        "--init", pipeline["dit"], "--out", out)  # fmt: skip
    new = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    old = torch.load(os.path.join(pipeline["dit"], "ckpt.pt"), map_location="cpu", weights_only=True)
    assert new["config"]["model"]["window"] == 6 and old["config"]["model"]["window"] == 4
    assert all(torch.equal(old["ema"][k], new["model"][k]) for k in old["ema"])


def test_rollout_training_runs_and_checks_its_flags(pipeline, tmp_path):
    """--rollout-frac trains part of each batch on the model's own context (test_selfforcing.py: what it draws)."""
    args = ["train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"]]
    args += ["--wandb", "disabled", "--sample-every", "0", "--log-every", "2"]
    p = run(*args, "--steps", "4", "--rollout-frac", "0.5", "--out", str(tmp_path / "ro"))
    ro = [float(m) for m in re.findall(r"rollout_loss ([0-9.eE+-]+)", p.stdout)]
    assert len(ro) == 2 and all(0 < v < 10 for v in ro), p.stdout
    bad = run(*args, "--rollout-frac", "0.5", "--rollout-frames", "3", "--out", str(tmp_path / "x"), check=False)
    one_line_error(bad, "--rollout-frames 3")


def test_clean_copy_training_runs_and_checks_its_flags(pipeline, tmp_path):
    """--clean-copy runs each window twice (test_levers.py: what the pass computes): twice the tokens a sample."""
    args = ["train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", pipeline["vae"]]
    args += ["--wandb", "disabled", "--sample-every", "0", "--log-every", "2"]
    p = run(*args, "--steps", "4", "--clean-copy", "--out", str(tmp_path / "cc"))
    rates = re.findall(r"samples_s ([0-9.eE+-]+) tokens_s ([0-9.eE+-]+)", p.stdout)
    model = json.load(open(tmp_path / "cc" / "config.json"))["model"]
    assert len(rates) == 2 and all(0 < float(v) < 10 for v in losses(p.stdout)), p.stdout
    tokens_per_sample = float(rates[-1][1]) / float(rates[-1][0])
    grid = (model["input_h"] // model["patch_size"]) * (model["input_w"] // model["patch_size"])
    assert tokens_per_sample == pytest.approx(2 * model["window"] * grid, rel=0.05)
    # the same seed, batches and levels without the flag: the weights differ only if training used the copy
    run(*args, "--steps", "4", "--out", str(tmp_path / "plain"))
    w = [torch.load(tmp_path / d / "ckpt.pt", map_location="cpu", weights_only=True)["model"] for d in ("cc", "plain")]
    assert not all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    bad = run(*args, "--clean-copy", "--clean-context", "1", "--out", str(tmp_path / "x"), check=False)
    one_line_error(bad, "--clean-copy")


def test_bundle_then_finetune_then_rebundle_in_place(pipeline, tmp_path):
    """make train-cpu's last stages: bundle, fine-tune on the bundled VAE, bundle again; the VAE file stays as it is.
    The first bundle also cuts the sample files from a recorded episode (--samples-from)."""
    import cv2

    import dataset
    import pong
    import utils

    out, samples = str(tmp_path / "ck"), tmp_path / "samples"
    episode = os.path.join(pipeline["data"], "episode_00000.npz")
    run("bundle.py", "--dit", pipeline["dit"], "--out", out, "--samples-from", episode, "--samples-start", "3",
        "--samples-len", "5", "--samples-dir", str(samples))  # fmt: skip
    ep = dataset.load_episode(episode)
    prompt = cv2.cvtColor(cv2.imread(str(samples / "prompt.png")), cv2.COLOR_BGR2RGB)
    assert (prompt == ep["frames"][3]).all()
    rally = torch.load(samples / "actions_rally.pt", weights_only=True)
    assert rally.tolist() == ep["actions"][3:8].tolist()
    for d, a in (("up", pong.UP), ("down", pong.DOWN)):
        assert torch.load(samples / f"actions_{d}.pt", weights_only=True).tolist() == [a] * 5
    assert open(samples / "heldout_episode.npz", "rb").read() == open(episode, "rb").read()
    assert {p.name for p in samples.iterdir()} == {"prompt.png", "actions_rally.pt", "actions_up.pt",
                                                   "actions_down.pt", "heldout_episode.npz"}  # fmt: skip
    bad = run("bundle.py", "--dit", pipeline["dit"], "--out", out, "--samples-from", episode, "--samples-start",
              "99999", "--samples-dir", str(samples), check=False)  # fmt: skip
    one_line_error(bad, "--samples-start")
    vae, dit = os.path.join(out, "pong_vae.pt"), os.path.join(out, "pong_dit.pt")
    ck = torch.load(dit, map_location="cpu", weights_only=True)
    assert ck["config"]["vae_fingerprint"] == utils.file_fingerprint(vae)
    assert all(v.dtype == torch.float16 for v in ck["ema"].values() if v.is_floating_point())
    before = open(vae, "rb").read()
    args = ["train.py", "dit", "--preset", "tiny", "--data", pipeline["data"], "--vae", vae, "--init", dit]
    run(*args, "--wandb", "disabled", "--steps", "2", "--sample-every", "0", "--out", str(tmp_path / "ft"))
    run("bundle.py", "--dit", str(tmp_path / "ft"), "--vae", vae, "--out", out)
    assert open(vae, "rb").read() == before
    assert torch.load(dit, map_location="cpu", weights_only=True)["step"] == 2


@pytest.fixture(scope="module")
def pong_600(tmp_path_factory):
    """One 600-frame random-agent Pong episode at 32x32: the reset screen (other colours) stays under 2% of
    the frames, as in real data."""
    data = str(tmp_path_factory.mktemp("pong_600") / "data")
    run("generate_dataset.py", "--agent", "random", "--episodes", "1", "--max-episode-frames", "600",
        "--frame-size", "32", "--seed", "3", "--workers", "1", "--out", data)  # fmt: skip
    return data


def test_fg_mask_colour_marks_the_score_digits_and_not_the_walls(pong_600):
    """--fg-mask colour (issue #26): every digit pixel of the score strip counts as foreground, even where the
    median frame holds the same digit; the walls (drawn in every frame) do not; the median mask is kept."""
    import dataclasses

    import pong
    from tasks import VAETask
    from train import VAEConfig

    cfg = VAEConfig(data=pong_600, model="tiny", val_fraction=0.0, fg_mask="colour")
    task = VAETask(cfg, torch.device("cpu"), True)
    median = VAETask(dataclasses.replace(cfg, fg_mask="median"), torch.device("cpu"), True)
    x = task.train.sample(64, torch.Generator().manual_seed(0))["frames"][:, 0]  # (B, 3, 32, 32)
    fg = task.foreground(x)[:, 0]
    fg_median = median.foreground(x)[:, 0]
    rows = pong.strip_rows(32)
    drawn = (x - torch.tensor(pong.COLOR_BACKGROUND).view(3, 1, 1) / 127.5 + 1).abs().amax(1) > 0.1
    digits = drawn[:, :rows] & task.changes[0, :rows]
    assert digits.sum() > 0 and fg[:, :rows][digits].all()  # every drawn digit pixel
    assert fg[:, :rows].sum() > fg_median[:, :rows].sum()  # more than the median mask marks there
    assert (fg_median <= fg).all()  # the median mask's pixels stay marked
    wall = drawn.all(0) & ~task.changes[0]  # drawn in every frame and never changing: the walls
    assert wall.sum() > 0 and not (fg & ~fg_median)[:, wall].any()  # the colour rule adds no wall pixel


def test_ball_weight_weights_the_detected_balls_pixels_only(pong_600, tmp_path, capsys):
    """--ball-weight (issue #26): the pixels around each detected ball weigh --ball-weight more, no other pixel
    does, and a frame without a ball is unchanged; the option is refused for a game without Pong's detector."""
    import dataclasses

    import pong
    from dataset import to_uint8_frames
    from tasks import VAETask
    from train import VAEConfig

    cfg = VAEConfig(data=pong_600, model="tiny", val_fraction=0.0, fg_weight=100.0)
    plain = VAETask(cfg, torch.device("cpu"), True)
    task = VAETask(dataclasses.replace(cfg, ball_weight=500.0), torch.device("cpu"), True)
    x = task.train.sample(64, torch.Generator().manual_seed(0))["frames"][:, 0]  # (B, 3, 32, 32)
    extra = (task.weights(x) - plain.weights(x))[:, 0]
    xy = pong.detect_objects(to_uint8_frames(x))["ball_xy"]
    has = ~np.isnan(xy[:, 0])
    assert 0 < has.sum() < len(x)  # balls and frames without one
    assert set(extra.unique().tolist()) <= {0.0, 500.0}
    assert (extra[~torch.from_numpy(has)] == 0).all()
    for b in np.flatnonzero(has):
        marked = extra[b].nonzero()  # (n, 2): rows, columns
        assert 1 <= len(marked) <= 25
        cx, cy = xy[b]
        assert ((marked[:, 1] - cx).abs() <= 2).all() and ((marked[:, 0] - cy).abs() <= 2).all()
        assert extra[b, round(cy), round(cx)] == 500.0  # the pixel under the ball's centre
    other = str(tmp_path / "other")
    shutil.copytree(pong_600, other)
    meta = json.load(open(os.path.join(other, "meta.json")))
    json.dump(meta | {"game": "breakout"}, open(os.path.join(other, "meta.json"), "w"))
    with pytest.raises(SystemExit):
        VAETask(dataclasses.replace(cfg, data=other, ball_weight=500.0), torch.device("cpu"), True)
    assert "--ball-weight" in capsys.readouterr().err


def test_ball_oversample_draws_that_share_of_the_batch_from_crowded_balls(pong_600, capsys):
    """--ball-oversample F (issue #26): the first round(F * B) frames of a batch have a ball with a paddle or a wall
    within 3 px (pong.ball_crowded), the rest are drawn as without it; a share outside 0..1 is refused."""
    import dataclasses

    import pong
    from dataset import to_uint8_frames
    from tasks import VAETask
    from train import VAEConfig

    cfg = VAEConfig(data=pong_600, model="tiny", val_fraction=0.0, batch_size=64)
    crowded = lambda task: pong.ball_crowded(to_uint8_frames(task.batch(torch.Generator().manual_seed(0))))
    plain = crowded(VAETask(cfg, torch.device("cpu"), True))
    task = VAETask(dataclasses.replace(cfg, ball_oversample=0.75), torch.device("cpu"), True)
    assert "training frames have a crowded ball" in capsys.readouterr().out
    drawn = crowded(task)
    assert drawn[:48].all() and plain.mean() < 0.4  # without the flag most frames have no crowded ball (23%)
    assert drawn[48:].mean() < 0.4
    with pytest.raises(SystemExit):
        VAETask(dataclasses.replace(cfg, ball_oversample=1.0), torch.device("cpu"), True)
    assert "--ball-oversample 1.0: must be a share" in capsys.readouterr().err
