"""One GPU call that trains the model that ships: record, encode, train DiT arms side by side, bundle, evaluate.

On one lent H100 (a bare machine, no network: carry .gpu/ from `make gpu-pack`), everything in one command:
    make gpu-run                       # python3 gpu_run.py (--preset gpu): <= 9.5 minutes, results in $OUT
The CPU smoke run, end to end in about a minute (the tests run it on their own tiny data):
    python gpu_run.py --preset tiny --device cpu --heldout /tmp/heldout --out /tmp/gpu_out
Prepare the carried folder here, where PyPI is reachable (wheels for Python 3.12 on manylinux x86-64, held-out data):
    make gpu-pack                      # python gpu_run.py --make-pack

Stages, in this order, each with a budget cut to the time left of --total-min:
    install  the carried wheels (gymnasium, ale-py, what they need) into --site, put on PYTHONPATH
    record   fresh episodes (generate_dataset.py), one recorder per --record set, side by side on all cores;
             without gymnasium the arms train on the carried --data sets instead
    encode   the latent cache of the shipped VAE (--vae), which stays: no VAE training
    train    one `train.py dit` per --arms entry, side by side on the one GPU (bf16, data on the GPU, fused AdamW),
             each at the batch of bench.train_batch_rule unless its flags name one
    bundle   bundle.py: each arm in fp16; OUT/<arm>_dit.pt plays with checkpoints/pong_vae.pt
    eval     evaluate.py on the held-out set, every arm and the shipped model side by side
    bench    bench.py (training MFU, generation frames/s) in the time that is left
OUT/report.md is rewritten after every stage: a stage that fails or runs out of time is marked so and the
run goes on with what it has. OUT also gets results.json and log.txt (every stage's output). docs/gpu.md
says what to carry, how to run it in one device call, and what has been measured.
"""

import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

import utils
from utils import arg

ROOT = os.path.dirname(os.path.abspath(__file__))
STAGES = ("install", "record", "encode", "train", "bundle", "eval", "bench")
SETS = "data/pong_tracker_e10,data/pong_tracker_e25,data/pong_dqn,data/pong_random"  # the Makefile's DATA, RANDOM
FT = "--model XS --init checkpoints/pong_dit.pt --lr 2e-4 --warmup 50"
# the recipe (the shipped DiT fine-tuned with issue #21's clean-context lever), patch 1 from scratch, and the
# previous recipe (diffusion forcing on every frame) as the control
ARMS = f"xs_clean={FT} --clean-context 1 --sampler-levels 0.5; xs1=--model XS1 --lr 4e-4 --warmup 100; xs_ft={FT}"
# gymnasium and ale-py (requirements.txt) and what their wheels require on Python 3.12, numpy aside (the GPU has it)
WHEELS = ("gymnasium", "ale-py", "cloudpickle", "typing-extensions", "farama-notifications")
# batch-1 generation on the 2-core CPU by (patch, width) at a 6-frame window, chunk+pipeline (docs/speed.md, 2026-12-04)
CPU_FPS = {(2, 192): 30.5, (1, 192): 12.0, (1, 128): 17.8, (1, 96): 29.6, (1, 64): 37.7}


