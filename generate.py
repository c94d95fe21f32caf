"""Roll out Pong from one frame and a stream of actions, with no emulator in the loop.

With the bundled model and sample files (CPU is fine):
    python generate.py
Your own model, prompt and actions (mp4, gif, or .npz of raw uint8 frames (N, H, W, 3)):
    python generate.py --ckpt runs/dit/ckpt.pt --prompt frame.png --actions actions.pt --frames 120 --out out.mp4
Replay a recorded episode: real (left) and generated (right) side by side, same actions:
    python generate.py --episode data/pong/episode_00003.npz --start 100 --frames 64 --out replay.mp4

Actions follow the recorder's convention: actions[k] is the action taken after
frame k and leads to frame k+1, so actions[0] moves the game on from the prompt.
A .pt holds indices (T,) in [0, 6) or one-hot (T, 6); see utils.ACTION_NAMES.

Speed: the context frames' keys/values are cached, each DDIM step runs only the new
frame's tokens (plus, in the first step, the frames queued since: DiT.queue), and
step_pipelined() decodes the previous frame on a second thread. Oasis's sampler instead re-runs the
whole window at every step; `WorldModel(..., cached=False)` does that, for
comparison (bench.py) and for the equality test.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import utils
from utils import arg

DEFAULT_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "pong_dit.pt")
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")


@dataclass
class ModelConfig:
    """The world model and how it samples: the flags generate.py, evaluate.py and play.py share."""

    ckpt: str = arg(DEFAULT_CKPT, "DiT checkpoint (train.py dit, or the bundled one)")
    vae: str = arg("", "VAE checkpoint; default: the one the DiT checkpoint records")
    steps: int = arg(2, "DDIM denoising steps per frame (2: as good as 4 or 8 on the shipped model, README)")
    context_noise: int = arg(0, "noise level (0..999) the context frames are labelled and stabilised with")
    guidance: float = arg(1.0, "classifier-free guidance scale on the action (1: off; >1 costs a second DiT pass)")
    window: str = arg(
        "chunk",
        "how the context window moves once full: exact | chunk | stream (see WINDOW_MODES)",
        choices=["exact", "chunk", "stream"],
    )
    device: str = arg("auto", "auto (cuda when present) | cpu | cuda")
    ema: bool = arg(True, "use the EMA weights")
    cuda_graph: bool = arg(False, "CUDA only: replay each DiT pass from a captured CUDA graph (dit.CUDAGraphRunner)")


THREADS_HELP = "CPU threads for each of the two stages (DiT, VAE decode); 0: half the cores each"


@dataclass
class GenerateConfig(ModelConfig):
    prompt: str = arg(
        os.path.join(SAMPLE_DIR, "prompt.png"), "prompt frame(s): a PNG/JPG, or an .npz of uint8 (n, H, W, 3)"
    )
    actions: str = arg(os.path.join(SAMPLE_DIR, "actions_rally.pt"), "actions .pt: indices (T,) or one-hot (T, 6)")
    frames: int = arg(120, "frames to write, prompt included")
    out: str = arg("runs/generated.mp4", "output: .mp4, .gif or .npz")
    seed: int = arg(0, "random seed")
    fps: int = arg(15, "frames per second of the video")
    scale: int = arg(4, "nearest-neighbour upscaling of the video")
    batch: int = arg(1, "rollouts at once (different seeds); each is written as OUT with a _i suffix")
    episode: str = arg("", "replay a recorded episode .npz: prompt and actions from it, real beside generated")
    start: int = arg(0, "with --episode: the frame to start from")
    threads: int = arg(0, THREADS_HELP)


def psnr(a, b):
    """PSNR in dB between uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def write_video(path, frames, fps=15, scale=1):
    """uint8 (N, H, W, 3) -> .mp4 / .gif / .npz, atomically."""
    frames = np.asarray(frames, dtype=np.uint8)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return utils.atomic_savez(path, frames=frames)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    import imageio.v2 as imageio

    def write(tmp):
        if ext == ".gif":
            imageio.mimsave(tmp, list(frames), duration=1000 / fps, loop=0)
        elif ext == ".mp4":
            imageio.mimsave(tmp, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
        else:
            raise ValueError(f"unknown video extension {ext!r}: use .mp4, .gif or .npz")

    utils._atomic(path, write)


# -----------------------------------------------------------------------------


def load_dit(path, device, ema=True):
    """Rebuild the DiT from its checkpoint alone."""
    from dit import DiT

    ckpt = utils.load_checkpoint(path, kind="dit")
    model = DiT(**ckpt["config"]["model"])
    model.load_state_dict({k: v.float() for k, v in ckpt["ema" if ema else "model"].items()})
    return model.to(device).eval(), ckpt["config"]


def find_vae(dit_path, config, override=""):
    """The VAE a DiT was trained on: --vae, else the recorded path, else the same file name beside the DiT."""
    if override:
        return override
    recorded = config.get("vae_path", "")
    here = os.path.dirname(os.path.abspath(dit_path))
    for p in (recorded, os.path.join(here, recorded), os.path.join(here, os.path.basename(recorded))):
        if p and os.path.isfile(p):
            return p
    utils.die(f"cannot find the VAE of {dit_path} (recorded as {recorded!r}); pass --vae")


def load_vae(path, device):
    from uvit_vae import AutoencoderKL

    ckpt = utils.load_checkpoint(path, kind="vae")
    vae = AutoencoderKL(**ckpt["config"]["model"])
    vae.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
    vae.scaling_factor = ckpt["config"]["scaling_factor"]
    return vae.to(device, memory_format=torch.channels_last).eval()  # ~20% faster convolutions on CPU


# How the context window moves once it is full (window = the DiT's max_frames):
#   exact  slide by one frame, re-encoding the kept frames (one window forward per frame);
#          identical to a full forward over the last window-1 frames, like Oasis's sampler
#   chunk  when full, keep the newest window//2 frames and re-encode them once; exact as well
#          (each frame sees 'window//2 .. window-1' real context frames), amortised to ~1 pass/frame
#   stream drop the oldest keys/values without re-encoding: O(1), but deeper keys still carry
#          information from dropped frames, which training never showed the model
WINDOW_MODES = ("exact", "chunk", "stream")


class WorldModel:
    """A playable Pong: reset() with prompt frames, then step(actions) returns the next frames."""

    def __init__(
        self,
        dit,
        vae,
        latent_scale,
        device,
        steps=2,
        context_noise=0,
        cached=True,
        seed=0,
        window="chunk",
        guidance=1.0,
        cuda_graph=False,
    ):
        self.dit, self.vae, self.scale, self.device = dit, vae, latent_scale, torch.device(device)
        self.cached, self.guidance = cached, float(guidance)
        if window not in WINDOW_MODES:
            raise ValueError(f"window must be one of {WINDOW_MODES}, found {window!r}")
        if cuda_graph and (self.device.type != "cuda" or not cached or window == "stream"):
            raise ValueError("CUDA graphs need device cuda, the cached sampler and an exact or chunk window")
        self.cuda_graph, self.runner = cuda_graph, None
        self.window_mode = window
        self.context_noise = int(context_noise)
        self.window = dit.max_frames
        self.ac = utils.alphas_cumprod_schedule().to(self.device)
        ts = utils.ddim_timesteps(steps)
        self.pairs = list(zip(ts[:-1], ts[1:]))
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self._pool = self._decoding = None  # step_pipelined's decode thread and its pending frame

    @classmethod
    def from_checkpoint(cls, path, vae="", device="cpu", ema=True, **kw):
        dit, config = load_dit(path, device, ema)
        vae_model = load_vae(find_vae(path, config, vae), device)
        return cls(dit, vae_model, config["latent_scale"], device, **kw)

    @classmethod
    def from_config(cls, cfg, device):
        """From a script config: ModelConfig's fields and a seed."""
        if cfg.cuda_graph and torch.device(device).type != "cuda":
            utils.die(f"--cuda-graph needs a CUDA device, not {device}")
        return cls.from_checkpoint(
            cfg.ckpt,
            cfg.vae,
            device,
            cfg.ema,
            steps=cfg.steps,
            context_noise=cfg.context_noise,
            seed=cfg.seed,
            window=cfg.window,
            guidance=cfg.guidance,
            cuda_graph=cfg.cuda_graph,
        )

    @property
    def frame_size(self):
        return self.dit.input_h * 8

    @torch.no_grad()
    def encode(self, frames):
        """uint8 (B, n, H, W, 3) -> scaled latents (B, n, C, h, w)."""
        x = torch.as_tensor(frames, device=self.device)
        B, n = x.shape[:2]
        x = x.flatten(0, 1).movedim(-1, 1).float().div(127.5).sub(1)
        z = self.vae.encode(x).mean * self.scale
        return z.unflatten(0, (B, n))

    @torch.no_grad()
    def decode(self, z):
        """scaled latents (B, C, h, w) -> uint8 (B, H, W, 3)."""
        x = self.vae.decode(z / self.scale)
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1)

    def _onehot(self, actions):
        a = torch.as_tensor(actions, device=self.device).long()
        return F.one_hot(a, utils.NUM_ACTIONS).float()

    def _noised_context(self, z):
        if self.context_noise == 0:
            return z
        noise = torch.randn(z.shape, generator=self.gen, device=self.device)
        return utils.q_sample(z, torch.full(z.shape[:2], self.context_noise, device=self.device), noise, self.ac)

    @torch.no_grad()
    def reset(self, prompt, prompt_actions=None):
        """prompt uint8 (B, n, H, W, 3); prompt_actions (B, n-1) indices for the prompt's own transitions."""
        prompt = np.asarray(prompt)
        B, n = prompt.shape[:2]
        self._decoding = None  # a frame of the previous game still decoding is dropped
        z = self.encode(prompt)
        a = torch.zeros(B, n, utils.NUM_ACTIONS, device=self.device)  # the first frame's action is unknown
        if n > 1:
            a[:, 1:] = self._onehot(prompt_actions)
        self.B = B
        ctx, ctx_actions = self._noised_context(z)[:, -(self.window - 1) :], a[:, -(self.window - 1) :]
        t = torch.full(ctx.shape[:2], self.context_noise, device=self.device, dtype=torch.long)
        if self.cached:  # encoded together with the first denoising step of the next frame
            self.cache = self.dit.new_cache()
            self.dit.queue(self.cache, ctx, t, ctx_actions)
            if self.cuda_graph:  # its graphs hold this cache's buffers
                from dit import CUDAGraphRunner

                self.runner = CUDAGraphRunner(self.dit)
        else:
            self.ctx, self.ctx_t, self.ctx_actions = ctx, t, ctx_actions  # (B, Tc, ...) the model's context

    @torch.no_grad()
    def step_latent(self, actions):
        """actions (B,) indices (the action taken after the last frame) -> the new frame's latent (B, C, h, w)."""
        a = self._onehot(actions)[:, None]  # (B, 1, A)
        C, h, w = self.dit.in_channels, self.dit.input_h, self.dit.input_w
        x = torch.randn((self.B, 1, C, h, w), generator=self.gen, device=self.device)
        tt = torch.empty(self.B, 1, dtype=torch.long, device=self.device)
        for t, t_next in self.pairs:
            tt.fill_(t)
            v = self._predict(x, tt, a)
            if self.guidance != 1.0:  # classifier-free guidance on the action ("unknown" = zeros, as in training)
                v0 = self._predict(x, tt, torch.zeros_like(a))
                v = v0 + self.guidance * (v - v0)
            x = utils.ddim_step(x, v, t, t_next, self.ac)
        z = self._noised_context(x)
        tt.fill_(self.context_noise)
        n_ctx = len(self.cache) if self.cached else self.ctx.shape[1]
        keep = self.window - 1
        if n_ctx + 1 > keep and self.window_mode == "chunk":
            keep = max(1, self.window // 2)
        if self.cached:
            self.dit.queue(self.cache, z, tt, a)
            self.dit.trim_cache(self.cache, keep, exact=self.window_mode != "stream")
        else:
            self.ctx, self.ctx_t, self.ctx_actions = (
                torch.cat(p, 1)[:, -keep:] for p in ((self.ctx, z), (self.ctx_t, tt), (self.ctx_actions, a))
            )
        return x[:, 0]

    def _predict(self, x, tt, a):
        """The DiT's v for the new frame x (B, 1, C, h, w) at level tt (B, 1) after action a (B, 1, A)."""
        if self.cached:
            return self.dit.forward_cached(x, tt, a, self.cache, runner=self.runner)
        full = self.dit(
            torch.cat([self.ctx, x], 1), torch.cat([self.ctx_t, tt], 1), torch.cat([self.ctx_actions, a], 1)
        )
        return full[:, -1:]  # naive: the whole window again at every step

    @torch.no_grad()
    def step(self, actions):
        """actions (B,) -> uint8 frames (B, H, W, 3), on the model's device."""
        return self.decode(self.step_latent(actions))

    def step_pipelined(self, actions):
        """step(), one frame late: returns the previous call's frame (None at first) and starts decoding this one.

        The VAE decodes frame k on a worker thread while the DiT makes frame k+1, so on a
        CPU each keeps a core busy. The frames are exactly step()'s; flush() returns the last.
        """
        z = self.step_latent(actions)
        prev = self.flush()
        if self._pool is None:  # the worker uses as many intra-op threads as the caller (not torch's default)
            self._pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._decoding = self._pool.submit(self.decode, z)
        return prev

    def flush(self):
        """The frame still being decoded by step_pipelined(), or None."""
        if self._decoding is None:
            return None
        frame = self._decoding.result()
        self._decoding = None  # only now: an interrupted wait keeps the frame
        return frame

    @torch.no_grad()
    def rollout(self, prompt, actions):
        """prompt uint8 (n, H, W, 3); actions (T,) with actions[k] after frame k -> uint8 (T + 1, H, W, 3)."""
        prompt = np.asarray(prompt)
        n = len(prompt)
        actions = torch.as_tensor(actions).long()
        self.reset(prompt[None], actions[None, : n - 1] if n > 1 else None)
        out = [torch.as_tensor(prompt)]
        for k in range(n - 1, len(actions)):
            out.append(self.step(actions[k : k + 1].to(self.device)).cpu())
        return torch.cat(out).numpy()


# -----------------------------------------------------------------------------
# command line


def read_actions(path):
    """A .pt of indices (T,) or one-hot (T, 6) -> int64 indices (T,), with one-line errors."""
    if not os.path.isfile(path):
        utils.die(f"--actions {path}: no such file")
    try:
        a = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        utils.die(f"--actions {path}: cannot read it ({type(e).__name__})")
    if not isinstance(a, torch.Tensor):
        utils.die(f"--actions {path}: expected a tensor, found {type(a).__name__}")
    if a.ndim == 2:
        if a.shape[1] != utils.NUM_ACTIONS:
            utils.die(f"--actions {path}: one-hot actions need shape (T, {utils.NUM_ACTIONS}), found {tuple(a.shape)}")
        a = a.argmax(dim=1)
    elif a.ndim != 1:
        utils.die(f"--actions {path}: expected shape (T,) or (T, {utils.NUM_ACTIONS}), found {tuple(a.shape)}")
    if a.is_floating_point() and not torch.equal(a, a.round()):
        utils.die(f"--actions {path}: action indices must be integers")
    a = a.long()
    if len(a) and (a.min() < 0 or a.max() >= utils.NUM_ACTIONS):
        utils.die(
            f"--actions {path}: actions must be in [0, {utils.NUM_ACTIONS}), found {a.min().item()}..{a.max().item()}"
        )
    return a


def read_prompt(path, size):
    """PNG/JPG of any size (resized as the recorder does) or .npz of uint8 frames -> (n, size, size, 3)."""
    if not os.path.isfile(path):
        utils.die(f"--prompt {path}: no such file")
    if path.endswith(".npz"):
        try:
            frames = np.load(path)["frames"]
        except Exception as e:  # noqa: BLE001
            utils.die(f"--prompt {path}: cannot read frames ({type(e).__name__})")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            utils.die(f"--prompt {path}: expected frames (n, H, W, 3), found {frames.shape}")
        return np.stack([utils.resize_frame(f, size) if f.shape[0] != size else f for f in frames])
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        utils.die(f"--prompt {path}: not a readable image")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return utils.resize_frame(img, size)[None]


def set_threads(threads, device):
    """CPU threads for each pipeline stage: the DiT (this thread) and the VAE decode (step_pipelined's worker).

    At batch 1 the DiT's matmuls are too small to gain from a second thread, so on a
    2-core CPU one thread per stage, running side by side, is the fastest split.
    """
    if device == "cpu":
        torch.set_num_threads(threads or max(1, torch.get_num_threads() // 2))


def main(cfg):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if not os.path.isfile(cfg.ckpt):
        utils.die(f"--ckpt {cfg.ckpt}: no such file (train one with train.py dit, or use the bundled checkpoints/)")
    if cfg.frames < 2:
        utils.die(f"--frames must be at least 2, found {cfg.frames}")
    if os.path.splitext(cfg.out)[1].lower() not in (".mp4", ".gif", ".npz"):
        utils.die(f"--out {cfg.out}: use a .mp4, .gif or .npz file name")
    set_threads(cfg.threads, device)
    engine = WorldModel.from_config(cfg, device)
    real = None
    if cfg.episode:
        import dataset

        try:
            ep = dataset.load_episode(cfg.episode)
        except (FileNotFoundError, ValueError) as e:
            utils.die(str(e))
        end = min(len(ep["frames"]), cfg.start + cfg.frames)
        prompt, actions = ep["frames"][cfg.start : cfg.start + 1], torch.from_numpy(ep["actions"][cfg.start : end - 1])
        real = ep["frames"][cfg.start : end]
    else:
        prompt, actions = read_prompt(cfg.prompt, engine.frame_size), read_actions(cfg.actions)
    n_actions = cfg.frames - 1
    if len(actions) < n_actions:  # repeat the stream to the requested length
        actions = (
            actions.repeat(n_actions // max(1, len(actions)) + 1)[:n_actions]
            if len(actions)
            else torch.zeros(n_actions, dtype=torch.long)
        )
    actions = actions[:n_actions]
    n = len(prompt)  # with several prompt frames, actions[:n-1] are the moves between them
    if n >= cfg.frames:
        utils.die(f"--frames {cfg.frames}: must exceed the {n} prompt frames")

    from tqdm import tqdm

    rep = lambda z: np.repeat(np.asarray(z)[None], cfg.batch, 0)
    engine.reset(rep(prompt), rep(actions[: n - 1]) if n > 1 else None)
    frames = [rep(prompt)]  # (batch, n, H, W, 3)
    a = actions.to(device)
    for k in tqdm(range(n - 1, len(actions)), desc="generating", unit="frame"):
        frame = engine.step_pipelined(a[k : k + 1].expand(cfg.batch))  # the previous frame, or None
        if frame is not None:
            frames.append(frame.cpu().numpy()[:, None])
    frames.append(engine.flush().cpu().numpy()[:, None])
    frames = np.concatenate(frames, 1)  # (batch, N, H, W, 3)
    for b in range(cfg.batch):
        video = frames[b]
        if real is not None:
            video = np.concatenate([real[: len(video)], video[: len(real)]], axis=2)
            print(f"PSNR vs the real frames: {np.mean([psnr(x, y) for x, y in zip(real[1:], frames[b][1:])]):.2f} dB")
        root, ext = os.path.splitext(cfg.out)
        path = cfg.out if cfg.batch == 1 else f"{root}_{b}{ext}"
        write_video(path, video, cfg.fps, 1 if ext == ".npz" else cfg.scale)
        print(f"wrote {path}: {len(video)} frames")


if __name__ == "__main__":
    main(utils.parse_config(GenerateConfig, description=__doc__.splitlines()[0]))
