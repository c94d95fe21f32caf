"""Interrupt the long commands at random moments; each must stop within 10 s with what it saved intact.

    python stress.py --runs 100                       # play, generate, dataset, train x SIGINT, SIGTERM
    python stress.py --runs 3 --what play,train       # a quick look

Each run starts the command on a tiny model and data (made once, in --work), sends one signal after
a random delay in [0, --max-delay] s, and waits at most --deadline s for it to exit (then kills it:
a hang). It then checks what the command wrote: the game's actions .pt and .npz agree (play), the
.npz loads (generate), every episode file loads (dataset), the checkpoint loads at the step the
exit line names (train), and no temporary file is left behind. A signal that lands before the
command installed its handler (while Python imports torch, about the first second) ends it the
default way: counted apart, as "before the handler", still with its output checked.
Not a test (it takes minutes): its counts go in docs/.
"""

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

import utils
from utils import arg

PY = sys.executable
ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


@dataclass
class Config:
    runs: int = arg(100, "runs per command and signal")
    what: str = arg("play,generate,dataset,train", "comma-separated commands to interrupt")
    signals: str = arg("SIGINT,SIGTERM", "comma-separated signals to send")
    max_delay: float = arg(6.0, "the signal comes after a uniform random delay in [0, this] seconds")
    deadline: float = arg(10.0, "seconds a command may take to exit after the signal")
    parallel: int = arg(2, "runs at a time")
    work: str = arg("", "folder for the tiny model and the runs' outputs (default: a new temporary one)")
    seed: int = arg(0, "random seed of the delays")