@dataclass
class RunConfig:
    out: str = arg(os.environ.get("OUT") or "runs/gpu_run/out", "results: fp16 DiTs, report.md, results.json, log.txt")
    work: str = arg("runs/gpu_run", "scratch: recordings, latents, runs, bundles, evaluations (runs are redone)")
    pack: str = arg(".gpu", "the carried folder (make gpu-pack): wheels/*.whl, data/<set> (looked up before the path)")
    device: str = arg("auto", "auto | cuda | cpu: where the arms train, and evaluations and benchmarks run")
    total_min: float = arg(9.5, "wall-clock budget of the whole run in minutes; each stage's budget is cut to it")
    stages: str = arg(",".join(STAGES), "the stages to run, comma-separated (always in the order above)")
    fail: str = arg("", "debug aid: this stage raises at its start (the tests check the report is still written)")
    site: str = arg("/tmp/site", "install: pip --target of the carried wheels, on PYTHONPATH for the later stages")
    install_s: float = arg(60, "install: budget in seconds")
    record: str = arg(
        "tracker:0.05:60,tracker:0.1:80,tracker:0.25:100,random:0:80", "record: agent:epsilon:episodes,..."
    )
    max_episode_frames: int = arg(2500, "record: frames per episode at most")
    workers: int = arg(0, "record: recording processes in all, shared by the sets by episodes (0: every core)")
    record_s: float = arg(120, "record: budget in seconds; the episodes finished by then are kept")
    data: str = arg(SETS, "the training sets when nothing was recorded (no wheels); missing ones are skipped")
    vae: str = arg("checkpoints/pong_vae.pt", "the shipped VAE, whose latents every arm trains on")
    encode_s: float = arg(90, "encode: budget in seconds (episodes left over are encoded by each arm itself)")
    arms: str = arg(ARMS, "train: 'NAME=train.py dit flags' separated by ';' (--max-minutes there, else --train-min)")
    train_preset: str = arg("gpu", "train: the train.py dit --preset of every arm")
    train_flags: str = arg("--window 6 --ema-decay 0.998 --eval-every 250 --save-every 500 --sample-every 0",
                           "train: the flags every arm shares, before its own")  # fmt: skip
    train_min: float = arg(3.5, "train: minutes an arm trains; cut so that bundle and eval keep their budgets")
    train_slack_s: float = arg(60, "train: seconds past its minutes (start-up, the last save) before an arm is stopped")
    tokens_per_step: int = arg(2**18, "train: the batch rule's tokens a step on CUDA (0: the preset's batch)")
    memory_share: float = arg(0.6, "train: share of the GPU memory the arms' activations may take, split evenly")
    bundle_s: float = arg(30, "bundle: budget in seconds")
    shipped: str = arg("checkpoints/pong_dit.pt", "eval: the shipped DiT, the baseline of the comparison")
    heldout: str = arg("data/pong_heldout", "eval: the held-out recorded episodes")
    eval_flags: str = arg("--rollouts 32 --tf-frames 1024", "eval: evaluate.py flags (the README quality table's)")
    eval_s: float = arg(150, "eval: budget in seconds (every model at once)")
    bench: str = arg(
        "--what train --precision bf16 --window 6 --train-models XS,XS1 --train-batch 64,auto --compile; "
        "--what generate --steps 2 --gen-batches 1,64,256,1024",
        "bench: bench.py flag sets separated by ';', one after the other in the time left",
    )
    seed: int = arg(0, "seed of the arms and evaluations; recording set i uses 200000 + 10000 i + seed")
    make_pack: bool = arg(
        False, "instead of a run: fill --pack with wheels from PyPI, --heldout and --data, then size it"
    )


PRESETS = {
    "gpu": {},
    "tiny": dict(
        out="runs/gpu_run_tiny/out", work="runs/gpu_run_tiny", total_min=5.0, record="random:0:2,tracker:0.1:1",
        max_episode_frames=80, workers=2, record_s=60, data="", encode_s=60, train_preset="tiny",
        arms="tiny=--model tiny; tiny_clean=--model tiny --clean-context 1 --sampler-levels 0.5",
        train_flags="--steps 10 --log-every 5 --eval-every 5 --save-every 10 --sample-every 0", train_min=1.0,
        train_slack_s=90, tokens_per_step=0, bundle_s=60, eval_flags="--quick", eval_s=120,
        bench="--preset tiny --what train --train-vaes '' --train-batch 2,auto",
    ),
}  # fmt: skip


class StageSkipped(Exception):
    """A stage that had nothing to do, or no time: the report says why."""


