"""--precision (issue #25): which precision each flag picks, and a bf16 training step against fp32's."""

import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402
from dit import DiT_models  # noqa: E402


def cpuinfo(tmp_path, flags):
    p = tmp_path / f"cpuinfo_{flags.split()[0]}"
    p.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {flags}\n")
    return str(p)


def test_auto_is_bf16_only_where_the_cpu_does_it_fast(tmp_path, capsys):
    fast, slow, amx = (cpuinfo(tmp_path, f) for f in ("avx512_bf16", "avx512bw", "amx_bf16 amx_tile"))
    assert utils.pick_precision("auto", "cpu", cpuinfo=fast) == "bf16"
    assert utils.pick_precision("auto", "cpu", cpuinfo=amx) == "bf16"
    assert utils.pick_precision("auto", "cpu", cpuinfo=slow) == "fp32"
    assert utils.pick_precision("auto", "cpu", auto_cpu=False, cpuinfo=fast) == "fp32"  # generation's default
    assert utils.pick_precision("fp32", "cpu", cpuinfo=fast) == "fp32"
    assert utils.pick_precision("bf16", "cpu", cpuinfo=str(tmp_path / "missing")) == "fp32"  # no cpuinfo: no
    assert capsys.readouterr().err.count("warning: --precision bf16") == 1
    # bf16 asked for where it is slow: one warning line, and fp32
    assert utils.pick_precision("bf16", "cpu", cpuinfo=slow) == "fp32"
    err = capsys.readouterr().err
    assert err.startswith("warning: --precision bf16: cpu has no fast bf16") and err.count("\n") == 1
    assert utils.pick_precision("bf16", "cpu", cpuinfo=fast) == "bf16" and not capsys.readouterr().err


def test_bf16_training_step_is_close_to_fp32():
    """One DiT training step (forward, MSE on v, backward) under bf16 autocast against fp32, same weights and batch.

    Tolerances: the loss within 2% of fp32's, the gradient's cosine similarity to fp32's above 0.99.
    The forward must really run in bf16 (a linear's output is bf16), or the test proves nothing.
    """
    torch.manual_seed(0)
    model = DiT_models["tiny"](input_h=6, input_w=6, in_channels=4, window=4, action_dim=6)
    with torch.no_grad():  # adaLN-Zero starts at zero output: give every weight a value
        for p in model.parameters():
            p.normal_(0, 0.05)
    x, target = torch.randn(2, 4, 4, 6, 6), torch.randn(2, 4, 4, 6, 6)
    t = torch.randint(0, 1000, (2, 4))
    a = torch.nn.functional.one_hot(torch.randint(0, 6, (2, 4)), 6).float()
    seen = []
    hook = model.blocks[0].s_attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def step(precision):
        model.zero_grad()
        with utils.autocast(precision, "cpu"):
            loss = (model(x, t, a).float() - target).square().mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss32, g32 = step("fp32")
    loss16, g16 = step("bf16")
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert torch.isfinite(torch.tensor(loss16)) and loss16 == pytest.approx(loss32, rel=0.02)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_log_figures_parse_with_one_float_pattern_at_any_speed():
    """{v:.4g} printed 11670 as 1.167e+04, which a pattern for digits read as 1 (issue #25)."""
    for v in (0.00031, 0.5, 12.5, 999.9, 11670.3, 2.5e7):
        text = utils.fmt(v)
        assert "e+" not in text and float(re.fullmatch(r"[0-9.eE+-]+", text).group()) == pytest.approx(v, rel=1e-3)
    assert utils.fmt(float("nan")) == "nan" and utils.fmt(7) == "7"


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "checkpoints", "pong_dit.pt")), reason="needs the bundle")
def test_engine_in_bf16_runs_both_networks_in_bf16_and_draws_what_fp32_draws():
    """The same rollout (seed, prompt, actions) in both precisions: the DiT and the decoder (on its own thread)
    really run in bf16, and the frames stay close to fp32's (PSNR above 40 dB over 6 frames; 50-57 dB measured)."""
    import numpy as np

    import engine

    ep = np.load(os.path.join(ROOT, "sample_data", "heldout_episode.npz"))
    prompt, actions = ep["frames"][200:201], torch.from_numpy(ep["actions"][200:206])
    frames, seen = {}, []
    for precision in ("fp32", "bf16"):
        cfg = engine.ModelConfig(precision=precision)
        eng = engine.load_world_model(cfg, "cpu")
        if precision == "bf16" and eng.precision == "fp32":
            pytest.skip("this CPU has no fast bf16: load_world_model fell back to fp32")
        record = lambda m, i, o, p=precision: seen.append((p, o.dtype))
        hooks = [m.register_forward_hook(record) for m in (eng.dit.blocks[0].s_attn.qkv, eng.vae.decoder.conv_in)]
        eng.reset(prompt[None])
        out = [eng.step_pipelined(actions[k : k + 1]) for k in range(len(actions))][1:] + [eng.flush()]
        frames[precision] = torch.cat(out).numpy()
        for h in hooks:
            h.remove()
    assert {d for p, d in seen if p == "fp32"} == {torch.float32} and {d for p, d in seen if p == "bf16"} == {
        torch.bfloat16
    }
    assert utils.psnr(frames["fp32"], frames["bf16"]).mean() > 40


