"""Train the VAE, then the world model (DiT), on recorded Pong episodes.

CPU smoke run (seconds, what the tests use):
    python train.py vae --data data/pong --out runs/vae --preset tiny
    python train.py dit --data data/pong --vae runs/vae --out runs/dit --preset tiny
One GPU (`--preset gpu` is the default when CUDA is present, `cpu` otherwise):
    python train.py vae --data data/pong --out runs/vae
    python train.py dit --data data/pong --vae runs/vae --out runs/dit
Several GPUs or nodes (DDP; NCCL on CUDA, gloo on CPU):
    torchrun --standalone --nproc_per_node=8 train.py dit --data data/pong --vae runs/vae --out runs/dit
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py dit ...
Resume a run after a crash or kill:
    python train.py dit --data data/pong --vae runs/vae --out runs/dit --resume

Fine-tune the decoder of a trained VAE, or train a lighter one (the latents, and a DiT trained on them, stay valid):
    python train.py vae --data data/pong --init runs/vae --decoder-only --out runs/vae_dec
    python train.py vae --data data/pong --init runs/vae --decoder-only --decoder lite --out runs/vae_lite
Fine-tune a trained DiT (from its EMA weights), e.g. on more data:
    python train.py dit --data data/pong,data/more --vae runs/vae --init runs/dit --out runs/dit_ft

The DiT is trained with diffusion forcing: every frame of a window gets its own noise level,
v-prediction on the sigmoid schedule. This file holds the flags (one config per kind, with its
presets) and the loop (optimizer, schedule, EMA, checkpoints, logging, DDP); tasks.py holds what
is trained: each model with its data (dataset.EpisodeDataset), loss and validation.
"""

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

import utils
from tasks import DiTTask, VAETask
from utils import arg


@dataclass
class TrainConfig:
    """The loop's flags, shared by both kinds."""

    data: str = arg("data/pong", "recorded episodes (generate_dataset.py --out); comma-separated dirs")
    out: str = arg("runs/run", "run directory: ckpt.pt, log.txt, config.json, samples")
    init: str = arg("", "start from this run dir or ckpt.pt of the same kind (its EMA weights), not random weights")
    steps: int = arg(1000, "total optimisation steps")
    batch_size: int = arg(32, "batch size per process")
    lr: float = arg(3e-4, "peak learning rate")
    min_lr_frac: float = arg(0.1, "cosine decay ends at lr * min_lr_frac")
    warmup: int = arg(100, "linear warmup steps")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "gradient norm clip")
    ema_decay: float = arg(0.999, "EMA decay of the weights")
    val_fraction: float = arg(0.1, "share of episodes held out for validation")
    max_episodes: int = arg(0, "use at most this many episodes of each data dir, the first by index (0 = all)")
    log_every: int = arg(50, "steps between log lines (and NaN checks)")
    eval_every: int = arg(500, "steps between validation losses")
    save_every: int = arg(500, "steps between checkpoints")
    max_minutes: float = arg(0.0, "time budget: the cosine schedule spans it, then the run saves and stops; 0 = none")
    seed: int = arg(0, "random seed (each rank uses seed + rank)")
    overfit: bool = arg(False, "debug aid: train on one fixed batch (same frames, noise and levels) every step")
    resume: bool = arg(False, "continue from OUT/ckpt.pt")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    precision: str = arg(
        "auto",
        "auto | fp32 | bf16: bf16 autocast around the forward and the loss (weights, optimizer, EMA and "
        "checkpoints stay fp32); auto: bf16 on CUDA and on a CPU with AVX-512 BF16 or AMX, else fp32",
        choices=list(utils.PRECISIONS),
    )
    compile: bool = arg(False, "torch.compile the training model (inductor; on a CPU it compiles C++, slow to start)")
    wandb: str = arg("auto", "auto | online | offline | disabled", choices=["auto", "online", "offline", "disabled"])
    wandb_project: str = arg("gamengen-mini", "wandb project")


@dataclass
class VAEConfig(TrainConfig):
    """train.py vae: single frames, reconstruction + KL."""

    model: str = arg("pong_cpu", "VAE config: a uvit_vae.VAE_CONFIGS key, or tiny (the tests')")
    kl_weight: float = arg(1e-6, "KL weight (per-element, relative to the reconstruction)")
    crop: int = arg(0, "train on random crops of this size (a multiple of 8; 0 = whole frames)")
    fg_weight: float = arg(20.0, "extra loss weight on pixels that differ from the static background")
    fg_mask: str = arg(
        "median",
        "the pixels --fg-weight weights: median (those that differ from the per-pixel median frame: what moves) "
        "| colour (also those that differ from the background's colour: every digit of a score, drawn or not "
        "in the median)",
        choices=["median", "colour"],
    )
    ball_weight: float = arg(
        0.0, "Pong: extra loss weight on the pixels around the detected ball (pong.ball_mask), on top of --fg-weight"
    )
    ball_oversample: float = arg(
        0.0,
        "Pong: share of each batch drawn from the frames with something drawn within 3 px of the ball "
        "(pong.ball_crowded: where the VAE loses balls)",
    )
    decoder_only: bool = arg(False, "with --init, train only the decoder: the latents (and a DiT on them) stay valid")
    decoder: str = arg("", "with --decoder-only, a new decoder of this uvit_vae.DECODER_CONFIGS size")
    latent_noise: float = arg(
        0.0,
        "decode latents plus Gaussian noise of a random std up to this many latent stds (1 = the DiT's scaled "
        "units), so that a latent a little off still decodes to the frame it is near; with the encoder training, "
        "it also pushes apart the latents of frames that differ",
    )


