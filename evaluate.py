"""How close is the generated game to the real one? Metrics on held-out recorded episodes, for any game.

CPU smoke run (seconds; what the tests use; --quick is short for --preset quick):
    python evaluate.py --ckpt runs/dit/ckpt.pt --data data/pong_heldout --out runs/eval --quick
One GPU (every held-out episode, 64 rollouts of 64 frames):
    python evaluate.py --ckpt runs/dit/ckpt.pt --data data/pong_heldout --out runs/eval
Choose the sampler's defaults by measurement:
    python evaluate.py --ckpt runs/dit/ckpt.pt --data data/pong_heldout --sweep-steps 1,2,4 --sweep-context-noise 0,100

Record the held-out set with a seed and epsilon never used for training (see generate_dataset.py --help).
Writes OUT/metrics.json (every number, with the config, checkpoint, device and counts; null
where a metric cannot be computed, the reason under "null_reasons") and OUT/metrics.png
(PSNR and object position errors against the rollout horizon).

Actions: actions[k] is taken after frame k and leads to frame k+1. A rollout from start s is
prompted with the real frames s-P+1..s and the actions between them; step k = 1..H feeds
actions[s+k-1], and its frame is compared with real frame s+k. Teacher forcing is the same
with P = --context and H = 1.

Every run also makes the same rollouts (same start points, same noise) from one real frame, as a
user's `generate.py --prompt frame.png` starts a game: "autoregressive_one_frame" beside the primed
"autoregressive". Every game gets PSNR, SSIM, PSNR on the pixels that moved, the copy-the-last-frame
baseline beside them (metrics.py) and action sensitivity (true against shuffled actions); a Pong model
also gets the ball, paddles, score and up/down control (pong.py).
"""

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import engine as engines
import utils
from metrics import REASONS, next_frame_block, plot, report, report_vae, rollout_block, to_json
from utils import arg


@dataclass
class EvalConfig(engines.ModelConfig):
    data: str = arg("data/pong_heldout", "held-out recorded episodes (a seed and epsilon never used for training)")
    out: str = arg("runs/eval", "output directory: metrics.json, metrics.png")
    context: int = arg(0, "real context frames for teacher forcing and controllability; 0 = the model's window - 1")
    prompt: int = arg(0, "real prompt frames before each autoregressive rollout; 0 = --context")
    rollouts: int = arg(64, "autoregressive rollouts, start points spread evenly over the held-out episodes")
    horizon: int = arg(64, "frames generated per rollout")
    horizons: str = arg("1,8,16,32,64", "rollout steps at which metrics are reported (those <= --horizon)")
    tf_frames: int = arg(256, "teacher-forced target frames, spread evenly over the held-out episodes")
    vae_frames: int = arg(512, "real frames for the VAE reconstruction metrics")
    vae_only: bool = arg(False, "only the VAE reconstruction metrics (to compare decoders: --vae)")
    control_frames: int = arg(8, "controllability: frames generated with up or down held")
    speed_frames: int = arg(64, "frames timed at batch 1 for the speed figure")
    sweep_steps: str = arg("", "comma-separated DDIM step counts to sweep, e.g. 1,2,4,8")
    sweep_context_noise: str = arg("", "comma-separated context noise levels to sweep, e.g. 0,50,100")
    batch: int = arg(32, "rollouts generated at once")
    max_episodes: int = arg(0, "evaluate at most this many held-out episodes (0 = all)")
    seed: int = arg(0, "random seed (start points are fixed; the sampler's noise is seeded per batch)")


DESCRIPTION = __doc__.splitlines()[0] + " (--quick is short for --preset quick)"
QUICK = dict(rollouts=4, horizon=8, horizons="1,4,8", tf_frames=8, vae_frames=16, control_frames=4, speed_frames=4)
PRESETS = {"quick": {**QUICK, "batch": 4}}
STOP = utils.INTERRUPTS  # installed by main; checked between generated frames


# -----------------------------------------------------------------------------
# data and generation


