"""Recorded episodes (of Pong, or of any game) as a torch Dataset of short windows.

The data format, the contract every script reads: a recording directory holds a meta.json and
episode_00000.npz, episode_00001.npz, ... generate_dataset.py writes them from ALE, but any source
will do. meta.json names the actions, {"game": "breakout", "action_names": ["NOOP", "FIRE", ...]}
(more entries are kept and ignored). Each episode file has N frames and these aligned arrays:
    frames  (N, S, S, 3) uint8   frames[k] is the k-th observation; S a multiple of 8, the same in a dir
    actions (N,) int64           actions[k] is taken after seeing frames[k]; it leads to frames[k+1]
                                 (actions[N-1] leads to a frame that is not stored); 0 <= actions < A
and optionally (generate_dataset.py writes them; missing ones are filled in as shown):
    rewards (N,) float32         reward of the step that produced frames[k]; rewards[0] = 0 (zeros)
    dones   (N,) bool            True only at k = N-1
    t_index (N,) int64           t_index[k] = k
An item is a window of `window` consecutive frames of one episode (stride 1, never across episodes),
and what the DiT is conditioned on: at frame j, the action that led to it (actions[j-1]; zeros at
j = 0 of a window, where it is unknown).

EpisodeDataset holds every frame of its episodes, decompressed once, in one uint8 tensor (about
27.6 kB a frame at 96x96) on any device; or, for the DiT, the VAE latents of those frames from
the latent cache (<episode dir>/latents/<VAE fingerprint>/episode_*.npy, built once by
build_latent_cache). train.py samples batches of windows straight from it on the GPU
(`sample`); a DataLoader can read single items (`ds[i]`).

    python dataset.py data/pong --window 8            # summary of the splits
    python dataset.py data/pong --bench               # items/s, single items and a DataLoader
    python dataset.py data/pong --vae runs/vae        # the same, serving that VAE's cached latents
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

import games
from utils import arg, atomic_save_npy, die, file_fingerprint, parse_config, resolve_ckpt_path

EPISODE_KEYS = ("frames", "actions")  # required; rewards, dones and t_index are filled in when missing


def list_episodes(root):
    """Sorted paths of root/episode_*.npz; FileNotFoundError / ValueError naming root if there are none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"recording directory not found: {root}")
    files = sorted(f for f in os.listdir(root) if f.startswith("episode_") and f.endswith(".npz"))
    if not files:
        raise ValueError(f"no episode_*.npz files in {root}")
    return [os.path.join(root, f) for f in files]