@dataclass
class DiTConfig(TrainConfig):
    """train.py dit: windows of VAE latents, diffusion forcing."""

    vae: str = arg("", "VAE run dir or ckpt.pt whose latents the DiT models (required)")
    init_new_vae: bool = arg(
        False,
        "with --init: a DiT trained on another VAE's latents may start (--vae's encoder fine-tuned from that one)",
    )
    model: str = arg("XS", "DiT size (a dit.DiT_models key)")
    window: int = arg(16, "frames per training window: the DiT's context window")
    ctx_noise_prob: float = arg(0.0, "share of windows trained GameNGen-style (clean-ish context, noisy last frame)")
    ctx_noise_max: int = arg(300, "max noise level of the context in those windows")
    clean_context: float = arg(
        0.0,
        "share of windows asked what generation asks: a clean context (level 0), "
        "the loss on the last frame only (GameNGen)",
    )
    clean_context_noise: int = arg(0, "in those windows the context's levels are drawn from 0..this (augmentation)")
    clean_copy: bool = arg(
        False,
        "teacher forcing against a clean copy of the window: every frame a target after the clean frames "
        "before it, T targets a window for twice the tokens (CausVid's set-up)",
    )
    sampler_levels: float = arg(0.0, "share of noise levels drawn at the DDIM sampler's levels (999, 500 for 2 steps)")
    sampler_steps: int = arg(2, "the sampler whose levels --sampler-levels draws: DDIM steps, as generate.py --steps")
    action_dropout: float = arg(0.1, "share of frames whose action is replaced by 'unknown' (zeros)")
    fg_weight: float = arg(0.0, "extra loss weight on latent cells that differ from the background or the last frame")
    fg_threshold: float = arg(0.5, "a cell differs when its latent moves by more than this (L2 over channels)")
    rollout_frac: float = arg(0.0, "share of each batch trained on the model's own rollouts (self-forcing, lever 4)")
    rollout_frames: int = arg(0, "frames the model generates before the target in those windows (0: window - 2)")
    sample_every: int = arg(1000, "steps between autoregressive sample rollouts (0: off)")


# fmt: off
PRESETS = {
    "vae": {
        "tiny": dict(model="tiny", steps=30, batch_size=8, warmup=5, log_every=10, eval_every=30, save_every=30,
                     ema_decay=0.9),
        "cpu": dict(model="pong_cpu", steps=100_000, max_minutes=38, batch_size=8, lr=4e-4, ema_decay=0.995,
                    fg_weight=50.0, eval_every=250, save_every=250),
        # The shipped engine must also play in real time on a CPU: "pong_cpu" decodes about twice as fast as
        # "pong" (bench.py --what vae), so the GPU recipe trains the same small VAE, far longer.
        "gpu": dict(model="pong_cpu", steps=20_000, max_minutes=2, batch_size=64, lr=4e-4, warmup=200,
                    fg_weight=100.0, eval_every=1000, save_every=1000),
    },
    "dit": {
        "tiny": dict(model="tiny", steps=40, batch_size=4, window=4, warmup=5, log_every=10, eval_every=20,
                     sample_every=40, save_every=20, ema_decay=0.9),
        "cpu": dict(model="XS", steps=100_000, max_minutes=30, batch_size=16, window=6, lr=5e-4, warmup=200,
                    max_episodes=4, ema_decay=0.998, eval_every=500, sample_every=1000, save_every=250),
        # XS, not S: the fp16 bundle must stay under 25 MB (S alone is 38 MB) and generate 20 frames/s
        # on a 2-core CPU. With the VAE (2 min) and the lite decoder (1 min), `make train-gpu` takes
        # about 7 minutes of training, so it fits one 10-minute call of a lent GPU.
        "gpu": dict(model="XS", steps=30_000, max_minutes=4, batch_size=64, window=16, lr=4e-4, warmup=300,
                    ema_decay=0.999, eval_every=1000, sample_every=2000, save_every=1000),
    },
}
# fmt: on
KINDS = {"vae": (VAEConfig, VAETask), "dit": (DiTConfig, DiTTask)}


