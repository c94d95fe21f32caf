"""The world model as a game engine: rebuild a trained DiT and VAE from their checkpoints, then
reset() with prompt frames and step(actions) to get the next frames, with no emulator in the loop.

    engine = load_world_model(ModelConfig(), "cpu")      # the bundled model
    engine.reset(prompt)                                  # uint8 (B, n, H, W, 3)
    frames = engine.step(actions)                         # (B,) action indices -> uint8 (B, H, W, 3)

generate.py, evaluate.py, play.py and bench.py use it; train.py uses it for its sample rollouts.
Speed: the context frames' keys/values are cached, and each DDIM step runs only the new frame's
tokens (plus, in the first step, the frames queued since: DiT.queue); step_pipelined() decodes the
previous frame on a second thread (on a CPU a TorchScript trace of the decoder, which holds Python's
lock once a frame). Oasis's sampler instead re-runs the whole window at every step: NaiveWorldModel
does that, for comparison (bench.py) and for the equality test. On a CPU with fast bf16 the engine
keeps its own bf16 copy of the networks, with linear weights laid out once for oneDNN (PackedLinear).
"""

import copy
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import diffusion
import games
import utils
from utils import arg

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "checkpoints", "pong_dit.pt")
SAMPLE_DIR = os.path.join(HERE, "sample_data")

# How the context window moves once it is full (its length is the DiT's `window`):
#   exact  slide by one frame, re-encoding the kept frames (one window forward per frame);
#          identical to a full forward over the last window-1 frames, like Oasis's sampler
#   chunk  when full, keep the newest window//2 frames and re-encode them once; exact as well
#          (each frame sees 'window//2 .. window-1' real context frames), amortised to ~1 pass/frame
#   stream drop the oldest keys/values without re-encoding: O(1), but deeper keys still carry
#          information from dropped frames, which training never showed the model
SLIDES = ("exact", "chunk", "stream")


@dataclass
class ModelConfig:
    """The world model and how it samples: the flags generate.py, evaluate.py and play.py share."""

    ckpt: str = arg(DEFAULT_CKPT, "DiT checkpoint (train.py dit, or the bundled one)")
    vae: str = arg("", "VAE checkpoint; default: the one the DiT checkpoint records")
    steps: int = arg(2, "DDIM denoising steps per frame (2: better than 1 or 4 held out; docs/experiments.md)")
    context_noise: int = arg(0, "noise level (0..999) the context frames are labelled and stabilised with")
    warm_start: int = arg(
        0,
        "start each frame from the previous one noised to this level (1..999; SDEdit) instead of from pure noise "
        "(0); the DDIM steps then run from this level down",
    )
    guidance: float = arg(1.0, "classifier-free guidance scale on the action (1: off; >1 costs a second DiT pass)")
    slide: str = arg("chunk", "how the context window moves once full (see engine.SLIDES)", choices=list(SLIDES))
    device: str = arg("auto", "auto (cuda when present) | cpu | cuda")
    precision: str = arg(
        "auto",
        "auto | fp32 | bf16 (bf16 weights, autocast; auto: engine.AUTO_CPU_BF16 on a CPU with fast bf16, else fp32)",
        choices=list(utils.PRECISIONS),
    )
    ema: bool = arg(True, "use the EMA weights")
    cuda_graph: bool = arg(False, "CUDA only: replay each DiT pass from a captured CUDA graph (dit.CUDAGraphRunner)")
    seed: int = arg(0, "random seed")


# Whether --precision auto generates in bf16 on a CPU that does it fast (AVX-512 BF16 or AMX). Issue #25's A/B:
# the engine's bf16 copy (packed linears, exact GELU) keeps the held-out table and plays 1.20-1.51x as fast as
# fp32 at batch 1 on this CPU (autocast alone was 0.67-0.83x: docs/speed.md), so yes. On CUDA, auto stays fp32.
AUTO_CPU_BF16 = True
THREADS_HELP = "CPU threads for each of the two stages (DiT, VAE decode); 0: half the cores each"


