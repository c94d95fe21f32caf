"""The diffusion maths: Oasis's sigmoid noise schedule, v-prediction, DDIM sampling.

Noise levels are integers t in [0, NUM_TIMESTEPS); alpha_bar[t] (`ac`) is how much of the clean
latent x0 survives at t. The DiT predicts v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022).
Imports only torch.
"""

import torch

NUM_TIMESTEPS = 1000


def sigmoid_beta_schedule(timesteps=NUM_TIMESTEPS, start=-3.0, end=3.0, tau=1.0, clamp_min=1e-5):
    """Betas whose alpha_bar follows a sigmoid in t (Jabri et al. 2022), as used by Oasis."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.tensor(start / tau).sigmoid()
    v_end = torch.tensor(end / tau).sigmoid()
    alphas_cumprod = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def alphas_cumprod_schedule(timesteps=NUM_TIMESTEPS):
    """alpha_bar[t] for t in [0, timesteps), float32."""
    return torch.cumprod(1.0 - sigmoid_beta_schedule(timesteps), dim=0).float()


def _bc(a, x):
    """Broadcast a per-frame coefficient (..., ) against x (..., C, H, W)."""
    return a.reshape(*a.shape, *([1] * (x.ndim - a.ndim)))


def q_sample(x0, t, noise, ac):
    """x_t = sqrt(ab) x0 + sqrt(1-ab) eps, with t of shape x0.shape[:-3]."""
    ab = _bc(ac[t], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def v_target(x0, noise, t, ac):
    """v = sqrt(ab) eps - sqrt(1-ab) x0."""
    ab = _bc(ac[t], x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def x0_from_v(x_t, v, t, ac):
    ab = _bc(ac[t], x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def eps_from_v(x_t, v, t, ac):
    ab = _bc(ac[t], x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v


def ddim_timesteps(steps, start=NUM_TIMESTEPS - 1):
    """Descending integer timesteps for a `steps`-step DDIM sampler, starting at `start` (T-1: pure noise)."""
    return torch.linspace(start, 0, steps + 1).round().long()[:-1].tolist() + [-1]


def ddim_step(x_t, v, t, t_next, ac):
    """One deterministic DDIM step (eta=0) from t to t_next; t_next < 0 means 'to x0'."""
    x0 = x0_from_v(x_t, v, t, ac)
    if t_next < 0:
        return x0
    eps = eps_from_v(x_t, v, t, ac)
    ab_next = ac[t_next]
    return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
