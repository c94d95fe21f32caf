"""diffusion.py: v-prediction conversions invert q_sample, DDIM with the true x0 recovers it."""

import torch

from diffusion import (
    NUM_TIMESTEPS,
    alphas_cumprod_schedule,
    ddim_step,
    ddim_timesteps,
    eps_from_v,
    q_sample,
    sigmoid_beta_schedule,
    v_target,
    x0_from_v,
)


def test_schedule_is_monotone_in_range():
    betas = sigmoid_beta_schedule()
    assert betas.shape == (NUM_TIMESTEPS,) and (betas >= 0).all() and (betas < 1).all()
    ac = alphas_cumprod_schedule()
    assert ac.shape == (NUM_TIMESTEPS,) and ac.dtype == torch.float32
    assert (ac > 0).all() and (ac <= 1).all()
    assert (ac[1:] < ac[:-1]).all()  # strictly more noise at every step
    assert ac[0] > 0.99 and ac[-1] < 0.01


def test_v_conversions_invert_q_sample():
    torch.manual_seed(0)
    ac = alphas_cumprod_schedule()
    x0, eps = torch.randn(2, 5, 4, 3, 3), torch.randn(2, 5, 4, 3, 3)
    t = torch.tensor([[0, 1, 500, 998, 999], [3, 250, 750, 10, 600]])  # one noise level per frame
    xt = q_sample(x0, t, eps, ac)
    v = v_target(x0, eps, t, ac)
    assert torch.allclose(x0_from_v(xt, v, t, ac), x0, atol=1e-5)
    assert torch.allclose(eps_from_v(xt, v, t, ac), eps, atol=1e-5)
    # per-frame coefficients really are per frame
    ab = ac[t[0, 2]]
    assert torch.allclose(xt[0, 2], ab.sqrt() * x0[0, 2] + (1 - ab).sqrt() * eps[0, 2])


def test_ddim_timesteps():
    ts = ddim_timesteps(10)
    assert ts[0] == NUM_TIMESTEPS - 1 and ts[-1] == -1 and len(ts) == 11
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_ddim_with_true_x0_recovers_x0():
    torch.manual_seed(0)
    ac = alphas_cumprod_schedule()
    x0 = torch.randn(3, 4, 6, 6)
    x = torch.randn_like(x0)  # start from pure noise
    ts = ddim_timesteps(8)
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.full((3,), t)
        ab = ac[tt].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the noise that x holds, if x0 is right
        v = v_target(x0, eps, tt, ac)  # an oracle v-prediction
        x = ddim_step(x, v, tt, t_next, ac)
        if t_next >= 0:  # every intermediate state stays on the x0 trajectory
            ab_next = ac[t_next]
            assert torch.allclose((x - ab_next.sqrt() * x0) / (1 - ab_next).sqrt(), eps, atol=1e-4)
    assert torch.allclose(x, x0, atol=1e-5)
