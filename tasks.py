"""What train.py trains: the data on the training device, and the two tasks (VAE, DiT) as batch -> loss.

train.py owns the loop (optimizer, schedule, EMA, checkpoints, logging, DDP); a task owns
its model, its data and its loss:
    task = VAETask(cfg, device, master) | DiTTask(cfg, device, master)
    task.model, task.model_config, task.forward_module (what DDP/compile wrap)
    task.loss(module, gen) -> (loss, {name: value}); task.evaluate(ema, step, logger) -> {name: value}
    task.sample(ema, step, logger) (DiT: a rollout GIF); task.finalize_config(ema) -> extra config
The latent cache (the dataset encoded once by the VAE) lives in DATA/latents/<vae fingerprint>/.
"""

import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import utils
from generate import load_vae

# -----------------------------------------------------------------------------
# data: whole episodes kept on the training device, windows gathered by index


def load_split(data, val_fraction, max_episodes=0):
    """Comma-separated data dirs -> (train files, val files, frame size); each dir is split by episode."""
    import dataset

    train, val, sizes = [], [], set()
    for d in data.split(","):
        if not os.path.isdir(d):
            utils.die(f"--data {d}: no such directory")
        try:
            files = dataset.list_episodes(d)
            with open(os.path.join(d, "meta.json")) as f:
                sizes.add(json.load(f)["frame_size"])
        except (OSError, ValueError, KeyError) as e:
            utils.die(f"--data {d}: {e}")
        if not files:
            utils.die(f"--data {d}: no episode_*.npz files found")
        files = files[:max_episodes] if max_episodes > 0 else files
        tr, va = dataset.split_episodes(files, val_fraction)
        train, val = train + tr, val + va
    if len(sizes) > 1:
        utils.die(f"--data {data}: the directories were recorded at different frame sizes {sorted(sizes)}")
    return train, val, sizes.pop()


class WindowBank:
    """All episodes of a split concatenated on one device; samples windows that never cross an episode."""

    def __init__(self, arrays, actions, seq_len, device):
        # arrays: list of (N_i, ...) per episode; actions: list of (N_i,) int
        self.seq_len = seq_len
        lens = [len(a) for a in arrays]
        starts, off = [], 0
        for n in lens:
            starts.extend(range(off, off + n - seq_len + 1))
            off += n
        if not starts:
            raise ValueError(f"no episode has {seq_len} frames")
        self.data = torch.from_numpy(np.concatenate(arrays)).to(device)
        self.actions = torch.from_numpy(np.concatenate(actions)).long().to(device)
        self.starts = torch.tensor(starts, device=device)
        self.device = device

    def __len__(self):
        return len(self.starts)

    def get(self, idx):
        """idx (B,) indices into starts -> data (B, T, ...), actions (B, T)."""
        pos = self.starts[idx][:, None] + torch.arange(self.seq_len, device=self.device)
        return self.data[pos], self.actions[pos]

    def sample(self, batch_size, gen):
        idx = torch.randint(len(self.starts), (batch_size,), generator=gen, device="cpu").to(self.device)
        return self.get(idx)


def to_float_frames(x):
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    return x.movedim(-1, -3).float().div(127.5).sub(1.0)


def shift_actions(actions, num_actions=utils.NUM_ACTIONS):
    """Recorded actions[k] leads to frame k+1; the DiT wants, at frame j, the action that led to it."""
    onehot = F.one_hot(actions, num_actions).float()  # (B, T, A)
    cond = torch.zeros_like(onehot)
    cond[:, 1:] = onehot[:, :-1]  # frame 0 of a window: action unknown (zeros)
    return cond


# -----------------------------------------------------------------------------
# the VAE's latent cache


