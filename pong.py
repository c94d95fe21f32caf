"""Everything that knows Pong: its actions, colours and score, the object detector, the tracker agent,
and the Pong metrics evaluate.py adds when a model plays Pong. The rest of the code is game-agnostic.

    d = detect_objects(frames)          # ball (x, y), paddles' y, at any frame size
    score = read_score(frames)          # uint8 (..., S, S, 3) -> int (..., 2): (opponent, player)
    truth = score_from_rewards(rewards) # a recorded episode's rewards -> the score each frame shows

The score: the Atari draws each side's score above the top wall in a 3x5 font of 4x4-pixel cells (raw
rows 1-20), the opponent's (left, orange) with its units digit at raw columns 36-47, the player's
(right, green) at 116-127, the tens digit 16 columns to the left, no leading zero. The reader
draws every score 0-21 into a raw 210x160 frame, resizes it as the recorder does
(utils.resize_frame, area averaging) and reads each half of a frame's score strip as its
nearest template. On recorded episodes it reads every frame right (tests/test_pong.py).
"""

import functools

import numpy as np

import utils
from metrics import nanmean, share

ACTION_NAMES = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
NUM_ACTIONS = len(ACTION_NAMES)
UP, DOWN = ACTION_NAMES.index("RIGHT"), ACTION_NAMES.index("LEFT")  # RIGHT moves the player's (right) paddle up
# Pong has no UP or DOWN action, so play.py's Up and Down arrows mean RIGHT and LEFT there (games.KeyMap), and
# Left/Right, which would move the paddle up and down, do nothing.
KEY_ALIASES = {"UP": "RIGHT", "DOWN": "LEFT", "LEFT": "", "RIGHT": ""}
ATARI_H, ATARI_W = 210, 160
# Rows of the 210x160 screen that hold the play field (between the white walls).
FIELD_TOP, FIELD_BOTTOM = 34, 194
COLOR_BALL = (236, 236, 236)
COLOR_PLAYER = (92, 186, 92)  # right paddle, the agent's
COLOR_OPPONENT = (213, 130, 74)  # left paddle, the CPU's
COLOR_BACKGROUND = (144, 72, 17)

MAX_SCORE = 21  # a game ends at 21
FONT = {  # the Atari's digits, 3 cells wide and 5 high ('#': drawn)
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", ".#.", ".#.", ".#.", ".#."),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("#..", "#..", "###", "#.#", "###"),
    7: ("###", "..#", "..#", "..#", "..#"),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "..#"),
}
CELL, TOP, STRIP_ROWS = 4, 1, 22  # raw: cell size, the digits' first row, rows 0-21 hold nothing else
UNITS_X = {0: 36, 1: 116}  # raw column of the units digit: 0 = the opponent (left), 1 = the player (right)
TENS_DX = -16
COLOURS = {0: COLOR_OPPONENT, 1: COLOR_PLAYER}


