"""What train.py trains: the VAE and the DiT, each as batch -> loss, with their data and validation.

train.py owns the loop (optimizer, schedule, EMA, checkpoints, logging, DDP); a task owns its
model, its data (dataset.EpisodeDataset on the training device) and its loss. The game and its action
names come from the data's meta.json and go into the checkpoint (task.extra_config):
    task = VAETask(cfg, device, master) | DiTTask(cfg, device, master)
    task.model, task.model_config, task.extra_config (more checkpoint config)
    task.loss(module, gen) -> (loss, {name: tensor}); task.evaluate(ema) -> {name: value}
    task.sample(ema, step, logger) (DiT: a rollout GIF); task.finalize_config(ema) -> config to save
    task.tokens_per_sample, task.flops_per_sample (for throughput and MFU; None if not counted)
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import diffusion
import games
import utils
from dataset import EpisodeDataset, build_latent_cache, list_split, read_game, to_float_frames, to_uint8_frames
from engine import WorldModel, load_vae


def load_split(cfg):
    """(train files, val files, frame size, game, action names) of --data; a one-line error for a bad directory."""
    try:
        return *list_split(cfg.data, cfg.val_fraction, cfg.max_episodes), *read_game(cfg.data)
    except ValueError as e:
        utils.die(str(e))


def windows(files, window, device, **kw):
    """EpisodeDataset, with a one-line error naming a missing or corrupt episode (or latent) file."""
    try:
        return EpisodeDataset(files, window, device=device, **kw)
    except (FileNotFoundError, ValueError) as e:
        utils.die(str(e))


class VAETask:
    """Reconstruction (background-weighted L1 + L2) plus a small KL, on single frames."""

    tokens_per_sample = flops_per_sample = None

    def __init__(self, cfg, device, master):
        from uvit_vae import DECODER_CONFIGS, AutoencoderKL, build_vae

        train_files, val_files, frame_size, self.game, names = load_split(cfg)
        if cfg.crop and (cfg.crop % 8 or cfg.crop > frame_size):
            utils.die(f"--crop {cfg.crop}: must be a multiple of 8 and at most the frame size {frame_size}")
        if cfg.decoder_only and not cfg.init:
            utils.die("--decoder-only needs --init: the VAE whose decoder to fine-tune")
        if cfg.decoder and not cfg.decoder_only:
            utils.die("--decoder needs --decoder-only: a new decoder is trained against a frozen --init encoder")
        if cfg.latent_noise < 0:
            utils.die(f"--latent-noise must be at least 0, found {cfg.latent_noise}")
        for flag in ("ball_weight", "ball_oversample"):
            if getattr(cfg, flag) and self.game != "pong":
                utils.die(f"--{flag.replace('_', '-')}: the ball detector is Pong's; these data are {self.game}'s")
        if not 0 <= cfg.ball_oversample < 1:
            utils.die(f"--ball-oversample {cfg.ball_oversample}: must be a share in 0..1 (1 excluded)")
        if cfg.decoder and cfg.decoder not in DECODER_CONFIGS:
            utils.die(f"--decoder {cfg.decoder!r}: choose from {sorted(DECODER_CONFIGS)}")
        self.train = windows(train_files, 1, device, num_actions=len(names))
        self.val = windows(val_files or train_files[:1], 1, device, num_actions=len(names))
        if cfg.ball_oversample:  # windows of one frame: window i is frame i
            import pong

            crowded = np.flatnonzero(pong.ball_crowded(self.train.data.cpu().numpy()))
            if not len(crowded):
                utils.die("--ball-oversample: no training frame has a ball beside a paddle or a wall")
            self.crowded = torch.from_numpy(crowded).to(device)
            if master:
                print(f"--ball-oversample: {len(crowded)} of {len(self.train)} training frames have a crowded ball")
        # The static background: the per-pixel median over a sample of training frames.
        g = torch.Generator().manual_seed(0)
        sample = self.train.sample(min(512, len(self.train)), g)["frames"][:, 0]  # (n, 3, H, W)
        self.background = sample.median(dim=0).values
        # --fg-mask colour: what is drawn over the field's colour (the most common one) where the frames often
        # differ from the median (> 2% of the sample: a score's digits; not the walls, which would outweigh the ball)
        colours, counts = self.background.flatten(1).unique(dim=1, return_counts=True)
        self.bg_colour = colours[:, counts.argmax()][:, None, None]  # (3, 1, 1)
        differs = ((sample - self.background).abs().amax(dim=1) > 0.1).float().mean(dim=0)  # (H, W)
        self.changes = (differs > 0.02)[None]  # (1, H, W)
        tiny = dict(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8) if cfg.model == "tiny" else {}
        try:
            self.model = build_vae("pong" if tiny else cfg.model, **tiny).to(device)
        except ValueError as e:
            utils.die(f"--model: {e}")
        self.init_scaling = None
        if cfg.init:  # GameNGen fine-tunes the decoder of a trained VAE the same way
            ck = utils.load_checkpoint(cfg.init, kind="vae")
            weights = ck["ema"]
            if cfg.decoder:  # a fresh (lighter) decoder: keep everything but decoder.*
                ck["config"]["model"]["decoder"] = DECODER_CONFIGS[cfg.decoder]
                weights = {k: v for k, v in weights.items() if not k.startswith("decoder.")}
            self.model = AutoencoderKL(**ck["config"]["model"]).to(device)
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if unexpected or (missing and not cfg.decoder):
                utils.die(f"--init {cfg.init}: its weights do not fit its own config ({(missing + unexpected)[:3]})")
            self.init_scaling = ck["config"]["scaling_factor"]
        if cfg.decoder_only:  # the encoder stays as it is, so the latents (and a DiT trained on them) stay valid
            self.model.encoder.requires_grad_(False)
            self.model.quant_conv.requires_grad_(False)
        self.model_config, self.extra_config = dict(self.model.config), {"game": self.game}
        self.cfg, self.device = cfg, device

    def loss(self, model, gen):
        x = self.batch(gen)  # (B, 3, H, W)
        w = self.weights(x)
        if self.cfg.crop:  # a convolutional VAE learns from crops; aligned to the latent grid
            c, size = self.cfg.crop, x.shape[-1]
            i, j = (8 * torch.randint(0, (size - c) // 8 + 1, (2,), generator=gen, device=gen.device)).tolist()
            x, w = (v[..., i : i + c, j : j + c] for v in (x, w))
        # decoder-only decodes the posterior mean, as generation decodes the DiT's latents; --latent-noise: plus
        # noise of a random std, as the DiT's latents are off by a little (docs/experiments.md, issue #26 rounds 4, 6)
        noise = None
        if self.cfg.latent_noise:
            noise = self.cfg.latent_noise * torch.rand(len(x), 1, 1, 1, generator=gen, device=gen.device).to(x.device)
        rec, post = model(x, sample_posterior=not self.cfg.decoder_only, generator=gen, noise=noise)
        err = rec.float() - x
        rec_loss = (w * (err.abs() + err.square())).mean() / w.mean()
        kl = post.kl().mean() / x[0].numel()
        return rec_loss + self.cfg.kl_weight * kl, {"rec": rec_loss.detach(), "kl": kl.detach()}

    def batch(self, gen):
        """A batch of single frames, uniformly drawn; --ball-oversample: that share of it from the crowded balls."""
        B = self.cfg.batch_size
        if not self.cfg.ball_oversample:
            return self.train.sample(B, gen)["frames"][:, 0]
        k = round(self.cfg.ball_oversample * B)
        pick = self.crowded[torch.randint(len(self.crowded), (k,), generator=gen, device=gen.device).to(self.device)]
        rest = torch.randint(len(self.train), (B - k,), generator=gen, device=gen.device).to(self.device)
        return self.train.batch(torch.cat([pick, rest]))["frames"][:, 0]

    def weights(self, x):
        """(B, 1, H, W): each pixel's loss weight in frames x (B, 3, H, W): 1, + --fg-weight, + --ball-weight."""
        w = 1.0 + self.cfg.fg_weight * self.foreground(x).float()
        if self.cfg.ball_weight:  # the ball is a few pixels: it can share a latent cell with a paddle or a wall
            import pong

            w = w + self.cfg.ball_weight * torch.from_numpy(pong.ball_mask(to_uint8_frames(x))).to(w.device)[:, None]
        return w

    def foreground(self, x):
        """(B, 1, H, W) bool: the pixels --fg-weight weights in frames x (B, 3, H, W), see --fg-mask."""
        fg = (x - self.background).abs().amax(dim=1, keepdim=True) > 0.1
        if self.cfg.fg_mask == "colour":  # a score's digits are in the median frame too: mark them by colour
            fg |= ((x - self.bg_colour).abs().amax(dim=1, keepdim=True) > 0.1) & self.changes
        return fg

    @torch.no_grad()
    def evaluate(self, model):
        m = vae_metrics(model, self.val, n=256, pong=self.game == "pong")
        return {f"val_{k}": v for k, v in m.items() if k not in ("n", "n_ball")}

    def finalize_config(self, model):
        """The latent scaling factor: 1 / std of the posterior means over training frames."""
        if self.cfg.decoder_only:  # the encoder is the --init one
            return {"scaling_factor": self.init_scaling}
        g = torch.Generator().manual_seed(1)
        x = self.train.sample(min(512, len(self.train)), g)["frames"][:, 0]
        with torch.no_grad():
            z = torch.cat([model.encode(c).mean for c in x.split(64)])
        return {"scaling_factor": float(1.0 / z.float().std())}


