"""How close are generated Pong frames to the real ones: image, object and score-event metrics.

evaluate.py runs the model and calls these; they take uint8 frames (..., H, W, 3) and know nothing
of the model. Objects come from utils.detect_objects (colour unmixing, sub-pixel).

Score changes are found the same way in real and generated frames, without the recorded rewards.
"score_events": a point at frame k when the ball was seen at k-1 within 15% of the width from the
left or right edge and is gone at k, k+1 and k+2 (after a point the real game hides the ball for ~15
frames), scored by the player if it left on the left. "score_digits": the score digits (the rows
above the top wall) change between k-1 and k and then stay put for 2 frames; the half that changed
says who scored. A generated event matches a real one with the same scorer within +-2 frames
(one-to-one); precision = matched / generated events, recall = matched / real events, over all
rollouts.
"score_read_opponent/player": the share of frames whose generated (or reconstructed) score half
reads as the real one (pong.read_score); "score_held" at step k: both halves read right, over the
rollouts whose real score has not changed by step k. On recorded episodes both detectors find every
recorded reward within +-2 frames and nothing else but the reset frame (tests/test_evaluate.py).
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

import pong
import utils

SIDES = ("opponent", "player")  # pong.read_score's halves, left and right
EDGE, GONE, TOL = 0.15, 3, 2  # score events: edge band (share of width), frames gone, match tolerance
HIT_PX = 4  # a generated ball within this many pixels of the real one is a hit
# why a metric is null, by a fragment of its name in metrics.json (first match wins)
REASONS = [
    ("score_read", "no real frame shows a readable score"),
    ("score_held", "the real score changed (or is unreadable) in every rollout by this step"),
    ("ball_presence", "no real frame shows a ball"),
    ("ball_spurious", "every real frame shows a ball"),
    ("precision", "no point is scored in the generated rollouts"),
    ("recall", "no point is scored in the real rollout windows"),
    ("_px", "the object is never seen in both the real and the generated frame (of a curve: at some steps)"),
    ("moves", "the player's paddle is not seen at the start and the end (or no start state has room to move)"),
    ("up_above_down", "the player's paddle is not seen at the end of both rollouts"),
]


def ssim(a, b, size=11, sigma=1.5):
    """SSIM per frame (Wang et al. 2004: 11x11 gaussian window, 'valid' borders, mean over channels).

    a, b: uint8 (..., H, W, 3) -> (...). Identical frames give exactly 1.
    """
    lead = a.shape[:-3]
    x, y = (torch.from_numpy(np.asarray(v)).reshape(-1, *v.shape[-3:]).movedim(-1, 1).double() for v in (a, b))
    size = min(size, *x.shape[-2:])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum())[None, None]  # separable: a pass along rows, then along columns
    blur = lambda z: F.conv2d(F.conv2d(z.flatten(0, 1)[:, None], g[..., None, :]), g[..., :, None])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my, xx, yy, xy = (blur(z) for z in (x, y, x * x, y * y, x * y))
    vx, vy, cov = xx - mx**2, yy - my**2, xy - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(len(x), -1).mean(1).numpy().reshape(lead)


def score_events(frames, det, digits=False):
    """Points scored in a sequence: uint8 (T, H, W, 3) and its detect_objects -> [(k, scorer)], 1 = the player."""
    T, H, W = frames.shape[:3]
    if digits:
        top = max(1, int(24 * H / utils.ATARI_H))  # the digits sit above the top wall (raw rows 24..33)
        d = np.abs(np.diff(frames[:, :top].astype(np.int16), axis=0)).max(-1) > 20  # (T-1, top, W)
        left, right = d[:, :, : W // 2].sum((1, 2)), d[:, :, W // 2 :].sum((1, 2))  # right: the player's score
        moved = left + right >= max(2, H * W // 1000)  # moved[k-1]: the digits change from frame k-1 to k
        # a new score then stays put for GONE-1 frames, which rules out flicker in generated frames
        keep = lambda k: moved[k - 1] and not moved[k : k + GONE - 1].any()
        return [(k, int(right[k - 1] > left[k - 1])) for k in range(1, T - GONE + 1) if keep(k)]
    seen, x = det["ball_present"], det["ball_xy"][:, 0]
    events = []
    for k in range(1, T - GONE + 1):
        if seen[k - 1] and not seen[k : k + GONE].any() and not EDGE * W <= x[k - 1] <= (1 - EDGE) * W - 1:
            events.append((k, int(x[k - 1] < W / 2)))  # out on the left: the player scored
    return events


def match_events(real, gen, tol=TOL):
    """Greedy one-to-one matching of (k, side) events within +-tol frames -> number matched."""
    free = list(gen)
    for k, side in real:
        hit = next((g for g in free if g[1] == side and abs(g[0] - k) <= tol), None)
        if hit is not None:
            free.remove(hit)
    return len(gen) - len(free)


def nanmean(x, axis=None):
    """Mean over finite entries; NaN (-> null) where there are none, without a warning."""
    x = np.asarray(x, np.float64)
    ok, n = np.isfinite(x), np.isfinite(x).sum(axis)
    return np.where(n > 0, np.where(ok, x, 0).sum(axis) / np.maximum(n, 1), np.nan)


def share(ok, mask):
    """Share of True in ok[mask]; NaN when the mask is empty."""
    return float(ok[mask].mean()) if mask.any() else float("nan")


def objects(real, gen):
    """Detections and position errors (px) for real vs generated uint8 (..., H, W, 3) frames."""
    dr, dg = utils.detect_objects(real), utils.detect_objects(gen)
    err = {"ball": np.linalg.norm(dr["ball_xy"] - dg["ball_xy"], axis=-1)}  # NaN unless both have it
    err.update({k: np.abs(dr[f"{k}_y"] - dg[f"{k}_y"]) for k in ("player", "opponent")})
    return dr, dg, err, share(dg["ball_present"], dr["ball_present"])


def score_read(real, gen):
    """Share of frames whose generated score half reads as the real one does (pong.read_score), each half."""
    sr, sg = pong.read_score(real), pong.read_score(gen)
    return {f"score_read_{side}": share(sg[..., i] == sr[..., i], sr[..., i] >= 0) for i, side in enumerate(SIDES)}


def next_frame_block(real, gen):
    """Per-frame metrics of (N, H, W, 3) frames; ball_presence: share of real balls also seen in gen."""
    dr, dg, err, presence = objects(real, gen)
    m = dict(psnr=utils.psnr(real, gen).mean(), ssim=ssim(real, gen).mean(), ball_presence=presence)
    m |= dict(ball_spurious=share(dg["ball_present"], ~dr["ball_present"]))
    m |= dict(ball_hit_rate=share(err["ball"] <= HIT_PX, dr["ball_present"]))  # NaN (no ball drawn) is a miss
    m |= score_read(real, gen)
    out = {k: float(v) for k, v in m.items()} | {"ball_error_px": float(nanmean(err["ball"])), "n": len(real)}
    return out | {"n_ball": int(dr["ball_present"].sum())}


def rollout_block(real, gen, horizons):
    """PSNR, object and score-event metrics of rollouts: real, gen uint8 (R, 1 + T, H, W, 3), the same start frame."""
    p = utils.psnr(real[:, 1:], gen[:, 1:])
    dr, dg, err, _ = objects(real, gen)
    has_r, has_g = dr["ball_present"][:, 1:], dg["ball_present"][:, 1:]
    at = lambda curve: {str(k): float(curve[k - 1]) for k in horizons}  # steps count from 1
    curves = {k: nanmean(v[:, 1:], 0) for k, v in err.items()}
    res = {"psnr": at(p.mean(0)), "psnr_mean": float(p.mean()), "psnr_curve": p.mean(0)}
    res |= {"ball_presence": share(has_g, has_r), "ball_spurious": share(has_g, ~has_r)}
    res |= {f"{k}_error_px": at(c) for k, c in curves.items()}
    res |= {"ball_error_first16_px": float(nanmean(err["ball"][:, 1:17])), "curves_px": curves}
    hit = err["ball"][:, 1:] <= HIT_PX  # NaN (a ball missing on either side) is a miss
    res |= {"ball_hit_rate": share(hit, has_r), "ball_hit_rate_first16": share(hit[:, :16], has_r[:, :16])}
    # score held: both halves read as the real frame's, where the real score has not changed since the start
    sr, sg = pong.read_score(real), pong.read_score(gen)  # (R, 1 + T, 2)
    same = (sr == sr[:, :1]).all(-1) & (sr >= 0).all(-1)
    held = (sg == sr).all(-1)
    res["score_held"] = at([share(held[:, k], same[:, k]) for k in range(1, held.shape[1])])
    for name in ("score_events", "score_digits"):
        n_r = n_g = n_m = 0
        for i in range(len(real)):
            ev_r, ev_g = (
                score_events(fr[i], {k: v[i] for k, v in d.items()}, name == "score_digits")
                for fr, d in ((real, dr), (gen, dg))
            )
            n_r, n_g, n_m = n_r + len(ev_r), n_g + len(ev_g), n_m + match_events(ev_r, ev_g)
        ratio = lambda a, b: a / b if b else float("nan")
        res[name] = dict(precision=ratio(n_m, n_g), recall=ratio(n_m, n_r), n_real=n_r, n_generated=n_g, n_matched=n_m)
    return res


def to_json(x, notes, path=""):
    """Plain JSON types; NaN/inf -> None, with the reason recorded in notes[path]."""
    if isinstance(x, dict):
        return {k: to_json(v, notes, f"{path}.{k}".lstrip(".")) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [to_json(v, notes, path) for v in x]
    if isinstance(x, (float, np.floating)):
        if np.isfinite(x):
            return float(x)
        notes[path] = next((why for key, why in REASONS if key in path), "cannot be computed")
        return None
    return x.item() if isinstance(x, np.generic) else x


def plot(path, m, horizon):
    """PSNR and object errors against the horizon, as a PNG; skipped (False) where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: metrics.json is the result, the plot is a convenience
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, ar, one = np.arange(1, horizon + 1), m["autoregressive"], m["autoregressive_one_frame"]
    nan = lambda v: [np.nan if u is None else u for u in (v if isinstance(v, list) else [v])]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(ks, nan(ar["psnr_curve"]), label=f"autoregressive, primed ({m['config']['steps']} DDIM steps)")
    a1.plot(ks, nan(one["psnr_curve"]), label="autoregressive, from one frame")
    a1.axhline(nan(m["vae"]["psnr"])[0], ls="--", c="gray", label="VAE reconstruction (ceiling)")
    a1.axhline(nan(m["teacher_forced"]["psnr"])[0], ls=":", c="k", label="teacher-forced next frame")
    a1.set(xlabel="rollout step", ylabel="PSNR (dB)", title="PSNR vs horizon")
    for key, label in (("ball", "ball (x, y)"), ("player", "player paddle y"), ("opponent", "opponent paddle y")):
        (line,) = a2.plot(ks, nan(ar["curves_px"][key]), marker=".", label=label)
        a2.plot(ks, nan(one["curves_px"][key]), ls=":", c=line.get_color(), label=f"{label}, from one frame")
    a2.set(xlabel="rollout step", ylabel="position error (px)", title="Object position error vs horizon")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    utils._atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def report_vae(m):
    """The run's header and the VAE's line (all evaluate.py --vae-only prints)."""
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    vae, ck, data = m["vae"], m["checkpoint"], m["data"]
    head = f"{ck['path']} (step {ck['step']}) on {m['device']}, {m['precision']}: "
    head += f"{data['episodes']} episodes, {data['frames']} frames"
    line = f"VAE recon.    PSNR {f(vae['psnr'])} dB  SSIM {f(vae['ssim'], 3)}  ball kept {f(vae['ball_presence'], 3)}"
    line += f"  score read {f(vae['score_read_opponent'], 3)} / {f(vae['score_read_player'], 3)}"
    return f"{head}\n{line} (opponent / player; {vae['n']} frames)"


