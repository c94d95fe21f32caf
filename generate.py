"""Roll out a game (Pong, or the game the model was trained on) from one frame and a stream of actions, with
no emulator in the loop.

With the bundled model and sample files (CPU is fine):
    python generate.py
Your own model, prompt and actions (mp4, gif, or .npz of raw uint8 frames (N, H, W, 3)):
    python generate.py --ckpt runs/dit/ckpt.pt --prompt frame.png --actions actions.pt --frames 120 --out out.mp4
Replay a recorded episode: real (left) and generated (right) side by side, same actions:
    python generate.py --episode data/pong/episode_00003.npz --start 100 --frames 64 --out replay.mp4
One GPU:
    python generate.py --device cuda --cuda-graph

Actions follow the recorder's convention: actions[k] is the action taken after
frame k and leads to frame k+1, so actions[0] moves the game on from the prompt.
A .pt holds indices (T,) in [0, A) or one-hot (T, A), A the game's action count; the checkpoint names
the actions (Pong's: NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE; the startup line prints them).
The engine (the KV-cached sampler, the pipelined decode) is engine.WorldModel.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import utils
from engine import THREADS_HELP, ModelConfig, load_world_model, read_actions, read_prompt, sample_path, set_threads
from utils import arg


@dataclass
class GenerateConfig(ModelConfig):
    prompt: str = arg(
        "", "prompt frame(s): a PNG/JPG, or an .npz of uint8 (n, H, W, 3); default: the model's game's sample_data"
    )
    actions: str = arg("", "actions .pt: indices (T,) or one-hot (T, A); default: the model's game's sample_data")
    frames: int = arg(120, "frames to write, prompt included")
    out: str = arg("runs/generated.mp4", "output: .mp4, .gif or .npz")
    fps: int = arg(15, "frames per second of the video")
    scale: int = arg(4, "nearest-neighbour upscaling of the video")
    batch: int = arg(1, "rollouts at once (different seeds); each is written as OUT with a _i suffix")
    episode: str = arg("", "replay a recorded episode .npz: prompt and actions from it, real beside generated")
    start: int = arg(0, "with --episode: the frame to start from")
    threads: int = arg(0, THREADS_HELP)


def main(cfg):
    stop = utils.INTERRUPTS.install()  # Ctrl-C / SIGTERM: stop between two frames, write those made so far
    device = utils.pick_device(cfg.device)
    if cfg.frames < 2:
        utils.die(f"--frames must be at least 2, found {cfg.frames}")
    if os.path.splitext(cfg.out)[1].lower() not in (".mp4", ".gif", ".npz"):
        utils.die(f"--out {cfg.out}: use a .mp4, .gif or .npz file name")
    set_threads(cfg.threads, device)
    engine = load_world_model(cfg, device)
    print(f"{engine.game}: actions " + " ".join(f"{i}={n}" for i, n in enumerate(engine.action_names)))
    real = None
    if cfg.episode:
        import dataset

        try:
            ep = dataset.load_episode(cfg.episode)
        except (FileNotFoundError, ValueError) as e:
            utils.die(str(e))
        end = min(len(ep["frames"]), cfg.start + cfg.frames)
        prompt, actions = ep["frames"][cfg.start : cfg.start + 1], torch.from_numpy(ep["actions"][cfg.start : end - 1])
        real = ep["frames"][cfg.start : end]
    else:
        prompt = read_prompt(cfg.prompt or sample_path(engine.game, "prompt"), engine.frame_size)
        actions = read_actions(cfg.actions or sample_path(engine.game, "actions"), engine.num_actions)
    n_actions = cfg.frames - 1
    if len(actions) < n_actions:  # repeat the stream to the requested length
        actions = (
            actions.repeat(n_actions // max(1, len(actions)) + 1)[:n_actions]
            if len(actions)
            else torch.zeros(n_actions, dtype=torch.long)
        )
    actions = actions[:n_actions]
    n = len(prompt)  # with several prompt frames, actions[:n-1] are the moves between them
    if n >= cfg.frames:
        utils.die(f"--frames {cfg.frames}: must exceed the {n} prompt frames")

    from tqdm import tqdm

    rep = lambda z: np.repeat(np.asarray(z)[None], cfg.batch, 0)
    engine.reset(rep(prompt), rep(actions[: n - 1]) if n > 1 else None)
    frames = [rep(prompt)]  # (batch, n, H, W, 3)
    a = actions.to(device)
    for k in tqdm(range(n - 1, len(actions)), desc="generating", unit="frame"):
        if stop:
            break
        frame = engine.step_pipelined(a[k : k + 1].expand(cfg.batch))  # the previous frame, or None
        if frame is not None:
            frames.append(frame.cpu().numpy()[:, None])
    last = engine.flush()
    if last is not None:
        frames.append(last.cpu().numpy()[:, None])
    frames = np.concatenate(frames, 1)  # (batch, N, H, W, 3)
    if stop:
        print(f"interrupted ({stop.name}) after {frames.shape[1]} of {cfg.frames} frames; writing those")
    for b in range(cfg.batch):
        video = frames[b]
        if real is not None:
            video = np.concatenate([real[: len(video)], video[: len(real)]], axis=2)
            print(f"PSNR vs the real frames: {utils.psnr(real[1:], frames[b][1 : len(real)]).mean():.2f} dB")
        root, ext = os.path.splitext(cfg.out)
        path = cfg.out if cfg.batch == 1 else f"{root}_{b}{ext}"
        utils.write_video(path, video, cfg.fps, 1 if ext == ".npz" else cfg.scale)
        print(f"wrote {path}: {len(video)} frames")
    if stop:
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    cfg = utils.parse_config(GenerateConfig, description=__doc__.splitlines()[0])
    try:
        main(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first frame
        utils.die("interrupted", 130)
