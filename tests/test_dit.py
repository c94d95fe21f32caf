"""DiT: shapes, adaLN-Zero at init, gradients everywhere, causality, KV-cached generation = full forward."""

import pytest
import torch

from dit import DEFAULT_MODEL, CUDAGraphRunner, DiT, DiT_models, flops_per_frame

KW = dict(input_h=4, input_w=6, in_channels=4, action_dim=6, window=8)
B, T = 2, 6


def inputs(seed=0, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 4, 4, 6, generator=g)
    ts = torch.randint(0, 1000, (b, t), generator=g)
    a = torch.nn.functional.one_hot(torch.randint(0, 6, (b, t), generator=g), 6).float()
    return x, ts, a


def perturbed(seed=0, **kw):
    """A tiny DiT with its zero-initialised layers made non-zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = DiT_models["tiny"](**{**KW, **kw}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(0, 0.1)
    return model


def test_registry_and_config():
    assert DEFAULT_MODEL in DiT_models and {"tiny", "S", "B"} <= set(DiT_models)
    m = DiT_models["tiny"](**KW)
    assert (m.hidden_size, m.depth, m.num_heads, m.input_h, m.window) == (64, 2, 2, 4, 8)
    rebuilt = DiT(**m.config)
    assert rebuilt.config == m.config
    rebuilt.load_state_dict(m.state_dict())  # strict: same architecture
    assert all(type(v) in (int, float) for v in m.config.values())
    assert flops_per_frame(m) > 0


def test_shapes_and_zero_output_at_init():
    torch.manual_seed(0)
    model = DiT_models["tiny"](**KW)
    out = model(*inputs())
    assert out.shape == (B, T, 4, 4, 6)
    assert torch.equal(out, torch.zeros_like(out))


def test_gradient_reaches_every_parameter():
    model = perturbed().train()  # zero-init layers perturbed, so one backward reaches everything
    x, t, a = inputs()
    (model(x, t, a) - x).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


@torch.no_grad()
def test_causality_through_model():
    model = perturbed()
    x, t, a = inputs()
    y = model(x, t, a)
    for k in (0, 2, 4):
        x2, t2, a2 = x.clone(), t.clone(), a.clone()
        x2[:, k + 1 :] = torch.randn_like(x2[:, k + 1 :])
        t2[:, k + 1 :] = 999 - t2[:, k + 1 :]
        a2[:, k + 1 :] = a2[:, k + 1 :].flip(-1)
        y2 = model(x2, t2, a2)
        assert torch.allclose(y[:, : k + 1], y2[:, : k + 1], atol=1e-6), k
        assert not torch.allclose(y[:, k + 1], y2[:, k + 1], atol=1e-4)


@torch.no_grad()
def test_actions_condition_their_frame():
    model = perturbed()
    x, t, a = inputs()
    a2 = a.clone()
    a2[:, 3] = a2[:, 3].roll(1, dims=-1)
    y, y2 = model(x, t, a), model(x, t, a2)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=1e-6)
    assert not torch.allclose(y[:, 3], y2[:, 3], atol=1e-4)


def span(x, t, a, lo, hi=None):
    """Frames lo..hi-1 of (x, t, a), for forward_cached / queue."""
    hi = lo + 1 if hi is None else hi
    return x[:, lo:hi], t[:, lo:hi], a[:, lo:hi]


@torch.no_grad()
def test_incremental_generation_equals_full_forward():
    model = perturbed()
    x, t, a = inputs()
    full = model(x, t, a)
    cache = model.new_cache()
    for j in range(T - 1):  # commit the context frame by frame
        out = model.forward_cached(*span(x, t, a, j), cache, keep=True)
        assert torch.allclose(out, full[:, j : j + 1], atol=1e-5)
    assert len(cache) == T - 1 and cache.offset == T - 1
    # denoising steps of the new frame at other noise levels: uncommitted, the cache stays put
    for level in (999, 500, 17):
        t_new = torch.full((B, 1), level)
        out = model.forward_cached(x[:, -1:], t_new, a[:, -1:], cache)
        ref = model(x, torch.cat((t[:, :-1], t_new), 1), a)[:, -1:]
        assert torch.allclose(out, ref, atol=1e-5), level
    assert len(cache) == T - 1


@torch.no_grad()
def test_context_in_one_chunk_equals_full_forward():
    model = perturbed()
    x, t, a = inputs()
    full = model(x, t, a)
    cache = model.new_cache()
    ctx = model.forward_cached(*span(x, t, a, 0, 4), cache, keep=True)
    rest = model.forward_cached(*span(x, t, a, 4, T), cache)
    assert torch.allclose(torch.cat((ctx, rest), 1), full, atol=1e-5)


@torch.no_grad()
def test_sliding_window_after_trim_equals_window_forward():
    model = perturbed()
    x, t, a = inputs(t=10)
    keep = 4
    cache = model.new_cache()
    for j in range(9):
        model.forward_cached(*span(x, t, a, j), cache, keep=True)
        model.trim_cache(cache, keep)
        assert len(cache) == min(j + 1, keep) and cache.offset == len(cache)  # positions restart at a trim
    out = model.forward_cached(*span(x, t, a, 9), cache)
    window = model(*span(x, t, a, 9 - keep, 10))
    assert torch.allclose(out, window[:, -1:], atol=1e-5)
    assert not torch.allclose(out, model(x, t, a)[:, -1:], atol=1e-4)  # frames really left the window


@torch.no_grad()
def test_queued_frames_run_with_the_next_step():
    """queue() defers a frame's keys/values to the next forward_cached: same outputs, one pass fewer."""
    model = perturbed()
    x, t, a = inputs(t=10)
    keep = 4
    cache = model.new_cache()
    model.queue(cache, *span(x, t, a, 0, 3))
    assert len(cache) == 3 and cache.pending == 3 and len(cache.layers[0]) == 0 and cache.offset == 3
    for j in range(3, 9):
        out = model.forward_cached(*span(x, t, a, j), cache)  # a denoising step
        lo = max(0, j - keep)
        assert torch.allclose(out, model(*span(x, t, a, lo, j + 1))[:, -1:], atol=1e-5)
        assert cache.pending == 0 and cache.offset == len(cache) == min(j, keep)
        model.queue(cache, *span(x, t, a, j))
        model.trim_cache(cache, keep)  # exact: the kept frames are queued again, nothing runs yet
        assert len(cache) == min(j + 1, keep) and cache.offset == len(cache)
        assert cache.pending == (keep if j + 1 > keep else 1)


