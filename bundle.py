"""Export a trained DiT and its VAE as small fp16 checkpoints that ship with the repository.

    python bundle.py --dit runs/dit --out checkpoints

With --samples-from EPISODE.npz (a recorded episode) it also writes the sample files: for Pong
sample_data/: prompt.png (frame --samples-start), actions_rally.pt (the recorded actions from there),
actions_up.pt / actions_down.pt (RIGHT / LEFT held) and heldout_episode.npz (a copy); for another
game sample_data/GAME/: prompt.png, actions.pt (recorded) and heldout_episode.npz.

Writes OUT/GAME_dit.pt and OUT/GAME_vae.pt, GAME the game the DiT was trained on (pong_dit.pt ...),
EMA weights in fp16, no optimizer state. The DiT file records the VAE by its file name, so
generate.py finds it beside it. Both load with torch.load(weights_only=True). A VAE that is already
a bundle (--vae checkpoints/pong_vae.pt) is copied byte for byte, so a DiT fine-tuned on its latents
goes beside the shipped VAE file as it is.
"""

import os
import shutil
from dataclasses import dataclass

import torch

import games
import utils
from utils import arg


@dataclass
class BundleConfig:
    dit: str = arg("runs/dit", "DiT run dir or ckpt.pt")
    vae: str = arg("", "VAE ckpt; default: the one the DiT checkpoint records")
    out: str = arg("checkpoints", "output directory")
    samples_from: str = arg("", "recorded episode .npz to cut sample_data/ from (empty: skip)")
    samples_start: int = arg(200, "frame of that episode used as the prompt")
    samples_len: int = arg(240, "actions per sample file")
    samples_dir: str = arg(
        "", "where --samples-from writes; empty: the repository's sample_data/ (generate.py reads it)"
    )


def slim(ckpt):
    """EMA weights only, in fp16; the optimizer and raw weights are dropped."""
    ema = {k: (v.half() if v.is_floating_point() else v) for k, v in ckpt["ema"].items()}
    return {"ema": ema, "step": ckpt["step"], "config": ckpt["config"], "version": ckpt["version"]}


def is_bundle(path):
    """Whether a checkpoint is already a bundle: EMA weights in fp16 and nothing else."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    weights = [v for v in ck.get("ema", {}).values() if v.is_floating_point()]
    return set(ck) == {"ema", "step", "config", "version"} and all(v.dtype == torch.float16 for v in weights)


def write_samples(cfg, game):
    """The sample files where generate.py and play.py look for them by default (engine.sample_path)."""
    import cv2

    import dataset
    from engine import SAMPLE_DIR, sample_path

    ep = dataset.load_episode(cfg.samples_from)
    k, n = cfg.samples_start, cfg.samples_len
    if not 0 <= k < len(ep["frames"]):
        utils.die(f"--samples-start {k}: {cfg.samples_from} has {len(ep['frames'])} frames")
    prompt, actions = (sample_path(game, kind, cfg.samples_dir or SAMPLE_DIR) for kind in ("prompt", "actions"))
    out_dir = os.path.dirname(prompt)
    os.makedirs(out_dir, exist_ok=True)
    utils._atomic(prompt, lambda tmp: cv2.imwrite(tmp, cv2.cvtColor(ep["frames"][k], cv2.COLOR_RGB2BGR)))
    files = {actions: torch.from_numpy(ep["actions"][k : k + n].copy())}
    if game == "pong":  # the paddle held up or down, for generate.py --actions
        import pong

        files |= {
            os.path.join(out_dir, f"actions_{d}.pt"): torch.full((n,), a)
            for d, a in (("up", pong.UP), ("down", pong.DOWN))
        }
    for path, a in files.items():
        utils.atomic_torch_save(a, path)
    shutil.copyfile(cfg.samples_from, os.path.join(out_dir, "heldout_episode.npz"))
    names = ", ".join(os.path.basename(p) for p in files)
    print(f"wrote {out_dir}/: prompt.png (frame {k} of {cfg.samples_from}), {names}, heldout_episode.npz")


def main(cfg):
    from engine import find_vae

    dit_path = utils.resolve_ckpt_path(cfg.dit)
    dit = utils.load_checkpoint(dit_path, kind="dit")
    game = games.from_config(dit["config"])[0]
    if cfg.samples_from:
        write_samples(cfg, game)
    vae_path = find_vae(dit_path, dit["config"], cfg.vae)
    vae = utils.load_checkpoint(vae_path, kind="vae")
    out_vae, out_dit = (os.path.join(cfg.out, f"{game}_{kind}.pt") for kind in ("vae", "dit"))
    if is_bundle(vae_path):  # byte for byte: its fingerprint, latent cache and the DiTs trained on it stay valid
        if os.path.abspath(vae_path) != os.path.abspath(out_vae):
            utils._atomic(out_vae, lambda tmp: shutil.copyfile(vae_path, tmp))
    else:
        utils.atomic_torch_save(slim(vae), out_vae)  # re-bundling in place writes the same bytes (same latent cache)
    small = slim(dit)
    # the bundled pair: the DiT fine-tunes (train.py dit --init) on the bundled VAE's latents
    small["config"] |= {"vae_path": os.path.basename(out_vae), "vae_fingerprint": utils.file_fingerprint(out_vae)}
    utils.atomic_torch_save(small, out_dit)
    for p in (out_vae, out_dit):
        print(f"wrote {p}: {os.path.getsize(p) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(utils.parse_config(BundleConfig, description=__doc__.splitlines()[0]))
