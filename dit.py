"""Spatio-temporal diffusion transformer (Oasis / Diffusion Forcing style) for Pong latents.

Input: x (B, T, C, H, W) latent frames, t (B, T) integer noise level per frame in
[0, 1000), actions (B, T, action_dim) float (one-hot). actions[:, j] is the action
that LED TO frame j, i.e. the one taken after frame j-1 was shown; the caller
shifts the recorded actions (frame 0's action is a zero / NOOP vector).
Output: (B, T, C, H, W), read by the training code as a v-prediction.

Each block does spatial attention + MLP within a frame, then causal temporal
attention + MLP per location, each of the four sub-blocks with its own adaLN-Zero
(shift, scale, gate) from the frame's conditioning c = emb(t) + emb(action).

Generation runs incrementally against a cache of temporal keys/values:

    cache = model.new_cache()
    model.queue(cache, context, t_ctx, a_ctx)                           # once
    for step: v = model.forward_cached(x_new, t_step, a_new, cache)    # (B, 1, C, H, W)
    model.queue(cache, x_done, t_ctx_1, a_new)                          # once per frame
    model.trim_cache(cache, model.window - 1)                       # sliding window

Queued frames are encoded by the next forward_cached, in the same pass as the new
frame (causal attention makes that exact), so a generated frame costs one pass
per denoising step and nothing more.

Run `python dit.py` for parameter counts and FLOPs per frame of each size.
Imports only torch, einops and the project's attention.
"""

import math

import torch
from einops import rearrange
from torch import nn

from attention import KVCache, SpatialAxialAttention, TemporalAxialAttention


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per-frame shift/scale (B, T, 1, 1, D) broadcast over the frame's tokens."""
    return torch.addcmul(shift, x, 1 + scale)  # one fused pass over x


def sincos_2d(dim, h, w):
    """Fixed 2-D sin-cos position embedding (h, w, dim): half the channels for the row, half the column."""
    assert dim % 4 == 0, f"hidden size must be divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = torch.arange(h, dtype=torch.float64)[:, None] * omega  # (h, dim/4)
    cols = torch.arange(w, dtype=torch.float64)[:, None] * omega  # (w, dim/4)
    rows = torch.cat((rows.sin(), rows.cos()), dim=-1)[:, None].expand(h, w, -1)
    cols = torch.cat((cols.sin(), cols.cos()), dim=-1)[None, :].expand(h, w, -1)
    return torch.cat((rows, cols), dim=-1).float()


class TimestepEmbedder(nn.Module):
    """Integer noise level -> sinusoidal features -> MLP, one vector per frame."""

    def __init__(self, hidden_size, freq_dim=256, max_period=10000):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        args = t.float()[..., None] * self.freqs  # (B, T, F/2)
        return self.mlp(torch.cat((args.cos(), args.sin()), dim=-1))  # (B, T, D)


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (..., D)


class SpatioTemporalDiTBlock(nn.Module):
    """Spatial attn + MLP, then causal temporal attn + MLP, each sub-block with its own adaLN-Zero."""

    def __init__(self, dim, heads, mlp_ratio=4.0, max_freq=8.0, rope_theta=10000.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.s_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.s_attn = SpatialAxialAttention(dim, heads, max_freq=max_freq)
        self.s_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.s_mlp = Mlp(dim, hidden)
        self.t_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.t_attn = TemporalAxialAttention(dim, heads, theta=rope_theta)
        self.t_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.t_mlp = Mlp(dim, hidden)
        # (shift, scale, gate) for s_attn, s_mlp, t_attn, t_mlp, from one matmul
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 12 * dim))

    @staticmethod
    def _sub(x, norm, fn, mod, **kw):
        shift, scale, gate = mod.chunk(3, dim=-1)
        return torch.addcmul(x, gate, fn(modulate(norm(x), shift, scale), **kw))  # x + gate * fn(...)

    def forward(self, x, c, cache=None, commit=0, clean_copy=False):
        # x: (B, T, H, W, D) tokens, c: (B, T, D) per-frame conditioning
        mod = self.adaLN_modulation(c)[:, :, None, None]  # (B, T, 1, 1, 12D)
        sa, sm, ta, tm = mod.chunk(4, dim=-1)
        x = self._sub(x, self.s_norm1, self.s_attn, sa)
        x = self._sub(x, self.s_norm2, self.s_mlp, sm)
        x = self._sub(x, self.t_norm1, self.t_attn, ta, cache=cache, commit=commit, clean_copy=clean_copy)
        x = self._sub(x, self.t_norm2, self.t_mlp, tm)
        return x  # (B, T, H, W, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its p*p*C patch values."""

    def __init__(self, dim, patch_values):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_values)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, :, None, None].chunk(2, dim=-1)  # (B, T, 1, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, H, W, p*p*C)


