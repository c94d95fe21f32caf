"""How close are generated Pong frames to the real ones: image, object and score-event metrics.

evaluate.py runs the model and calls these; they take uint8 frames (..., H, W, 3) and know
nothing of the model. Objects come from utils.detect_objects (colour unmixing, sub-pixel).

Score changes are found the same way in real and generated frames, without the recorded
rewards. "score_events": a point at frame k when the ball was seen at k-1 within 15% of the
width from the left or right edge and is gone at k, k+1 and k+2 (after a point the real game
hides the ball for ~15 frames), scored by the player if it left on the left. "score_digits":
the score digits (the rows above the top wall) change between k-1 and k and then stay put
for 2 frames; the half that changed says who scored. A generated event matches a real one
with the same scorer within +-2 frames (one-to-one); precision = matched / generated events,
recall = matched / real events, over all rollouts. On recorded episodes both detectors find
every recorded reward within +-2 frames and nothing else but the reset frame (tests/test_evaluate.py).
"""

import numpy as np
import torch
import torch.nn.functional as F

import utils

EDGE, GONE, TOL = 0.15, 3, 2  # score events: edge band (share of width), frames gone, match tolerance


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


def next_frame_block(real, gen):
    """Per-frame metrics of (N, H, W, 3) frames; ball_presence: share of real balls also seen in gen."""
    dr, dg, err, presence = objects(real, gen)
    m = dict(psnr=utils.psnr(real, gen).mean(), ssim=ssim(real, gen).mean(), ball_presence=presence)
    return {k: float(v) for k, v in m.items()} | {"ball_error_px": float(nanmean(err["ball"])), "n": len(real)}


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