@torch.no_grad()
def vae_metrics(vae, ds, n=256, pong=False):
    """PSNR (dB, on uint8 frames); in Pong, the share of real balls still detected after reconstruction
    and the score read right."""
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().to(ds.device)
    real = ds.data[ds.starts[idx]]  # uint8 (n, H, W, 3): windows of one frame
    rec = torch.cat([vae.decode(vae.encode(to_float_frames(c)).mean) for c in real.split(64)])
    rec = to_uint8_frames(rec)
    real = real.cpu().numpy()
    out = {"psnr": float(utils.psnr(real, rec).mean()), "n": len(real)}
    if not pong:
        return out
    import pong as game

    m = game.frame_metrics(real, rec)  # the crowded balls: a paddle or a wall beside them, where the lost ones are
    out |= {"ball_kept": m["ball_presence"], "n_ball": m["n_ball"], "ball_kept_crowded": m["ball_presence_crowded"]}
    return out | {k: v for k, v in m.items() if k.startswith("score_read")}


@torch.no_grad()
def own_context(model, x0, cond, k, gen, ac, steps=2):
    """x0 (B, T, C, h, w) with frames T-1-k .. T-2 replaced by the model's own, as generation makes them.

    Each is sampled as engine.WorldModel samples (DDIM, `steps` steps from pure noise, clean
    context, the window's actions) after the real frames before T-1-k and the generated ones
    since, so the target frame T-1 follows a context with the model's own mistakes (self-forcing).
    """
    B, T = x0.shape[:2]
    x, ts = x0.clone(), diffusion.ddim_timesteps(steps)
    for j in range(T - 1 - k, T - 1):
        z = torch.randn(x0[:, j : j + 1].shape, generator=gen, device=gen.device).to(x.device)
        t = torch.zeros(B, j + 1, dtype=torch.long, device=x.device)
        for t_now, t_next in zip(ts[:-1], ts[1:]):
            t[:, -1] = t_now
            v = model(torch.cat([x[:, :j], z], 1), t, cond[:, : j + 1])[:, -1:].float()
            z = diffusion.ddim_step(z, v, t_now, t_next, ac)
        x[:, j] = z[:, 0]
    return x


