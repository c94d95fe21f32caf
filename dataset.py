"""Recorded Pong episodes as a torch Dataset of short windows.

A recording directory (made by generate_dataset.py) holds episode_00000.npz, episode_00001.npz,
... Each episode file has N frames and these aligned arrays:
    frames  (N, H, W, 3) uint8   frames[k] is the k-th observation, frames[0] the reset one
    actions (N,) int64           actions[k] is taken after seeing frames[k]; it leads to frames[k+1]
                                 (actions[N-1] leads to a frame that is not stored)
    rewards (N,) float32         reward of the step that produced frames[k]; rewards[0] = 0
    dones   (N,) bool            True only at k = N-1
    t_index (N,) int64           t_index[k] = k
An item is a window of seq_len consecutive frames of one episode (stride 1, never across episodes).

Episodes are decompressed once, at construction, and kept in memory as uint8
(about 27.6 kB a frame at 96x96); only the conversion to float happens per item.

    python dataset.py data/pong --seq-len 8           # summary of the splits
    python dataset.py data/pong --bench               # items/s, single items and a DataLoader
"""

import dataclasses
import json
import os
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from utils import NUM_ACTIONS, arg, die, parse_config

EPISODE_KEYS = ("frames", "actions", "rewards", "dones", "t_index")


def list_episodes(root):
    """Sorted paths of root/episode_*.npz; FileNotFoundError / ValueError naming root if there are none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"recording directory not found: {root}")
    files = sorted(f for f in os.listdir(root) if f.startswith("episode_") and f.endswith(".npz"))
    if not files:
        raise ValueError(f"no episode_*.npz files in {root}")
    return [os.path.join(root, f) for f in files]


def read_meta(root):
    """root/meta.json (written by generate_dataset.py) as a dict; errors name the file."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (generate_dataset.py writes it)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or "frame_size" not in meta:
        raise ValueError(f"{path}: no 'frame_size' entry, not a generate_dataset.py meta.json")
    return meta


