"""The clean-context and sampler-level levers (train.py dit --clean-context, --sampler-levels, issue #21):
training asks the DiT what generation asks it."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import diffusion  # noqa: E402
from dit import DiT_models  # noqa: E402
from tasks import DiTTask  # noqa: E402

B, T = 64, 6


def task(**flags):
    cfg = dict(clean_context=0.0, clean_context_noise=0, sampler_levels=0.0, sampler_steps=2, ctx_noise_prob=0.0)
    cfg |= dict(ctx_noise_max=300, fg_weight=0.0)
    t = SimpleNamespace(cfg=SimpleNamespace(**(cfg | flags)), ac=diffusion.alphas_cumprod_schedule())
    t.noise_levels = DiTTask.noise_levels.__get__(t)
    t.loss_on = DiTTask.loss_on.__get__(t)
    return t


def levels(**flags):
    return task(**flags).noise_levels(B, T, torch.Generator().manual_seed(0))


def test_default_levels_are_plain_diffusion_forcing_with_an_unchanged_random_stream():
    t, clean = levels()
    assert torch.equal(t, torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(0)))
    assert not clean.any()


def test_clean_context_puts_the_context_at_level_0_and_leaves_the_target_uniform():
    t, clean = levels(clean_context=1.0)
    assert clean.all() and (t[:, :-1] == 0).all()
    assert t[:, -1].float().std() > 200  # still spread over 0..999
    t, clean = levels(clean_context=0.5)
    assert 0.25 < clean.float().mean() < 0.75
    assert (t[clean, :-1] == 0).all() and (t[~clean, :-1] > 0).float().mean() > 0.9
    t, clean = levels(clean_context=1.0, clean_context_noise=50)
    assert t[:, :-1].max() <= 50 and t[:, :-1].max() > 0


@pytest.mark.parametrize("steps, want", [(1, {999}), (2, {999, 500}), (4, {999, 749, 500, 250})])
def test_sampler_levels_are_the_ddim_samplers_levels(steps, want):
    t, _ = levels(sampler_levels=1.0, sampler_steps=steps)
    assert set(t.unique().tolist()) == want
    t, _ = levels(sampler_levels=0.5)
    at = (t == 999) | (t == 500)
    assert 0.4 < at.float().mean() < 0.6  # half at the sampler's levels, half uniform (rarely 500 or 999)


def tiny_dit():
    g = torch.Generator().manual_seed(0)
    dit = DiT_models["tiny"](input_h=4, input_w=4, window=T).eval()
    with torch.no_grad():  # undo the zero init so the output depends on every input
        for p in dit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return dit


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(n, T, 4, 4, 4, generator=g), torch.randn(n, T, 4, 4, 4, generator=g)
    t = torch.randint(1, 1000, (n, T), generator=g)
    cond = F.one_hot(torch.randint(0, 6, (n, T), generator=g), 6).float()
    return x0, t, noise, cond


@torch.no_grad()
def test_plain_loss_is_the_mse_over_every_frame():
    tk, dit, (x0, t, noise, cond) = task(), tiny_dit(), batch()
    v = dit(diffusion.q_sample(x0, t, noise, tk.ac), t, cond)
    want = F.mse_loss(v, diffusion.v_target(x0, noise, t, tk.ac))
    torch.testing.assert_close(tk.loss_on(dit, x0, t, noise, cond), want)


@torch.no_grad()
def test_clean_window_scores_only_the_last_frame_after_the_clean_context():
    tk, dit, (x0, t, noise, cond) = task(), tiny_dit(), batch()
    t[:, :-1] = 0
    clean = torch.ones(len(x0), dtype=torch.bool)
    loss = tk.loss_on(dit, x0, t, noise, cond, clean)
    # what generation does: the real (clean) latents as context, the target noised at its level
    x_in = torch.cat([x0[:, :-1], diffusion.q_sample(x0[:, -1:], t[:, -1:], noise[:, -1:], tk.ac)], 1)
    v = dit(x_in, t, cond)[:, -1:]
    torch.testing.assert_close(loss, F.mse_loss(v, diffusion.v_target(x0[:, -1:], noise[:, -1:], t[:, -1:], tk.ac)))
    # the context's noise is never seen, and a context frame is no target
    other = torch.cat([torch.randn_like(noise[:, :-1]), noise[:, -1:]], 1)
    torch.testing.assert_close(tk.loss_on(dit, x0, t, other, cond, clean), loss)
    assert not torch.allclose(tk.loss_on(dit, x0, t, noise, cond), loss)  # the same batch as plain windows


@torch.no_grad()
def test_a_mixed_batch_weighs_every_window_the_same():
    tk, dit, (x0, t, noise, cond) = task(), tiny_dit(), batch()
    t[:2, :-1] = 0
    clean = torch.tensor([True, True, False, False])
    both = tk.loss_on(dit, x0, t, noise, cond, clean)
    a = tk.loss_on(dit, x0[:2], t[:2], noise[:2], cond[:2], clean[:2])
    b = tk.loss_on(dit, x0[2:], t[2:], noise[2:], cond[2:], clean[2:])
    torch.testing.assert_close(both, (a + b) / 2)


@torch.no_grad()
def test_clean_copy_scores_every_frame_after_the_clean_frames_before_it():
    """--clean-copy (teacher forcing against a clean copy): one pass over 2T frames gives, for every
    frame j, what a plain forward gives for j after the clean frames 0..j-1: T of generation's questions."""
    tk, dit, (x0, t, noise, cond) = task(), tiny_dit(), batch()
    x_t = diffusion.q_sample(x0, t, noise, tk.ac)
    v = dit(x_t, t, cond, clean=x0)
    for j in range(T):
        t_j = torch.cat([torch.zeros_like(t[:, :j]), t[:, j : j + 1]], 1)
        one = dit(torch.cat([x0[:, :j], x_t[:, j : j + 1]], 1), t_j, cond[:, : j + 1])[:, -1]
        torch.testing.assert_close(v[:, j], one, atol=1e-5, rtol=1e-4)
    # noised frame j sees neither the other noised frames nor the clean frames from j on
    other = x_t.clone()
    other[:, 1:3] = torch.randn_like(other[:, 1:3])
    cleaner = x0.clone()
    cleaner[:, 4:] = torch.randn_like(cleaner[:, 4:])
    torch.testing.assert_close(dit(other, t, cond, clean=cleaner)[:, [0, 3, 4]], v[:, [0, 3, 4]], atol=1e-5, rtol=1e-4)
    # the loss is the MSE over every frame of that pass
    want = F.mse_loss(v, diffusion.v_target(x0, noise, t, tk.ac))
    torch.testing.assert_close(tk.loss_on(dit, x0, t, noise, cond, copy=True), want)
    assert not torch.allclose(tk.loss_on(dit, x0, t, noise, cond), want)  # diffusion forcing: noised context
