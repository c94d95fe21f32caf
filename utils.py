"""Shared plumbing: config-to-CLI, seeding, interrupts, atomic writes, checkpoints, devices, precision,
PSNR, videos and frame resizing. Game knowledge is elsewhere: games.py (any ALE game), pong.py (Pong);
the diffusion maths is in diffusion.py.

Imports only torch, numpy and the standard library at module level, so the
training and generation code runs on a bare GPU image (cv2 is imported lazily).
"""

import argparse
import dataclasses
import hashlib
import math
import os
import random
import signal
import sys
import tempfile

import numpy as np
import torch

# -----------------------------------------------------------------------------
# config dataclass -> argparse, with presets


def arg(default, help, **kw):
    """A dataclass field whose help text becomes the --help line."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def parse_config(cls, argv=None, presets=None, default_preset=None, description=None, positional=None, prog=None):
    """Build a CLI from a config dataclass: every field becomes --hyphenated-flag.

    presets: {name: {field: value}}; the one chosen by --preset (else default_preset) is applied
    before explicit flags, so a flag on the command line always wins over the preset, and
    --help shows the defaults that really apply: the preset's values over the dataclass's.
    positional: optional (name, choices, help) for a leading positional argument.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((v for k, v in zip(argv, argv[1:]) if k == "--preset"), None)
    chosen = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), chosen) or default_preset
    preset = (presets or {}).get(chosen, {})
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if positional:
        p.add_argument(positional[0], choices=positional[1], help=positional[2])
    if presets:
        h = f"preset of defaults (default: {default_preset})" if default_preset else "preset of defaults"
        p.add_argument("--preset", choices=sorted(presets), default=None, help=h)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = f"{f.metadata.get('help', '')} (default: {preset.get(f.name, default)})"
        if f.type in (bool, "bool"):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            if typ not in (int, float, str):
                raise TypeError(f"unsupported field type {f.type} for {f.name}")
            p.add_argument(name, type=typ, default=None, help=h, choices=f.metadata.get("choices"))
    ns = p.parse_args(argv)
    values = dict(preset)
    values.update({f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name) is not None})
    cfg = cls(**values)
    if positional:
        return getattr(ns, positional[0]), cfg
    return cfg


def die(msg, code=2):
    """One clear line on stderr and a non-zero exit: for mistakes of the user's."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# interrupts: Ctrl-C and SIGTERM stop a long command at a safe point


class Interrupts:
    """A signal (Ctrl-C's SIGINT, SIGTERM, a scheduler's SIGUSR1) only sets a flag; the loop checks it.

    Python raises KeyboardInterrupt wherever the main thread happens to be: inside a thread pool's
    submit or a future's wait, half-way through a save. The loops here stop between two steps
    instead, where nothing is half done, then save what they made. A second signal raises
    KeyboardInterrupt at once, for a user who does not want to wait.
        stop = utils.INTERRUPTS.install()
        while ...: step(); if stop: break
    Signal handlers belong to the process, so it has one instance: INTERRUPTS.
    """

    def __init__(self):
        self.signum = None

    def install(self, signals=(signal.SIGINT, signal.SIGTERM)):
        """Handle `signals`, except one this process was started ignoring: a shell starts a background
        job (`cmd &`) with SIGINT ignored so that the terminal's Ctrl-C spares it, and Python keeps that."""
        for s in signals:
            if signal.getsignal(s) is not signal.SIG_IGN:
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self):
        """The shell's convention for a command ended by signal N: 128 + N (130 for Ctrl-C)."""
        return 128 + (self.signum or 0)

    def check(self):
        """Raise KeyboardInterrupt here, at a safe point, if a signal came."""
        if self.signum is not None:
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


def take_back_sigint():
    """For a process that sends Ctrl-C to its children (the tests, stress.py): a process started in the
    background (`make test &`, nohup, some CI runners) has SIGINT ignored, and an ignored signal stays
    ignored in every child it starts, through exec. Handling it here again, as Python does, gives each
    child the default. (Not Popen's preexec_fn: it runs Python in the forked child of a process that
    has threads, which can deadlock before exec.) Call it from the main thread."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# -----------------------------------------------------------------------------
# atomic writes: a killed process never leaves a half-written file behind


def _atomic(path, write):
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    """torch.save, atomically. Through a file object: given a path, torch names the archive inside after
    the (random) temp file, so the same object saved twice would differ in bytes and in file_fingerprint."""

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    _atomic(path, write)


def atomic_savez(path, **arrays):
    """np.savez_compressed, atomically. `path` should end in .npz."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic(path, write)


def atomic_save_npy(path, array):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic(path, write)


def atomic_write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


# The checkpoint format. 2: the DiT's window length is "window" (version 1 called it "max_frames").
CKPT_VERSION = 2


