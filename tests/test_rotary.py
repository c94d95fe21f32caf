"""RoPE: relative property, norm preservation, agreement with a naive 2x2 rotation, no saved buffers."""

import math

import torch

from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb


def naive_rotate(x, pos, freqs):
    """x (n, d), pos (n,), freqs (d/2,): rotate pair (x[2i], x[2i+1]) by pos * freqs[i] with a 2x2 matrix."""
    out = x.clone().double()
    for r in range(x.shape[0]):
        for i, f in enumerate(freqs.tolist()):
            a = float(pos[r]) * f
            rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
            out[r, 2 * i : 2 * i + 2] = rot @ x[r, 2 * i : 2 * i + 2].double()
    return out


def test_relative_property_lang():
    torch.manual_seed(0)
    rope = RotaryEmbedding(32)
    q, k = torch.randn(32), torch.randn(32)

    def score(i, j):
        qi = apply_rotary_emb(rope(torch.tensor([i])), q[None])[0]
        kj = apply_rotary_emb(rope(torch.tensor([j])), k[None])[0]
        return (qi * kj).sum()

    for diff in (0, 1, 3, 7):
        ref = score(diff, 0)
        for i in (5, 37, 1000, 1013, 123456):
            assert torch.allclose(score(i + diff, i), ref, atol=1e-5), (diff, i)
    # and it really depends on the difference
    assert not torch.allclose(score(3, 0), score(4, 0), atol=1e-3)


def test_seq_angles_offsets():
    rope = RotaryEmbedding(16)
    a = rope.seq_angles(16, offset=37)
    assert a.shape == (16, 16)
    assert torch.allclose(a, rope(torch.arange(37, 53)))
    assert torch.equal(a[:, 0::2], a[:, 1::2])  # one angle per interleaved pair


def test_relative_property_pixel_grid():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, freqs_for="pixel", max_freq=6)
    g = rope.grid_angles(5, 5)
    assert g.shape == (5, 5, 16)
    q, k = torch.randn(16), torch.randn(16)
    s = lambda a, b: (apply_rotary_emb(g[a], q[None]) * apply_rotary_emb(g[b], k[None])).sum()
    # same displacement on the grid -> same score
    assert torch.allclose(s((0, 1), (2, 2)), s((1, 2), (3, 3)), atol=1e-5)
    assert torch.allclose(s((4, 0), (3, 4)), s((2, 0), (1, 4)), atol=1e-5)


def test_rotation_preserves_norm_and_passthrough():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    x = torch.randn(3, 7, 24)
    y = apply_rotary_emb(rope.seq_angles(7, offset=1000), x)
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)
    assert torch.equal(y[..., 16:], x[..., 16:])  # features beyond rot_dim pass through
    y16 = apply_rotary_emb(rope.seq_angles(7), x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16


def test_matches_naive_rotation():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8, theta=100.0)
    x = torch.randn(6, 8)
    pos = torch.tensor([0, 1, 2, 37, 52, 1000])
    got = apply_rotary_emb(rope(pos), x).double()
    freqs = 1.0 / 100.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert torch.allclose(got, naive_rotate(x, pos, freqs), atol=1e-5)


def test_pixel_grid_matches_naive():
    torch.manual_seed(0)
    dim, h, w = 8, 3, 4
    rope = RotaryEmbedding(dim, freqs_for="pixel", max_freq=4)
    x = torch.randn(h * w, dim)
    got = apply_rotary_emb(rope.grid_angles(h, w).flatten(0, 1), x).double()
    f = torch.linspace(1.0, 2.0, dim // 4, dtype=torch.float64) * math.pi
    ys = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None].expand(h, w).flatten()
    xs = torch.linspace(-1, 1, w, dtype=torch.float64)[None, :].expand(h, w).flatten()
    want = torch.cat(
        (naive_rotate(x[:, : dim // 2], ys, f), naive_rotate(x[:, dim // 2 :], xs, f)),
        dim=-1,
    )
    assert torch.allclose(got, want, atol=1e-5)


def test_buffers_not_in_state_dict():
    for rope in (RotaryEmbedding(16), RotaryEmbedding(16, freqs_for="pixel")):
        if rope.freqs_for == "pixel":
            rope.grid_angles(4, 4)
        assert len(rope.state_dict()) == 0
        assert len(list(rope.buffers())) >= 1
