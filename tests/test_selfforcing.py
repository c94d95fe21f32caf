"""Self-forcing (train.py dit --rollout-frac): the context it trains on is exactly what generation draws."""

import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import diffusion  # noqa: E402
import engine  # noqa: E402
from dit import DiT_models  # noqa: E402
from tasks import DiTTask, own_context  # noqa: E402


def random_tiny_dit(g):
    dit = DiT_models["tiny"](input_h=4, input_w=4, window=6).eval()
    with torch.no_grad():  # undo the zero init, so the model draws something that depends on its inputs
        for p in dit.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return dit


def test_own_context_is_what_the_engine_generates():
    g = torch.Generator().manual_seed(0)
    dit = random_tiny_dit(g)
    B, T, k = 3, 6, 3
    r = T - 1 - k  # real frames before the generated ones
    x0 = torch.randn(B, T, 4, 4, 4, generator=g)
    acts = torch.randint(0, 6, (B, T), generator=g)
    cond = F.one_hot(acts, 6).float()  # the action before each frame, as EpisodeDataset's prev_actions
    ac = diffusion.alphas_cumprod_schedule()
    out = own_context(dit, x0, cond, k, torch.Generator().manual_seed(5), ac)
    assert torch.equal(out[:, :r], x0[:, :r]) and torch.equal(out[:, -1], x0[:, -1])
    eng = engine.NaiveWorldModel(dit, None, 1.0, "cpu", steps=2, seed=5)
    eng.B = B
    eng._start(x0[:, :r], torch.zeros(B, r, dtype=torch.long), cond[:, :r])
    for j in range(r, T - 1):
        want = eng.step_latent(acts[:, j])
        assert not torch.allclose(out[:, j], x0[:, j])
        torch.testing.assert_close(out[:, j], want, atol=1e-5, rtol=1e-5)


def test_rollout_loss_scores_the_last_frame_after_a_clean_generated_context():
    """The context's own noise levels and noise are ignored (it is clean, level 0), the generated frames
    replace the real ones (k = 0 keeps the real context and gives another loss), and only frame T-1 counts."""
    g = torch.Generator().manual_seed(1)
    dit = random_tiny_dit(g)
    B, T = 4, 6
    x0, noise = torch.randn(B, T, 4, 4, 4, generator=g), torch.randn(B, T, 4, 4, 4, generator=g)
    t = torch.randint(0, 1000, (B, T), generator=g)
    cond = F.one_hot(torch.randint(0, 6, (B, T), generator=g), 6).float()
    task = lambda k: SimpleNamespace(rollout_frames=k, ac=diffusion.alphas_cumprod_schedule())
    loss = lambda k, t, noise: DiTTask.rollout_loss(task(k), dit, x0, t, noise, cond, torch.Generator().manual_seed(2))
    ref = loss(3, t, noise)
    other_ctx = torch.cat([torch.randint(0, 1000, (B, T - 1), generator=g), t[:, -1:]], 1)
    torch.testing.assert_close(loss(3, other_ctx, torch.cat([noise[:, :-1] * 0, noise[:, -1:]], 1)), ref)
    assert not torch.allclose(loss(0, t, noise), ref)  # the generated context matters
    assert not torch.allclose(loss(3, torch.cat([t[:, :-1], (t[:, -1:] + 500) % 1000], 1), noise), ref)
