"""Benchmarks of the model pieces, run as a script (figures go to docs/speed.md, with the command).

    python bench.py --what forward                  # DiT "S" forward on this CPU (about a minute)
    python bench.py --what forward --preset tiny    # smoke run, seconds
    python bench.py --what forward --device cuda --precision bf16   # one GPU
    python bench.py --what vae                      # VAE encode/decode ms per 96x96 frame, batch 1

--what forward: full-window DiT forward throughput (tokens/s, frames/s) at each batch
size, and the generation step: forward_cached of one new frame against `context`
cached frames versus the naive full-window forward, plus the per-frame cost of
committing a finished frame and trimming the cache.
--what vae: encode and decode time of one 96x96 frame for every config in VAE_CONFIGS (+ DECODER_CONFIGS).
--what generate: end-to-end generation frames/s (DiT + VAE decode, uint8 frames out) of
engine.WorldModel in steady state (window full): the naive sampler that re-runs the whole
window at every denoising step (Oasis's loop) against the KV-cached one, same run, with ratios;
the last row also decodes on a second thread (step_pipelined), as generate.py and play.py do.
    python bench.py --what generate                       # the bundled model, batch 1 and 8
    python bench.py --what generate --device cuda --gen-batches 1,64,256,1024
--what train: training throughput and MFU (on CUDA) against size and batch: DiT XS, S, B and two VAEs, one table.
A batch of `auto` is the rule that fills the GPU (train_batch_rule: about --train-tokens tokens a step, halved
until autograd's saved activations fit the free memory); --compile adds a torch.compile'd row at the last batch,
--clean-copy a row per batch timing train.py dit --clean-copy's pass (the window twice).
    python bench.py --what train --device cuda --precision bf16 --window 6 --train-models XS,XS1 \
        --train-batch 64,auto --compile
--what precision: fp32 against bf16 autocast, side by side at each of --precision-threads: training samples/s of
the shipped shapes (DiT --train-models at --train-batch x --window, each --train-vaes at --vae-batch) and
generation frames/s at batch 1 (chunk+pipeline, as play.py runs), with the ratio.
    python bench.py --what precision --window 6 --train-models XS --train-vaes pong_cpu --train-batch 16 \
        --vae-batch 8 --gen-frames 40
--what attention: attention.attend against F.scaled_dot_product_attention on --model's shapes (spatial: a frame's
tokens; temporal: --window frames, causal; and one generated frame against the cached ones), fp32 and bf16; and
rotary_embedding_torch.apply_rotary_emb against the textbook rotation on the training shapes.
    python bench.py --what attention --window 6 --train-batch 16 --threads 1
"""

import dataclasses
import functools
import math
import os
import statistics
import time

import torch

import utils
from dit import DEFAULT_MODEL, DiT_models
from utils import arg, die, parse_config, peak_flops, pick_device, seed_everything
from uvit_vae import DECODER_CONFIGS, VAE_CONFIGS, build_vae


@dataclasses.dataclass
class BenchConfig:
    what: str = arg(
        "forward", "which benchmark to run", choices=["forward", "vae", "generate", "train", "precision", "attention"]
    )
    ckpt: str = arg("", "generate: DiT checkpoint (default: the bundled one, else a random --model with pong_cpu)")
    steps: int = arg(2, "generate: DDIM steps per frame")
    gen_frames: int = arg(24, "generate: timed frames per measurement, after the window is full")
    gen_batches: str = arg("1,8", "generate: comma-separated batch sizes")
    train_batch: str = arg("16", "train: DiT windows per step, comma-separated; auto: train_batch_rule's")
    train_tokens: int = arg(2**18, "train: the auto batch's target tokens a step (a power of two of windows near it)")
    train_memory: float = arg(0.6, "train: share of the free device memory the auto batch's activations may take")
    compile: bool = arg(False, "train: also time each DiT torch.compile'd, at the last batch (compile time shown)")
    clean_copy: bool = arg(
        False, "train: also time each DiT step as train.py dit --clean-copy runs it (the window twice)"
    )
    train_models: str = arg("XS,S,B", "train: comma-separated DiT sizes (dit.DiT_models keys)")
    train_vaes: str = arg("pong_cpu,pong", "train: comma-separated VAE configs (uvit_vae.VAE_CONFIGS keys)")
    vae_batch: int = arg(64, "train: VAE frames per step")
    model: str = arg(DEFAULT_MODEL, "forward, generate: DiT size from dit.DiT_models", choices=sorted(DiT_models))
    patch_size: int = arg(0, "forward, generate: a random DiT of --model with this patch size (0: as --model)")
    hidden_size: int = arg(0, "forward, generate: ... and this width, 64 per head (0: as --model)")
    window: int = arg(16, "frames per window T (the DiT's window; the cached step sees window - 1 frames)")
    batches: str = arg("1,32", "comma-separated batch sizes for the full forward")
    warmup: int = arg(2, "untimed calls before timing")
    repeats: int = arg(5, "timed calls; the median is reported")
    threads: int = arg(0, "torch CPU threads (0: torch's default)")
    device: str = arg("cpu", "cpu or cuda")
    precision: str = arg(
        "fp32", "fp32, or bf16 under autocast (weights fp32, as train.py runs it)", choices=["fp32", "bf16"]
    )
    precision_threads: str = arg("1,2", "precision: comma-separated CPU thread counts to compare at")
    seed: int = arg(0, "random seed for weights and inputs")