def table(header, rows):
    """A markdown table: header words (underscores become spaces), then one row per tuple."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return [line(h.replace("_", " ") for h in header.split()), "|---" * len(header.split()) + "|"] + list(
        map(line, rows)
    )


def count_set(d):
    """A recorded set's episodes and frames (read from the file headers, not the frames)."""
    from dataset import load_episode

    files = sorted(glob.glob(os.path.join(d, "episode_*.npz")))
    return dict(set=d, episodes=len(files), frames=sum(len(load_episode(f, frames=False)["actions"]) for f in files))


def clean(text):
    """Output with progress bars folded: of each line's carriage-return updates, only the last."""
    return "\n".join(line.rstrip("\r").split("\r")[-1] for line in text.split("\n"))


def parse_train_log(path, batch, window, clean_share):
    """train.py's log.txt -> steps, median samples/s and MFU, target frames seen, validation against minutes.

    Minutes are training time: the sum over log lines of steps * batch / samples_s (train.py's own interval).
    """
    s = {"steps": 0, "samples_s": [], "mfu": [], "val": [], "minutes": 0.0}
    if not os.path.isfile(path):
        return s
    for line in open(path):
        m = re.match(r"step +(\d+) (.*)", line)
        if not m:
            continue
        step, words = int(m.group(1)), m.group(2).split()
        kv = {k: float(v) for k, v in zip(words[::2], words[1::2]) if re.fullmatch(r"[-+.\deE]+|nan|inf", v)}
        if "samples_s" in kv:
            s["minutes"] += (step - s["steps"]) * batch / max(kv["samples_s"], 1e-9) / 60
            s["steps"] = step
            s["samples_s"].append(kv["samples_s"])
            s["mfu"] += [kv["mfu"]] if "mfu" in kv else []
        if "val_loss" in kv:
            s["val"].append((round(s["minutes"], 2), step, kv["val_loss"], kv.get("val_next")))
    s["frames_seen"] = round(s["steps"] * batch * (window * (1 - clean_share) + clean_share))
    for k in ("samples_s", "mfu"):
        s[k] = statistics.median(s[k][1:] or s[k]) if s[k] else None  # the first interval pays for start-up
    return s