def sample_path(game, kind, root=SAMPLE_DIR):
    """The bundled sample of a game's model: its "prompt" (PNG) or its recorded "actions" (.pt); Pong's in
    sample_data/, another game's in sample_data/GAME/ (bundle.py --samples-from writes them)."""
    if game == "pong":
        return os.path.join(root, {"prompt": "prompt.png", "actions": "actions_rally.pt"}[kind])
    return os.path.join(root, game, {"prompt": "prompt.png", "actions": "actions.pt"}[kind])


def load_dit(path, device, ema=True):
    """Rebuild the DiT from its checkpoint alone -> (model, checkpoint config, training step)."""
    from dit import DiT

    ckpt = utils.load_checkpoint(path, kind="dit")
    if not ema and "model" not in ckpt:
        utils.die(f"--no-ema: {path} holds only the EMA weights")
    model = DiT(**ckpt["config"]["model"])
    model.load_state_dict({k: v.float() for k, v in ckpt["ema" if ema else "model"].items()})
    return model.to(device).eval(), ckpt["config"], ckpt.get("step")


def find_vae(dit_path, config, override=""):
    """The VAE a DiT was trained on: --vae, else the recorded path, else the same file name beside the DiT."""
    if override:
        return utils.resolve_ckpt_path(override)
    recorded = config.get("vae_path", "")
    here = os.path.dirname(os.path.abspath(utils.resolve_ckpt_path(dit_path)))
    for p in (recorded, os.path.join(here, recorded), os.path.join(here, os.path.basename(recorded))):
        if p and os.path.isfile(p):
            return p
    utils.die(f"cannot find the VAE of {dit_path} (recorded as {recorded!r}); pass --vae")


def load_vae(path, device):
    """Rebuild the VAE (EMA weights) from its checkpoint alone, with its latent scaling factor."""
    from uvit_vae import AutoencoderKL

    ckpt = utils.load_checkpoint(path, kind="vae")
    vae = AutoencoderKL(**ckpt["config"]["model"])
    vae.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()})
    vae.scaling_factor = ckpt["config"]["scaling_factor"]
    return vae.to(device, memory_format=torch.channels_last).eval()  # ~20% faster convolutions on CPU


def load_world_model(cfg, device, naive=False, **overrides):
    """A WorldModel from ModelConfig's fields (overrides: WorldModel keywords, e.g. steps)."""
    if cfg.cuda_graph and torch.device(device).type != "cuda":
        utils.die(f"--cuda-graph needs a CUDA device, not {device}")
    if not os.path.isfile(utils.resolve_ckpt_path(cfg.ckpt)):
        utils.die(f"--ckpt {cfg.ckpt}: no such file (train one with train.py dit, or use the bundled checkpoints/)")
    dit, config, step = load_dit(cfg.ckpt, device, cfg.ema)
    vae_path = find_vae(cfg.ckpt, config, cfg.vae)
    kw = dict(steps=cfg.steps, context_noise=cfg.context_noise, seed=cfg.seed, slide=cfg.slide)
    kw |= dict(warm_start=cfg.warm_start)
    precision = "fp32" if cfg.precision == "auto" and torch.device(device).type != "cpu" else cfg.precision
    precision = utils.pick_precision(precision, device, auto_cpu=AUTO_CPU_BF16)
    kw |= dict(guidance=cfg.guidance, cuda_graph=cfg.cuda_graph, precision=precision) | overrides
    try:  # a setting out of range (--warm-start, --slide): one line, from the constructor's own checks
        engine = (NaiveWorldModel if naive else WorldModel)(
            dit, load_vae(vae_path, device), config["latent_scale"], device, **kw
        )
    except ValueError as e:
        utils.die(str(e))
    engine.source = dict(path=os.path.abspath(cfg.ckpt), step=step, vae=os.path.abspath(vae_path))  # for reports
    engine.game, engine.action_names = games.from_config(config)
    if len(engine.action_names) != engine.num_actions:
        utils.die(f"{cfg.ckpt}: names {len(engine.action_names)} actions but its DiT takes {engine.num_actions}")
    return engine