@torch.no_grad()
def test_streaming_trim_keeps_positions():
    model = perturbed()
    x, t, a = inputs(t=8)
    cache = model.new_cache()
    model.forward_cached(*span(x, t, a, 0, 6), cache, keep=True)
    model.trim_cache(cache, 2, exact=False)
    assert len(cache) == 2 and cache.offset == 6 and cache.x.shape[1] == 2
    assert model.forward_cached(*span(x, t, a, 6, 8), cache).shape == (B, 2, 4, 4, 6)


def sliding_generation(model, x, t, a, runner=None):
    """Frame by frame as WorldModel's chunk window runs it: 2 denoising passes a frame, queue, exact trims."""
    cache, outs = model.new_cache(), []
    model.queue(cache, *span(x, t, a, 0, 2))
    for j in range(2, x.shape[1]):
        for level in (999, t[0, j].item()):
            out = model.forward_cached(
                x[:, j : j + 1], torch.full_like(t[:, :1], level), a[:, j : j + 1], cache, runner=runner
            )
            outs.append(out)
        model.queue(cache, *span(x, t, a, j))
        if len(cache) >= model.window:
            model.trim_cache(cache, model.window // 2)
    return torch.cat(outs, 1)


class EagerRunner(CUDAGraphRunner):
    """The runner's bookkeeping without CUDA: a 'replay' re-runs the pass on the static inputs, as a graph would,
    and checks what a real graph would silently get wrong: the cache's buffers must not have moved."""

    def capture(self, x, t, a, cache):
        inputs = tuple(v.clone() for v in (x, t, a))
        out = self.model._run(*inputs, cache, commit=0)
        buffers = lambda: [(kv._k.data_ptr(), kv._v.data_ptr()) for kv in cache.layers]
        captured = buffers()

        def replay():
            assert buffers() == captured, "the KV cache reallocated after capture"
            out.copy_(self.model._run(*inputs, cache, commit=0))

        return replay, inputs, out


@torch.no_grad()
def test_graph_runner_replays_a_few_states():
    """The runner keys each pass by cache state, copies inputs in and commits afterwards: same outputs, and
    with exact trims (positions restart at 0) a long rollout needs only a handful of captured states."""
    model = perturbed(window=6)
    x, t, a = inputs(t=40)
    runner, short = EagerRunner(model), EagerRunner(model)
    assert torch.allclose(sliding_generation(model, x, t, a, runner), sliding_generation(model, x, t, a), atol=1e-6)
    sliding_generation(model, *span(x, t, a, 0, 12), short)
    assert set(runner.graphs) == set(short.graphs)  # 76 passes or 20: the same 9 (batch, n, cached, position)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_runner_equals_eager():
    model = perturbed(window=6).cuda()
    x, t, a = (v.cuda() for v in inputs(t=20))
    runner = CUDAGraphRunner(model)
    assert torch.allclose(sliding_generation(model, x, t, a, runner), sliding_generation(model, x, t, a), atol=1e-4)
    assert len(runner.graphs) == 9


def test_bad_shapes_are_named():
    model = DiT_models["tiny"](**KW)
    x, t, a = inputs()
    try:
        model(x[:, :, :3], t, a)
    except ValueError as e:
        assert "expects x" in str(e)
    else:
        raise AssertionError("wrong channel count accepted")