def read_meta(root):
    """root/meta.json (generate_dataset.py writes it; see the data format above) as a dict; errors name the file."""
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (it names the game's actions: see the data format in dataset.py)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object")
    return meta


def read_game(data):
    """(game, action names) of comma-separated recording dirs; a ValueError if they differ or name none."""
    found = set()
    for d in data.split(","):
        try:
            found.add(json.dumps(games.from_config(read_meta(d))))
        except ValueError as e:
            raise ValueError(f"--data {d}: meta.json {e}") from None
    if len(found) > 1:
        raise ValueError(f"--data {data}: the directories hold different games or action sets: {sorted(found)}")
    game, names = json.loads(found.pop())
    return game, names


def _frames_shape(path):
    """Shape of frames.npy inside an .npz, read from its header without decompressing the frames."""
    with zipfile.ZipFile(path) as zf, zf.open("frames.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(f)
    if dtype != np.uint8:
        raise ValueError(f"frames are {dtype}, expected uint8")
    return shape


def load_episode(path, frames=True, num_actions=None):
    """All arrays of one episode file as a dict; scalars (seed, agent, ...) become python values.

    frames=False skips decompressing the frames and adds "frames_shape" instead. num_actions: check the
    actions against the game's count.
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
    ep.setdefault("rewards", np.zeros(n, np.float32))
    ep.setdefault("dones", np.arange(n) == n - 1)
    ep.setdefault("t_index", np.arange(n))
    if any(len(ep[k]) != n for k in ("actions", "rewards", "dones", "t_index")):
        raise ValueError(f"{path}: arrays actions, rewards, dones, t_index have different lengths")
    if not np.issubdtype(ep["actions"].dtype, np.integer):
        raise ValueError(f"{path}: actions are {ep['actions'].dtype}, expected integers")
    if ep["actions"].min() < 0 or (num_actions is not None and ep["actions"].max() >= num_actions):
        raise ValueError(f"{path}: actions outside 0..{(num_actions or 1) - 1} (meta.json names {num_actions})")
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


def list_split(data, val_fraction=0.1, max_episodes=0):
    """Comma-separated recording dirs -> (train files, val files, frame size); each dir is split on its own.

    max_episodes > 0 keeps the first that many episodes of each dir. Errors are ValueErrors naming the dir.
    """
    train, val, sizes = [], [], set()
    for d in data.split(","):
        try:
            files = list_episodes(d)
            read_meta(d)
            h, w = _frames_shape(files[0])[1:3]
        except (FileNotFoundError, ValueError, OSError, KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"--data {d}: {e}") from None
        if h != w or h % 8:
            raise ValueError(f"--data {d}: frames are {h}x{w}; the VAE needs square frames, a multiple of 8")
        sizes.add(int(h))
        tr, va = split_episodes(files[:max_episodes] if max_episodes > 0 else files, val_fraction)
        train, val = train + tr, val + va
    if len(sizes) > 1:
        raise ValueError(f"--data {data}: the directories were recorded at different frame sizes {sorted(sizes)}")
    return train, val, sizes.pop()


def to_float_frames(x):
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1]."""
    return x.movedim(-1, -3).float().div(127.5).sub(1.0)


def to_uint8_frames(x):
    """float (..., 3, H, W) in [-1, 1] (clamped) -> uint8 numpy (..., H, W, 3): to_float_frames' inverse."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def prev_actions(actions, num_actions):
    """What the DiT sees at frame j: recorded actions (B, T) -> one-hot of actions[j-1] (B, T, A).

    The recorder's actions[k] is taken after frame k and leads to frame k+1. The first frame
    of a window gets zeros: "unknown", as for the first prompt frame when generating.
    """
    onehot = F.one_hot(actions, num_actions).float()  # (B, T, A)
    return torch.cat((torch.zeros_like(onehot[:, :1]), onehot[:, :-1]), dim=1)


class EpisodeDataset(Dataset):
    """Windows of `window` consecutive frames (or VAE latents) of recorded episodes, held on one device.

    files: episode paths (see list_split). latents: a VAE fingerprint (build_latent_cache): serve
    its cached latents times `scale` instead of frames, which are then not decompressed.
    ds.sample(B, gen) / ds.batch(idx) -> dict of batched tensors on the device:
        frames (B, T, 3, H, W) float32 in [-1, 1]  or  latents (B, T, c, h, w) float32
        actions (B, T) int64                       actions[:, k] is taken after frame k
        prev_actions (B, T, A) float32             what the DiT sees at frame j: one-hot actions[:, j-1]
    ds[i] gives one window with the same keys plus t_index (T,) and episode (its number).
    ds.data holds the stored frames, uint8 (N, H, W, 3), or latents (N, c, h, w), all episodes end to end.
    """

    def __init__(self, files, window, latents="", scale=1.0, device="cpu", num_actions=None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not files:
            raise ValueError("no episode files")
        # A, the one-hot width: the game's action count, from the first file's meta.json unless given
        self.num_actions = num_actions or len(read_game(os.path.dirname(files[0]) or ".")[1])
        self.files, self.window, self.latents, self.device = list(files), window, latents, torch.device(device)
        data, actions, self.episodes, starts, off = [], [], [], [], 0
        for i, path in enumerate(self.files):
            ep = load_episode(path, frames=not latents, num_actions=self.num_actions)
            n = len(ep["actions"])
            data.append(ep["frames"] if not latents else _load_latents(path, latents, n) * np.float32(scale))
            actions.append(ep["actions"])
            self.episodes.append(_episode_number(path, i))
            starts.extend(range(off, off + n - window + 1))
            off += n
        self.offsets = np.cumsum([0] + [len(a) for a in actions])  # frame index of each episode's start
        self.data = torch.from_numpy(np.concatenate(data)).to(self.device)
        self.actions = torch.from_numpy(np.concatenate(actions).astype(np.int64)).to(self.device)
        self.starts = torch.tensor(starts, dtype=torch.long, device=self.device)  # first frame of each window

    def __len__(self):
        return len(self.starts)

    def batch(self, idx):
        """Window indices (B,) -> the batch dict (see the class docstring)."""
        pos = self.starts[idx][:, None] + torch.arange(self.window, device=self.device)  # (B, T) frame indices
        x, actions = self.data[pos], self.actions[pos]
        out = {"latents": x} if self.latents else {"frames": to_float_frames(x)}
        return out | {"actions": actions, "prev_actions": prev_actions(actions, self.num_actions)}

    def sample(self, batch_size, gen):
        """A batch of windows drawn uniformly with replacement, by a generator on any device."""
        idx = torch.randint(len(self.starts), (batch_size,), generator=gen, device=gen.device)
        return self.batch(idx.to(self.device))

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = int(self.starts[i])
        if self.device.type == "cpu" and not self.latents:  # numpy: torch's intra-op threads made this slower
            s = slice(start, start + self.window)
            x = np.ascontiguousarray(self.data[s].numpy().transpose(0, 3, 1, 2), dtype=np.float32)  # (T, 3, H, W)
            x /= 127.5
            x -= 1.0
            actions = self.actions[s]
            prev = prev_actions(actions[None], self.num_actions)[0]
            item = {"frames": torch.from_numpy(x), "actions": actions, "prev_actions": prev}
        else:
            item = {k: v[0] for k, v in self.batch(torch.tensor([i], device=self.device)).items()}
        e = int(np.searchsorted(self.offsets, start, side="right")) - 1
        item["t_index"] = torch.arange(start - self.offsets[e], start - self.offsets[e] + self.window)
        return item | {"episode": self.episodes[e]}


def _episode_number(path, fallback):
    stem = os.path.splitext(os.path.basename(path))[0]
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


# -----------------------------------------------------------------------------
# the latent cache: each episode encoded once by a VAE


def latent_path(episode_file, fingerprint):
    stem = os.path.splitext(os.path.basename(episode_file))[0]
    return os.path.join(os.path.dirname(episode_file), "latents", fingerprint, stem + ".npy")


def _load_latents(path, fingerprint, n):
    lpath = latent_path(path, fingerprint)
    if not os.path.isfile(lpath):
        raise FileNotFoundError(f"latent file not found: {lpath} (for {path}; build_latent_cache writes it)")
    try:
        lat = np.load(lpath, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{lpath}: not a readable .npy file ({type(e).__name__}: {e})") from None
    if lat.ndim != 4 or len(lat) != n or not np.issubdtype(lat.dtype, np.floating):
        raise ValueError(f"{lpath}: latents {lat.dtype}{lat.shape}, expected float16 ({n}, c, h, w)")
    return lat.astype(np.float32)


@torch.no_grad()
def build_latent_cache(files, fingerprint, encode, master=True, chunk=256):
    """Encode every episode missing from the cache once: encode(uint8 (n, H, W, 3)) -> latents (n, c, h, w).

    The fingerprint names the VAE (utils.file_fingerprint of its checkpoint), so a new VAE gets a new
    cache; the recorder refuses to mix frame sizes in one directory, so a cache never goes stale.
    Each file is written atomically (a killed run keeps what was finished). Under DDP rank 0 writes.
    """
    todo = [f for f in files if not os.path.isfile(latent_path(f, fingerprint))]
    if master and todo:
        from tqdm import tqdm

        for f in tqdm(todo, desc="encoding the latent cache", unit="episode"):
            frames = load_episode(f)["frames"]
            lat = [torch.as_tensor(encode(c)).half().cpu() for c in np.split(frames, range(chunk, len(frames), chunk))]
            atomic_save_npy(latent_path(f, fingerprint), torch.cat(lat).numpy())
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    window: int = arg(8, "frames per item")
    split: str = arg("all", "which episodes", choices=["train", "val", "all"])
    val_fraction: float = arg(0.1, "fraction of episodes held out for validation")
    vae: str = arg("", "serve the latents this VAE (run dir or ckpt.pt) cached, instead of frames")
    bench: bool = arg(False, "measure items/s instead of printing a summary")
    items: int = arg(2000, "items read per benchmark")
    batch_size: int = arg(32, "DataLoader batch size in the benchmark")
    num_workers: int = arg(0, "DataLoader workers in the benchmark")
    threads: int = arg(1, "torch threads in the benchmark (0: torch's default)")
    seed: int = arg(0, "seed of the random item order")


def main(root, cfg):
    t0 = time.perf_counter()
    try:
        train, val, _ = list_split(root, cfg.val_fraction)
        fp = file_fingerprint(resolve_ckpt_path(cfg.vae)) if cfg.vae else ""
        ds = EpisodeDataset({"train": train, "val": val, "all": sorted(train + val)}[cfg.split], cfg.window, fp)
    except (FileNotFoundError, ValueError) as e:
        die(str(e))
    load_s = time.perf_counter() - t0
    print(
        f"{root}: {len(train)} train + {len(val)} val episodes; split {cfg.split!r}: {len(ds.files)} episodes, "
        f"{len(ds.data)} frames, {len(ds)} windows of {cfg.window} (loaded in {load_s:.2f}s)"
    )
    if not cfg.bench:
        return
    if len(ds) == 0:
        die(f"no windows of {cfg.window} frames in split {cfg.split!r} of {root}")
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
    n, t0 = 0, time.perf_counter()
    while n < cfg.items:
        n += len(ds.sample(cfg.batch_size, g)["actions"])
    sampled = n / (time.perf_counter() - t0)
    key = "latents" if cfg.vae else "frames"
    print(
        f"{key} {tuple(ds[0][key].shape)}: {single:.0f} items/s single (random order), "
        f"{batched:.0f} items/s DataLoader(batch_size={cfg.batch_size}, num_workers={cfg.num_workers}), "
        f"{sampled:.0f} items/s ds.sample({cfg.batch_size}) (as train.py reads them), "
        f"torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    root, cfg = parse_config(Config, positional=("root", None, "recording directory"), description=__doc__)
    main(root, cfg)