def file_fingerprint(path):
    """The first 16 hex digits of a file's sha256: names a VAE's latent cache (dataset.py)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_ckpt_path(path):
    """A run directory means its ckpt.pt; a file path is returned as it is."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_checkpoint(path, kind=None):
    """torch.load(weights_only=True) of a checkpoint file or run dir, with one-line errors for a missing,
    corrupt, wrong-kind or too-new file. Older versions are brought up to date on load."""
    path = resolve_ckpt_path(path)
    if not os.path.isfile(path):
        die(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's bad file
        die(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        die(f"{path} is not a GameNGen-Mini checkpoint (no 'config' entry)")
    found = ckpt["config"].get("kind")
    if kind is not None and found != kind:
        die(f"{path} is a {found!r} checkpoint, expected a {kind!r} checkpoint")
    version = ckpt.get("version", 1)
    if version > CKPT_VERSION:
        die(f"{path} has checkpoint version {version}; this code reads up to {CKPT_VERSION} (update the code)")
    if version < 2 and found == "dit" and "max_frames" in ckpt["config"]["model"]:
        model = ckpt["config"]["model"]
        model["window"] = model.pop("max_frames")
    ckpt["version"] = CKPT_VERSION
    return ckpt


def pick_device(flag, local_rank=0):
    """--device auto | cpu | cuda | cuda:N -> torch.device; auto is CUDA when present. One line if CUDA is absent."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda":  # under torchrun, each process takes its own GPU
        flag = f"cuda:{local_rank}"
    if flag.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {flag}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(flag)
    except RuntimeError:
        die(f"--device {flag!r}: expected auto, cpu, cuda or cuda:N")


PRECISIONS = ("auto", "fp32", "bf16")


def fast_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Does the device multiply bf16 matrices faster than fp32? CUDA with bf16 (Ampere on), or a CPU with
    AVX-512 BF16 or AMX (oneDNN's bf16 kernels; elsewhere bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no way to tell, so no
        return False
    return device.type == "cpu" and bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_precision(flag, device, auto_cpu=True, cpuinfo="/proc/cpuinfo"):
    """--precision auto | fp32 | bf16 -> "fp32" or "bf16" (bf16: autocast around the forward, fp32 weights).

    auto is bf16 where the hardware does it fast (fast_bf16) and, on a CPU, only if auto_cpu (generation
    keeps fp32 on a CPU unless measured otherwise). bf16 asked for where it is slow warns and gives fp32.
    """
    if flag not in PRECISIONS:
        die(f"--precision {flag!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    fast = fast_bf16(device, cpuinfo)
    if flag == "auto":
        return "bf16" if fast and (device.type == "cuda" or auto_cpu) else "fp32"
    if flag == "bf16" and not fast:
        print(f"warning: --precision bf16: {device} has no fast bf16 (CUDA, or a CPU with AVX-512 BF16 or AMX); "
              "running in fp32", file=sys.stderr)  # fmt: skip
        return "fp32"
    return flag


def autocast(precision, device):
    """The forward's context for a precision from pick_precision: bf16 autocast, or nothing for fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def fmt(v):
    """A logged figure, parseable by one float pattern at any magnitude: 11670.3 -> '11670', not '1.167e+04'."""
    if isinstance(v, float) and math.isfinite(v) and abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def peak_flops(device):
    """The GPU's dense bf16 FLOP/s, for MFU; None on a CPU or an unlisted GPU."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS_BF16.items() if k in name), None)


def psnr(a, b):
    """PSNR in dB per frame between uint8 images: (..., H, W, 3) -> (...)."""
    mse = np.square(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean(axis=(-3, -2, -1))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def write_video(path, frames, fps=15, scale=1):
    """uint8 (N, H, W, 3) -> .mp4 / .gif / .npz (frames), atomically."""
    frames = np.asarray(frames, dtype=np.uint8)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return atomic_savez(path, frames=frames)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    import imageio.v2 as imageio

    def write(tmp):
        if ext == ".gif":
            imageio.mimsave(tmp, list(frames), duration=1000 / fps, loop=0)
        elif ext == ".mp4":
            imageio.mimsave(tmp, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
        else:
            raise ValueError(f"unknown video extension {ext!r}: use .mp4, .gif or .npz")

    _atomic(path, write)


# -----------------------------------------------------------------------------
# frames


def resize_frame(frame, size):
    """(H, W, 3) uint8 (an Atari screen is 210x160) -> (size, size, 3) uint8 with area averaging.

    Area averaging keeps a small object (Pong's 2x4 pixel ball) as a blended blob instead of
    dropping it, as nearest-neighbour sampling can at small sizes.
    """
    import cv2

    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)


class FrameResizer:
    """utils.resize_frame over an episode's frames, in order, redoing only the blocks that changed.

    Shrinking H x W to size x size, INTER_AREA treats each block of H/gcd(H, size) x W/gcd(W, size) pixels
    (35x5 -> 16x3 for 210x160 to 96) with the same weights wherever the block sits, so resizing a block
    alone gives the very bytes of resizing the whole frame (tests/test_recorder.py checks it). Most of a
    Atari frame stands still: at 96, ~4 blocks change per frame, and this is ~3x faster than whole frames.
    """

    def __init__(self, size, shape):
        h, w = shape[:2]
        gy, gx = (math.gcd(h, size), math.gcd(w, size)) if size <= min(h, w) else (1, 1)  # enlarging: whole
        self.size, self.grid = size, (gy, h // gy, size // gy, gx, w // gx, size // gx)
        self.prev = self.last = None  # the previous raw frame and its resized one

    def __call__(self, raw):
        """[(H, W, 3) uint8] * K, the episode's next K frames -> (K, size, size, 3) uint8."""
        import cv2

        ny, bh, oh, nx, bw, ow = self.grid
        out = np.empty((len(raw), self.size, self.size, 3), np.uint8)
        for f, o in zip(raw, out):
            if self.prev is None:
                self.prev, self.last = f, resize_frame(f, self.size)
            o[:] = self.last
            changed = (f != self.prev).reshape(ny, bh, -1).any(1).reshape(ny, nx, -1).any(2)  # (ny, nx)
            for i, j in zip(*np.nonzero(changed)):
                block = cv2.resize(
                    f[i * bh : (i + 1) * bh, j * bw : (j + 1) * bw], (ow, oh), interpolation=cv2.INTER_AREA
                )
                o[i * oh : (i + 1) * oh, j * ow : (j + 1) * ow] = block
            self.prev, self.last = f, o
        return out