def report(m, horizons):
    """The compact table printed at the end: primed rollouts and rollouts from one frame side by side."""
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"
    ctl, tf, vae, ck, data = (m[k] for k in ("control", "teacher_forced", "vae", "checkpoint", "data"))
    runs = {
        f"primed ({m['derived']['prompt']} frames)": m["autoregressive"],
        "one frame": m["autoregressive_one_frame"],
    }
    out = report_vae(m).splitlines()[:2]
    out.append(
        f"teacher-f.    PSNR {f(tf['psnr'])} dB  SSIM {f(tf['ssim'], 3)}  ball presence {f(tf['ball_presence'])}"
        f"  spurious {f(tf.get('ball_spurious'))}  error {f(tf['ball_error_px'])} px"
        f"  hit rate (<= {HIT_PX} px) {f(tf.get('ball_hit_rate'))}  ({tf['n']} frames, {tf.get('n_ball')} with a ball)"
    )
    for name, ar in runs.items():
        out.append(f"{m['counts']['rollouts']} rollouts, {name}, step " + "".join(f"{k:>7}" for k in horizons))
        for key in ("psnr", "ball_error_px", "player_error_px", "opponent_error_px", "score_held"):
            out.append(f"{key:>22}" + "".join(f"{f(ar[key][str(k)]):>7}" for k in horizons))
        out.append(
            f"  ball presence {f(ar['ball_presence'])}, spurious {f(ar['ball_spurious'])}, error first 16 steps "
            f"{f(ar['ball_error_first16_px'])} px, hit rate (<= {HIT_PX} px) {f(ar['ball_hit_rate'])}, "
            f"first 16 steps {f(ar['ball_hit_rate_first16'])}"
        )
        for key in ("score_events", "score_digits"):
            s = ar[key]
            out.append(
                f"  {key:<13} precision {f(s['precision'])} recall {f(s['recall'])} ({s['n_matched']} matched, "
                f"{s['n_real']} real, {s['n_generated']} generated)"
            )
    out.append(
        f"control       up->up {f(ctl['up_moves_up'])} down->down {f(ctl['down_moves_down'])} (free: "
        f"{f(ctl['up_moves_up_free'])} {f(ctl['down_moves_down_free'])}) up above down {f(ctl['up_above_down'])}, "
        f"PSNR true - shuffled actions {f(ctl['psnr_gain_true_vs_shuffled'])} dB"
    )
    out.append(f"speed         {f(m['speed']['frames_per_s_batch1'], 1)} frames/s at batch 1 on {m['device']}")
    for name, rows in m["sweeps"].items():
        out.append(f"sweep {name}: steps noise  tf dB tf err tf hit  ar dB  ball  spur.  err16   hit   fps")
        out += [
            f"{'':>{len(name) + 7}}{r['steps']:>5} {r['context_noise']:>5} {f(r['tf_psnr']):>6} "
            f"{f(r.get('tf_ball_error_px'), 1):>6} {f(r.get('tf_ball_hit_rate')):>6} "
            f"{f(r['ar_psnr_mean']):>6} {f(r['ar_ball_presence']):>5} {f(r['ar_ball_spurious']):>6} "
            f"{f(r['ar_ball_error_first16_px'], 1):>6} {f(r['ar_ball_hit_rate']):>5} {f(r['fps_batch1'], 1):>5}"
            for r in rows
        ]
    return "\n".join(out + [f"wrote {os.path.join(m['config']['out'], 'metrics.json')} and metrics.png"])
