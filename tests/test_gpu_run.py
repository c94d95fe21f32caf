"""gpu_run.py, the one-GPU-call pipeline, end to end on the CPU with its tiny preset: carried wheels, recording,
latents, two arms side by side, bundles, evaluations, benchmark, the report; a stage failing on purpose; no time."""

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402
from bench import train_batch_rule  # noqa: E402
from dit import DiT_models  # noqa: E402
from gpu_run import parse_train_log  # noqa: E402

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SHIPPED = os.path.join(ROOT, "checkpoints", "pong_dit.pt")
needs_bundle = pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="needs the shipped checkpoints/")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def probe_wheel(folder):
    """A pure-Python wheel made here: the tests download nothing, so it stands in for the carried wheels
    (the venv's own gymnasium and ale-py do the recording)."""
    os.makedirs(folder, exist_ok=True)
    path, info = os.path.join(folder, "gpu_run_probe-1.0-py3-none-any.whl"), "gpu_run_probe-1.0.dist-info"
    files = {
        "gpu_run_probe.py": "CARRIED = True\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-run-probe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A carried folder (one wheel, one data set) and a tiny held-out set, recorded at the shipped frame size."""
    d = tmp_path_factory.mktemp("gpu_run")
    probe_wheel(str(d / "pack" / "wheels"))
    for out, seed in ((d / "heldout", 90000), (d / "pack" / "data" / "pong_carried", 5)):
        p = run("generate_dataset.py", "--agent", "random", "--episodes", "1", "--max-episode-frames", "60",
                "--frame-size", "96", "--seed", str(seed), "--out", str(out), "--workers", "1")  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
    return d


def gpu_run(d, *args):
    flags = ["--preset", "tiny", "--device", "cpu", "--pack", str(d / "pack"), "--heldout", str(d / "heldout")]
    return run("gpu_run.py", *flags, *args)


def stages(report):
    """{stage: (status, note)} from the report's stage table."""
    rows = re.findall(r"^\| (\w+) \| (ok|skipped|FAILED) \| [\d.]+ \| -?\d+ \| (.*) \|$", report, re.M)
    return {name: (status, note) for name, status, note in rows}


@needs_bundle
def test_tiny_run_end_to_end(setup):
    d = setup
    out, site = d / "out", d / "site"
    p = gpu_run(d, "--out", str(out), "--work", str(d / "work"), "--site", str(site))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = (out / "report.md").read_text()
    st = stages(report)
    assert list(st) == ["install", "record", "encode", "train", "bundle", "eval", "bench"], report
    assert all(status == "ok" for status, _ in st.values()), report
    # install: the carried wheel went into --site (pip --target), and the recorder's imports work
    assert (site / "gpu_run_probe.py").is_file()
    assert "1 wheels into" in st["install"][1] and "(pip)" in st["install"][1] and "gymnasium 1." in st["install"][1]
    # record: both sets, recorded fresh (not the carried data), 3 episodes of 80 frames
    assert re.match(r"240 frames in 2 sets", st["record"][1]), st["record"]
    # OUT: at most 8 files of at most 16 MiB: the arms' fp16 DiTs, the report, results.json, the log
    files = sorted(os.listdir(out))
    assert files == ["log.txt", "report.md", "results.json", "tiny_clean_dit.pt", "tiny_dit.pt"]
    assert all(os.path.getsize(out / f) <= 16 * 2**20 for f in files)
    vae_fp = utils.file_fingerprint(os.path.join(ROOT, "checkpoints", "pong_vae.pt"))
    for arm in ("tiny", "tiny_clean"):
        ck = torch.load(out / f"{arm}_dit.pt", map_location="cpu", weights_only=True)
        assert all(v.dtype == torch.float16 for v in ck["ema"].values() if v.is_floating_point())
        assert ck["step"] == 10 and ck["config"]["vae_fingerprint"] == vae_fp  # plays with checkpoints/pong_vae.pt
    results = json.loads((out / "results.json").read_text())
    for arm in results["arms"].values():
        assert arm["exit"] == 0 and arm["steps"] == 10 and arm["samples_s"] > 0 and arm["vae_is_shipped"]
        assert [s for _, s, *_ in arm["val"]] == [5, 10] and arm["minutes"] > 0
    assert results["arms"]["tiny"]["frames_seen"] == 10 * 4 * 4  # steps x batch x window: every frame a target
    assert results["arms"]["tiny_clean"]["frames_seen"] == 10 * 4  # clean context: the last frame only
    # the comparison: the shipped model and each arm, evaluated on the held-out set
    assert set(results["evals"]) == {"shipped", "tiny", "tiny_clean"}
    assert all(m["data"]["episodes"] == 1 for m in results["evals"].values())
    table = report.split("## On the held-out set")[1]
    assert all(re.search(rf"^\| {n} \| [\d.]+ \|", table, re.M) for n in ("shipped", "tiny", "tiny_clean")), table
    assert "val_loss / val_next against training minutes" in report and "DiT-tiny" in report  # curves, bench
    assert "----- " in (out / "log.txt").read_text()  # every stage's output


def test_failing_stage_still_leaves_the_report(setup):
    """record fails on purpose: the report says so, and encode goes on with the carried data set."""
    d = setup
    out = d / "out_fail"
    p = gpu_run(d, "--out", str(out), "--work", str(d / "work_fail"), "--stages", "record,encode", "--fail", "record",
                "--data", "data/pong_carried")  # fmt: skip
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    st = stages((out / "report.md").read_text())
    assert st["record"] == ("FAILED", "RuntimeError: failed on purpose (--fail record)")
    assert st["encode"][0] == "ok" and os.path.join("pack", "data", "pong_carried") in st["encode"][1]
    assert os.listdir(d / "pack" / "data" / "pong_carried" / "latents")  # the shipped VAE's latent cache


def test_no_time_left_skips_every_stage(tmp_path):
    p = run("gpu_run.py", "--preset", "tiny", "--device", "cpu", "--total-min", "0", "--out", str(tmp_path / "o"),
            "--work", str(tmp_path / "w"), "--pack", str(tmp_path / "none"))  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    st = stages((tmp_path / "o" / "report.md").read_text())
    assert len(st) == 7 and set(st.values()) == {("skipped", "out of time")}


def test_unknown_stage_is_one_line_error(tmp_path):
    p = run("gpu_run.py", "--preset", "tiny", "--stages", "record,train,nope", "--out", str(tmp_path))
    assert p.returncode == 2 and p.stderr.startswith("error: --stages") and "Traceback" not in p.stderr


def test_train_log_gives_minutes_frames_and_validation(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "dit: 5.50M parameters on cuda x1, from step 0\n"
        "step     50 loss 0.05 lr 0.0002 grad_norm 0.3 samples_s 800 tokens_s 1e+05 mfu 0.01\n"
        "step    100 loss 0.04 lr 0.0002 grad_norm 0.3 samples_s 1600 tokens_s 2e+05 mfu 0.02\n"
        "step    100 val_loss 0.03 val_next 0.02\n"
        "step    150 loss 0.04 lr 0.0002 grad_norm 0.3 samples_s 1600 tokens_s 2e+05 mfu 0.02\n"
    )
    s = parse_train_log(str(log), batch=64, window=6, clean_share=0.5)
    assert s["steps"] == 150 and s["samples_s"] == 1600 and s["mfu"] == 0.02  # the first interval left out
    assert s["minutes"] == pytest.approx((50 * 64 / 800 + 2 * 50 * 64 / 1600) / 60)
    assert s["val"] == [(round((50 * 64 / 800 + 50 * 64 / 1600) / 60, 2), 100, 0.03, 0.02)]
    assert s["frames_seen"] == 150 * 64 * 3.5  # half the windows train 6 frames, half their last one


def test_batch_rule_fills_tokens_and_fits_memory():
    """About --tokens tokens a step, a power of two of windows; halved until the saved activations fit."""
    model = DiT_models["tiny"](window=4)  # 36 tokens a frame, 144 a window
    assert train_batch_rule(model, 4, memory=1e12, tokens=144 * 64) == 64
    assert train_batch_rule(model, 4, memory=1e12, tokens=144 * 90) == 64  # log2(90) = 6.49: nearest power of two
    small = train_batch_rule(model, 4, memory=20e6, tokens=144 * 64)
    assert small < 64 and small & (small - 1) == 0
