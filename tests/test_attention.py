"""Axial attention: temporal causality, KV cache equal to the full forward, trim = shifted window, attend."""

import pytest
import torch

from attention import KVCache, SpatialAxialAttention, TemporalAxialAttention, attend, plain_attention

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


def test_plain_attention_equals_sdpa_and_bf16_training_takes_it(monkeypatch):
    """attend = F.scaled_dot_product_attention everywhere (values and gradients), but bf16 training on a CPU runs
    plain_attention (the fused kernel is slow there): checked by making the fused kernel fail on that path."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 8) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    mask.fill_diagonal_(True)  # every query sees something
    for kw in ({}, {"is_causal": True}, {"mask": mask}):
        sdpa_kw = {"attn_mask": kw["mask"]} if "mask" in kw else kw
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **sdpa_kw)
        assert torch.allclose(plain_attention(q, k, v, **kw), ref, atol=1e-5), kw
    # bf16 with gradients: the plain path, close to fp32's result and gradients
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref_q = q.clone().requires_grad_()
    sdpa(ref_q, k, v, is_causal=True).square().sum().backward()
    q16 = q.bfloat16().requires_grad_()

    def fused(*a, **kw):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", fused)
    out = attend(q16, k.bfloat16(), v.bfloat16(), is_causal=True)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), sdpa(q, k, v, is_causal=True), atol=0.05)
    assert torch.nn.functional.cosine_similarity(q16.grad.float().flatten(), ref_q.grad.flatten(), dim=0) > 0.99
    with torch.no_grad(), pytest.raises(AssertionError, match="fused"):  # generation (no grad) keeps the fused one
        attend(q16, k.bfloat16(), v.bfloat16())