def sh(*args):
    p = subprocess.run([PY, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if p.returncode:
        utils.die(f"setting up: {' '.join(args[:2])} failed: {p.stderr.strip()[-300:]}")


def setup(work):
    """Tiny recorded data, a tiny VAE and DiT trained on it (seconds), a prompt and an actions file."""
    if not os.path.isfile(os.path.join(work, "dit", "ckpt.pt")):
        data = os.path.join(work, "data")
        sh("generate_dataset.py", "--agent", "random", "--episodes", "3", "--max-episode-frames", "60",
           "--frame-size", "32", "--workers", "1", "--out", data)  # fmt: skip
        sh("train.py", "vae", "--preset", "tiny", "--data", data, "--out", os.path.join(work, "vae"))
        sh("train.py", "dit", "--preset", "tiny", "--data", data, "--vae", os.path.join(work, "vae"),
           "--out", os.path.join(work, "dit"))  # fmt: skip
    utils.atomic_torch_save(torch.randint(0, 6, (50,)), os.path.join(work, "actions.pt"))


def command(what, work, out):
    """The command line, and a check(stdout) -> None or the reason its output is not intact."""
    dit, data = os.path.join(work, "dit", "ckpt.pt"), os.path.join(work, "data")
    prompt = os.path.join(data, "episode_00000.npz")
    if what == "play":
        cmd = ["play.py", "--ckpt", dit, "--prompt", prompt, "--headless", "--frames", "100000", "--steps", "1",
               "--record", os.path.join(out, "g.npz")]  # fmt: skip

        def check(stdout):
            if not os.path.exists(os.path.join(out, "g.actions.pt")):
                return None if "wrote" not in stdout else "said it wrote the game, but no file"
            n = len(torch.load(os.path.join(out, "g.actions.pt"), weights_only=True))
            m = len(np.load(os.path.join(out, "g.npz"))["frames"])
            return None if m == n + 1 else f"{m} frames for {n} actions"

    elif what == "generate":
        cmd = ["generate.py", "--ckpt", dit, "--prompt", prompt, "--actions", os.path.join(work, "actions.pt"),
               "--frames", "100000", "--steps", "1", "--out", os.path.join(out, "g.npz")]  # fmt: skip

        def check(stdout):
            if not os.path.exists(os.path.join(out, "g.npz")):
                return None if "wrote" not in stdout else "said it wrote the frames, but no file"
            return None if len(np.load(os.path.join(out, "g.npz"))["frames"]) >= 1 else "no frames"

    elif what == "dataset":
        cmd = ["generate_dataset.py", "--agent", "random", "--episodes", "1000", "--max-episode-frames", "300",
               "--frame-size", "32", "--workers", "2", "--out", os.path.join(out, "d")]  # fmt: skip

        def check(stdout):
            import dataset

            for f in glob.glob(os.path.join(out, "d", "episode_*.npz")):
                try:
                    dataset.load_episode(f)
                except ValueError as e:
                    return str(e)
            return None

    else:
        cmd = ["train.py", "dit", "--preset", "tiny", "--data", data, "--vae", os.path.join(work, "vae"),
               "--out", os.path.join(out, "t"), "--steps", "100000", "--save-every", "7", "--eval-every", "1000",
               "--sample-every", "0", "--wandb", "disabled"]  # fmt: skip

        def check(stdout):
            path = os.path.join(out, "t", "ckpt.pt")
            m = re.search(r"stopped by \w+ after step (\d+)", stdout)
            if not os.path.exists(path):
                return "said it saved, but no checkpoint" if m else None
            step = torch.load(path, weights_only=True)["step"]
            return None if m is None or int(m.group(1)) == step else f"line says step {m.group(1)}, ckpt {step}"

    return cmd, check


def one(what, sig, delay, cfg, work):
    """-> "clean" | "before the handler" | "hang" | "corrupt: ..." | "error: ..." for one interrupted run."""
    out = tempfile.mkdtemp(dir=os.path.join(work, "runs"))
    cmd, check = command(what, work, out)
    p = subprocess.Popen([PY, *cmd], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(sig)
    try:
        stdout, stderr = p.communicate(timeout=cfg.deadline)
    except subprocess.TimeoutExpired:
        stacks = ""
        spy = shutil.which("py-spy", path=os.path.dirname(PY)) or shutil.which("py-spy")
        if spy:  # where it hangs, for the report (pip install py-spy)
            dump = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True, timeout=60)
            stacks = "\n" + dump.stdout[-3000:]
        p.kill()
        p.communicate()
        return "hang" + stacks
    left = glob.glob(os.path.join(out, "**", ".tmp-*"), recursive=True)
    bad = check(stdout) or (f"temporary files left: {left}" if left else None)
    if bad:
        return f"corrupt: {bad}"
    if p.returncode == (0 if what == "play" else 128 + sig) and "Traceback" not in stderr:
        return "clean"  # play ends a game on Ctrl-C as on Esc; the others exit 128 + N, the shell's way
    if p.returncode == -sig or stderr.rstrip().endswith("KeyboardInterrupt"):
        return "before the handler"
    return f"error: exit code {p.returncode}: {stderr.strip()[-300:]}"


def main(cfg):
    utils.take_back_sigint()  # started in the background, its children would ignore SIGINT
    work = cfg.work or tempfile.mkdtemp(prefix="stress-")
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    setup(work)
    rng = random.Random(cfg.seed)
    jobs = [(w, signal.Signals[s]) for w in cfg.what.split(",") for s in cfg.signals.split(",")]
    tasks = [(w, s, rng.uniform(0, cfg.max_delay)) for w, s in jobs for _ in range(cfg.runs)]
    print(f"{len(tasks)} runs in {work}, {cfg.parallel} at a time", flush=True)
    counts, notes = {j: {} for j in jobs}, []
    t0 = time.time()
    with ThreadPoolExecutor(cfg.parallel) as pool:
        results = pool.map(lambda t: (t, one(*t, cfg, work)), tasks)
        for i, ((w, s, delay), r) in enumerate(results):
            kind = r.split(":")[0].split("\n")[0]
            counts[w, s][kind] = counts[w, s].get(kind, 0) + 1
            if kind in ("hang", "corrupt", "error"):
                notes.append(f"{w} {s.name} after {delay:.2f}s: {r}")
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(tasks)} runs, {time.time() - t0:.0f}s", flush=True)
    print(f"\n| command | signal | runs | clean | before the handler | hang (> {cfg.deadline:g} s) | corrupt | error |")
    print("|---|---|---|---|---|---|---|---|")
    for (w, s), c in counts.items():
        n = sum(c.values())
        print(f"| {w} | {s.name} | {n} | {c.get('clean', 0)} | {c.get('before the handler', 0)} | "
              f"{c.get('hang', 0)} | {c.get('corrupt', 0)} | {c.get('error', 0)} |")  # fmt: skip
    for n in notes:
        print(n)
    print(f"{len(tasks)} runs in {time.time() - t0:.0f}s on {os.cpu_count()} cores")
    sys.exit(1 if notes else 0)


if __name__ == "__main__":
    main(utils.parse_config(Config, description=__doc__.splitlines()[0]))
