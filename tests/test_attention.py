"""Axial attention: temporal causality, KV cache equal to the full forward, trim = shifted window."""

import torch

from attention import KVCache, SpatialAxialAttention, TemporalAxialAttention

B, T, H, W, D, HEADS = 2, 8, 3, 2, 32, 2


def make(seed=0):
    torch.manual_seed(seed)
    return TemporalAxialAttention(D, HEADS).eval(), torch.randn(B, T, H, W, D)


def test_shapes():
    torch.manual_seed(0)
    x = torch.randn(B, T, H, W, D)
    assert SpatialAxialAttention(D, HEADS)(x).shape == x.shape
    assert TemporalAxialAttention(D, HEADS)(x).shape == x.shape


def test_spatial_is_per_frame():
    torch.manual_seed(0)
    attn = SpatialAxialAttention(D, HEADS)
    x = torch.randn(B, T, H, W, D)
    y = attn(x)
    x2 = x.clone()
    x2[:, 3] += 1.0
    y2 = attn(x2)
    assert torch.allclose(torch.cat((y[:, :3], y[:, 4:]), 1), torch.cat((y2[:, :3], y2[:, 4:]), 1), atol=1e-6)
    assert not torch.allclose(y[:, 3], y2[:, 3], atol=1e-3)


@torch.no_grad()
def test_temporal_causality():
    attn, x = make()
    y = attn(x)
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2 = attn(x2)
        assert torch.allclose(y[:, : t + 1], y2[:, : t + 1], atol=1e-6), t
        assert not torch.allclose(y[:, t + 1], y2[:, t + 1], atol=1e-3)


@torch.no_grad()
def test_cache_frame_by_frame_equals_full():
    attn, x = make()
    full = attn(x)
    cache = KVCache()
    for t in range(T):
        peek = attn(x[:, t : t + 1], cache=cache)  # not committed: does not change the cache
        assert len(cache) == t and cache.offset == t
        out = attn(x[:, t : t + 1], cache=cache, commit=1)
        assert torch.allclose(peek, out)
        assert torch.allclose(out, full[:, t : t + 1], atol=1e-5), t
    assert cache.k.shape == (B * H * W, HEADS, T, D // HEADS) and cache.offset == T


@torch.no_grad()
def test_cache_chunks_equal_full():
    attn, x = make()
    full = attn(x)
    cache = KVCache()
    a = attn(x[:, :3], cache=cache, commit=3)
    b = attn(x[:, 3:7], cache=cache, commit=4)  # a chunk after a non-empty cache: needs the offset mask
    c = attn(x[:, 7:], cache=cache, commit=T - 7)
    assert torch.allclose(torch.cat((a, b, c), 1), full, atol=1e-5)


@torch.no_grad()
def test_trim_then_step_equals_window_forward():
    attn, x = make()
    keep = 3
    cache = KVCache()
    for t in range(T - 1):
        attn(x[:, t : t + 1], cache=cache, commit=1)
        cache.trim(keep)
    assert len(cache) == keep and cache.offset == T - 1
    out = attn(x[:, T - 1 :], cache=cache)
    # positions (T-1-keep .. T-1) vs (0 .. keep): a constant shift, invisible to RoPE
    window = attn(x[:, T - 1 - keep :])
    assert torch.allclose(out, window[:, -1:], atol=1e-5)
    full = attn(x)
    assert not torch.allclose(out, full[:, -1:], atol=1e-3)  # the trim really dropped frames


@torch.no_grad()
def test_large_offsets_keep_accuracy():
    attn, x = make()
    cache = KVCache()
    cache.offset = 5000
    outs = [attn(x[:, t : t + 1], cache=cache, commit=1) for t in range(T)]
    assert torch.allclose(torch.cat(outs, 1), attn(x), atol=1e-5)