def set_threads(threads, device):
    """CPU threads for each pipeline stage: the DiT (this thread) and the VAE decode (step_pipelined's worker).

    At batch 1 the DiT's matmuls are too small to gain from a second thread, so on a
    2-core CPU one thread per stage, running side by side, is the fastest split.
    """
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads or max(1, torch.get_num_threads() // 2))


def read_actions(path, num_actions):
    """A .pt of indices (T,) or one-hot (T, A) -> int64 indices (T,) in [0, A), with one-line errors.
    A: the model's action count (engine.num_actions; Pong's 6)."""
    if not os.path.isfile(path):
        utils.die(f"--actions {path}: no such file")
    try:
        a = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        utils.die(f"--actions {path}: cannot read it ({type(e).__name__})")
    if not isinstance(a, torch.Tensor):
        utils.die(f"--actions {path}: expected a tensor, found {type(a).__name__}")
    if a.ndim == 2:
        if a.shape[1] != num_actions:
            utils.die(f"--actions {path}: one-hot actions need shape (T, {num_actions}), found {tuple(a.shape)}")
        a = a.argmax(dim=1)
    elif a.ndim != 1:
        utils.die(f"--actions {path}: expected shape (T,) or (T, {num_actions}), found {tuple(a.shape)}")
    if a.is_floating_point() and not torch.equal(a, a.round()):
        utils.die(f"--actions {path}: action indices must be integers")
    a = a.long()
    if len(a) and (a.min() < 0 or a.max() >= num_actions):
        utils.die(
            f"--actions {path}: the model's game has {num_actions} actions, so they must be in [0, {num_actions}); "
            f"found {a.min().item()}..{a.max().item()}"
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
        return np.stack([utils.resize_frame(f, size) if f.shape[:2] != (size, size) else f for f in frames])
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        utils.die(f"--prompt {path}: not a readable image")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return utils.resize_frame(img, size)[None]


def bf16_copy(module):
    """The module with its weights in bf16: itself if they already are, else a copy. Buffers (the timestep
    frequencies, positional tables) stay fp32: a timestep of 999 times a bf16 frequency loses its phase.
    On a CPU the copy's linear layers are PackedLinear and its tanh GELUs exact ones (docs/speed.md)."""
    if all(p.dtype == torch.bfloat16 for p in module.parameters()):
        return module
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.data = p.data.to(torch.bfloat16)
    if PackedLinear.available() and all(p.device.type == "cpu" for p in module.parameters()):
        for parent in list(module.modules()):
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, PackedLinear(child))
                elif isinstance(child, torch.nn.GELU) and child.approximate == "tanh":
                    # tanh's approximation differs from GELU by < 5e-4, under bf16's rounding; exact is 2x cheaper
                    setattr(parent, name, torch.nn.GELU())
    return module


class PackedLinear(torch.nn.Module):
    """A bf16 nn.Linear for a CPU whose weight oneDNN lays out once for its matrix units, instead of at every
    call: 1.4-1.6x faster at generation's 36-144 rows (docs/speed.md). Uses torch's private mkldnn ops (what
    torch.compile's CPU backend calls); the laid-out weight is opaque, so the module cannot be copied or saved."""

    ROWS = 36  # the rows oneDNN lays the weight out for: one frame's tokens

    @staticmethod
    def available():
        ops = torch.ops.mkldnn
        return torch.backends.mkldnn.is_available() and all(
            hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
        )

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().to(torch.bfloat16)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, self.ROWS)  # not a parameter or buffer
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")


class _Decoder(torch.nn.Module):
    """WorldModel._decode as a module, for torch.jit.trace."""

    def __init__(self, engine):
        super().__init__()
        self.vae, self.engine = engine.vae, engine

    def forward(self, z):
        return self.engine._decode(z)