class Run:
    """The stages, their budgets against one deadline, their log and the report rewritten after each."""

    def __init__(self, cfg):
        self.cfg, self.t0 = cfg, time.time()
        self.deadline = self.t0 + cfg.total_min * 60
        self.device = str(utils.pick_device(cfg.device))
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
        self.rows, self.sets, self.arms, self.evals, self.bench_out = [], [], {}, {}, ""
        self.can_record, self.train_data = False, []
        os.makedirs(cfg.out, exist_ok=True)
        os.makedirs(cfg.work, exist_ok=True)
        for old in glob.glob(os.path.join(cfg.out, "*_dit.pt")):  # a previous run's: not this run's results
            os.remove(old)
        self.log = open(os.path.join(cfg.out, "log.txt"), "w")
        gpu = torch.cuda.get_device_name(0) if self.device.startswith("cuda") else "no GPU"
        self.machine = f"{gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {sys.version.split()[0]}"

    def left(self):
        return self.deadline - time.time()

    def say(self, msg):
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def find(self, path):
        """A data set: the carried copy (PACK/data/<name>) when there is one, else the path itself."""
        carried = os.path.join(self.cfg.pack, "data", os.path.basename(path.rstrip("/")))
        return carried if os.path.isdir(carried) else path

    def run_all(self, cmds, seconds, logs):
        """Run commands side by side, each into its log file; stop those still running after `seconds`.

        Returns the exit codes, None for a command stopped for time.
        """
        procs, codes = [], []
        for cmd, log in zip(cmds, logs):
            os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
            self.say("$ " + shlex.join(cmd))
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True))  # fmt: skip
        end = time.time() + seconds
        try:
            for p in procs:
                try:
                    codes.append(p.wait(timeout=max(0.0, end - time.time())))
                except subprocess.TimeoutExpired:
                    codes.append(None)
        finally:
            for p in procs:  # stopped for time, or this run was interrupted: SIGTERM, then the whole group
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        pass
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # what the command left running (recorder workers)
                except (ProcessLookupError, PermissionError):
                    pass
                p.wait()
        for log, code in zip(logs, codes):
            text = clean(open(log, errors="replace").read())[-1_000_000:]
            self.log.write(f"----- {log}: {'stopped for time' if code is None else f'exit {code}'}\n{text}\n")
        return codes

    def stage(self, name, budget, fn):
        if name not in self.cfg.stages.split(","):
            return
        budget = min(budget, self.left())
        t, status = time.time(), "ok"
        self.say(f"=== {name}: budget {budget:.0f}s")
        try:
            if budget <= 1:
                raise StageSkipped("out of time")
            if name == self.cfg.fail:
                raise RuntimeError(f"failed on purpose (--fail {name})")
            note = fn(budget)
        except StageSkipped as e:
            status, note = "skipped", str(e)
        except (Exception, SystemExit) as e:  # the report still gets written; the next stages go on
            status, note = "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.rows.append((name, status, round(time.time() - t, 1), round(budget), note))
        self.say(f"=== {name}: {status} in {time.time() - t:.1f}s: {note}")
        self.write_report()

    # ------------------------------------------------------------------ stages

    def install(self, budget):
        cfg, wheels = self.cfg, sorted(glob.glob(os.path.join(self.cfg.pack, "wheels", "*.whl")))
        note = f"no wheels in {cfg.pack}/wheels"
        if wheels:
            pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
            pip += ["--no-cache-dir", "--upgrade", "--target", cfg.site, *wheels]
            log, code = os.path.join(cfg.work, "logs", "install.txt"), 0
            if importlib.util.find_spec("pip"):
                code = self.run_all([pip], budget, [log])[0]
            else:  # no pip on the machine: a wheel is a zip of what goes on the path
                for w in wheels:
                    zipfile.ZipFile(w).extractall(cfg.site)
            how = "pip" if importlib.util.find_spec("pip") else "unzipped: no pip"
            note = f"{len(wheels)} wheels into {cfg.site} ({how})"
            if code == 0:
                self.env["PYTHONPATH"] = os.pathsep.join(p for p in (cfg.site, self.env.get("PYTHONPATH")) if p)
            else:  # e.g. wheels for another Python: the machine's own packages, if any, stay in use
                note = f"pip refused the {len(wheels)} wheels (exit {code}): {clean(open(log).read()).strip()[-200:]}"
        probe = "import gymnasium, ale_py; print(gymnasium.__version__, ale_py.__version__)"
        p = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True, timeout=120)
        self.can_record = p.returncode == 0
        versions = f"gymnasium {p.stdout.split()[0]}, ale-py {p.stdout.split()[1]}" if self.can_record else "absent"
        return f"{note}; gymnasium + ale_py: {versions}"

    def record(self, budget):
        cfg = self.cfg
        if not self.can_record:
            raise StageSkipped("gymnasium / ale_py cannot be imported: the arms train on the carried --data")
        sets = [s.split(":") for s in cfg.record.split(",") if s]
        total_eps, cores = sum(int(n) for *_, n in sets), cfg.workers or os.cpu_count()
        cmds, outs = [], []
        for i, (agent, eps, n) in enumerate(sets):
            out = os.path.join(cfg.work, "data", f"{agent}_e{eps}")
            workers = max(1, round(cores * int(n) / total_eps))
            flags = f"--agent {agent} --epsilon {eps} --episodes {n} --seed {200000 + 10000 * i + cfg.seed} --workers "
            flags += f"{workers} --frame-size 96 --max-episode-frames {cfg.max_episode_frames} --out {shlex.quote(out)}"
            cmds.append([sys.executable, os.path.join(ROOT, "generate_dataset.py"), *shlex.split(flags)])
            outs.append(out)
        t = time.time()
        codes = self.run_all(cmds, budget, [o + ".log.txt" for o in outs])
        seconds = time.time() - t
        for out, code in zip(outs, codes):
            self.sets.append(count_set(out) | dict(exit="stopped for time" if code is None else code))
            self.train_data += [out] if self.sets[-1]["episodes"] else []
        frames = sum(s["frames"] for s in self.sets)
        if not frames:
            raise RuntimeError(f"no episode finished in {seconds:.0f}s (exit codes {codes})")
        return f"{frames:,} frames in {len(self.train_data)} sets, {seconds:.0f}s ({frames / seconds:,.0f} frames/s)"

    def encode(self, budget):
        from dataset import latent_path, list_split, load_episode, to_float_frames
        from engine import load_vae

        cfg, end = self.cfg, time.time() + budget
        if not self.train_data:
            self.train_data = [self.find(d) for d in cfg.data.split(",") if d and os.path.isdir(self.find(d))]
            self.sets += [count_set(d) for d in self.train_data]
        if not self.train_data:
            raise RuntimeError("no training data: nothing recorded and none of --data is here")
        train, val, _ = list_split(",".join(self.train_data))
        fp, vae = utils.file_fingerprint(cfg.vae), load_vae(cfg.vae, self.device)

        @torch.no_grad()
        def one(f):  # as tasks.DiTTask encodes: the posterior mean of each chunk of 256 frames, stored in fp16
            if os.path.isfile(latent_path(f, fp)) or time.time() > end:
                return os.path.isfile(latent_path(f, fp))
            frames = torch.from_numpy(load_episode(f)["frames"])
            z = [vae.encode(to_float_frames(c.to(self.device))).mean.half().cpu() for c in frames.split(256)]
            utils.atomic_save_npy(latent_path(f, fp), torch.cat(z).numpy())
            return True

        with ThreadPoolExecutor(min(8, os.cpu_count())) as pool:  # decompressing overlaps encoding
            done = sum(pool.map(one, train + val))
        return f"{done} of {len(train + val)} episodes have latents ({', '.join(self.train_data)})"

    def train(self, budget):
        from bench import train_batch_rule
        from dit import DiT_models
        from train import PRESETS as TRAIN_PRESETS
        from train import DiTConfig

        cfg = self.cfg
        if not self.train_data:
            raise StageSkipped("no training data (record and encode did not run)")
        arms = dict(a.strip().split("=", 1) for a in cfg.arms.split(";") if a.strip())
        reserve = cfg.bundle_s + cfg.eval_s + cfg.train_slack_s  # so bundle and eval keep their budgets
        minutes = min(cfg.train_min, (self.left() - reserve) / 60, (budget - cfg.train_slack_s) / 60)
        if minutes < 0.2:
            raise StageSkipped(f"{minutes:.1f} minutes left for training")
        cuda = self.device.startswith("cuda")
        gpu_mem = torch.cuda.get_device_properties(torch.device(self.device)).total_memory if cuda else 0
        cmds, logs, longest = [], [], 0.0
        for name, flags in arms.items():
            out = os.path.join(cfg.work, "arms", name)
            shutil.rmtree(out, ignore_errors=True)
            argv = ["--preset", cfg.train_preset, *shlex.split(cfg.train_flags), "--max-minutes", f"{minutes:.2f}"]
            argv += [*shlex.split(flags), "--data", ",".join(self.train_data), "--vae", cfg.vae, "--out", out]
            argv += ["--device", self.device, "--seed", str(cfg.seed), "--wandb", "disabled"]
            arm = self.arms[name] = dict(flags=flags, argv=argv, out=out, exit="bad flags")
            try:  # the arm's whole config, as train.py will read it: bad flags fail this arm only
                a = utils.parse_config(DiTConfig, argv, presets=TRAIN_PRESETS["dit"], prog=f"arm {name}")
            except SystemExit:
                continue
            model, a.max_minutes = DiT_models[a.model](window=a.window), min(a.max_minutes or minutes, minutes)
            if gpu_mem and cfg.tokens_per_step and "--batch-size" not in flags:  # the batch that fills the GPU
                memory = gpu_mem * cfg.memory_share / len(arms)
                a.batch_size = train_batch_rule(model, a.window, memory, cfg.tokens_per_step)
            argv += ["--max-minutes", f"{a.max_minutes:.2f}", "--batch-size", str(a.batch_size)]
            fps = CPU_FPS.get((model.patch_size, model.hidden_size)) if a.window == 6 else None
            arm.update(model=a.model, window=a.window, batch=a.batch_size, clean=a.clean_context, cpu_fps=fps)
            arm.pop("exit")
            cmds.append([sys.executable, os.path.join(ROOT, "train.py"), "dit", *argv])
            logs.append(os.path.join(cfg.work, "logs", f"train_{name}.txt"))
            longest = max(longest, a.max_minutes)
        codes = self.run_all(cmds, min(budget, longest * 60 + cfg.train_slack_s), logs)
        for arm, code in zip([a for a in self.arms.values() if "exit" not in a], codes):
            arm["exit"] = code
            arm |= parse_train_log(os.path.join(arm["out"], "log.txt"), arm["batch"], arm["window"], arm["clean"])
        ok = [n for n, a in self.arms.items() if a["exit"] == 0]
        if not ok:
            raise RuntimeError(f"no arm finished (exit codes {[a['exit'] for a in self.arms.values()]})")
        return f"{len(ok)} of {len(self.arms)} arms finished ({', '.join(ok)}), {minutes:.2f} minutes each at most"

    def bundle(self, budget):
        cfg, done = self.cfg, []
        ready = {n: a for n, a in self.arms.items() if os.path.isfile(os.path.join(a["out"], "ckpt.pt"))}
        if not ready:
            raise StageSkipped("no arm checkpoint")
        cmds = [[sys.executable, os.path.join(ROOT, "bundle.py"), "--dit", a["out"], "--vae", cfg.vae,
                 "--out", os.path.join(cfg.work, "bundles", n)] for n, a in ready.items()]  # fmt: skip
        codes = self.run_all(cmds, budget, [os.path.join(cfg.work, "logs", f"bundle_{n}.txt") for n in ready])
        for (name, arm), code in zip(ready.items(), codes):
            b = os.path.join(cfg.work, "bundles", name)
            if code == 0:  # the VAE is the shipped one, byte for byte: only the DiT travels back
                same = utils.file_fingerprint(os.path.join(b, "pong_vae.pt")) == utils.file_fingerprint(cfg.vae)
                shutil.copyfile(os.path.join(b, "pong_dit.pt"), os.path.join(cfg.out, f"{name}_dit.pt"))
                arm.update(bundle=os.path.join(b, "pong_dit.pt"), vae_is_shipped=same)
                done.append(f"{name}_dit.pt {os.path.getsize(os.path.join(b, 'pong_dit.pt')) / 2**20:.1f} MiB")
        return f"{cfg.out}: {', '.join(done)}"

    def eval(self, budget):
        cfg = self.cfg
        models = {"shipped": cfg.shipped} | {n: a["bundle"] for n, a in self.arms.items() if "bundle" in a}
        flags = shlex.split(cfg.eval_flags) + ["--data", self.find(cfg.heldout), "--device", self.device]
        outs = {n: os.path.join(cfg.work, "eval", n) for n in models}
        cmds = [[sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", ckpt, *flags, "--out", outs[n],
                 "--seed", str(cfg.seed)] for n, ckpt in models.items()]  # fmt: skip
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        self.eval_cmd = "evaluate.py " + shlex.join(flags) + " (every model at once)"
        codes = self.run_all(cmds, budget, [os.path.join(cfg.work, "logs", f"eval_{n}.txt") for n in models])
        for n, out in outs.items():
            if os.path.isfile(os.path.join(out, "metrics.json")):
                self.evals[n] = json.load(open(os.path.join(out, "metrics.json")))
        if not self.evals:
            raise RuntimeError("no evaluation finished")
        # metrics.json comes before metrics.png: without matplotlib (a bare GPU machine) it exits 1 with the figures
        return f"{len(self.evals)} of {len(models)} evaluated ({', '.join(self.evals)}); exit codes {codes}"

    def bench(self, budget):
        end, parts = time.time() + budget, [shlex.split(b) for b in self.cfg.bench.split(";") if b.strip()]
        for i, flags in enumerate(parts):
            log = os.path.join(self.cfg.work, "logs", f"bench_{i}.txt")
            cmd = [sys.executable, os.path.join(ROOT, "bench.py"), *flags, "--device", self.device]
            code = self.run_all([cmd], max(0.0, end - time.time()), [log])[0]
            self.bench_out += f"$ python bench.py {shlex.join(cmd[2:])}   # exit {code}\n{clean(open(log).read())}\n"
            self.write_report()
        return f"{len(parts)} benchmarks"

    # ------------------------------------------------------------------ report

    def write_report(self):
        cfg, f = self.cfg, lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
        r = [f"# gpu_run.py report\n\n{time.strftime('%Y-%m-%d %H:%M:%S')}, {self.machine}; device {self.device}, "
             f"{time.time() - self.t0:.0f}s of the {cfg.total_min} minutes.\n"]  # fmt: skip
        r += table("stage status seconds budget_(s) note", self.rows)
        if self.sets:
            rows = [(s["set"], s.get("episodes", ""), s.get("frames", ""), s.get("exit", "carried")) for s in self.sets]
            r += ["\n## Training data\n"] + table("set episodes frames recorder_exit", rows)
        if self.arms:
            rows = []
            for n, a in self.arms.items():
                val = (a.get("val") or [(None,) * 4])[-1]
                rows.append((n, a.get("model"), a.get("window"), a.get("batch"), a.get("steps"),
                             f(a.get("samples_s"), 0), "n/a" if a.get("mfu") is None else f"{a['mfu']:.2%}",
                             f"{a.get('frames_seen', 0):,}", f"{f(val[2], 4)} / {f(val[3], 4)}", f(a.get("minutes")),
                             f"{a['cpu_fps']} (docs/speed.md)" if a.get("cpu_fps") else "not measured"))  # fmt: skip
            r += ["\n## Arms (train.py dit, side by side)\n"] + table(
                "arm model window batch steps samples/s MFU target_frames_seen val_loss_/_val_next minutes "
                "CPU_batch-1_frames/s_(>=_20_to_ship)", rows)  # fmt: skip
            for n, a in self.arms.items():
                curve = ", ".join(f"{m} min {f(v, 4)} / {f(nx, 4)} (step {s})" for m, s, v, nx in a.get("val", []))
                r.append(f"\n- {n} (exit {a.get('exit')}): `train.py dit {shlex.join(a['argv'])}`\n  "
                         f"val_loss / val_next against training minutes: {curve or 'none'}")  # fmt: skip
        if self.evals:
            rows = []
            for n, m in self.evals.items():
                ar, one, ctl, ev = m["autoregressive"], m["autoregressive_one_frame"], m["control"], "score_events"
                h = str(32 if "32" in ar["psnr"] else max(int(k) for k in ar["psnr"]))
                rows.append((n, f(m["teacher_forced"]["psnr"]), f"{f(ar['psnr'][h])} @{h}",
                             f"{f(ar['ball_presence'])} / {f(ar['ball_spurious'])}", f(ar["ball_error_first16_px"], 1),
                             f(ar["ball_hit_rate_first16"]),
                             f"{f(ar['player_error_px'][h], 1)} / {f(ar['opponent_error_px'][h], 1)} @{h}",
                             f"{f(ar[ev]['precision'])} / {f(ar[ev]['recall'])}",
                             f"{f(ctl['up_moves_up'])} / {f(ctl['down_moves_down'])}",
                             f(ctl["psnr_gain_true_vs_shuffled"]),
                             f"{f(one['ball_presence'])} / {f(one['ball_spurious'])}",
                             f(m["speed"]["frames_per_s_batch1"], 1)))  # fmt: skip
            r += [f"\n## On the held-out set: {self.eval_cmd}\n"] + table(
                "model TF_PSNR AR_PSNR_@H ball_present_/_spurious ball_error_first_16_(px) hit_rate_first_16 "
                "paddles_@H_player_/_opponent_(px) score_events_P_/_R control_up_/_down true_-_shuffled_(dB) "
                "one_frame:_ball_present_/_spurious frames/s_batch_1", rows)  # fmt: skip
        if self.bench_out:
            r += ["\n## Benchmarks\n", "```", self.bench_out.rstrip(), "```"]
        results = dict(config=asdict(cfg), machine=self.machine, stages=self.rows, sets=self.sets, arms=self.arms)
        results |= dict(evals={n: {k: m[k] for k in m if k != "config"} for n, m in self.evals.items()})
        utils.atomic_write_text(os.path.join(cfg.out, "report.md"), "\n".join(r) + "\n")
        utils.atomic_write_text(os.path.join(cfg.out, "results.json"), json.dumps(results, indent=1, default=str))