def vae_fingerprint(vae_ckpt_path):
    h = hashlib.sha256()
    with open(vae_ckpt_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_ckpt_path(path):
    """A run dir means its ckpt.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    return path


def latent_path(episode_file, fingerprint):
    return os.path.join(os.path.dirname(episode_file), "latents", fingerprint, _stem(episode_file) + ".npy")


@torch.no_grad()
def build_latent_cache(files, vae_path, device, master):
    """Encode every episode once to <its dir>/latents/<VAE fingerprint>/episode_*.npy (posterior means, unscaled).

    The fingerprint hashes the VAE checkpoint file, so a new VAE gets a new cache; the
    recorder refuses to mix frame sizes in one directory, so a cache never goes stale.
    """
    import dataset

    fp = vae_fingerprint(vae_path)
    todo = [f for f in files if not os.path.isfile(latent_path(f, fp))]
    if master and todo:
        from tqdm import tqdm

        vae = load_vae(vae_path, device)
        for f in tqdm(todo, desc="encoding the latent cache", unit="episode"):
            frames = dataset.load_episode(f)["frames"]
            lat = [
                vae.encode(to_float_frames(torch.from_numpy(c).to(device))).mean.half().cpu()
                for c in np.split(frames, range(256, len(frames), 256))
            ]

            def write(tmp, arr=torch.cat(lat).numpy()):
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)

            utils._atomic(latent_path(f, fp), write)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return fp


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


# -----------------------------------------------------------------------------
# the two kinds of model: batch -> loss, plus their validation


class VAEForward(torch.nn.Module):
    """encode -> sample -> decode as one forward, so DDP and compile can wrap the VAE."""

    def __init__(self, vae, decoder_only=False):
        super().__init__()
        self.vae, self.decoder_only = vae, decoder_only

    def forward(self, x):  # (B, 3, H, W) -> (B, 3, H, W), posterior
        if self.decoder_only:  # decode the posterior mean, as generation decodes the DiT's latents
            with torch.no_grad():
                post = self.vae.encode(x)
            return self.vae.decode(post.mean), post
        post = self.vae.encode(x)
        return self.vae.decode(post.sample()), post


class VAETask:
    """Reconstruction (background-weighted L1 + L2) plus a small KL, on single frames."""

    def __init__(self, cfg, device, master):
        import dataset
        from uvit_vae import build_vae

        train_files, val_files, self.frame_size = load_split(cfg.data, cfg.val_fraction, cfg.max_episodes)
        if cfg.crop and (cfg.crop % 8 or cfg.crop > self.frame_size):
            utils.die(f"--crop {cfg.crop}: must be a multiple of 8 and at most the frame size {self.frame_size}")
        frames = [dataset.load_episode(f)["frames"] for f in train_files]
        self.train = WindowBank(frames, [np.zeros(len(f), np.int64) for f in frames], 1, device)
        vf = [dataset.load_episode(f)["frames"] for f in val_files] or frames[:1]
        self.val = WindowBank(vf, [np.zeros(len(f), np.int64) for f in vf], 1, device)
        # The static background: the per-pixel median over a sample of training frames.
        g = torch.Generator().manual_seed(0)
        sample, _ = self.train.sample(min(512, len(self.train)), g)
        self.background = to_float_frames(sample[:, 0]).median(dim=0).values  # (3, H, W)
        overrides = (
            {"ch": 16, "ch_mult": (1, 1, 2, 2), "num_res_blocks": 1, "norm_groups": 8} if cfg.model == "tiny" else {}
        )
        self.model = build_vae("pong" if cfg.model == "tiny" else cfg.model, **overrides).to(device)
        self.init_scaling = None
        if cfg.decoder_only and not cfg.init:
            utils.die("--decoder-only needs --init: the VAE whose decoder to fine-tune")
        if cfg.decoder and not cfg.decoder_only:
            utils.die("--decoder needs --decoder-only: a new decoder is trained against a frozen --init encoder")
        if cfg.init:  # GameNGen fine-tunes the decoder of a trained VAE the same way
            from uvit_vae import DECODER_CONFIGS, AutoencoderKL

            ck = utils.load_checkpoint(resolve_ckpt_path(cfg.init), kind="vae")
            weights = ck["ema"]
            if cfg.decoder:  # a fresh (lighter) decoder: keep everything but decoder.*
                if cfg.decoder not in DECODER_CONFIGS:
                    utils.die(f"--decoder {cfg.decoder!r}: choose from {sorted(DECODER_CONFIGS)}")
                ck["config"]["model"]["decoder"] = DECODER_CONFIGS[cfg.decoder]
                weights = {k: v for k, v in weights.items() if not k.startswith("decoder.")}
            self.model = AutoencoderKL(**ck["config"]["model"]).to(device)
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            assert not unexpected and all(k.startswith("decoder.") for k in missing) and (cfg.decoder or not missing)
            self.init_scaling = ck["config"]["scaling_factor"]
        if cfg.decoder_only:
            for part in (self.model.encoder, self.model.quant_conv):
                part.requires_grad_(False)
        self.model_config = dict(self.model.config)
        self.forward_module = VAEForward(self.model, cfg.decoder_only)
        self.cfg, self.device = cfg, device

    def weights(self, x, bg):
        fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (B, 1, H, W)
        return 1.0 + self.cfg.fg_weight * fg

    def loss(self, model, gen):
        x, _ = self.train.sample(self.cfg.batch_size, gen)
        x = to_float_frames(x[:, 0])  # (B, 3, H, W)
        bg = self.background
        if self.cfg.crop:  # a convolutional VAE learns from crops; aligned to the latent grid
            c, size = self.cfg.crop, x.shape[-1]
            i, j = (8 * torch.randint(0, (size - c) // 8 + 1, (2,), generator=gen)).tolist()
            x, bg = x[..., i : i + c, j : j + c], bg[..., i : i + c, j : j + c]
        rec, post = model(x)
        w = self.weights(x, bg)
        err = rec.float() - x
        rec_loss = (w * (err.abs() + err.square())).mean() / w.mean()
        kl = post.kl().mean() / x[0].numel()
        return rec_loss + self.cfg.kl_weight * kl, {"rec": rec_loss.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def evaluate(self, model, step, logger):
        m = vae_metrics(model, self.val, self.device, n=256)
        return {"val_psnr": m["psnr"], "val_ball_kept": m["ball_kept"]}

    def finalize_config(self, model):
        """The latent scaling factor: 1 / std of the posterior means over training frames."""
        if self.cfg.decoder_only:  # the encoder is the --init one
            return {"scaling_factor": self.init_scaling}
        g = torch.Generator().manual_seed(1)
        x, _ = self.train.sample(min(512, len(self.train)), g)
        with torch.no_grad():
            z = torch.cat([model.encode(to_float_frames(c[:, 0])).mean for c in x.split(64)])
        return {"scaling_factor": float(1.0 / z.float().std())}


@torch.no_grad()
def vae_metrics(vae, bank, device, n=256):
    """PSNR (dB, on [0,255] uint8 frames) and the share of real balls still detected after reconstruction."""
    idx = torch.linspace(0, len(bank) - 1, min(n, len(bank))).long().to(device)
    real, _ = bank.get(idx)
    real = real[:, 0]
    rec = torch.cat([vae.decode(vae.encode(to_float_frames(c)).mean) for c in real.split(64)])
    rec_u8 = ((rec.float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(1, -1)
    mse = (rec_u8.float() - real.float()).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    psnr = (10 * torch.log10(255.0**2 / mse)).mean().item()
    d_real = utils.detect_objects(real.cpu().numpy())
    d_rec = utils.detect_objects(rec_u8.cpu().numpy())
    has = d_real["ball_present"]
    kept = float((d_rec["ball_present"][has]).mean()) if has.any() else float("nan")
    return {"psnr": psnr, "ball_kept": kept, "n": int(len(idx)), "n_ball": int(has.sum())}


class DiTTask:
    """Diffusion forcing on VAE latents: an independent noise level per frame, v-prediction."""

    def __init__(self, cfg, device, master):
        import dataset
        from dit import DiT_models

        if not cfg.vae:
            utils.die("train.py dit needs --vae (a VAE run dir or ckpt.pt from `train.py vae`)")
        vae_path = resolve_ckpt_path(cfg.vae)
        if not os.path.isfile(vae_path):
            utils.die(f"--vae {cfg.vae}: no VAE checkpoint at {vae_path}")
        self.vae = load_vae(vae_path, device)
        self.scale = float(self.vae.scaling_factor)
        train_files, val_files, frame_size = load_split(cfg.data, cfg.val_fraction, cfg.max_episodes)
        fp = build_latent_cache(train_files + val_files, vae_path, device, master)

        def bank(files):
            lat = [np.load(latent_path(f, fp)).astype(np.float32) * self.scale for f in files]
            act = [dataset.load_episode(f)["actions"] for f in files]
            return WindowBank(lat, act, cfg.seq_len, device)

        self.train = bank(train_files)
        self.val = bank(val_files) if val_files else self.train
        self.val_files = val_files or train_files
        c, h, w = self.train.data.shape[1:]
        self.model = DiT_models[cfg.model](
            input_h=h, input_w=w, in_channels=c, max_frames=cfg.seq_len, action_dim=utils.NUM_ACTIONS
        ).to(device)
        if cfg.init:  # fine-tune a trained DiT (its EMA weights) on the same VAE's latents
            ck = utils.load_checkpoint(resolve_ckpt_path(cfg.init), kind="dit")
            if ck["config"]["model"] != json.loads(json.dumps(self.model.config)):
                utils.die(f"--init {cfg.init}: model config {ck['config']['model']} differs from --model {cfg.model}")
            if ck["config"].get("vae_fingerprint") != vae_fingerprint(vae_path):
                utils.die(f"--init {cfg.init} was trained on another VAE's latents than --vae {cfg.vae}")
            self.model.load_state_dict(ck["ema"])
        self.model_config = dict(self.model.config)
        self.forward_module = self.model
        self.extra_config = {
            "vae_path": os.path.abspath(vae_path),
            "vae_fingerprint": vae_fingerprint(vae_path),
            "latent_scale": self.scale,
            "frame_size": frame_size,
        }
        self.ac = utils.alphas_cumprod_schedule().to(device)
        self.cfg, self.device = cfg, device
        self.tokens_per_sample = cfg.seq_len * (h // self.model.patch_size) * (w // self.model.patch_size)

    def noise_levels(self, B, T, gen):
        t = torch.randint(0, utils.NUM_TIMESTEPS, (B, T), generator=gen)
        if self.cfg.ctx_noise_prob > 0:
            # GameNGen-style windows: a lightly noised context and a fully random last frame.
            pick = torch.rand(B, generator=gen) < self.cfg.ctx_noise_prob
            ctx = torch.randint(0, self.cfg.ctx_noise_max + 1, (B, T), generator=gen)
            t = torch.where(pick[:, None], torch.cat([ctx[:, :-1], t[:, -1:]], 1), t)
        return t

    def make_batch(self, bank, B, gen):
        x0, actions = bank.sample(B, gen)  # (B, T, C, H, W), (B, T)
        T = x0.shape[1]
        t = self.noise_levels(B, T, gen).to(self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        cond = shift_actions(actions)
        if self.cfg.action_dropout > 0:
            keep = (torch.rand(B, T, 1, generator=gen) >= self.cfg.action_dropout).float().to(self.device)
            cond = cond * keep
        return x0, t, noise, cond

    def loss_on(self, model, x0, t, noise, cond):
        x_t = utils.q_sample(x0, t, noise, self.ac)
        v = model(x_t, t, cond)
        return F.mse_loss(v.float(), utils.v_target(x0, noise, t, self.ac))

    def loss(self, model, gen):
        loss = self.loss_on(model, *self.make_batch(self.train, self.cfg.batch_size, gen))
        return loss, {}

    @torch.no_grad()
    def evaluate(self, model, step, logger):
        g = torch.Generator().manual_seed(1234)  # the same windows, noise and levels every time
        losses = [self.loss_on(model, *self.make_batch(self.val, self.cfg.batch_size, g)).item() for _ in range(4)]
        return {"val_loss": float(np.mean(losses))}

    @torch.no_grad()
    def sample(self, model, step, logger):
        """A short autoregressive rollout against the real frames of a validation episode."""
        import dataset
        import generate

        ep = dataset.load_episode(self.val_files[0])
        n = min(len(ep["frames"]) - 1, 2 * self.cfg.seq_len)
        k = (len(ep["frames"]) - n) // 2  # mid-game: frame 0 (the reset screen) has other colours
        engine = generate.WorldModel(model, self.vae, self.scale, self.device, steps=8)
        fake = engine.rollout(ep["frames"][k : k + 1], torch.from_numpy(ep["actions"][k : k + n - 1]))
        real = ep["frames"][k : k + n]
        psnr = float(np.mean([generate.psnr(a, b) for a, b in zip(real[1:], fake[1:])]))
        path = os.path.join(self.cfg.out, f"sample_{step:07d}.gif")
        generate.write_video(path, np.concatenate([real, fake], axis=2), fps=15)
        logger.media(step, "sample", path)
        return {"sample_psnr": psnr}

    def finalize_config(self, model):
        return {}