class DiTTask:
    """Diffusion forcing on VAE latents: an independent noise level per frame, v-prediction."""

    def __init__(self, cfg, device, master):
        from dit import DiT_models, flops_per_frame

        if not cfg.vae:
            utils.die("train.py dit needs --vae (a VAE run dir or ckpt.pt from `train.py vae`)")
        vae_path = utils.resolve_ckpt_path(cfg.vae)
        if not os.path.isfile(vae_path):
            utils.die(f"--vae {cfg.vae}: no VAE checkpoint at {vae_path}")
        self.vae = load_vae(vae_path, device)
        self.scale = float(self.vae.scaling_factor)
        train_files, val_files, _, game, names = load_split(cfg)
        fp = utils.file_fingerprint(vae_path)
        ck = utils.load_checkpoint(cfg.init, kind="dit") if cfg.init else None  # checked before the latent cache
        if ck and ck["config"].get("vae_fingerprint") != fp and not cfg.init_new_vae:
            utils.die(f"--init {cfg.init} was trained on another VAE's latents than --vae {cfg.vae} (--init-new-vae)")

        def encode(frames):  # chunk by chunk: a signal stops here, before the episode's file is written
            utils.INTERRUPTS.check()
            return self.vae.encode(to_float_frames(torch.from_numpy(frames).to(device))).mean

        try:  # a corrupt episode is met here first when no cache exists yet
            build_latent_cache(train_files + val_files, fp, encode, master)
        except (FileNotFoundError, ValueError) as e:
            utils.die(str(e))
        kw = dict(latents=fp, scale=self.scale, num_actions=len(names))
        self.train = windows(train_files, cfg.window, device, **kw)
        self.val = windows(val_files, cfg.window, device, **kw) if val_files else self.train
        c, h, w = self.train.data.shape[1:]
        self.model = DiT_models[cfg.model](
            input_h=h, input_w=w, in_channels=c, window=cfg.window, action_dim=len(names)
        ).to(device)
        if ck:  # fine-tune a trained DiT (its EMA weights) on the same VAE's latents (or, asked, another's)
            # the window holds no weights (RoPE over time), so a longer one can start from a shorter one
            same = lambda c: {k: v for k, v in c.items() if k != "window"}
            if same(ck["config"]["model"]) != same(json.loads(json.dumps(self.model.config))):
                utils.die(f"--init {cfg.init}: model config {ck['config']['model']} differs from --model {cfg.model}")
            if games.from_config(ck["config"]) != (game, names):
                utils.die(f"--init {cfg.init} plays {games.from_config(ck['config'])}, --data {(game, names)}")
            self.model.load_state_dict(ck["ema"])
        self.model_config = dict(self.model.config)
        self.extra_config = {"vae_path": os.path.abspath(vae_path), "vae_fingerprint": fp, "latent_scale": self.scale}
        self.extra_config |= {"game": game, "action_names": names}
        self.ac = diffusion.alphas_cumprod_schedule().to(device)
        self.cfg, self.device = cfg, device
        self.n_rollout = round(cfg.rollout_frac * cfg.batch_size)
        self.rollout_frames = cfg.rollout_frames or cfg.window - 2
        for flag in ("clean_context", "sampler_levels"):
            if not 0 <= getattr(cfg, flag) <= 1:
                utils.die(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: must be a share in 0..1")
        if not 0 <= cfg.clean_context_noise < diffusion.NUM_TIMESTEPS or cfg.sampler_steps < 1:
            utils.die("--clean-context-noise must be in 0..999 and --sampler-steps at least 1")
        if cfg.clean_copy and (cfg.clean_context or cfg.ctx_noise_prob or cfg.rollout_frac):
            utils.die(
                "--clean-copy trains every frame after a clean context: drop --clean-context, "
                "--ctx-noise-prob and --rollout-frac"
            )
        if self.n_rollout and not 1 <= self.rollout_frames <= cfg.window - 2:
            utils.die(f"--rollout-frames {cfg.rollout_frames}: must be in 1..window-2 ({cfg.window - 2})")
        # The static background's latent: the per-cell median over a sample of training frames (--fg-weight).
        sample = self.train.sample(min(512, len(self.train)), torch.Generator().manual_seed(0))
        self.background = sample["latents"][:, 0].median(dim=0).values  # (C, h, w)
        frames = 2 * cfg.window if cfg.clean_copy else cfg.window  # the clean copy runs through the model too
        self.tokens_per_sample = frames * self.model.grid_h * self.model.grid_w
        self.flops_per_sample = 3 * flops_per_frame(self.model) * frames  # forward + backward

    def noise_levels(self, B, T, gen, ask=None):
        """(B, T) noise levels, and the (B,) windows that ask generation's question (`clean`).

        Diffusion forcing draws every frame's level uniformly. --sampler-levels moves a share of the
        draws onto the levels the DDIM sampler queries (999 and 500 for 2 steps). A `clean` window
        (--clean-context) has its context at level 0 (up to --clean-context-noise) as at generation,
        and only its last frame is a target. Nothing extra is drawn for a flag left at 0, so the
        default recipe's random stream is unchanged. ask="forcing" (uniform levels) or "next" (clean
        context, uniform target) ignores the flags: validation asks every run the same questions.
        """
        cfg, dev = self.cfg, gen.device
        t = torch.randint(0, diffusion.NUM_TIMESTEPS, (B, T), generator=gen, device=dev)
        clean = torch.full((B,), ask == "next", dtype=torch.bool, device=dev)
        if ask is not None:
            return torch.where(clean[:, None] & (torch.arange(T, device=dev) < T - 1), 0, t), clean
        if cfg.sampler_levels > 0:
            levels = torch.tensor([s for s in diffusion.ddim_timesteps(cfg.sampler_steps) if s >= 0], device=dev)
            pick = levels[torch.randint(0, len(levels), (B, T), generator=gen, device=dev)]
            t = torch.where(torch.rand(B, T, generator=gen, device=dev) < cfg.sampler_levels, pick, t)
        if cfg.ctx_noise_prob > 0:
            # GameNGen-style windows: a lightly noised context and a fully random last frame.
            pick = torch.rand(B, generator=gen, device=dev) < cfg.ctx_noise_prob
            ctx = torch.randint(0, cfg.ctx_noise_max + 1, (B, T), generator=gen, device=dev)
            t = torch.where(pick[:, None], torch.cat([ctx[:, :-1], t[:, -1:]], 1), t)
        if cfg.clean_context > 0:
            clean = torch.rand(B, generator=gen, device=dev) < cfg.clean_context
            ctx = torch.randint(0, cfg.clean_context_noise + 1, (B, T - 1), generator=gen, device=dev)
            t = torch.where(clean[:, None], torch.cat([ctx, t[:, -1:]], 1), t)
        return t, clean

    def make_batch(self, ds, B, gen, ask=None):
        batch = ds.sample(B, gen)
        x0, cond = batch["latents"], batch["prev_actions"]  # (B, T, C, H, W), (B, T, A)
        T = x0.shape[1]
        # drawn where gen lives (the training device): no copy from the host, so no sync, in a step
        t, clean = self.noise_levels(B, T, gen, ask)
        t, clean = t.to(self.device), clean.to(self.device)
        noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(self.device)
        if self.cfg.action_dropout > 0:
            keep = (torch.rand(B, T, 1, generator=gen, device=gen.device) >= self.cfg.action_dropout).float()
            keep = keep.to(self.device)
            cond = cond * keep
        return x0, t, noise, cond, clean

    def cell_weights(self, x0):
        """(B, T, 1, h, w): 1 + fg_weight where a latent cell differs from the background or from the last frame.

        The ball is 1-2 pixels of a 96x96 frame: with a plain MSE the static field dominates the loss.
        """
        moved = lambda a, b: (a - b).norm(dim=2, keepdim=True) > self.cfg.fg_threshold  # (B, T, 1, h, w)
        fg = moved(x0, self.background)
        fg[:, 1:] |= moved(x0[:, 1:], x0[:, :-1])
        return 1.0 + self.cfg.fg_weight * fg.float()

    def loss_on(self, model, x0, t, noise, cond, clean=None, weighted=True, copy=False):
        """MSE on v. A clean window's context is given clean, as generation gives it, and is no target.

        Every window counts the same: a diffusion-forcing window averages its T frames, a clean
        window is its last frame. copy=True (--clean-copy): every noised frame j is a target, after
        the clean frames 0..j-1 of a clean copy of the window (DiT.forward's `clean`).
        """
        B, T = t.shape
        x_t = diffusion.q_sample(x0, t, noise, self.ac)
        if clean is None:
            clean = torch.zeros(B, dtype=torch.bool, device=t.device)
        ctx = clean[:, None] & (torch.arange(T, device=t.device) < T - 1)  # (B, T): frames that are only context
        x_t = torch.where((ctx & (t == 0))[..., None, None, None], x0, x_t)  # level 0: the clean latent itself
        v = model(x_t, t, cond, clean=x0) if copy else model(x_t, t, cond)
        v, target = v.float(), diffusion.v_target(x0, noise, t, self.ac)
        w = self.cell_weights(x0) if weighted and self.cfg.fg_weight else torch.ones_like(x0[:, :, :1])
        frame = (~ctx).float()
        frame = frame / frame.sum(1, keepdim=True)  # (B, T): the frames of a window share a weight of 1
        err = (w * (v - target).square()).mean(dim=(2, 3, 4))  # (B, T)
        return (frame * err).sum() / (frame * w.mean(dim=(2, 3, 4))).sum()

    def rollout_loss(self, model, x0, t, noise, cond, gen):
        """The last frame's loss after a generated context, which is clean (level 0), as at generation."""
        ctx = own_context(model, x0, cond, self.rollout_frames, gen, self.ac)[:, :-1]
        t = torch.cat([torch.zeros_like(t[:, :-1]), t[:, -1:]], 1)
        last = diffusion.q_sample(x0[:, -1:], t[:, -1:], noise[:, -1:], self.ac)
        v = model(torch.cat([ctx, last], 1), t, cond)[:, -1:].float()
        return F.mse_loss(v, diffusion.v_target(x0[:, -1:], noise[:, -1:], t[:, -1:], self.ac))

    def loss(self, model, gen):
        x0, t, noise, cond, clean = self.make_batch(self.train, self.cfg.batch_size, gen)
        r = self.n_rollout
        if not r:
            return self.loss_on(model, x0, t, noise, cond, clean, copy=self.cfg.clean_copy), {}
        # the first r windows are trained on the model's own context; each window counts the same
        ro = self.rollout_loss(model, x0[:r], t[:r], noise[:r], cond[:r], gen)
        n = len(x0) - r
        plain = self.loss_on(model, x0[r:], t[r:], noise[r:], cond[r:], clean[r:]) if n else ro
        return (r * ro + n * plain) / len(x0), {"rollout_loss": ro.detach()}

    @torch.no_grad()
    def evaluate(self, model):
        """val_loss: diffusion forcing (every frame at a uniform level); val_next: generation's question
        (a clean context, the last frame the target). The same windows, noise and levels every time,
        whatever the training flags, so runs with different flags compare."""
        out = {}
        for name, ask in (("val_loss", "forcing"), ("val_next", "next")):
            g = torch.Generator(self.device).manual_seed(1234)
            batches = [self.make_batch(self.val, self.cfg.batch_size, g, ask) for _ in range(4)]
            out[name] = float(np.mean([self.loss_on(model, *b).item() for b in batches]))
            if self.cfg.fg_weight:  # the plain MSE too, comparable across --fg-weight settings
                mse = [self.loss_on(model, *b, weighted=False).item() for b in batches]
                out[name + "_mse"] = float(np.mean(mse))
        return out

    @torch.no_grad()
    def sample(self, model, step, logger):
        """A short autoregressive rollout against the real frames of a validation episode."""
        from dataset import load_episode

        ep = load_episode(self.val.files[0])
        n = min(len(ep["frames"]) - 1, 2 * self.cfg.window)
        k = (len(ep["frames"]) - n) // 2  # mid-game: frame 0 (the reset screen) has other colours
        engine = WorldModel(model, self.vae, self.scale, self.device, steps=8)
        fake = engine.rollout(ep["frames"][k : k + 1], torch.from_numpy(ep["actions"][k : k + n - 1]))
        real = ep["frames"][k : k + n]
        path = os.path.join(self.cfg.out, f"sample_{step:07d}.gif")
        utils.write_video(path, np.concatenate([real, fake], axis=2), fps=15)
        logger.media(step, "sample", path)
        return {"sample_psnr": float(utils.psnr(real[1:], fake[1:]).mean())}

    def finalize_config(self, model):
        return {}
