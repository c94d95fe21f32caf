"""dataset.py: windows stay inside episodes, the DiT sees actions[j-1] at frame j, the split is deterministic and
disjoint, the latent cache, clear errors."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import (  # noqa: E402
    EpisodeDataset,
    build_latent_cache,
    latent_path,
    list_episodes,
    list_split,
    load_episode,
    prev_actions,
    read_meta,
    split_episodes,
)
from utils import atomic_savez, atomic_write_text  # noqa: E402

LENGTHS = [12, 5, 9, 3, 20, 7, 15, 4, 11, 8]  # episode j has LENGTHS[j] frames


def write_episode(path, j, n, size=16):
    """Frames that encode (episode, t) in their pixels, so every item can be checked."""
    frames = np.zeros((n, size, size, 3), np.uint8)
    frames[:, :, :, 0] = j
    frames[:, :, :, 1] = np.arange(n)[:, None, None]
    frames[:, 0, 0, 2] = 255
    actions = (np.arange(n) + j) % 6
    atomic_savez(path, frames=frames, actions=actions.astype(np.int64), rewards=np.zeros(n, np.float32),
                 dones=np.arange(n) == n - 1, t_index=np.arange(n), seed=j)  # fmt: skip


@pytest.fixture
def rec(tmp_path):
    root = tmp_path / "rec"
    for j, n in enumerate(LENGTHS):
        write_episode(str(root / f"episode_{j:05d}.npz"), j, n)
    atomic_write_text(str(root / "meta.json"), '{"frame_size": 16}')
    return str(root)


def test_windows_stay_inside_episodes(rec):
    T = 4
    ds = EpisodeDataset(list_episodes(rec), T)
    assert len(ds) == sum(max(0, n - T + 1) for n in LENGTHS)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        j, t = item["episode"], item["t_index"]
        assert item["frames"].shape == (T, 3, 16, 16) and item["frames"].dtype == torch.float32
        assert item["actions"].dtype == torch.int64 and item["prev_actions"].shape == (T, 6)
        assert (t == t[0] + torch.arange(T)).all() and t[-1] < LENGTHS[j]  # consecutive, inside episode j
        u8 = torch.round((item["frames"] + 1) * 127.5)  # back to the stored pixels
        assert (u8[:, 0] == j).all() and (u8[:, 1, 1, 1] == t).all()
        assert item["frames"].min() >= -1 and item["frames"].max() == 1
        assert (item["actions"] == (t + j) % 6).all()
        seen.add((j, int(t[0])))
    assert len(seen) == len(ds)  # stride 1, every window once


def test_the_dit_sees_the_action_that_led_to_each_frame(rec):
    """Recorded actions[k] is taken after frame k; at frame j of a window the DiT is given actions[j-1]."""
    ds = EpisodeDataset(list_episodes(rec), 5)
    batch = ds.sample(64, torch.Generator().manual_seed(0))
    frames, acts, prev = batch["frames"], batch["actions"], batch["prev_actions"]
    t = torch.round((frames[:, :, 1, 1, 1] + 1) * 127.5).long()  # (B, T) the frame index in its episode
    j = torch.round((frames[:, :, 0, 1, 1] + 1) * 127.5).long()  # (B, T) the episode
    assert ((t[:, 1:] - t[:, :-1]) == 1).all() and (j == j[:, :1]).all()  # never across an episode
    assert (acts == (t + j) % 6).all()  # actions[k] is the one recorded with frame k
    assert (prev[:, 0] == 0).all()  # the first frame of a window: unknown
    assert (prev[:, 1:].argmax(-1) == (t[:, :-1] + j[:, :-1]) % 6).all() and (prev[:, 1:].sum(-1) == 1).all()
    np.testing.assert_array_equal(prev_actions(torch.tensor([[3, 1, 4]]), 6).argmax(-1), [[0, 3, 1]])


def test_split_is_deterministic_and_disjoint(rec):
    files = list_episodes(rec)
    train, val = split_episodes(files, 0.2)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == files
    assert split_episodes(list(reversed(files)), 0.2) == (train, val)
    tr, va, size = list_split(rec, 0.2)
    assert (tr, va, size) == (train, val, 16)
    tr_ds, va_ds = EpisodeDataset(tr, 3), EpisodeDataset(va, 3)
    assert {tr_ds[i]["episode"] for i in range(len(tr_ds))}.isdisjoint({va_ds[i]["episode"] for i in range(len(va_ds))})
    assert split_episodes(files[:1], 0.5) == (files[:1], [])  # one episode: all train
    assert split_episodes(files[:2], 0.1)[1] != []  # two: one goes to val
    assert list_split(f"{rec},{rec}", 0.2, max_episodes=3)[0] == 2 * split_episodes(files[:3], 0.2)[0]


def test_latent_cache(rec):
    files = list_episodes(rec)
    encode = lambda frames: torch.from_numpy(frames[:, :2, :2, :].astype(np.float32)).permute(0, 3, 1, 2)
    build_latent_cache(files, "abc", encode, chunk=4)  # chunked: episodes longer than 4 frames span chunks
    ds = EpisodeDataset(files, 5, latents="abc", scale=0.5)
    assert ds.data.dtype == torch.float32 and ds.data.shape[1:] == (3, 2, 2)
    for i in range(0, len(ds), 3):
        item = ds[i]
        assert "frames" not in item and item["latents"].shape == (5, 3, 2, 2)
        assert (item["latents"][:, 1, 0, 0] == 0.5 * item["t_index"].float()).all()  # scaled channel 1 = t
        assert (item["latents"][:, 0, 0, 0] == 0.5 * item["episode"]).all()
    mtime = os.path.getmtime(latent_path(files[0], "abc"))
    build_latent_cache(files, "abc", lambda f: 1 / 0)  # all cached: nothing is encoded again
    assert os.path.getmtime(latent_path(files[0], "abc")) == mtime
    np.save(latent_path(files[0], "abc"), np.zeros((3, 4, 2, 2), np.float16))
    with pytest.raises(ValueError, match="episode_00000.npy"):
        EpisodeDataset(files, 5, latents="abc")
    os.remove(latent_path(files[0], "abc"))
    with pytest.raises(FileNotFoundError, match="episode_00000.npy"):
        EpisodeDataset(files, 5, latents="abc")


def test_errors_name_the_file(rec, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_episodes(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        list_split(str(tmp_path / "empty"))
    bad = os.path.join(rec, "episode_00003.npz")
    with open(bad, "wb") as f:
        f.write(b"not a zip file")
    for frames in (True, False):
        with pytest.raises(ValueError, match="episode_00003.npz"):
            load_episode(bad, frames=frames)
    with pytest.raises(ValueError, match="episode_00003.npz"):
        EpisodeDataset(list_episodes(rec), 4)
    np.savez(bad, frames=np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="episode_00003.npz.*missing arrays \\['actions'\\]"):
        load_episode(bad)
    np.savez(bad, frames=np.zeros((3, 8, 8, 3), np.uint8), actions=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="episode_00003.npz: frames .* do not match 2 actions"):
        load_episode(bad)
    np.savez(bad, frames=np.zeros((2, 8, 8, 3), np.uint8), actions=np.array([0, 6]))
    with pytest.raises(ValueError, match="episode_00003.npz: actions outside 0..5"):
        load_episode(bad, num_actions=6)
    atomic_write_text(os.path.join(rec, "meta.json"), "{not json")
    with pytest.raises(ValueError, match="meta.json"):
        read_meta(rec)


def test_cli_bench_and_error(rec):
    p = subprocess.run([sys.executable, "dataset.py", rec, "--bench", "--items", "50", "--window", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "items/s single" in p.stdout and "DataLoader" in p.stdout and "ds.sample" in p.stdout
    p = subprocess.run([sys.executable, "dataset.py", rec + "_missing"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "_missing" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