PRESETS = {
    "tiny": dict(
        model="tiny",
        window=4,
        batches="1,2",
        warmup=1,
        repeats=2,
        train_models="tiny",
        train_vaes="pong_fast",
        train_batch="2",
        train_tokens=512,
        vae_batch=2,
    )
}


def timeit(fn, cfg):
    """Median wall time of fn() in seconds, after cfg.warmup untimed calls."""
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    for _ in range(cfg.warmup):
        fn()
    sync()
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def autocast(cfg):
    return utils.autocast(cfg.precision, cfg.device)


def random_inputs(model, b, t, device):
    x = torch.randn(b, t, model.in_channels, model.input_h, model.input_w, device=device)
    ts = torch.randint(0, 1000, (b, t), device=device)
    a = torch.nn.functional.one_hot(torch.randint(0, model.action_dim, (b, t), device=device), model.action_dim)
    return x, ts, a.float()


def random_dit(cfg):
    """A random DiT of --model, with --patch-size and --hidden-size when given."""
    kw = dict(window=cfg.window) | ({"patch_size": cfg.patch_size} if cfg.patch_size else {})
    if cfg.hidden_size:
        kw |= dict(hidden_size=cfg.hidden_size, num_heads=max(1, cfg.hidden_size // 64))
    return DiT_models[cfg.model](**kw).to(cfg.device).eval()


def bench_forward(cfg):
    """DiT forward throughput, and the cached single-frame step against the full-window forward."""
    model = random_dit(cfg)
    tokens_per_frame = model.grid_h * model.grid_w
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DiT-{cfg.model}: {n_params / 1e6:.2f}M params, {tokens_per_frame} tokens/frame, device {cfg.device}")
    print(f"threads {torch.get_num_threads()}, {cfg.precision}, median of {cfg.repeats} after {cfg.warmup} warmup")
    results = {}
    with torch.inference_mode(), autocast(cfg):
        for b in [int(s) for s in cfg.batches.split(",")]:
            x, t, a = random_inputs(model, b, cfg.window, cfg.device)
            sec = timeit(lambda x=x, t=t, a=a: model(x, t, a), cfg)
            fps = b * cfg.window / sec
            results[f"forward_b{b}"] = sec
            print(
                f"full forward  B={b:<3} T={cfg.window}: {sec * 1e3:9.1f} ms  "
                f"{fps * tokens_per_frame:10.0f} tokens/s  {fps:8.1f} frames/s"
            )

        # generation step: one new frame against window - 1 cached frames, batch 1
        n = cfg.window - 1
        x, t, a = random_inputs(model, 1, n + 1, cfg.device)
        cache = model.new_cache()
        model.forward_cached(x[:, :n], t[:, :n], a[:, :n], cache, keep=True)
        step = timeit(lambda: model.forward_cached(x[:, n:], t[:, n:], a[:, n:], cache), cfg)
        naive = timeit(lambda: model(x, t, a), cfg)
        results.update(cached_step=step, window_forward=naive)
        print(f"cached step   B=1 n=1 after {n} frames: {step * 1e3:9.2f} ms")
        print(f"naive window  B=1 T={n + 1}:            {naive * 1e3:9.2f} ms   ({naive / step:.1f}x the cached step)")

        # once per generated frame: commit it, then trim the window back to n frames
        def commit_and_trim(exact):
            model.forward_cached(x[:, n:], t[:, n:], a[:, n:], cache, keep=True)
            model.trim_cache(cache, n, exact=exact)

        for exact in (False, True):
            sec = timeit(lambda exact=exact: commit_and_trim(exact), cfg)
            results[f"commit_trim_{'exact' if exact else 'streaming'}"] = sec
            how = "exact (re-encode window)" if exact else "streaming (drop K/V)"
            print(f"commit + trim, {how}: {sec * 1e3:9.2f} ms per generated frame")
    return results


def bench_vae(cfg):
    """Encode and decode time of one 96x96 frame (12x12x4 latent) at batch 1, for each VAE config."""
    print(f"device {cfg.device}, threads {torch.get_num_threads()}, median of {cfg.repeats} after {cfg.warmup} warmup")
    results = {}
    with torch.inference_mode(), autocast(cfg):
        variants = [(name, {}) for name in VAE_CONFIGS]
        variants += [(f"pong_cpu+{d}", {"decoder": DECODER_CONFIGS[d]}) for d in DECODER_CONFIGS]
        for name, kw in variants:
            vae = build_vae(name.split("+")[0], **kw).to(cfg.device).eval()
            vae = vae.to(memory_format=torch.channels_last)  # as engine.load_vae runs it
            x = torch.rand(1, 3, 96, 96, device=cfg.device) * 2 - 1
            z = torch.randn(1, 4, 12, 12, device=cfg.device)
            enc = timeit(functools.partial(vae.encode, x), cfg)
            dec = timeit(functools.partial(vae.decode, z), cfg)
            results[name] = dict(encode=enc, decode=dec)
            n_params = sum(p.numel() for p in vae.parameters())
            print(f"{name:>13}: {n_params / 1e6:6.2f}M params  encode {enc * 1e3:8.1f} ms  decode {dec * 1e3:8.1f} ms")
    return results


def load_engine_parts(cfg):
    """(dit, vae, latent_scale, name) from --ckpt, the bundled checkpoint, or random weights."""
    import engine

    path = cfg.ckpt or (engine.DEFAULT_CKPT if os.path.isfile(engine.DEFAULT_CKPT) else "")
    if path:
        dit, config, _ = engine.load_dit(path, cfg.device)
        vae = engine.load_vae(engine.find_vae(path, config), cfg.device)
        if cfg.patch_size or cfg.hidden_size:  # another shape at the same speed test, on this VAE
            dit = random_dit(cfg)
            path = f"random DiT-{cfg.model}, patch {dit.patch_size}, width {dit.hidden_size} + the VAE of {path}"
        return dit, vae, config["latent_scale"], path
    dit = random_dit(cfg)
    return dit, build_vae("pong_cpu").to(cfg.device).eval(), 1.0, f"random DiT-{cfg.model} + pong_cpu VAE"


def time_engine(eng, step, prompt, actions, window, cfg, sync):
    """Steady-state steps/s of one engine (its own precision): fill the window, run a full chunk cycle, then time."""
    eng.reset(prompt)
    for _ in range(window + window // 2 + cfg.warmup):  # every cache state seen (and captured) once
        step(actions)
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.gen_frames):  # pipelined: each call hands over the previous frame
        step(actions).cpu()
    sync()
    steps_per_s = cfg.gen_frames / (time.perf_counter() - t0)
    eng.flush()  # the frame still decoding is not counted, so not timed either
    return steps_per_s


def bench_generate(cfg, only=None):
    """Generation frames/s, end to end: naive window re-run vs KV cache (exact, chunk, stream windows).

    only: the variants' labels to run (default all)."""
    import numpy as np

    import engine

    dit, vae, scale, name = load_engine_parts(cfg)
    size = dit.input_h * vae.downsample_factor
    print(
        f"model: {name}; {dit.window}-frame window, {cfg.steps} DDIM steps, {size}x{size} frames, "
        f"device {cfg.device}, threads {torch.get_num_threads()}, precision {cfg.precision}"
    )
    # (label, cached, slide, pipelined): the pipelined one decodes frame k on a second thread while the
    # DiT makes frame k+1, each stage with half the threads (engine.set_threads), as generate.py and play.py run
    variants = [
        ("naive", False, "exact", False),
        ("cached exact", True, "exact", False),
        ("cached chunk", True, "chunk", False),
        ("cached stream", True, "stream", False),
        ("chunk+pipeline", True, "chunk", True),
    ]
    if cfg.device.startswith("cuda") and cfg.precision == "fp32":  # each DiT pass replayed from a CUDA graph
        variants.append(("chunk+graph", True, "chunk", False))
    variants = [v for v in variants if only is None or v[0] in only]
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    threads = torch.get_num_threads()
    results = {}
    for b in [int(x) for x in cfg.gen_batches.split(",")]:
        prompt = np.zeros((b, 1, size, size, 3), np.uint8)
        actions = torch.randint(0, dit.action_dim, (b,), device=cfg.device)
        for label, cached, slide, pipelined in variants:
            torch.set_num_threads(threads)
            if pipelined:
                engine.set_threads(0, cfg.device)
            graph = label.endswith("graph")
            kind = engine.WorldModel if cached else engine.NaiveWorldModel
            eng = kind(
                dit, vae, scale, cfg.device, steps=cfg.steps, slide=slide, cuda_graph=graph, precision=cfg.precision
            )
            step = eng.step_pipelined if pipelined else eng.step
            try:
                if graph:  # first check the replayed graphs against the eager engine, same seed
                    ref = engine.WorldModel(dit, vae, scale, cfg.device, steps=cfg.steps, slide=slide)
                    with autocast(cfg), torch.inference_mode():
                        ref.reset(prompt)
                        eng.reset(prompt)
                        diff = max(
                            (ref.step_latent(actions) - eng.step_latent(actions)).abs().max().item()
                            for _ in range(2 * dit.window)
                        )
                    print(f"batch {b:<5} {label:<15} max latent difference to eager: {diff:.2e}")
                fps = time_engine(eng, step, prompt, actions, dit.window, cfg, sync)
            except RuntimeError as e:  # the graph path has not run on a GPU yet: report, go on with the rest
                if not graph:
                    raise
                print(f"batch {b:<5} {label:<15} failed: {str(e).splitlines()[0][:200]}")
                continue
            results[(b, label)] = b * fps  # frames/s in total, all b streams
            naive = results.get((b, "naive"))
            ratio = f"{results[(b, label)] / naive:4.1f}x naive" if naive else "naive not run"
            how = f"{torch.get_num_threads()}+{torch.get_num_threads()}" if pipelined else f"{threads}"
            print(
                f"batch {b:<5} {label:<15} {b * fps:10.1f} frames/s in total ({fps:7.1f} per stream, "
                f"{ratio})  threads {how}"
            )
    torch.set_num_threads(threads)
    return results


def saved_bytes(model, window, dtype=torch.bfloat16, n=2):
    """Bytes autograd keeps for the backward pass, per training window: one forward of n windows, counted.

    On a CPU the attention saves more than CUDA's fused kernels, so a count made there errs on the safe side.
    """
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    dev = next(model.parameters()).device
    inputs = random_inputs(model, n, window, dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(dev.type, dtype=dtype):
        model(*inputs)
    return sum(storages.values()) / n


def train_batch_rule(model, window, memory, tokens=2**18):
    """The batch that fills a GPU: the power of two of windows nearest `tokens` tokens a step (enough rows for
    a small model's matmuls to keep the GPU busy), halved until its saved activations fit in `memory` bytes."""
    per_window = window * model.grid_h * model.grid_w
    batch = 2 ** max(0, round(math.log2(max(1, tokens / per_window))))
    need = saved_bytes(model, window)
    while batch > 1 and batch * need > memory:
        batch //= 2
    return batch


def free_memory(device):
    """Free bytes on the device: the GPU's, or a quarter of the host's memory for a CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4


def bench_train(cfg):
    """Training throughput and MFU against model size and batch: DiT sizes (--train-models) and VAEs (--train-vaes).

    A step is forward + backward + AdamW on random inputs; its FLOPs are counted once with
    torch.utils.flop_counter (matmuls, convolutions, attention), so DiT and VAE rows compare.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not all(b.strip() == "auto" or b.strip().isdigit() for b in cfg.train_batch.split(",")):
        die(f"--train-batch {cfg.train_batch!r}: expected comma-separated window counts or auto, e.g. 64,auto")
    peak = peak_flops(cfg.device)
    rows = [("dit", m) for m in cfg.train_models.split(",") if m] + [("vae", v) for v in cfg.train_vaes.split(",") if v]
    print(f"device {cfg.device}, precision {cfg.precision}, median of {cfg.repeats} steps after {cfg.warmup} warmup")
    print(f"{'model':>12} {'params':>8} {'batch':>9} {'ms/step':>9} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6}  mode")
    results = {}
    for kind, name in rows:
        if kind == "dit":
            model = DiT_models[name](window=cfg.window).to(cfg.device)
            memory = free_memory(cfg.device) * cfg.train_memory
            auto = lambda m=model, mem=memory: train_batch_rule(m, cfg.window, mem, cfg.train_tokens)
            batches = [auto() if b.strip() == "auto" else int(b) for b in cfg.train_batch.split(",") if b.strip()]
        else:
            model = build_vae(name).to(cfg.device, memory_format=torch.channels_last)
            batches = [cfg.vae_batch]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as train.py on a CPU or CUDA
        modes = [(b, "eager") for b in batches] + ([(batches[-1], "compiled")] if cfg.compile and kind == "dit" else [])
        modes += [(b, "clean copy") for b in batches] if cfg.clean_copy and kind == "dit" else []
        flops_of = {}
        for n, mode in modes:
            if kind == "dit":
                inputs, label_b = random_inputs(model, n, cfg.window, cfg.device), f"{n}x{cfg.window}"
            else:
                inputs, label_b = (torch.rand(n, 3, 96, 96, device=cfg.device) * 2 - 1,), str(n)
            net = torch.compile(model) if mode == "compiled" else model

            copy = dict(clean=inputs[0]) if mode == "clean copy" else {}  # a clean copy: the window twice

            def step(net=net, inputs=inputs, kind=kind, opt=opt, copy=copy):
                with autocast(cfg):
                    out = net(*inputs, **copy)
                    loss = (out[0] if kind == "vae" else out).float().square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            if (n, bool(copy)) not in flops_of:
                with FlopCounterMode(display=False) as counter:
                    step()
                flops_of[n, bool(copy)] = counter.get_total_flops()
            else:
                step()  # the compiled step's first call: the compile
            first = time.perf_counter() - t0
            sec = timeit(step, cfg)
            flops = flops_of[n, bool(copy)] / sec
            mfu = f"{flops / peak:6.1%}" if peak else "   n/a"
            label = f"DiT-{name}" if kind == "dit" else name
            n_params = sum(p.numel() for p in model.parameters()) / 1e6
            how = f"compiled ({first:.0f}s to compile)" if mode == "compiled" else mode
            print(
                f"{label:>12} {n_params:7.1f}M {label_b:>9} {sec * 1e3:9.1f} {n / sec:10.1f} "
                f"{flops / 1e12:8.3g} {mfu}  {how}"
            )
            results[(label, n, mode)] = {
                "ms": sec * 1e3,
                "samples_s": n / sec,
                "flops_s": flops,
                "mfu": flops / peak if peak else None,
            }
    return results


def bench_precision(cfg):
    """fp32 against bf16 at each thread count, one run: training samples/s and generation frames/s, with ratios."""
    rows, counts = {}, [int(n) for n in cfg.precision_threads.split(",")]
    for threads in counts:
        torch.set_num_threads(threads)
        for precision in ("fp32", "bf16"):
            c = dataclasses.replace(cfg, precision=precision, gen_batches="1")
            print(f"--- {threads} thread(s), {precision}")
            train = {label: r["samples_s"] for (label, _, mode), r in bench_train(c).items() if mode == "eager"}
            gen = bench_generate(c, only=("chunk+pipeline",))
            rows[threads, precision] = train | {"generate (frames/s)": gen[1, "chunk+pipeline"]}
    print(f"\n{'':24}" + "".join(f"{f'{t} thr fp32':>12}{f'{t} thr bf16':>12}{'ratio':>7}" for t in counts))
    for name in rows[counts[0], "fp32"]:
        line = f"{name + ('' if '/s' in name else ' (samples/s)'):24}"
        for t in counts:
            a, b = rows[t, "fp32"][name], rows[t, "bf16"][name]
            line += f"{a:12.1f}{b:12.1f}{b / a:6.2f}x"
        print(line)
    return rows


BENCHES = {"forward": bench_forward, "vae": bench_vae, "generate": bench_generate, "train": bench_train}
BENCHES["precision"] = bench_precision


def bench_attention(cfg):
    """ms per call of F.scaled_dot_product_attention, attention.plain_attention and attention.attend (which picks one
    of them): training (forward + backward) at --train-batch x --window, generation (forward, batch 1), fp32, bf16."""
    from attention import attend, plain_attention
    from rotary_embedding_torch import apply_rotary_emb

    model = random_dit(cfg)
    nh, hd, B, T = model.num_heads, model.hidden_size // model.num_heads, int(cfg.train_batch.split(",")[0]), cfg.window
    n = model.input_h * model.input_w // model.patch_size**2  # tokens a frame
    sdpa = lambda q, k, v, causal: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    plain = lambda q, k, v, causal: plain_attention(q, k, v, is_causal=causal)
    ours = lambda q, k, v, causal: attend(q, k, v, is_causal=causal)
    cases = [  # name, q shape, k/v length, causal, backward
        (f"train spatial  {B * T}x{nh}x{n}", (B * T, nh, n, hd), n, False, True),
        (f"train temporal {B * n}x{nh}x{T}", (B * n, nh, T, hd), T, True, True),
        ("  forward only", (B * n, nh, T, hd), T, True, False),
        (f"gen spatial    1x{nh}x{n}", (1, nh, n, hd), n, False, False),
        (f"gen temporal   {n}x{nh}x1 vs {T}", (n, nh, 1, hd), T, False, False),
    ]
    print(f"{'':34}{'sdpa ms':>9}{'plain ms':>10}{'attend ms':>11}  sdpa/attend   (threads {torch.get_num_threads()})")
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, nk, causal, backward in cases:
            kv = (*shape[:2], nk, shape[3])
            q = torch.randn(shape, dtype=dtype, device=cfg.device, requires_grad=backward)
            k, v = (torch.randn(kv, dtype=dtype, device=cfg.device, requires_grad=backward) for _ in range(2))
            with torch.set_grad_enabled(backward):
                a, p, b = best_alternated(
                    cfg, [(run_attention, f, q, k, v, causal, backward) for f in (sdpa, plain, ours)]
                )
            print(f"{str(dtype)[6:]:9}{name:25}{a * 1e3:9.2f}{p * 1e3:10.2f}{b * 1e3:11.2f}{a / b:9.2f}x")
    print(f"\n{'RoPE on q and k, forward + backward':34}{'textbook':>9}{'ours ms':>10}{'ratio':>9}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, length in (("spatial", (2, B * T, nh, n, hd), n), ("temporal", (2, B * n, nh, T, hd), T)):
            angles = torch.rand(length, hd // 2, device=cfg.device).repeat_interleave(2, -1) * 6
            x = torch.randn(shape, dtype=dtype, device=cfg.device, requires_grad=True)
            a, b = best_alternated(cfg, [(run_rope, f, angles, x) for f in (textbook_rope, apply_rotary_emb)])
            print(f"{str(dtype)[6:]:9}{name:25}{a * 1e3:9.2f}{b * 1e3:10.2f}{a / b:8.2f}x")


def best_alternated(cfg, calls):
    """Seconds a call for each (fn, *args) in calls: the best of 3 rounds, the calls alternated in each (this
    machine's speed drifts)."""
    runs = [[timeit(functools.partial(*c), cfg) for c in calls] for _ in range(3)]
    return [min(t) for t in zip(*runs)]


def run_attention(fn, q, k, v, causal, backward):
    out = fn(q, k, v, causal)
    if backward:
        out.float().sum().backward()


def run_rope(fn, angles, x):
    fn(angles, x).float().sum().backward()


def textbook_rope(angles, t):
    """The naive rotation apply_rotary_emb replaces: x cos + rotate_half(x) sin, in float32."""
    x = t.float()
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    half = torch.stack((-x1, x0), dim=-1).flatten(-2)
    return (x * angles.cos() + half * angles.sin()).to(t.dtype)


BENCHES["attention"] = bench_attention


def main(cfg):
    cfg.device = str(pick_device(cfg.device))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    return BENCHES[cfg.what](cfg)


if __name__ == "__main__":
    main(parse_config(BenchConfig, presets=PRESETS, description=__doc__.splitlines()[0]))
