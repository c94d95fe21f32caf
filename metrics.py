"""How close are generated frames to the real ones, for any game: image metrics, with baselines.

evaluate.py runs the model and calls these; they take uint8 frames (..., H, W, 3) and know nothing
of the model or the game. Every block has PSNR and SSIM, and two things to read them against:
"copy": the same metric for the copy-the-last-frame baseline (a model that draws nothing new: the
previous real frame for a next frame, the start frame held for a rollout), and "moved_psnr": PSNR on
the pixels that changed in the real game since the previous frame only (where the action is; in
Pong under 1% of the frame). When the game is Pong, pong.py adds its object and score metrics
(ball, paddles, score held, score events: defined there).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

import utils

# why a metric is null, by a fragment of its name in metrics.json (first match wins; pong.REASONS first)
REASONS = [("moved_psnr", "no pixel changed between these real frames")]


def ssim(a, b, size=11, sigma=1.5, chunk=128):
    """SSIM per frame (Wang et al. 2004: 11x11 gaussian window, 'valid' borders, mean over channels).

    a, b: uint8 (..., H, W, 3) -> (...). Identical frames give exactly 1. `chunk` frames at a time: in
    float64 each 96x96 frame takes ~2 MB a map, and a rollout block has thousands of frames.
    """
    lead, shape = a.shape[:-3], a.shape[-3:]
    a, b = np.asarray(a).reshape(-1, *shape), np.asarray(b).reshape(-1, *shape)
    size = min(size, *shape[:2])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum())[None, None]  # separable: a pass along rows, then along columns
    blur = lambda z: F.conv2d(F.conv2d(z.flatten(0, 1)[:, None], g[..., None, :]), g[..., :, None])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for i in range(0, len(a), chunk):
        x, y = (torch.from_numpy(v[i : i + chunk]).movedim(-1, 1).double() for v in (a, b))
        mx, my, xx, yy, xy = (blur(z) for z in (x, y, x * x, y * y, x * y))
        vx, vy, cov = xx - mx**2, yy - my**2, xy - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        out.append(s.reshape(len(x), -1).mean(1))
    return torch.cat(out).numpy().reshape(lead) if out else np.zeros(lead)


def nanmean(x, axis=None):
    """Mean over finite entries; NaN (-> null) where there are none, without a warning."""
    x = np.asarray(x, np.float64)
    ok, n = np.isfinite(x), np.isfinite(x).sum(axis)
    return np.where(n > 0, np.where(ok, x, 0).sum(axis) / np.maximum(n, 1), np.nan)


def share(ok, mask):
    """Share of True in ok[mask]; NaN when the mask is empty."""
    return float(ok[mask].mean()) if mask.any() else float("nan")


def moved_psnr(real, gen, prev):
    """PSNR (dB) over the pixels where real differs from prev (any channel), pooled over the frames given."""
    real, gen, prev = (np.asarray(v, np.float32) for v in (real, gen, prev))
    moved = (real != prev).any(-1)  # (..., H, W)
    if not moved.any():
        return float("nan")
    mse = np.square(real - gen).mean(-1)[moved].mean()
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def next_frame_block(real, gen, prev=None, pong=False):
    """Per-frame metrics of (N, H, W, 3) frames; prev: the real frames before them (for the baselines)."""
    m = dict(psnr=float(utils.psnr(real, gen).mean()), ssim=float(ssim(real, gen).mean()), n=len(real))
    if prev is not None:
        m |= dict(moved_psnr=moved_psnr(real, gen, prev), copy_psnr=float(utils.psnr(real, prev).mean()))
        m |= dict(copy_ssim=float(ssim(real, prev).mean()), copy_moved_psnr=moved_psnr(real, prev, prev))
    if pong:
        import pong as game

        m |= game.frame_metrics(real, gen)
    return m


def rollout_block(real, gen, horizons, pong=False):
    """Metrics of rollouts: real, gen uint8 (R, 1 + T, H, W, 3), the same start frame; at steps `horizons`."""
    p = utils.psnr(real[:, 1:], gen[:, 1:])  # (R, T)
    copy = real[:, :1].repeat(real.shape[1] - 1, 1)  # the start frame held
    p0 = utils.psnr(real[:, 1:], copy)
    at = lambda curve: {str(k): float(curve[k - 1]) for k in horizons}  # steps count from 1
    res = {"psnr": at(p.mean(0)), "psnr_mean": float(p.mean()), "psnr_curve": p.mean(0)}
    ks = list(horizons)  # SSIM at the reported steps only: it costs ~10 ms a frame
    res["ssim"] = dict(zip(map(str, ks), ssim(real[:, ks], gen[:, ks]).mean(0).tolist()))
    res["copy_ssim"] = dict(zip(map(str, ks), ssim(real[:, ks], real[:, [0] * len(ks)]).mean(0).tolist()))
    moved = [moved_psnr(real[:, k], gen[:, k], real[:, k - 1]) for k in range(1, real.shape[1])]
    res |= {"moved_psnr": at(moved), "copy_psnr": at(p0.mean(0)), "copy_psnr_curve": p0.mean(0)}
    res["copy_moved_psnr"] = at([moved_psnr(real[:, k], real[:, 0], real[:, k - 1]) for k in range(1, real.shape[1])])
    if pong:
        import pong as game

        res |= game.rollout_metrics(real, gen, horizons)
    return res


def to_json(x, notes, reasons=REASONS, path=""):
    """Plain JSON types; NaN/inf -> None, with the reason (the first of `reasons` in its path) in notes[path]."""
    if isinstance(x, dict):
        return {k: to_json(v, notes, reasons, f"{path}.{k}".lstrip(".")) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [to_json(v, notes, reasons, path) for v in x]
    if isinstance(x, (float, np.floating)):
        if np.isfinite(x):
            return float(x)
        notes[path] = next((why for key, why in reasons if key in path), "cannot be computed")
        return None
    return x.item() if isinstance(x, np.generic) else x


def plot(path, m, horizon):
    """PSNR (and in Pong the object errors) against the horizon, as a PNG; skipped (False) without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: metrics.json is the result, the plot is a convenience
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, ar, one = np.arange(1, horizon + 1), m["autoregressive"], m["autoregressive_one_frame"]
    nan = lambda v: [np.nan if u is None else u for u in (v if isinstance(v, list) else [v])]
    objects = "curves_px" in ar
    fig, axes = plt.subplots(1, 1 + objects, figsize=(5.5 * (1 + objects), 4), squeeze=False)
    a1 = axes[0, 0]
    a1.plot(ks, nan(ar["psnr_curve"]), label=f"autoregressive, primed ({m['config']['steps']} DDIM steps)")
    a1.plot(ks, nan(one["psnr_curve"]), label="autoregressive, from one frame")
    a1.plot(ks, nan(ar["copy_psnr_curve"]), ls="-.", c="gray", label="copy the start frame (baseline)")
    a1.axhline(nan(m["vae"]["psnr"])[0], ls="--", c="gray", label="VAE reconstruction (ceiling)")
    a1.axhline(nan(m["teacher_forced"]["psnr"])[0], ls=":", c="k", label="teacher-forced next frame")
    a1.set(xlabel="rollout step", ylabel="PSNR (dB)", title=f"{m['derived']['game']}: PSNR vs horizon")
    if objects:  # Pong
        a2 = axes[0, 1]
        for key, label in (("ball", "ball (x, y)"), ("player", "player paddle y"), ("opponent", "opponent paddle y")):
            (line,) = a2.plot(ks, nan(ar["curves_px"][key]), marker=".", label=label)
            a2.plot(ks, nan(one["curves_px"][key]), ls=":", c=line.get_color(), label=f"{label}, from one frame")
        a2.set(xlabel="rollout step", ylabel="position error (px)", title="Object position error vs horizon")
    for a in axes[0]:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    utils._atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"


