"""Axial attention for video latents laid out as (B, T, H, W, D) tokens.

- SpatialAxialAttention: the H*W tokens of each frame attend to each other
  (non-causal), with 2-D axial RoPE on queries and keys.
- TemporalAxialAttention: each spatial location attends over time, causally,
  with 1-D RoPE on frame positions. It can run incrementally against a KVCache,
  which is what makes frame-by-frame generation cheap: the n new frames are the
  queries, the cached frames plus the new ones are the keys and values. In
  training it can also run over a window given twice (clean copy, then noised
  copy: teacher forcing, `clean_copy_mask`).

Both attend with `attend`: F.scaled_dot_product_attention without dropout, except
bf16 on a CPU (see there). Imports only torch, einops and the project's rotary embedding.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb


class KVCache:
    """Rotated keys/values of the frames one temporal attention layer has already seen.

    k, v: (B*H*W, heads, T_cached, head_dim), after RoPE. offset: absolute time
    position of the next frame. Storage is a buffer grown by doubling, so a step
    that does not commit writes its keys into the free tail instead of concatenating.
    """

    def __init__(self, window=16):
        self._k = self._v = None  # (B*H*W, heads, buffer frames, head_dim)
        self.window = window  # frames of the first buffer: a sliding window that fits never reallocates
        self.length = 0  # frames held
        self.offset = 0  # absolute position of the next frame

    def __len__(self):
        return self.length

    @property
    def k(self):
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def v(self):
        return None if self._v is None else self._v[:, :, : self.length]

    def extend(self, k, v):
        """Write n new frames after the cached ones, without committing them; return all keys/values."""
        n = k.shape[2]
        end = self.length + n
        if self.length and k.shape[:2] != self._k.shape[:2]:
            raise ValueError(f"KVCache holds {tuple(self._k.shape[:2])} (B*H*W, heads), got {tuple(k.shape[:2])}")
        if self._k is None or end > self._k.shape[2] or k.shape[:2] != self._k.shape[:2]:
            cap = max(end, self.window) if self._k is None else max(end, 2 * self._k.shape[2])
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            if self.length:
                new_k[:, :, : self.length] = self.k
                new_v[:, :, : self.length] = self.v
            self._k, self._v = new_k, new_v
        self._k[:, :, self.length : end] = k
        self._v[:, :, self.length : end] = v
        return self._k[:, :, :end], self._v[:, :, :end]

    def commit(self, n):
        """Keep the n frames last written by extend() and advance the time position."""
        self.length += n
        self.offset += n

    def trim(self, keep):
        """Keep only the last `keep` cached frames; positions (offset) are unchanged."""
        keep = max(0, min(keep, self.length))
        if 0 < keep < self.length:
            start = self.length - keep
            self._k[:, :, :keep] = self._k[:, :, start : self.length].clone()
            self._v[:, :, :keep] = self._v[:, :, start : self.length].clone()
        self.length = keep

    def reset(self, offset=0):
        """Forget every frame (keeping the buffer) and set the next frame's position."""
        self.length, self.offset = 0, offset


def attend(q, k, v, mask=None, is_causal=False):
    """F.scaled_dot_product_attention(q, k, v, mask, is_causal) with q, k, v (..., n, head_dim); mask bool, True =
    attend. In bf16 training on a CPU it is the plain product-softmax-product (scores in fp32): there torch's fused
    kernel takes 2-7x as long, forward and backward, on this model's short sequences (36 tokens a frame, a few
    frames); at generation's batch 1 the fused kernel is the faster (`python bench.py --what attention`)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or not (q.requires_grad and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return plain_attention(q, k, v, mask, is_causal)


def plain_attention(q, k, v, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(head_dim)) v, the scores in fp32; is_causal: query i sees keys <= i."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (..., n_q, n_k)
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def clean_copy_mask(T, device=None):
    """(2T, 2T) bool mask for a window given twice, T clean frames then the same T frames noised.

    Clean frame i sees clean frames <= i (plain causal). Noised frame j sees the clean frames
    before j and itself, as frame j does at generation after j clean frames: T targets in one pass.
    """
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    before = causal.tril(diagonal=-1)
    itself = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat((torch.cat((causal, torch.zeros_like(causal)), 1), torch.cat((before, itself), 1)), 0)


class SpatialAxialAttention(nn.Module):
    """Multi-head attention among the H*W tokens of each frame, with 2-D axial RoPE."""

    def __init__(self, dim, heads, max_freq=8.0, qkv_bias=True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} not divisible by heads {heads}"
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rope = RotaryEmbedding(self.head_dim, freqs_for="pixel", max_freq=max_freq)

    def forward(self, x):
        B, T, H, W, D = x.shape
        qkv = self.qkv(x)  # (B, T, H, W, 3D)
        qkv = rearrange(qkv, "b t h w (three nh hd) -> three (b t) nh (h w) hd", three=3, nh=self.heads)
        angles = self.rope.grid_angles(H, W).flatten(0, 1)  # (H*W, hd)
        q, k = apply_rotary_emb(angles, qkv[:2])  # q and k rotated in one go
        v = qkv[2]
        out = attend(q, k, v)  # (B*T, nh, H*W, hd)
        out = rearrange(out, "(b t) nh (h w) hd -> b t h w (nh hd)", b=B, h=H)
        return self.proj(out)  # (B, T, H, W, D)


class TemporalAxialAttention(nn.Module):
    """Causal multi-head attention over time at each spatial location, with 1-D RoPE and a KV cache."""

    def __init__(self, dim, heads, theta=10000.0, qkv_bias=True):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} not divisible by heads {heads}"
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rope = RotaryEmbedding(self.head_dim, freqs_for="lang", theta=theta)

    def forward(self, x, cache=None, commit=0, clean_copy=False):
        """x holds n frames. cache=None: frames 0..n-1, plain causal attention.

        clean_copy=True: x is a window given twice (n = 2T, clean then noised), both copies at
        positions 0..T-1, attending as clean_copy_mask says (training only, no cache).

        With a KVCache, x holds the n frames right after the cached ones (positions
        offset..offset+n-1); they attend to every cached frame and causally to each
        other. commit=k stores the keys/values of the first k of them and advances the
        offset by k (0: none are kept; the frames after the first k were queries only).
        """
        B, n, H, W, D = x.shape
        qkv = self.qkv(x)  # (B, n, H, W, 3D)
        qkv = rearrange(qkv, "b t h w (three nh hd) -> three (b h w) nh t hd", three=3, nh=self.heads)
        offset = 0 if cache is None else cache.offset
        angles = self.rope.seq_angles(n // 2, 0).repeat(2, 1) if clean_copy else self.rope.seq_angles(n, offset)
        q, k = apply_rotary_emb(angles, qkv[:2])  # angles: (n, hd)
        v = qkv[2]

        past = 0 if cache is None else len(cache)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B*H*W, nh, past+n, hd)
        if clean_copy:
            assert cache is None, "a clean copy is a training pass: no cache"
            out = attend(q, k, v, mask=clean_copy_mask(n // 2, x.device))
        elif n == 1:
            out = attend(q, k, v)  # one query sees everything: no mask
        elif past == 0:
            out = attend(q, k, v, is_causal=True)
        else:
            # new frame i (absolute past+i) sees every cached frame and new frames <= i
            mask = torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = attend(q, k, v, mask=mask)
        if cache is not None and commit:
            assert not isinstance(commit, bool), "commit is a frame count, not a flag"
            cache.commit(commit)
        out = rearrange(out, "(b h w) nh t hd -> b t h w (nh hd)", b=B, h=H)  # (B, n, H, W, D)
        return self.proj(out)