def setup_distributed(cfg):
    """Returns (rank, world, device). DDP switches on when torchrun sets RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = utils.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def lr_at(step, progress, cfg):
    """Linear warmup, then cosine decay over `progress` in [0, 1] (steps done, or time used of --max-minutes)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, progress)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, in one fused pass over all parameters."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


class Logger:
    """stdout + RUN/log.txt + wandb (rank 0 only)."""

    def __init__(self, cfg, kind, master, config):
        self.master, self.run = master, None
        if not master:
            return
        os.makedirs(cfg.out, exist_ok=True)
        self.file = open(os.path.join(cfg.out, "log.txt"), "a")
        mode = cfg.wandb
        try:
            import wandb
        except ImportError:
            wandb = None
            if mode in ("online", "offline"):
                utils.die("--wandb online/offline needs the wandb package (pip install wandb)")
            mode = "disabled"
        if mode == "auto":
            netrc = os.path.expanduser("~/.netrc")
            logged_in = os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()
            mode = "online" if (os.environ.get("WANDB_API_KEY") or logged_in) else "offline"
        if mode != "disabled":
            name = f"pong__{kind}__{cfg.seed}__{int(time.time())}"
            self.run = wandb.init(project=cfg.wandb_project, name=name, config=config, dir=cfg.out, mode=mode)
            self.wandb = wandb

    def log(self, step, values, msg=None):
        if not self.master:
            return
        if msg is None:
            msg = f"step {step:6d} " + " ".join(f"{k} {utils.fmt(v)}" for k, v in values.items())
        print(msg, flush=True)
        self.file.write(msg + "\n")
        self.file.flush()
        if self.run is not None:
            self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def media(self, step, key, path):
        if self.run is not None:
            self.run.log({key: self.wandb.Video(path, format=path.rsplit(".", 1)[-1])}, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()


def start(kind, cfg, task, world, gen):
    """EMA, optimizer, the checkpoint's config and the step to start from: fresh, or --resume's checkpoint."""
    model, ckpt_path = task.model, os.path.join(cfg.out, "ckpt.pt")
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].device.type in ("cuda", "cpu")  # one kernel for all parameters: 3x faster on this CPU too
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=fused)
    config = {"kind": kind, "model": task.model_config, "train": dataclasses.asdict(cfg), "world_size": world}
    config |= task.extra_config
    step, elapsed = 0, 0.0
    if cfg.resume:
        ck = utils.load_checkpoint(ckpt_path, kind=kind)
        if ck["config"]["model"] not in (task.model_config, json.loads(json.dumps(task.model_config))):
            utils.die(f"--resume: {ckpt_path} was trained with model config {ck['config']['model']}, "
                      f"this run builds {task.model_config}")  # fmt: skip
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed = ck["step"], ck.get("elapsed", 0.0)
        if world == 1 and "rng" in ck:  # so a resumed run continues exactly
            gen.set_state(ck["rng"]["gen"])
            torch.set_rng_state(ck["rng"]["torch"])
        config.update({k: v for k, v in ck["config"].items() if k == "scaling_factor"})
    return ema, opt, config, step, elapsed


def wrap(model, cfg, device, world):
    """What the loop calls: the bare model, compiled (--compile) and/or in DDP. Checkpoints save the bare one."""
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def save(path, model, ema, opt, step, config, elapsed, gen):
    """The checkpoint: plain types only, written atomically; the RNG states make a resumed run continue exactly."""
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "step": step}
    state |= {"config": config, "version": utils.CKPT_VERSION, "elapsed": elapsed}
    utils.atomic_torch_save(state | {"rng": {"gen": gen.get_state(), "torch": torch.get_rng_state()}}, path)