def report_vae(m):
    """The run's header and the VAE's line (all evaluate.py --vae-only prints)."""
    vae, ck, data = m["vae"], m["checkpoint"], m["data"]
    head = f"VAE {ck['vae']} on {m['device']}, {m['precision']}: "
    head += f"{data['episodes']} episodes, {data['frames']} frames"
    line, note = f"VAE recon.    PSNR {f(vae['psnr'])} dB  SSIM {f(vae['ssim'], 3)}", f"{vae['n']} frames"
    if "ball_presence" in vae:  # Pong
        crowded = f(vae["ball_presence_crowded"], 3)
        line += f"  ball kept {f(vae['ball_presence'], 3)} ({crowded} beside a paddle or wall)"
        line += f"  score read {f(vae['score_read_opponent'], 3)} / {f(vae['score_read_player'], 3)}"
        note = f"opponent / player; {note}"
    return f"{head}\n{line} ({note})"


def report(m, horizons):
    """The compact table printed at the end: primed rollouts and rollouts from one frame side by side."""
    ctl, tf = m["control"], m["teacher_forced"]
    runs = {
        f"primed ({m['derived']['prompt']} frames)": m["autoregressive"],
        "one frame": m["autoregressive_one_frame"],
    }
    pong = "ball_presence" in tf
    out = report_vae(m).splitlines()[:2]
    out.append(
        f"teacher-f.    PSNR {f(tf['psnr'])} dB  SSIM {f(tf['ssim'], 3)}  on moved pixels {f(tf['moved_psnr'])} dB;"
        f"  copying the last frame: {f(tf['copy_psnr'])} dB, SSIM {f(tf['copy_ssim'], 3)}, on moved pixels "
        f"{f(tf['copy_moved_psnr'])} dB  ({tf['n']} frames)"
    )
    if pong:
        out.append(
            f"              ball presence {f(tf['ball_presence'])}  spurious {f(tf['ball_spurious'])}  error "
            f"{f(tf['ball_error_px'])} px  hit rate (<= 4 px) {f(tf['ball_hit_rate'])}  ({tf['n_ball']} with a ball)"
        )
    rows = ["psnr", "ssim", "moved_psnr", "copy_psnr", "copy_moved_psnr"]
    rows += ["ball_error_px", "player_error_px", "opponent_error_px", "score_held"] if pong else []
    for name, ar in runs.items():
        out.append(f"{m['counts']['rollouts']} rollouts, {name}, step " + "".join(f"{k:>7}" for k in horizons))
        out += [f"{key:>22}" + "".join(f"{f(ar[key][str(k)]):>7}" for k in horizons) for key in rows]
        if not pong:
            continue
        out.append(
            f"  ball presence {f(ar['ball_presence'])}, spurious {f(ar['ball_spurious'])}, error first 16 steps "
            f"{f(ar['ball_error_first16_px'])} px, hit rate (<= 4 px) {f(ar['ball_hit_rate'])}, "
            f"first 16 steps {f(ar['ball_hit_rate_first16'])} (presence {f(ar['ball_presence_first16'])}, spurious "
            f"{f(ar['ball_spurious_first16'])})"
        )
        for key in ("score_events", "score_digits"):
            s = ar[key]
            out.append(
                f"  {key:<13} precision {f(s['precision'])} recall {f(s['recall'])} ({s['n_matched']} matched, "
                f"{s['n_real']} real, {s['n_generated']} generated)"
            )
        s = ar["ball_serves"]
        out.append(
            f"  serves        a ball again within {s['wait']} frames of a point: real {f(s['real_served'])} of "
            f"{s['n_real']} (median {f(s['real_delay'], 0)} frames), generated {f(s['generated_served'])} of "
            f"{s['n_generated']} (median {f(s['generated_delay'], 0)})"
        )
    control = f"control       PSNR true - shuffled actions {f(ctl['psnr_gain_true_vs_shuffled'])} dB"
    if pong:
        control += (
            f"; up->up {f(ctl['up_moves_up'])} down->down {f(ctl['down_moves_down'])} (free: "
            f"{f(ctl['up_moves_up_free'])} {f(ctl['down_moves_down_free'])}) up above down {f(ctl['up_above_down'])}"
        )
    out.append(control)
    out.append(f"speed         {f(m['speed']['frames_per_s_batch1'], 1)} frames/s at batch 1 on {m['device']}")
    for name, rows in m["sweeps"].items():
        head = "steps noise  tf dB tf err tf hit  ar dB  ball  spur. ball16 spur16  err16   hit served   fps"
        out.append(f"sweep {name}: {head}")
        out += [
            f"{'':>{len(name) + 7}}{r['steps']:>5} {r['context_noise']:>5} {f(r['tf_psnr']):>6} "
            f"{f(r.get('tf_ball_error_px'), 1):>6} {f(r.get('tf_ball_hit_rate')):>6} "
            f"{f(r['ar_psnr_mean']):>6} {f(r.get('ar_ball_presence')):>5} {f(r.get('ar_ball_spurious')):>6} "
            f"{f(r.get('ar_ball_presence_first16')):>6} {f(r.get('ar_ball_spurious_first16')):>6} "
            f"{f(r.get('ar_ball_error_first16_px'), 1):>6} {f(r.get('ar_ball_hit_rate')):>5} "
            f"{f(r.get('ar_served')):>6} {f(r['fps_batch1'], 1):>5}"
            for r in rows
        ]
    return "\n".join(out + [f"wrote {os.path.join(m['config']['out'], 'metrics.json')} and metrics.png"])