def test_engine_bf16_keeps_its_own_bf16_copy():
    """--precision bf16 generates with a bf16 copy of the weights (issue #25: no cast of every weight at every
    call); the modules it was given stay fp32 (training's sample rollouts share the EMA model), and the buffers,
    the timestep frequencies among them, stay fp32."""
    import engine
    from dit import DiT_models
    from uvit_vae import build_vae

    dit = DiT_models["tiny"](input_h=4, input_w=4, in_channels=4, window=4, action_dim=3).eval()
    vae = build_vae("pong", ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8).eval()
    eng = engine.WorldModel(dit, vae, 1.0, "cpu", precision="bf16")
    assert eng.dit is not dit and eng.vae is not vae
    weights = lambda m: (
        [p for p in m.parameters()] + [x.packed for x in m.modules() if isinstance(x, engine.PackedLinear)]
    )
    assert {p.dtype for p in weights(eng.dit)} == {p.dtype for p in weights(eng.vae)} == {torch.bfloat16}
    assert {p.dtype for p in dit.parameters()} == {p.dtype for p in vae.parameters()} == {torch.float32}
    assert {b.dtype for b in eng.dit.buffers()} == {torch.float32}
    assert engine.WorldModel(eng.dit, eng.vae, 1.0, "cpu", precision="bf16").dit is eng.dit  # no second copy
    assert engine.WorldModel(dit, vae, 1.0, "cpu").dit is dit  # fp32: the modules as given
    eng.reset(torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8).numpy())
    frame = eng.step(torch.tensor([2]))
    assert frame.shape == (1, 32, 32, 3) and frame.dtype == torch.uint8


@pytest.mark.skipif(not __import__("engine").PackedLinear.available(), reason="torch has no oneDNN linear ops")
def test_cpu_bf16_copy_packs_its_linears_and_computes_what_they_did():
    """On a CPU the engine's bf16 copy runs its linear layers with weights oneDNN laid out once (PackedLinear) and
    exact GELU for tanh's (< 5e-4 apart): each layer's output as nn.Linear's in bf16, to bf16's rounding."""
    import engine
    from dit import DiT_models

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 80)
    packed = engine.PackedLinear(lin)
    x = torch.randn(2, 3, 36, 48)
    with torch.no_grad():
        want = torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
        got = packed(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 36, 80)
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()
    dit = DiT_models["tiny"](input_h=4, input_w=4, in_channels=4, window=4, action_dim=3).eval()
    copy = engine.bf16_copy(dit)
    assert not any(isinstance(m, torch.nn.Linear) for m in copy.modules())
    assert sum(isinstance(m, engine.PackedLinear) for m in copy.modules()) == sum(
        isinstance(m, torch.nn.Linear) for m in dit.modules()
    )
    gelus = [m for m in copy.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(m.approximate == "none" for m in gelus)
    a = torch.linspace(-6, 6, 10001)
    assert (torch.nn.functional.gelu(a) - torch.nn.functional.gelu(a, approximate="tanh")).abs().max() < 5e-4