class DiTCache:
    """Generation state: one KVCache per block, plus the inputs of every frame held.

    The last `pending` frames are queued: their keys/values are not computed yet
    (the next forward_cached does it). Keeping the inputs lets a trim re-encode exactly.
    """

    def __init__(self, depth, window=16):
        self.layers = [KVCache(window) for _ in range(depth)]
        self.x = self.t = self.a = None  # frames held (B, Tc, ...), as given to queue/forward_cached
        self.pending = 0

    def __len__(self):
        return 0 if self.x is None else self.x.shape[1]

    @property
    def offset(self):
        """Absolute time position of the next frame."""
        return self.layers[0].offset + self.pending

    def add(self, x, t, a):
        new = tuple(v.detach().clone() for v in (x, t, a))  # callers may reuse their buffers
        if self.x is None:
            self.x, self.t, self.a = new
        else:
            self.x, self.t, self.a = (torch.cat((o, n), dim=1) for o, n in zip((self.x, self.t, self.a), new))


class CUDAGraphRunner:
    """DiT._run replayed from CUDA graphs, one per cache state: model.forward_cached(..., runner=this).

    A state is (batch, frames in the pass, frames cached, position): with exact trims
    (positions restart at 0) a sliding window cycles through a handful of them. Each is
    captured once, after a warm-up on a side stream; a replay copies the inputs into the
    graph's static tensors and writes the new keys/values into the cache's buffers, which
    therefore must not move: a runner serves one cache (make a new one with each new cache).
    The commit, Python bookkeeping, is applied after the replay.
    """

    def __init__(self, model):
        self.model, self.graphs, self.pool = model, {}, None

    def __call__(self, x, t, a, cache, commit=0):
        kv = cache.layers[0]
        key = (x.shape[0], x.shape[1], len(kv), kv.offset)
        if key not in self.graphs:
            self.graphs[key] = self.capture(x, t, a, cache)
        replay, inputs, out = self.graphs[key]
        for static, v in zip(inputs, (x, t, a)):
            static.copy_(v)
        replay()
        if commit:
            for kv in cache.layers:
                kv.commit(commit)
        return out.clone()  # the next replay overwrites `out`

    def capture(self, x, t, a, cache):
        """(replay, static inputs, static output) for this state."""
        inputs = tuple(v.clone() for v in (x, t, a))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy kernel and allocator set-up stays out of the graph
            for _ in range(2):
                self.model._run(*inputs, cache, commit=0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: generate.py's decode thread may launch kernels while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.model._run(*inputs, cache, commit=0)
        self.pool = graph.pool()
        return graph.replay, inputs, out


class DiT(nn.Module):
    """Diffusion transformer over (B, T, C, H, W) latents with per-frame noise levels and actions."""

    def __init__(
        self,
        input_h=12,
        input_w=12,
        in_channels=4,
        patch_size=2,
        hidden_size=256,
        depth=8,
        num_heads=4,
        mlp_ratio=4.0,
        action_dim=6,
        window=16,
        rope_theta=10000.0,
    ):
        super().__init__()
        if input_h % patch_size or input_w % patch_size:
            raise ValueError(f"latent size {input_h}x{input_w} is not divisible by patch_size {patch_size}")
        self.config = dict(
            input_h=input_h,
            input_w=input_w,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            action_dim=action_dim,
            window=window,
            rope_theta=rope_theta,
        )
        for k, v in self.config.items():
            setattr(self, k, v)
        self.grid_h, self.grid_w = input_h // patch_size, input_w // patch_size
        p, D = patch_size, hidden_size

        self.x_embedder = nn.Linear(p * p * in_channels, D)  # a stride-p conv, written as a linear
        self.register_buffer("pos_embed", sincos_2d(D, self.grid_h, self.grid_w), persistent=False)
        self.t_embedder = TimestepEmbedder(D)
        self.a_embedder = nn.Linear(action_dim, D)
        max_freq = max(self.grid_h, self.grid_w)
        self.blocks = nn.ModuleList(
            SpatioTemporalDiTBlock(D, num_heads, mlp_ratio, max_freq, rope_theta) for _ in range(depth)
        )
        self.final_layer = FinalLayer(D, p * p * in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT init: xavier linears, N(0, 0.02) embeddings, adaLN and output layer zeroed (output 0 at init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.a_embedder.weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check(self, x, t, actions):
        B, T = x.shape[:2]
        want = (self.in_channels, self.input_h, self.input_w)
        if x.ndim != 5 or tuple(x.shape[2:]) != want:
            raise ValueError(f"DiT expects x of shape (B, T, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if tuple(t.shape) != (B, T):
            raise ValueError(f"DiT expects t of shape ({B}, {T}), got {tuple(t.shape)}")
        if tuple(actions.shape) != (B, T, self.action_dim):
            raise ValueError(f"DiT expects actions of shape ({B}, {T}, {self.action_dim}), got {tuple(actions.shape)}")

    def _run(self, x, t, actions, cache=None, commit=0, clean_copy=False):
        self._check(x, t, actions)
        p = self.patch_size
        x = rearrange(x, "b t c (h p1) (w p2) -> b t h w (p1 p2 c)", p1=p, p2=p)
        x = self.x_embedder(x) + self.pos_embed  # (B, T, h, w, D)
        c = self.t_embedder(t) + self.a_embedder(actions.to(x.dtype))  # (B, T, D)
        for i, block in enumerate(self.blocks):
            x = block(x, c, None if cache is None else cache.layers[i], commit, clean_copy)
        x = self.final_layer(x, c)  # (B, T, h, w, p*p*C)
        return rearrange(x, "b t h w (p1 p2 c) -> b t c (h p1) (w p2)", p1=p, p2=p)  # (B, T, C, H, W)

    def forward(self, x, t, actions, clean=None):
        """Full causal forward over frames 0..T-1: x (B, T, C, H, W), t (B, T) long, actions (B, T, A).

        clean (B, T, C, H, W): teacher forcing against a clean copy of the window (training). Output j
        is then what a plain forward gives for frame j after the clean frames 0..j-1, for every j
        in one pass over 2T frames (the clean copy runs at level 0, with the same actions).
        """
        if clean is None:
            return self._run(x, t, actions)
        T = x.shape[1]
        x2, a2 = torch.cat((clean, x), 1), torch.cat((actions, actions), 1)
        return self._run(x2, torch.cat((torch.zeros_like(t), t), 1), a2, clean_copy=True)[:, T:]

    # ---- incremental generation -------------------------------------------------

    def new_cache(self):
        """An empty generation cache: one KVCache per block, sized for the window (no reallocation)."""
        return DiTCache(self.depth, window=max(16, self.window))

    def queue(self, cache, x, t, a):
        """Add n frames after the cached ones without running the model; the next forward_cached encodes them."""
        self._check(x, t, a)
        cache.add(x, t, a)
        cache.pending += x.shape[1]

    def forward_cached(self, x_new, t_new, a_new, cache, keep=False, runner=None):
        """Outputs (B, n, C, H, W) for n new frames that directly follow the cached ones.

        Queued frames run in the same pass, ahead of the new ones, and are committed.
        keep=True also commits the new frames: their keys/values (and inputs) join the cache.
        runner: what runs the pass (default self._run; a CUDAGraphRunner replays it).
        Call it under torch.inference_mode(): the cache is written in place.
        """
        p, n = cache.pending, x_new.shape[1]
        if p:  # (B, p + n, ...): the queued frames, then the new ones
            x_new, t_new, a_new = (
                torch.cat((q[:, -p:], v), dim=1) for q, v in zip((cache.x, cache.t, cache.a), (x_new, t_new, a_new))
            )
        out = (runner or self._run)(x_new, t_new, a_new, cache, commit=p + n if keep else p)
        cache.pending = 0
        if keep:  # the inputs too, so trim_cache can re-encode a window exactly
            cache.add(x_new[:, p:], t_new[:, p:], a_new[:, p:])
        return out[:, p:]

    def trim_cache(self, cache, keep, exact=True):
        """Keep only the last `keep` frames (re-encoded from position 0, or dropped in place).

        exact=True queues the kept frames for re-encoding (the next forward_cached runs
        them), so continuing equals a full forward over the window; they restart at
        position 0 (RoPE is relative, so only rounding changes), which makes the cache's
        states repeat, as CUDAGraphRunner needs. exact=False only drops old keys/values:
        O(1), but the kept frames' deeper keys/values still carry information from the
        dropped frames (a streaming approximation).
        """
        if keep >= len(cache):
            return
        keep = max(keep, 0)
        cache.x, cache.t, cache.a = (z[:, z.shape[1] - keep :] for z in (cache.x, cache.t, cache.a))
        if exact or keep <= cache.pending:  # every kept frame runs again from its input
            for kv in cache.layers:
                kv.reset(offset=0)
            cache.pending = keep
        else:
            for kv in cache.layers:
                kv.trim(keep - cache.pending)


def flops_per_frame(model, context=None):
    """Analytic forward FLOPs (2 per multiply-add) for one frame, with `context` frames of temporal keys.

    context defaults to model.window (a full window; the cached single-frame step
    costs the same). Counts every matmul and both attention products; norms, activations
    and RoPE are left out.
    """
    D, N, p, C = model.hidden_size, model.grid_h * model.grid_w, model.patch_size, model.in_channels
    T = model.window if context is None else context
    hidden = int(D * model.mlp_ratio)
    mac = N * p * p * C * D  # patch embedding
    mac += 256 * D + D * D + model.action_dim * D  # timestep MLP + action embedding
    per_block = 12 * D * D  # adaLN modulation, once per frame
    per_block += 2 * (N * 4 * D * D + 2 * N * D * hidden)  # qkv + proj + MLP, spatial and temporal
    per_block += 2 * N * N * D  # spatial QK^T and AV
    per_block += 2 * N * T * D  # temporal QK^T and AV against T keys
    mac += model.depth * per_block
    mac += 2 * D * D + N * D * p * p * C  # final adaLN + output linear
    return 2 * mac


def DiT_tiny(**kw):
    return DiT(**{**dict(hidden_size=64, depth=2, num_heads=2, patch_size=2), **kw})


def DiT_XS(**kw):
    """The shipped model's size: small enough to train on a 2-core CPU within an hour."""
    return DiT(**{**dict(hidden_size=192, depth=4, num_heads=3, patch_size=2), **kw})


def DiT_XS1(**kw):
    """Patch size 1 (a token per latent cell, 8x8 pixels), width halved so it generates as fast as XS on a CPU."""
    return DiT(**{**dict(hidden_size=96, depth=4, num_heads=2, patch_size=1), **kw})


def DiT_S(**kw):
    return DiT(**{**dict(hidden_size=256, depth=8, num_heads=4, patch_size=2), **kw})


def DiT_B(**kw):
    return DiT(**{**dict(hidden_size=512, depth=12, num_heads=8, patch_size=2), **kw})


DiT_models = {"tiny": DiT_tiny, "XS": DiT_XS, "XS1": DiT_XS1, "S": DiT_S, "B": DiT_B}
DEFAULT_MODEL = "S"


if __name__ == "__main__":
    print(f"{'model':>6} {'params':>12} {'GFLOPs/frame':>13}  (default 12x12x4 latents, 16-frame window)")
    for name, ctor in DiT_models.items():
        m = ctor()
        n_params = sum(p.numel() for p in m.parameters())
        print(f"{name:>6} {n_params:>12,} {flops_per_frame(m) / 1e9:>13.3f}")