class WorldModel:
    """A playable game: reset() with prompt frames, then step(actions) returns the next frames.

    game, action_names: what the model was trained on (load_world_model sets them from the checkpoint).
    """

    def __init__(
        self, dit, vae, latent_scale, device, steps=2, context_noise=0, seed=0, slide="chunk", guidance=1.0,
        cuda_graph=False, precision="fp32", warm_start=0,
    ):  # fmt: skip
        if slide not in SLIDES:
            raise ValueError(f"slide must be one of {SLIDES}, found {slide!r}")
        if cuda_graph and (torch.device(device).type != "cuda" or slide == "stream" or type(self) is not WorldModel):
            raise ValueError("CUDA graphs need device cuda, the cached sampler and an exact or chunk slide")
        # "bf16": the engine's own bf16 copy of the DiT and the VAE (no weight casts at each call), run under
        # autocast (norms, softmax in fp32); the sampler's maths stays fp32. Issue #25: the copy, not autocast
        # alone, is what makes batch-1 play faster on a CPU (docs/speed.md).
        if precision == "bf16":
            dit, vae = bf16_copy(dit), bf16_copy(vae)
        self.dit, self.vae, self.scale, self.device = dit, vae, latent_scale, torch.device(device)
        self.slide, self.guidance, self.context_noise = slide, float(guidance), int(context_noise)
        self.cuda_graph, self.runner = cuda_graph, None
        self.precision = precision
        self.window, self.num_actions = dit.window, dit.action_dim
        self.game, self.action_names = "unknown", [str(i) for i in range(self.num_actions)]
        if not 0 <= warm_start < diffusion.NUM_TIMESTEPS:
            raise ValueError(f"--warm-start {warm_start}: must be in 0..{diffusion.NUM_TIMESTEPS - 1} (0: off)")
        self.warm_start = int(warm_start)
        self.ac = diffusion.alphas_cumprod_schedule().to(self.device)
        ts = diffusion.ddim_timesteps(steps, start=self.warm_start or diffusion.NUM_TIMESTEPS - 1)
        self.pairs = list(zip(ts[:-1], ts[1:]))
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self._pool = self._decoding = None  # step_pipelined's decode thread and its pending frame
        self._traced = {}  # decode's TorchScript traces on a CPU, by latent shape

    @property
    def frame_size(self):
        return self.dit.input_h * self.vae.downsample_factor

    def amp(self):
        """The networks' context (thread-local, so the decode thread enters its own)."""
        return utils.autocast(self.precision, self.device)

    @torch.no_grad()
    def encode(self, frames):
        """uint8 (B, n, H, W, 3) -> scaled latents (B, n, C, h, w)."""
        x = torch.as_tensor(frames, device=self.device)
        B, n = x.shape[:2]
        x = x.flatten(0, 1).movedim(-1, 1).float().div(127.5).sub(1)
        with self.amp():
            z = self.vae.encode(x).mean.float() * self.scale
        return z.unflatten(0, (B, n))

    def _decode(self, z):
        """scaled latents (B, C, h, w) -> uint8 (B, H, W, 3): decode()'s maths, traced as it is on a CPU."""
        with self.amp():
            x = self.vae.decode(z / self.scale).float()
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1)

    @torch.no_grad()
    def decode(self, z):
        """scaled latents (B, C, h, w) -> uint8 (B, H, W, 3).

        On a CPU it runs a TorchScript trace of _decode, made once per latent shape (the same frames): eager
        PyTorch takes Python's lock at every layer, which on step_pipelined's second thread slowed the DiT's
        thread; the trace takes it once a call (docs/speed.md).
        """
        if self.device.type != "cpu":
            return self._decode(z)
        return self._traced_decoder(tuple(z.shape))(z)

    def _traced_decoder(self, shape):
        """decode()'s TorchScript trace for latents of this shape (B, C, h, w), made at the first call."""
        if shape not in self._traced:
            z = torch.zeros(shape, device=self.device)
            with warnings.catch_warnings():  # TorchScript is deprecated (torch 2.13 has it); a shape check warns
                warnings.simplefilter("ignore")
                try:
                    self._traced[shape] = torch.jit.trace(_Decoder(self), z, check_trace=False)
                except (AttributeError, RuntimeError):  # a torch without TorchScript: the eager decoder
                    self._traced[shape] = self._decode
        return self._traced[shape]

    def _onehot(self, actions):
        return F.one_hot(torch.as_tensor(actions, device=self.device).long(), self.num_actions).float()

    def _noised_context(self, z):
        if self.context_noise == 0:
            return z
        noise = torch.randn(z.shape, generator=self.gen, device=self.device)
        return diffusion.q_sample(z, torch.full(z.shape[:2], self.context_noise, device=self.device), noise, self.ac)

    @torch.no_grad()
    def reset(self, prompt, prompt_actions=None):
        """prompt uint8 (B, n, H, W, 3); prompt_actions (B, n-1) indices for the prompt's own transitions."""
        prompt = np.asarray(prompt)
        B, n = prompt.shape[:2]
        self._decoding = None  # a frame of the previous game still decoding is dropped
        z = self.encode(prompt)
        if self.device.type == "cpu":  # the decoder's trace is made now, not in the first frame's time
            self._traced_decoder((B, *z.shape[2:]))
        a = torch.zeros(B, n, self.num_actions, device=self.device)  # the first frame's action is unknown
        if n > 1:
            a[:, 1:] = self._onehot(prompt_actions)
        self.B, self.last = B, z[:, -1:]  # last: the newest frame's clean latent (B, 1, C, h, w)
        ctx, a = self._noised_context(z)[:, -(self.window - 1) :], a[:, -(self.window - 1) :]
        self._start(ctx, torch.full(ctx.shape[:2], self.context_noise, device=self.device, dtype=torch.long), a)

    def _start(self, ctx, t, a):
        """Hold the context (B, Tc, ...): queued, it is encoded with the first denoising step of the next frame."""
        self.cache = self.dit.new_cache()
        self.dit.queue(self.cache, ctx, t, a)
        if self.cuda_graph:  # its graphs hold this cache's buffers
            from dit import CUDAGraphRunner

            self.runner = CUDAGraphRunner(self.dit)

    def _predict(self, x, tt, a):
        """The DiT's v for the new frame x (B, 1, C, h, w) at level tt (B, 1) after action a (B, 1, A)."""
        with self.amp():  # the cached context's keys/values are made here too (queued frames run first)
            return self.dit.forward_cached(x, tt, a, self.cache, runner=self.runner).float()

    def _append(self, z, tt, a, keep):
        """Add the finished frame to the context, then keep only its last `keep` frames."""
        self.dit.queue(self.cache, z, tt, a)
        self.dit.trim_cache(self.cache, keep, exact=self.slide != "stream")

    def _context_len(self):
        return len(self.cache)

    @torch.no_grad()
    def step_latent(self, actions):
        """actions (B,) indices (the action taken after the last frame) -> the new frame's latent (B, C, h, w)."""
        a = self._onehot(actions)[:, None]  # (B, 1, A)
        C, h, w = self.dit.in_channels, self.dit.input_h, self.dit.input_w
        x = torch.randn((self.B, 1, C, h, w), generator=self.gen, device=self.device)
        tt = torch.empty(self.B, 1, dtype=torch.long, device=self.device)
        if self.warm_start:  # SDEdit: the previous frame, noised; what stays still starts where it was
            x = diffusion.q_sample(self.last, tt.fill_(self.warm_start), x, self.ac)
        for t, t_next in self.pairs:
            tt.fill_(t)
            v = self._predict(x, tt, a)
            if self.guidance != 1.0:  # classifier-free guidance on the action ("unknown" = zeros, as in training)
                v0 = self._predict(x, tt, torch.zeros_like(a))
                v = v0 + self.guidance * (v - v0)
            x = diffusion.ddim_step(x, v, t, t_next, self.ac)
        keep = self.window - 1
        if self._context_len() + 1 > keep and self.slide == "chunk":
            keep = max(1, self.window // 2)
        self._append(self._noised_context(x), tt.fill_(self.context_noise), a, keep)
        self.last = x
        return x[:, 0]

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


class NaiveWorldModel(WorldModel):
    """Oasis's sampler: the whole context window runs again at every denoising step (no KV cache)."""

    def _start(self, ctx, t, a):
        self.ctx, self.ctx_t, self.ctx_a = ctx, t, a  # (B, Tc, ...) the model's context

    def _predict(self, x, tt, a):
        with self.amp():
            full = self.dit(torch.cat([self.ctx, x], 1), torch.cat([self.ctx_t, tt], 1), torch.cat([self.ctx_a, a], 1))
        return full[:, -1:].float()

    def _append(self, z, tt, a, keep):
        self.ctx, self.ctx_t, self.ctx_a = (
            torch.cat(p, 1)[:, -keep:] for p in ((self.ctx, z), (self.ctx_t, tt), (self.ctx_a, a))
        )

    def _context_len(self):
        return self.ctx.shape[1]
