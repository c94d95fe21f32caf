"""What every test file shares: Ctrl-C for the children, and a bounded wait for a child's output."""

import os
import re
import select
import signal
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils  # noqa: E402

# A `make test` started in the background would hand the children it interrupts an ignored SIGINT.
utils.take_back_sigint()


@pytest.fixture
def read_until():
    """read_until(p, stream, pattern, timeout=300) -> the text read from the child's pipe up to `pattern`.

    It waits for an event (a line the child prints), not for a time, so a slow machine only waits
    longer. The timeout turns a hang into a failure that says where the child was: the child gets
    SIGABRT, and with PYTHONFAULTHANDLER=1 in its environment it prints every thread's stack."""

    def wait(p, stream, pattern, timeout=300):
        fd, seen, deadline = stream.fileno(), "", time.monotonic() + timeout
        while not re.search(pattern, seen):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                p.send_signal(signal.SIGABRT)
                _, err = p.communicate(timeout=30)
                pytest.fail(f"no {pattern!r} within {timeout} s; read: {seen[-1000:]!r}; stderr: {(err or '')[-3000:]}")
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:
                pytest.fail(f"the child ended before {pattern!r}: {seen[-2000:]}")
            seen += chunk
        return seen

    return wait


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny DiT + VAE in train.py's checkpoint format (the play, serve and browser tests), with random (not
    zero-initialised) output layers so the frames depend on the actions and the noise, and a 32x32 prompt PNG."""
    import cv2

    from dit import DiT_models
    from uvit_vae import build_vae

    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    dit = DiT_models["tiny"](input_h=4, input_w=4, window=4)
    vae = build_vae("pong", ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4)
    with torch.no_grad():  # adaLN-Zero makes a fresh DiT output 0 whatever the input; randomise it
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for m, name in ((dit, "dit"), (vae, "vae")):
        sd = m.state_dict()
        config = {"kind": name, "model": m.config}
        if name == "dit":
            config.update(latent_scale=1.0, vae_path="vae.pt")
        else:
            config.update(scaling_factor=1.0)
        ck = {"model": sd, "ema": sd, "optimizer": {}, "step": 0, "version": utils.CKPT_VERSION, "config": config}
        torch.save(ck, d / f"{name}.pt")
    prompt = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(d / "prompt.png"), prompt)
    return d


BREAKOUT_ACTIONS = ["NOOP", "FIRE", "RIGHT", "LEFT"]


@pytest.fixture(scope="session")
def tiny_breakout(tiny, tmp_path_factory):
    """The tiny model's VAE and prompt with a random 4-action DiT whose checkpoint names Breakout and its actions:
    a game that is not Pong (the play, serve and browser tests of the key mapping)."""
    import shutil

    from dit import DiT_models

    d = tmp_path_factory.mktemp("tiny_breakout")
    for name in ("vae.pt", "prompt.png"):
        shutil.copy(tiny / name, d / name)
    torch.manual_seed(1)
    dit = DiT_models["tiny"](input_h=4, input_w=4, window=4, action_dim=len(BREAKOUT_ACTIONS))
    with torch.no_grad():  # as tiny: random output layers, so the frames depend on the actions
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = dit.state_dict()
    config = {"kind": "dit", "model": dit.config, "latent_scale": 1.0, "vae_path": "vae.pt", "game": "breakout",
              "action_names": BREAKOUT_ACTIONS}  # fmt: skip
    ck = {"model": sd, "ema": sd, "optimizer": {}, "step": 0, "version": utils.CKPT_VERSION, "config": config}
    torch.save(ck, d / "dit.pt")
    return d