def draw_score(raw, value, side):
    """Draw `value` (0-21) as the game does into a raw (210, 160, 3) frame, in place."""
    digits = [(UNITS_X[side], value % 10)] + ([(UNITS_X[side] + TENS_DX, value // 10)] if value >= 10 else [])
    for x0, d in digits:
        for r, row in enumerate(FONT[d]):
            for c, cell in enumerate(row):
                if cell == "#":
                    y, x = TOP + CELL * r, x0 + CELL * c
                    raw[y : y + CELL, x : x + CELL] = COLOURS[side]


def strip_rows(size):
    """Rows of a size x size frame whose raw source lies within the score area (raw rows 0-21)."""
    return int(STRIP_ROWS * size / ATARI_H)


@functools.lru_cache(maxsize=8)
def templates(size):
    """Every score's strip at this frame size: float32 (2 sides, 22 values, rows, size // 2, 3)."""
    out = np.zeros((2, MAX_SCORE + 1, strip_rows(size), size // 2, 3), np.float32)
    for side in (0, 1):
        for v in range(MAX_SCORE + 1):
            raw = np.empty((ATARI_H, ATARI_W, 3), np.uint8)
            raw[:] = COLOR_BACKGROUND
            draw_score(raw, v, side)
            half = utils.resize_frame(raw, size)[: strip_rows(size)]
            out[side, v] = half[:, side * (size // 2) : (side + 1) * (size // 2)] if side else half[:, : size // 2]
    return out


def read_score(frames):
    """uint8 (..., S, S, 3) -> int64 (..., 2): (opponent, player), each half's nearest score template;
    -1 where the strip is not the field's colour (the reset screen, or a frame that is not Pong's)."""
    frames = np.asarray(frames)
    size = frames.shape[-2]
    t = templates(size)
    strip = frames[..., : strip_rows(size), :, :].astype(np.float32)
    field = np.abs(np.median(strip.reshape(*strip.shape[:-3], -1, 3), -2) - COLOR_BACKGROUND).max(-1) < 16
    out = []
    for side in (0, 1):
        half = strip[..., side * (size // 2) : (side + 1) * (size // 2), :]  # (..., rows, S/2, 3)
        half = half.reshape(*half.shape[:-3], 1, -1)  # (..., 1, D)
        dist = np.square(half - t[side].reshape(len(t[side]), -1)).sum(-1)  # (..., 22)
        out.append(np.where(field, dist.argmin(-1), -1))
    return np.stack(out, -1).astype(np.int64)


def score_from_rewards(rewards, lag=1):
    """The score (opponent, player) each frame of a recorded episode shows: int64 (N, 2).

    rewards[k] is the reward of the step that produced frame k; the digits change `lag` frames
    later (the game redraws them on the next frame). Episodes start at 0-0.
    """
    r = np.asarray(rewards)
    gained = np.stack([r < 0, r > 0], -1).astype(np.int64)  # (N, 2)
    shown = np.zeros_like(gained)
    shown[lag:] = gained[: len(r) - lag] if lag else gained
    return np.cumsum(shown, 0)


# -----------------------------------------------------------------------------
# the object detector

# Inside the play field a frame holds only the background and three object colours,
# and area resizing blends them linearly, so each pixel is bg + sum_o cover_o * (color_o - bg).
# Solving that 3x3 system gives every object's coverage fraction per pixel ("unmixing").
_OBJ_DELTAS = np.array([COLOR_BALL, COLOR_PLAYER, COLOR_OPPONENT], np.float32) - np.float32(COLOR_BACKGROUND)
_UNMIX = np.linalg.inv(_OBJ_DELTAS).astype(np.float32)  # (rgb - bg) @ _UNMIX -> (ball, player, opponent)
_COVER_MIN = 0.1  # per-pixel coverage below this is uint8 rounding noise (which is < 0.03)
# A ball covers some pixel by at least 3/4 of an Atari pixel (0.2 at 96 px, where a VAE's haze stays below 0.17)
_BALL_PEAK = 0.75


def _field_rows(h):
    """Rows [r0, r1) of an h-row frame that touch the play field, and the white-wall fraction of each."""
    sy = ATARI_H / h
    r0, r1 = int(np.floor(FIELD_TOP / sy)), int(np.ceil(FIELD_BOTTOM / sy))
    lo, hi = np.arange(r0, r1) * sy, np.arange(r0 + 1, r1 + 1) * sy
    wall = (np.clip(FIELD_TOP - lo, 0, sy) + np.clip(hi - FIELD_BOTTOM, 0, sy)) / sy
    return r0, r1, wall.astype(np.float32)


def _box_sum(a, ry, rx):
    """(n, H, W) -> (n, H, W): the sum of a over the (2ry+1) x (2rx+1) box around each pixel (zero padded)."""
    s = np.pad(a, ((0, 0), (ry + 1, ry), (rx + 1, rx))).cumsum(1).cumsum(2)
    ky, kx = 2 * ry + 1, 2 * rx + 1
    return s[:, ky:, kx:] - s[:, :-ky, kx:] - s[:, ky:, :-kx] + s[:, :-ky, :-kx]


def detect_objects(frames, chunk=1024):
    """Find the ball and both paddles in Pong frames by colour, vectorized over any leading dims.

    frames: (..., H, W, 3) uint8, a raw 210x160 frame or one area-resized from it (resize_frame).
    Returns a dict of numpy arrays, positions in pixel-index coordinates of the given frame
    (the centre of pixel column j is x=j), NaN where the object is absent:
      ball_present (...,) bool, ball_xy (..., 2) float (x, y), player_y (...,), opponent_y (...,).
    Only rows of the play field count (the walls are white like the ball, the score digits
    share the paddle colours); wall blended into the border rows is subtracted exactly.
    A coverage-weighted centroid gives sub-pixel positions; for the ball, only coverage within
    8 Atari pixels of the densest spot counts, so faint haze elsewhere in a generated or reconstructed
    frame neither drags the position nor makes a ball on its own. The player's paddle is searched in
    the right half, the opponent's in the left half. The first frame after a reset uses another
    palette: frames whose field is not mostly Pong's background report every object absent.
    """
    frames = np.asarray(frames)
    lead, (h, w) = frames.shape[:-3], frames.shape[-3:-1]
    flat = frames.reshape(-1, h * w, 3)
    r0, r1, wall = _field_rows(h)
    area = (ATARI_H / h) * (ATARI_W / w)  # input pixels per output pixel
    ball_min, paddle_min = 0.4 * 8 / area, 4 / area  # 40% of the 2x4 ball; one row of the 4-wide paddle
    near_r, near_c = int(8 * h / ATARI_H), int(8 * w / ATARI_W)  # the ball's neighbourhood, in pixels
    # Every object raises the blue channel above what background (and wall, in the border
    # rows) gives, so this threshold finds each pixel covered >= ~5% by anything; the
    # unmixing then runs on those few pixels only.
    blue_max = np.floor(COLOR_BACKGROUND[2] + 2.5 + wall * (COLOR_BALL[2] - COLOR_BACKGROUND[2])).astype(np.uint8)
    bx, by, py, oy = (np.full(len(flat), np.nan, np.float32) for _ in range(4))
    for i in range(0, len(flat), chunk):
        f = flat[i : i + chunk]  # (B, h*w, 3)
        n = len(f)
        blue = f[:, r0 * w : r1 * w, 2].reshape(n, r1 - r0, w)
        idx = np.flatnonzero(blue > blue_max[:, None])  # into (B, rows, W)
        b, rc = np.divmod(idx, (r1 - r0) * w)
        r, c = np.divmod(rc, w)
        cover = (f.reshape(-1, 3)[b * h * w + (r + r0) * w + c] - np.float32(COLOR_BACKGROUND)) @ _UNMIX  # (K, 3)
        cover[:, 0] -= wall[r]
        cover = np.where(cover > _COVER_MIN, np.minimum(cover, 1.0), 0.0)
        y, right = r + r0, c >= w // 2
        # the ball is where a (2 near_r + 1) x (2 near_c + 1) box holds the most ball coverage
        dense = np.zeros((n, r1 - r0, w), np.float32)
        dense[b, r, c] = cover[:, 0]
        cr, cc = np.divmod(_box_sum(dense, near_r, near_c).reshape(n, -1).argmax(1), w)
        ball = cover[:, 0] * ((np.abs(r - cr[b]) <= near_r) & (np.abs(c - cc[b]) <= near_c))
        peak = np.zeros(n, np.float32)
        np.maximum.at(peak, b, ball)  # a ball is a blob, not a haze of faint pixels (as beside a blurred paddle)
        sums = lambda weights=None, b=b, n=n: np.bincount(b, weights, minlength=n)  # per-frame sums
        # the reset frame has another palette (its background's blue is 43, Pong's 17): no play frame
        play = blue[:, ::2, ::2].mean((1, 2)) < 30
        with np.errstate(invalid="ignore", divide="ignore"):
            m = sums(weights=ball)
            ok = (m >= ball_min) & (peak >= _BALL_PEAK / area) & play
            bx[i : i + n] = np.where(ok, sums(weights=ball * c) / m, np.nan)
            by[i : i + n] = np.where(ok, sums(weights=ball * y) / m, np.nan)
            for out, cov in ((py, cover[:, 1] * right), (oy, cover[:, 2] * ~right)):
                m = sums(weights=cov)
                out[i : i + n] = np.where((m >= paddle_min) & play, sums(weights=cov * y) / m, np.nan)
    return {
        "ball_present": ~np.isnan(bx).reshape(lead),
        "ball_xy": np.stack([bx, by], -1).reshape(*lead, 2),
        "player_y": py.reshape(lead),
        "opponent_y": oy.reshape(lead),
    }


# -----------------------------------------------------------------------------
# recording: the tracker agent and the ball returns it is judged by


class TrackerAgent:
    """Moves the player's paddle toward the ball's y; NOOP within DEAD_ZONE px or with no ball."""

    DEAD_ZONE = 4.0

    def reset(self, rng):
        pass

    def act(self, obs):
        d = detect_objects(obs)
        diff = d["ball_xy"][1] - d["player_y"]  # NaN when either is absent
        return 0 if not abs(diff) > self.DEAD_ZONE else (UP if diff < 0 else DOWN)


def ball_mask(frames, radius=2):
    """(N, H, W) bool: the pixels within `radius` (each axis) of the detected ball's centre in uint8 (N, H, W, 3)
    frames; none where no ball is seen. What train.py vae --ball-weight weights."""
    xy = detect_objects(frames)["ball_xy"]  # (N, 2), NaN without a ball: every comparison below is False
    h, w = frames.shape[1:3]
    rows = np.abs(np.arange(h)[None, :] - xy[:, 1:]) <= radius  # (N, H)
    cols = np.abs(np.arange(w)[None, :] - xy[:, :1]) <= radius  # (N, W)
    return rows[:, :, None] & cols[:, None, :]


def ball_crowded(frames, reach=3):
    """(N,) bool: a ball is seen in uint8 (N, H, W, 3) frames and something else (a paddle, a wall) is drawn within
    `reach` pixels of its centre: the balls a VAE merges into what shares their latent cell (issue #26, round 10).
    What train.py vae --ball-oversample draws more often."""
    xy = detect_objects(frames)["ball_xy"]
    k = np.flatnonzero(~np.isnan(xy[:, 0]))
    h, w = frames.shape[1:3]
    d = np.arange(-reach, reach + 1)
    rows = np.clip(np.round(xy[k, 1:]).astype(int) + d, 0, h - 1)  # (K, 2 reach + 1)
    cols = np.clip(np.round(xy[k, :1]).astype(int) + d, 0, w - 1)
    patch = frames[k[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.int16)  # (K, 2r+1, 2r+1, 3)
    drawn = np.abs(patch - np.int16(COLOR_BACKGROUND)).max(-1) > 24
    ball = (np.abs(d)[:, None] <= 1) & (np.abs(d)[None, :] <= 1)  # the ball's own pixels (at most 2 px at 96 px)
    out = np.zeros(len(frames), bool)
    out[k] = (drawn & ~ball).any((1, 2))
    return out


def count_returns(ball_x, width):
    """How often the ball's horizontal motion turns from rightward to leftward in the right quarter.

    ball_x: (N,) per-frame ball x (NaN when absent). Standing-still frames (dx = 0, as at the
    bounce) are skipped; a turn across an absent ball (a point and a new serve) does not count.
    """
    k = np.flatnonzero(~np.isnan(ball_x))
    dx, gap = np.diff(ball_x[k]), np.diff(k)
    moves = np.flatnonzero((dx != 0) & (gap == 1))  # moves between consecutive visible frames
    a, b = moves[:-1], moves[1:]
    turn = (dx[a] > 0) & (dx[b] < 0) & (k[b] - k[a] <= 3) & (ball_x[k[a + 1]] > 0.75 * width)
    return int(turn.sum())


# -----------------------------------------------------------------------------
# Pong's metrics (evaluate.py adds them to metrics.py's when the game is Pong)
#
# Score changes are found the same way in real and generated frames, without the recorded rewards.
# "score_events": a point at frame k when the ball was seen at k-1 within 15% of the width from the
# left or right edge and is gone at k, k+1 and k+2 (after a point the real game hides the ball for ~15
# frames), scored by the player if it left on the left. "score_digits": the score digits (the rows
# above the top wall) change between k-1 and k and then stay put for 2 frames; the half that changed
# says who scored. A generated event matches a real one with the same scorer within +-2 frames
# (one-to-one); precision = matched / generated events, recall = matched / real events, over all
# rollouts. "score_read_opponent/player": the share of frames whose generated (or reconstructed)
# score half reads as the real one (read_score); "score_held" at step k: both halves read right, over
# the rollouts whose real score has not changed by step k. On recorded episodes both detectors find
# every recorded reward within +-2 frames and nothing else but the reset frame (tests/test_evaluate.py).
# "ball_serves": after each point (a score event) with SERVE_WAIT frames of the rollout left, whether a ball is
# seen again within them (the next serve), and after how many frames; for the real and the generated frames.

SIDES = ("opponent", "player")  # read_score's halves, left and right
EDGE, GONE, TOL = 0.15, 3, 2  # score events: edge band (share of width), frames gone, match tolerance
SERVE_WAIT = 24  # frames: the real game serves the next ball 15-16 frames after a point
HIT_PX = 4  # a generated ball within this many pixels of the real one is a hit
# why a metric is null, by a fragment of its name in metrics.json (metrics.to_json)
REASONS = [
    ("score_read", "no real frame shows a readable score"),
    ("score_held", "the real score changed (or is unreadable) in every rollout by this step"),
    ("ball_presence_crowded", "no real frame shows a ball beside a paddle or a wall"),
    ("ball_presence", "no real frame shows a ball"),
    ("ball_spurious", "every real frame shows a ball"),
    ("precision", "no point is scored in the generated rollouts"),
    ("recall", "no point is scored in the real rollout windows"),
    ("serves.real", "no real point with SERVE_WAIT frames of the rollout after it (or no serve after one)"),
    ("serves.generated", "no generated point with SERVE_WAIT frames of the rollout after it (or no serve after one)"),
    ("ar_served", "no generated point with SERVE_WAIT frames of the rollout after it"),
    ("_px", "the object is never seen in both the real and the generated frame (of a curve: at some steps)"),
    ("moves", "the player's paddle is not seen at the start and the end (or no start state has room to move)"),
    ("up_above_down", "the player's paddle is not seen at the end of both rollouts"),
]


def score_events(frames, det, digits=False):
    """Points scored in a sequence: uint8 (T, H, W, 3) and its detect_objects -> [(k, scorer)], 1 = the player."""
    T, H, W = frames.shape[:3]
    if digits:
        top = max(1, int(24 * H / ATARI_H))  # the digits sit above the top wall (raw rows 24..33)
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


def serve_delays(seen, events, wait=SERVE_WAIT):
    """Frames from each point (score_events) to the next frame with a ball seen, NaN if none within `wait`;
    only the points with `wait` frames after them in the sequence."""
    out = []
    for k, _ in events:
        if k + wait < len(seen):
            back = np.flatnonzero(seen[k : k + wait + 1])
            out.append(back[0] if len(back) else np.nan)
    return out


def match_events(real, gen, tol=TOL):
    """Greedy one-to-one matching of (k, side) events within +-tol frames -> number matched."""
    free = list(gen)
    for k, side in real:
        hit = next((g for g in free if g[1] == side and abs(g[0] - k) <= tol), None)
        if hit is not None:
            free.remove(hit)
    return len(gen) - len(free)


def objects(real, gen):
    """Detections and position errors (px) for real vs generated uint8 (..., H, W, 3) frames."""
    dr, dg = detect_objects(real), detect_objects(gen)
    err = {"ball": np.linalg.norm(dr["ball_xy"] - dg["ball_xy"], axis=-1)}  # NaN unless both have it
    err.update({k: np.abs(dr[f"{k}_y"] - dg[f"{k}_y"]) for k in ("player", "opponent")})
    return dr, dg, err, share(dg["ball_present"], dr["ball_present"])


def score_read(real, gen):
    """Share of frames whose generated score half reads as the real one does (read_score), each half."""
    sr, sg = read_score(real), read_score(gen)
    return {f"score_read_{side}": share(sg[..., i] == sr[..., i], sr[..., i] >= 0) for i, side in enumerate(SIDES)}


def frame_metrics(real, gen):
    """Ball and score of (N, H, W, 3) generated frames against the real ones; ball_presence: share of real balls
    also seen in gen."""
    dr, dg, err, presence = objects(real, gen)
    m = dict(ball_presence=presence, ball_spurious=share(dg["ball_present"], ~dr["ball_present"]))
    m |= dict(ball_hit_rate=share(err["ball"] <= HIT_PX, dr["ball_present"]))  # NaN (no ball drawn) is a miss
    m |= dict(ball_error_px=float(nanmean(err["ball"])), n_ball=int(dr["ball_present"].sum()))
    crowded = ball_crowded(real)  # a paddle or a wall within 3 px: where a VAE loses its balls
    m |= dict(ball_presence_crowded=share(dg["ball_present"], crowded), n_ball_crowded=int(crowded.sum()))
    return m | score_read(real, gen)


def rollout_metrics(real, gen, horizons):
    """Object, score-held and score-event metrics of rollouts: real, gen uint8 (R, 1 + T, H, W, 3)."""
    dr, dg, err, _ = objects(real, gen)
    has_r, has_g = dr["ball_present"][:, 1:], dg["ball_present"][:, 1:]
    at = lambda curve: {str(k): float(curve[k - 1]) for k in horizons}  # steps count from 1
    curves = {k: nanmean(v[:, 1:], 0) for k, v in err.items()}
    res = {"ball_presence": share(has_g, has_r), "ball_spurious": share(has_g, ~has_r)}
    res |= {f"{k}_error_px": at(c) for k, c in curves.items()}
    res |= {"ball_error_first16_px": float(nanmean(err["ball"][:, 1:17])), "curves_px": curves}
    hit = err["ball"][:, 1:] <= HIT_PX  # NaN (a ball missing on either side) is a miss
    res |= {"ball_hit_rate": share(hit, has_r), "ball_hit_rate_first16": share(hit[:, :16], has_r[:, :16])}
    # over the first 16 steps, before the generated game has gone its own way (a ball out at another time)
    res |= {"ball_presence_first16": share(has_g[:, :16], has_r[:, :16])}
    res |= {"ball_spurious_first16": share(has_g[:, :16], ~has_r[:, :16])}
    # score held: both halves read as the real frame's, where the real score has not changed since the start
    sr, sg = read_score(real), read_score(gen)  # (R, 1 + T, 2)
    same = (sr == sr[:, :1]).all(-1) & (sr >= 0).all(-1)
    held = (sg == sr).all(-1)
    res["score_held"] = at([share(held[:, k], same[:, k]) for k in range(1, held.shape[1])])
    delays = {"real": [], "generated": []}
    for name in ("score_events", "score_digits"):
        n_r = n_g = n_m = 0
        for i in range(len(real)):
            ev_r, ev_g = (
                score_events(fr[i], {k: v[i] for k, v in d.items()}, name == "score_digits")
                for fr, d in ((real, dr), (gen, dg))
            )
            n_r, n_g, n_m = n_r + len(ev_r), n_g + len(ev_g), n_m + match_events(ev_r, ev_g)
            if name == "score_events":
                delays["real"] += serve_delays(dr["ball_present"][i], ev_r)
                delays["generated"] += serve_delays(dg["ball_present"][i], ev_g)
        ratio = lambda a, b: a / b if b else float("nan")
        res[name] = dict(precision=ratio(n_m, n_g), recall=ratio(n_m, n_r), n_real=n_r, n_generated=n_g, n_matched=n_m)
    res["ball_serves"] = {"wait": SERVE_WAIT}
    for side, d in delays.items():
        d = np.array(d, np.float64)
        ok = ~np.isnan(d)
        res["ball_serves"] |= {f"{side}_served": float(ok.mean()) if len(d) else float("nan"), f"n_{side}": len(d)}
        res["ball_serves"][f"{side}_delay"] = float(np.median(d[ok])) if ok.any() else float("nan")
    return res


def control_metrics(generate, start, K, y_range):
    """Hold up vs down for K frames from the same real states (same noise); read the player's paddle.

    generate(action) -> uint8 (R, K, H, W, 3) rollouts from the start frames (R, H, W, 3) with that action held;
    y_range: the paddle's observed travel (min, max) in the data.
    """
    y = {a: detect_objects(generate(a)[:, -1])["player_y"] for a in (UP, DOWN)}
    y0, (lo, hi) = detect_objects(start)["player_y"], y_range
    seen = {a: np.isfinite(y0) & np.isfinite(y[a]) for a in (UP, DOWN)}
    with np.errstate(invalid="ignore"):
        up, down = y[UP] <= y0 - 1, y[DOWN] >= y0 + 1
        m = dict(frames=K, n=len(start), up_moves_up=share(up, seen[UP]), down_moves_down=share(down, seen[DOWN]))
        # "_free": only start states >= 2 px away from the paddle's observed travel limit in that direction
        m.update(up_moves_up_free=share(up, seen[UP] & (y0 - lo >= 2)))
        m.update(down_moves_down_free=share(down, seen[DOWN] & (hi - y0 >= 2)))
        m.update(up_above_down=share(y[UP] < y[DOWN], np.isfinite(y[UP]) & np.isfinite(y[DOWN])))
    return m