def _frames_shape(path):
    """Shape of frames.npy inside an .npz, read from its header without decompressing the frames."""
    with zipfile.ZipFile(path) as zf, zf.open("frames.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(f)
    if dtype != np.uint8:
        raise ValueError(f"frames are {dtype}, expected uint8")
    return shape


def load_episode(path, frames=True):
    """All arrays of one episode file as a dict; scalars (seed, agent, ...) become python values.

    frames=False skips decompressing the frames and adds "frames_shape" instead.
    Raises FileNotFoundError or ValueError naming the file if it is missing, corrupt or inconsistent.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"episode file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in EPISODE_KEYS if k not in z.files]
            if missing:
                raise ValueError(f"missing arrays {missing}")
            ep = {k: z[k] for k in z.files if k != "frames" or frames}
        shape = ep["frames"].shape if frames else _frames_shape(path)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: not a readable episode file ({type(e).__name__}: {e})") from None
    ep = {k: v.item() if v.ndim == 0 else v for k, v in ep.items()}
    n = len(ep["actions"])
    if len(shape) != 4 or shape[-1] != 3 or shape[0] != n or n == 0:
        raise ValueError(f"{path}: frames {tuple(shape)} do not match {n} actions (expected (N, H, W, 3))")
    if any(len(ep[k]) != n for k in EPISODE_KEYS[1:]):
        raise ValueError(f"{path}: arrays {EPISODE_KEYS} have different lengths")
    if ep["actions"].min() < 0 or ep["actions"].max() >= NUM_ACTIONS:
        raise ValueError(f"{path}: actions outside 0..{NUM_ACTIONS - 1}")
    if not frames:
        ep["frames_shape"] = tuple(int(s) for s in shape)
    return ep


def split_episodes(files, val_fraction=0.1):
    """Deterministic, disjoint (train, val) split by episode file name.

    The val set is the round(n * val_fraction) files (at least 1 when n >= 2 and val_fraction > 0,
    at most n - 1) with the smallest crc32 of their base name: the same on every machine and run.
    With a single episode, val is empty and train has it.
    """
    files = sorted(files)
    n = len(files)
    n_val = 0 if n < 2 or val_fraction <= 0 else min(n - 1, max(1, round(n * val_fraction)))
    by_hash = sorted(files, key=lambda f: zlib.crc32(os.path.basename(f).encode()))
    val = set(by_hash[:n_val])
    return [f for f in files if f not in val], [f for f in files if f in val]


def _episode_number(path, fallback):
    stem = os.path.splitext(os.path.basename(path))[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


class PongDataset(Dataset):
    """Windows of seq_len consecutive frames (or VAE latents) of recorded Pong episodes.

    Item: frames (T, 3, H, W) float32 in [-1, 1] (or latents (T, c, h, w) float32 when latent_dir
    is given: read from latent_dir/<episode stem>.npy, stored float16 (N, c, h, w); frames are then
    not loaded), actions (T,) int64, actions_onehot (T, 6) float32, t_index (T,) int64, episode int.
    actions[k] is the action taken at frame k; it leads to frame k+1, so the last action of a
    window leads outside it. split: "train", "val" (see split_episodes) or "all".
    """

    def __init__(self, root, seq_len, split="train", val_fraction=0.1, latent_dir=None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        files = list_episodes(root)
        train, val = split_episodes(files, val_fraction)
        self.files = {"train": train, "val": val, "all": files}[split]
        self.seq_len, self.latent_dir = seq_len, latent_dir
        self.data, self.actions, self.t_index, self.episodes = [], [], [], []
        for i, path in enumerate(self.files):
            ep = load_episode(path, frames=latent_dir is None)
            n = len(ep["actions"])
            if latent_dir is None:
                self.data.append(ep["frames"])  # (N, H, W, 3) uint8
            else:
                self.data.append(self._load_latents(path, n))  # (N, c, h, w) float16
            self.actions.append(torch.from_numpy(ep["actions"].astype(np.int64)))
            self.t_index.append(torch.from_numpy(ep["t_index"].astype(np.int64)))
            self.episodes.append(_episode_number(path, i))
        windows = [max(0, len(a) - seq_len + 1) for a in self.actions]
        self.offsets = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)  # item i -> episode

    def _load_latents(self, path, n):
        stem = os.path.splitext(os.path.basename(path))[0]
        lpath = os.path.join(self.latent_dir, stem + ".npy")
        if not os.path.isfile(lpath):
            raise FileNotFoundError(f"latent file not found: {lpath} (for {path})")
        try:
            lat = np.load(lpath, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{lpath}: not a readable .npy file ({type(e).__name__}: {e})") from None
        if lat.ndim != 4 or len(lat) != n or not np.issubdtype(lat.dtype, np.floating):
            raise ValueError(f"{lpath}: latents {lat.dtype}{lat.shape}, expected float16 ({n}, c, h, w)")
        return lat

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        e = int(np.searchsorted(self.offsets, i, side="right")) - 1
        s = slice(i - int(self.offsets[e]), i - int(self.offsets[e]) + self.seq_len)
        actions = self.actions[e][s]
        item = {
            "actions": actions,
            "actions_onehot": F.one_hot(actions, NUM_ACTIONS).float(),
            "t_index": self.t_index[e][s],
            "episode": self.episodes[e],
        }
        # numpy, not torch: on a busy 2-core machine torch's two intra-op threads made this 100x slower
        if self.latent_dir is None:
            x = np.ascontiguousarray(self.data[e][s].transpose(0, 3, 1, 2), dtype=np.float32)  # (T, 3, H, W)
            x /= 127.5
            x -= 1.0
            item["frames"] = torch.from_numpy(x)
        else:
            item["latents"] = torch.from_numpy(self.data[e][s].astype(np.float32))  # (T, c, h, w)
        return item


@dataclasses.dataclass
class Config:
    seq_len: int = arg(8, "frames per item")
    split: str = arg("all", "which episodes", choices=["train", "val", "all"])
    val_fraction: float = arg(0.1, "fraction of episodes held out for validation")
    latent_dir: str = arg("", "serve latents from this directory instead of frames")
    bench: bool = arg(False, "measure items/s instead of printing a summary")
    items: int = arg(2000, "items read per benchmark")
    batch_size: int = arg(32, "DataLoader batch size in the benchmark")
    num_workers: int = arg(0, "DataLoader workers in the benchmark")
    threads: int = arg(1, "torch threads in the benchmark (0: torch's default)")
    seed: int = arg(0, "seed of the random item order")


def main(root, cfg):
    t0 = time.perf_counter()
    try:
        ds = PongDataset(root, cfg.seq_len, cfg.split, cfg.val_fraction, cfg.latent_dir or None)
        train, val = split_episodes(list_episodes(root), cfg.val_fraction)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    load_s = time.perf_counter() - t0
    frames = sum(len(a) for a in ds.actions)
    print(
        f"{root}: {len(train)} train + {len(val)} val episodes; split {cfg.split!r}: {len(ds.files)} episodes, "
        f"{frames} frames, {len(ds)} windows of {cfg.seq_len} (loaded in {load_s:.2f}s)"
    )
    if not cfg.bench:
        return
    if len(ds) == 0:
        die(f"no windows of {cfg.seq_len} frames in split {cfg.split!r} of {root}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randint(len(ds), (cfg.items,), generator=g).tolist()
    t0 = time.perf_counter()
    for i in idx:
        ds[i]
    single = cfg.items / (time.perf_counter() - t0)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, generator=g)
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["actions"])
        if n >= cfg.items:
            break
    batched = n / (time.perf_counter() - t0)
    key = "latents" if cfg.latent_dir else "frames"
    print(
        f"{key} {tuple(ds[0][key].shape)}: {single:.0f} items/s single (random order), "
        f"{batched:.0f} items/s DataLoader(batch_size={cfg.batch_size}, num_workers={cfg.num_workers}), "
        f"torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    root, cfg = parse_config(Config, positional=("root", None, "recording directory"), description=__doc__)
    main(root, cfg)