def main(kind, cfg):
    # Preemption: SIGTERM (a scheduler's; SLURM sends it before SIGKILL), SIGUSR1 (sent ahead of time on
    # request) or Ctrl-C finishes the step in flight, saves the checkpoint and exits; --resume continues.
    signalled = utils.INTERRUPTS.install((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    utils.seed_everything(cfg.seed + rank)
    gen = torch.Generator(device).manual_seed(cfg.seed + rank)  # on the device: batches are drawn there
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if cfg.resume and not os.path.isfile(ckpt_path):
        utils.die(f"--resume: no checkpoint at {ckpt_path}")
    if not cfg.resume and os.path.isfile(ckpt_path):
        utils.die(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")

    precision = utils.pick_precision(cfg.precision, device)
    task = KINDS[kind][1](cfg, device, master)
    model = task.model
    ema, opt, config, step, elapsed0 = start(kind, cfg, task, world, gen)
    config["precision"] = precision
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        utils.atomic_write_text(os.path.join(cfg.out, "config.json"), json.dumps(config, indent=1, default=str))
    logger = Logger(cfg, kind, master, config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(
        step, {}, f"{kind}: {n_params / 1e6:.2f}M parameters on {device} x{world}, {precision}, from step {step}"
    )

    train_model = wrap(task.model, cfg, device, world)
    amp = utils.autocast(precision, device)
    peak = utils.peak_flops(device)

    t0 = time.time()
    elapsed = lambda: elapsed0 + time.time() - t0  # training seconds, across resumes
    flags = torch.distributed.new_group(backend="gloo") if world > 1 else None

    def stop_now():
        """Was any rank signalled? Every rank gets the same answer, so all stop after the same step.
        The flag is all-reduced on the CPU (gloo): no GPU sync."""
        if flags is None:
            return bool(signalled)
        flag = torch.tensor([int(bool(signalled))])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=flags)
        return bool(flag.item())

    def progress():
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return max(p, elapsed() / (cfg.max_minutes * 60)) if cfg.max_minutes > 0 else p

    def checkpoint(at):
        if master:
            config.update(task.finalize_config(ema))
            save(ckpt_path, model, ema, opt, at, config, elapsed(), gen)

    def stop(what):
        bar.close()
        utils.die(f"loss became {what} near step {step}; stopping. The last good checkpoint "
                  f"(step {last_saved}) is kept at {ckpt_path}", code=3)  # fmt: skip

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True, desc=kind)
    t_log, last_saved, start_step, stopped = time.time(), step, step, False
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync between log steps
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr = lr_at(step, progress(), cfg)
        if cfg.overfit:
            gen.manual_seed(cfg.seed + rank)
            torch.manual_seed(cfg.seed + rank)
        with amp:
            loss, extras = task.loss(train_model, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, cfg.ema_decay if step >= cfg.warmup else 0.0)
        loss_sum += loss.detach()
        step += 1
        bar.update(1)
        last = step == cfg.steps or (cfg.max_minutes > 0 and elapsed() > cfg.max_minutes * 60)
        if step % cfg.log_every == 0 or last:
            n = (step - 1) % cfg.log_every + 1
            mean_loss = loss_sum.item() / n
            loss_sum.zero_()
            if not math.isfinite(mean_loss):
                stop(mean_loss)
            dt, t_log = time.time() - t_log, time.time()
            sps = n * cfg.batch_size * world / dt
            vals = {"loss": mean_loss, "lr": lr, "grad_norm": gnorm.item(), "samples_s": sps}
            vals |= {k: float(v) for k, v in extras.items()}
            if task.tokens_per_sample:
                vals["tokens_s"] = sps * task.tokens_per_sample
            if peak and task.flops_per_sample:
                vals["mfu"] = sps * task.flops_per_sample / (peak * world)
            logger.log(step, vals)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        if master and (step % cfg.eval_every == 0 or last):
            ema.eval()
            logger.log(step, task.evaluate(ema))
        if master and getattr(cfg, "sample_every", 0) and (step % cfg.sample_every == 0 or last):
            logger.log(step, task.sample(ema, step, logger))
        if step % cfg.save_every == 0 or last:
            if not math.isfinite(loss.item()):
                stop("non-finite")
            checkpoint(step)
            last_saved = step
        if last:
            break
        if stop_now():
            stopped = True
            break
    bar.close()
    if step > start_step and last_saved != step:
        checkpoint(step)
    msg = f"done: step {step}, {elapsed():.0f}s of training, checkpoint {ckpt_path}"
    if stopped:
        msg = f"stopped by {signalled.name or 'a signal to another rank'} after step {step}: checkpoint {ckpt_path} "
        msg += "saved; continue with --resume"
    logger.log(step, {}, msg)
    logger.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if stopped:
        sys.exit(128 + (signalled.signum or signal.SIGTERM))


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else None
    if kind not in KINDS:
        if kind in ("-h", "--help"):
            print(__doc__ + "\nusage: train.py {vae,dit} [--help] [flags]")
            sys.exit(0)
        utils.die("usage: train.py {vae,dit} [flags]; see train.py vae --help or train.py dit --help")
    cfg = utils.parse_config(
        KINDS[kind][0],
        sys.argv[2:],
        presets=PRESETS[kind],
        default_preset="gpu" if torch.cuda.is_available() else "cpu",
        description=f"train.py {kind}: " + __doc__.splitlines()[0],
        prog=f"train.py {kind}",
    )
    try:
        main(kind, cfg)
    except KeyboardInterrupt:  # a signal before the first step (e.g. while encoding the latent cache), or a second one
        name = utils.INTERRUPTS.name or "SIGINT"
        utils.die(
            f"interrupted ({name}); {cfg.out}/ckpt.pt holds the last checkpoint, if any", 128 + signal.Signals[name]
        )