def load_episodes(cfg, frame_size):
    import dataset

    try:
        files = dataset.list_episodes(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        utils.die(str(e))
    if not files:
        utils.die(f"--data {cfg.data}: no episode_*.npz files found")
    eps = []
    for f in files[: cfg.max_episodes] if cfg.max_episodes > 0 else files:
        try:
            ep = dataset.load_episode(f)
        except (FileNotFoundError, ValueError) as e:  # the message names the file
            utils.die(str(e))
        if ep["frames"].shape[1:] != (frame_size, frame_size, 3):
            utils.die(f"{f}: frames are {ep['frames'].shape[1:]}, the model makes ({frame_size}, {frame_size}, 3)")
        eps.append({"frames": ep["frames"], "actions": np.asarray(ep["actions"], np.int64)})
    return eps


def spread(eps, lo, margin, n):
    """n (episode, s) pairs spread evenly over every s in [lo, len - margin) of every episode."""
    cand = [(e, s) for e, ep in enumerate(eps) for s in range(lo, len(ep["frames"]) - margin)]
    idx = np.unique(np.linspace(0, len(cand) - 1, min(n, len(cand))).round().astype(int)) if cand else []
    return [cand[i] for i in idx]


def take(eps, points, offset=0, T=1, key="frames"):
    """eps[e][key][s+offset : s+offset+T] for each (e, s) -> (R, T, ...)."""
    return np.stack([eps[e][key][s + offset : s + offset + T] for e, s in points])


def prompt_of(eps, points, n):
    """WorldModel.reset's arguments: real frames s-n+1..s (R, n, H, W, 3) and the n-1 actions between them."""
    return take(eps, points, 1 - n, n), take(eps, points, 1 - n, n - 1, "actions")


def recorded(eps, T):
    """The recorded actions that drive a rollout from s: actions[s..s+T-1] (actions[k] leads to frame k+1)."""
    return lambda e, s: eps[e]["actions"][s : s + T]


def run(engine, eps, points, n_prompt, T, actions_fn, cfg, desc):
    """For each start (e, s): prompt with real frames s-n_prompt+1..s, generate T frames -> uint8 (R, T, H, W, 3).

    actions_fn(e, s) -> (T,) actions. Batch b's noise is seeded with seed + b, so two runs
    that differ only in their actions share the sampler's noise.
    """
    from tqdm import tqdm

    out = []
    if not sys.stderr.isatty():  # tqdm stays silent off a terminal: one line per phase instead
        print(f"{desc}: {len(points)} x {T} frames", flush=True)
    bar = tqdm(total=len(points) * T, desc=desc, unit="frame", leave=False, disable=None)
    for b, i in enumerate(range(0, len(points), cfg.batch)):
        chunk = points[i : i + cfg.batch]
        acts = torch.as_tensor(np.stack([actions_fn(e, s) for e, s in chunk]), device=engine.device)
        engine.gen.manual_seed(cfg.seed + b)
        engine.reset(*prompt_of(eps, chunk, n_prompt))
        frames = []
        for k in range(T):
            STOP.check()  # Ctrl-C / SIGTERM: stop between two frames
            frames.append(engine.step(acts[:, k]).cpu().numpy())
            bar.update(len(chunk))
        out.append(np.stack(frames, 1))
    bar.close()
    return np.concatenate(out)


def fps_batch1(engine, eps, point, n_prompt, n):
    """End-to-end frames/s at batch 1 (DiT + VAE decode + copy to the host), after two warm-up frames,
    run as generate.py and play.py run it: decoding pipelined with the DiT, half the CPU threads each."""
    threads = torch.get_num_threads()
    engines.set_threads(0, engine.device)
    try:
        engine.reset(*prompt_of(eps, [point], n_prompt))
        a = torch.zeros(1, dtype=torch.long, device=engine.device)
        for k in range(n + 2):
            STOP.check()
            if k == 2:  # the first frames pay for lazy initialisation
                t0 = time.perf_counter()
            frame = engine.step_pipelined(a)  # the previous call's frame
            if frame is not None:
                frame.cpu()
        seconds = time.perf_counter() - t0  # n frames delivered, n frames generated
        engine.flush()
        return n / seconds
    finally:
        torch.set_num_threads(threads)


def pong_control(engine, eps, points, ctx, K, cfg):
    """Pong: hold up vs down for K frames from the same real states (same noise); read the player's paddle."""
    import pong

    all_y = np.concatenate([pong.detect_objects(ep["frames"])["player_y"] for ep in eps])
    y_range = (np.nanmin(all_y), np.nanmax(all_y)) if np.isfinite(all_y).any() else (np.nan, np.nan)
    hold = lambda a: run(engine, eps, points, ctx, K, lambda e, s: np.full(K, a), cfg, f"control {a}")
    return pong.control_metrics(hold, take(eps, points)[:, 0], K, y_range)


def device_name(device):
    cpu = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu


def parse_list(flag, text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        utils.die(f"--{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4,8")


# -----------------------------------------------------------------------------


def main(cfg, argv=()):
    STOP.install()
    device = utils.pick_device(cfg.device)
    if not os.path.isdir(cfg.data):
        utils.die(f"--data {cfg.data}: no such directory")
    for flag in ("rollouts", "horizon", "tf_frames", "vae_frames", "control_frames", "speed_frames", "batch"):
        if getattr(cfg, flag) < 1:
            utils.die(f"--{flag.replace('_', '-')} must be at least 1, found {getattr(cfg, flag)}")
    horizons = [k for k in parse_list("horizons", cfg.horizons) if 1 <= k <= cfg.horizon] or [cfg.horizon]
    sweeps = {"steps": parse_list("sweep-steps", cfg.sweep_steps)}
    sweeps["context_noise"] = parse_list("sweep-context-noise", cfg.sweep_context_noise)
    if not all(1 <= v <= 1000 for v in sweeps["steps"]) or not all(0 <= v < 1000 for v in sweeps["context_noise"]):
        utils.die("--sweep-steps must be in 1..1000 and --sweep-context-noise in 0..999")
    utils.seed_everything(cfg.seed)
    engine = engines.load_world_model(cfg, device)
    is_pong = engine.game == "pong"
    make = lambda st, cn: engines.WorldModel(
        engine.dit, engine.vae, engine.scale, device, st, cn, seed=cfg.seed, slide=cfg.slide, guidance=cfg.guidance,
        cuda_graph=cfg.cuda_graph, precision=engine.precision, warm_start=cfg.warm_start,
    )  # fmt: skip
    max_ctx = engine.window - 1
    ctx = cfg.context or max_ctx
    P = cfg.prompt or ctx
    for flag, v in (("context", ctx), ("prompt", P)):
        if not 1 <= v <= max_ctx:
            utils.die(f"--{flag} {v}: must be in 1..{max_ctx} (the model's window - 1)")
    eps = load_episodes(cfg, engine.frame_size)
    tf_pts, ar_pts = spread(eps, ctx - 1, 1, cfg.tf_frames), spread(eps, P - 1, cfg.horizon, cfg.rollouts)
    if not tf_pts or not ar_pts:
        longest = max(len(ep["frames"]) for ep in eps)
        utils.die(f"--data {cfg.data}: the longest episode has {longest} frames, a rollout needs --prompt + --horizon")
    t_start = time.time()

    # VAE reconstruction: the ceiling for everything generated
    vae_pts = spread(eps, 0, 0, cfg.vae_frames)
    real = take(eps, vae_pts)[:, 0]
    chunks = np.array_split(real, -(-len(real) // 64))
    rec = np.concatenate([engine.decode(engine.encode(c[:, None])[:, 0]).cpu().numpy() for c in chunks])
    m_vae = next_frame_block(real, rec, pong=is_pong)
    if cfg.vae_only:
        return write(cfg, argv, engine, {"vae": m_vae, "counts": dict(vae_frames=len(vae_pts))}, t_start, eps)

    def quality(eng, label):
        """Teacher-forced next frames and autoregressive rollouts with one sampler setting."""
        tf = run(eng, eps, tf_pts, ctx, 1, recorded(eps, 1), cfg, f"{label} tf")[:, 0]
        gen = run(eng, eps, ar_pts, P, cfg.horizon, recorded(eps, cfg.horizon), cfg, f"{label} rollouts")
        real = take(eps, ar_pts, 0, cfg.horizon + 1)  # the start frame, then the frames to compare with
        gen = np.concatenate([real[:, :1], gen], 1)
        m_tf = next_frame_block(take(eps, tf_pts, 1)[:, 0], tf, take(eps, tf_pts)[:, 0], pong=is_pong)
        return m_tf, rollout_block(real, gen, horizons, pong=is_pong), gen

    m_tf, m_ar, gen = quality(engine, "main")
    # the same start points and noise from one real frame, as a user's --prompt frame.png starts a game
    m_one = m_ar
    if P > 1:
        real = take(eps, ar_pts, 0, cfg.horizon + 1)
        one = run(engine, eps, ar_pts, 1, cfg.horizon, recorded(eps, cfg.horizon), cfg, "one-frame rollouts")
        m_one = rollout_block(real, np.concatenate([real[:, :1], one], 1), horizons, pong=is_pong)
    # the same rollouts (same noise) with each rollout's actions permuted: how much do the actions matter?
    rng = np.random.default_rng(cfg.seed)
    perm = {p: rng.permutation(cfg.horizon) for p in ar_pts}
    shuffled_fn = lambda e, s: recorded(eps, cfg.horizon)(e, s)[perm[e, s]]
    shuffled = run(engine, eps, ar_pts, P, cfg.horizon, shuffled_fn, cfg, "shuffled actions")
    real = take(eps, ar_pts, 1, cfg.horizon)
    gain = utils.psnr(real, gen[:, 1:]) - utils.psnr(real, shuffled)  # (R, T)
    m_ctl = {"n": 0}
    if is_pong:
        m_ctl = pong_control(engine, eps, spread(eps, ctx - 1, 0, cfg.rollouts), ctx, cfg.control_frames, cfg)
    m_ctl["psnr_gain_true_vs_shuffled"] = float(gain.mean())
    m_ctl["psnr_gain_at"] = {str(k): float(gain[:, k - 1].mean()) for k in horizons}
    fps = fps_batch1(engine, eps, ar_pts[0], P, cfg.speed_frames)
    dev_name = device_name(device)

    for name, values in sweeps.items():
        rows = []
        for v in values:
            st, cn = (v, cfg.context_noise) if name == "steps" else (cfg.steps, v)
            eng = engine if (st, cn) == (cfg.steps, cfg.context_noise) else make(st, cn)
            tf, ar = (m_tf, m_ar) if eng is engine else quality(eng, f"{name}={v}")[:2]
            row = {"steps": st, "context_noise": cn}
            row |= {f"tf_{k}": tf.get(k) for k in ("psnr", "ssim", "ball_presence", "ball_error_px", "ball_hit_rate")}
            row |= {f"ar_{k}": ar.get(k) for k in ("psnr", "psnr_mean", "ball_presence", "ball_spurious")}
            row |= {f"ar_{k}": ar.get(k) for k in ("ball_error_first16_px", "ball_hit_rate")}
            row |= {f"ar_{k}": ar.get(k) for k in ("ball_presence_first16", "ball_spurious_first16")}
            row["ar_served"] = ar.get("ball_serves", {}).get("generated_served")  # Pong: a ball again after a point
            rows.append(row | {"fps_batch1": fps_batch1(eng, eps, ar_pts[0], P, cfg.speed_frames)})
        sweeps[name] = rows

    metrics = {
        "derived": dict(
            context=ctx,
            prompt=P,
            horizons=horizons,
            frame_size=engine.frame_size,
            model=engine.dit.config,
            game=engine.game,
            action_names=engine.action_names,
        ),
        "counts": dict(vae_frames=len(vae_pts), tf_frames=len(tf_pts), rollouts=len(ar_pts), control=m_ctl["n"]),
        "vae": m_vae,
        "teacher_forced": m_tf,
        "autoregressive": m_ar,
        "autoregressive_one_frame": m_one,
        "control": m_ctl,
        "speed": dict(frames_per_s_batch1=fps, frames=cfg.speed_frames, steps=cfg.steps, device=dev_name),
        "sweeps": {k: v for k, v in sweeps.items() if v},
    }
    write(cfg, argv, engine, metrics, t_start, eps, horizons)


def write(cfg, argv, engine, metrics, t_start, eps=(), horizons=()):
    """OUT/metrics.json (with the run's config, checkpoint, device and data) and OUT/metrics.png; print the table."""
    head = dict(config=dataclasses.asdict(cfg), argv=list(argv), checkpoint=engine.source)
    head["device"] = device_name(engine.device)
    head |= dict(precision=engine.precision, data=dict(dir=os.path.abspath(cfg.data), episodes=len(eps)))
    head["data"]["frames"] = sum(len(ep["frames"]) for ep in eps)
    notes, reasons = {}, REASONS
    if engine.game == "pong":
        import pong

        reasons = pong.REASONS + REASONS
    metrics = to_json(head | metrics | {"seconds": time.time() - t_start}, notes, reasons) | {"null_reasons": notes}
    os.makedirs(cfg.out, exist_ok=True)
    utils.atomic_write_text(os.path.join(cfg.out, "metrics.json"), json.dumps(metrics, indent=1))
    if cfg.vae_only:
        print(report_vae(metrics))
        return
    plot(os.path.join(cfg.out, "metrics.png"), metrics, cfg.horizon)
    print(report(metrics, horizons))


if __name__ == "__main__":
    argv = ["--preset=quick" if a == "--quick" else a for a in sys.argv[1:]]
    cfg = utils.parse_config(EvalConfig, argv, presets=PRESETS, description=DESCRIPTION)
    try:
        main(cfg, argv)
    except KeyboardInterrupt:
        what = f"interrupted ({STOP.name or 'SIGINT'})"
        utils.die(f"{what}; nothing written to {cfg.out}", STOP.exit_code if STOP else 130)