def make_pack(cfg):
    """Fill --pack: the recorder's wheels (Python 3.12, manylinux x86-64; this venv's versions) and the data sets."""
    from importlib.metadata import version

    wheels = os.path.join(cfg.pack, "wheels")
    shutil.rmtree(wheels, ignore_errors=True)
    platforms = [f"--platform={p}_x86_64" for p in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17",
                                                     "manylinux2014", "manylinux1")]  # fmt: skip
    for name in WHEELS:
        pin = f"{name}=={version(name)}"
        p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version=3.12", "--implementation=cp", *platforms, "-d", wheels, pin],
                           capture_output=True, text=True)  # fmt: skip
        if p.returncode:
            utils.die(f"pip download {pin} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    for w in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        print(f"{w}: {os.path.getsize(w) / 2**20:.2f} MiB")
    for d in [cfg.heldout] + [d for d in cfg.data.split(",") if d]:  # without their latent caches
        dst = os.path.join(cfg.pack, "data", os.path.basename(d.rstrip("/")))
        shutil.rmtree(dst, ignore_errors=True)
        if os.path.isdir(d):
            shutil.copytree(d, dst, ignore=shutil.ignore_patterns("latents", ".tmp-*"))
        print(f"{dst}: {'copied from ' + d if os.path.isdir(d) else d + ' is not here, not packed'}")
    size = lambda files: sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    pack = size(glob.glob(os.path.join(cfg.pack, "**"), recursive=True))
    p = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True)
    tree = size(os.path.join(ROOT, f) for f in p.stdout.splitlines()) if p.returncode == 0 else 0
    print(f"{cfg.pack}: {pack / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB, git ls-files) "
          f"{(tree + pack) / 2**20:.1f} MiB of the 64 MiB a device call carries")  # fmt: skip
    if tree + pack > 64 * 2**20:
        utils.die(f"{cfg.pack} and the working tree are over 64 MiB: pack fewer --data sets")


def main(cfg):
    if cfg.make_pack:
        return make_pack(cfg)
    unknown = set(cfg.stages.split(",")) - set(STAGES)
    if unknown or (cfg.fail and cfg.fail not in STAGES):
        utils.die(f"--stages / --fail: unknown stage {sorted(unknown) or cfg.fail}; the stages are {','.join(STAGES)}")
    run = Run(cfg)
    run.say(f"gpu_run.py on {run.machine}: {cfg.total_min} minutes, stages {cfg.stages}")
    budgets = dict(install=cfg.install_s, record=cfg.record_s, encode=cfg.encode_s, train=cfg.total_min * 60,
                   bundle=cfg.bundle_s, eval=cfg.eval_s, bench=cfg.total_min * 60)  # fmt: skip
    for name in STAGES:
        run.stage(name, budgets[name], getattr(run, name))
    failed = [n for n, s, *_ in run.rows if s == "FAILED"]
    run.say(f"done in {time.time() - run.t0:.0f}s: {cfg.out}/report.md" + (f"; failed: {failed}" if failed else ""))
    run.log.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(utils.parse_config(RunConfig, presets=PRESETS, default_preset="gpu", description=__doc__)))
