"""Pong's score: the digits the game draws, and a reader for them in frames of any size.

    score = read_score(frames)          # uint8 (..., S, S, 3) -> int (..., 2): (opponent, player)
    truth = score_from_rewards(rewards) # a recorded episode's rewards -> the score each frame shows

The Atari draws each side's score above the top wall in a 3x5 font of 4x4-pixel cells (raw rows
1-20), the opponent's (left, orange) with its units digit at raw columns 36-47, the player's
(right, green) at 116-127, the tens digit 16 columns to the left, no leading zero. The reader
draws every score 0-21 into a raw 210x160 frame, resizes it as the recorder does
(utils.resize_frame, area averaging) and reads each half of a frame's score strip as its
nearest template. On recorded episodes it reads every frame right (tests/test_pong.py).
"""

import functools

import numpy as np

import utils

RAW_H, RAW_W = 210, 160
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
COLOURS = {0: utils.COLOR_OPPONENT, 1: utils.COLOR_PLAYER}


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
    return int(STRIP_ROWS * size / RAW_H)


@functools.lru_cache(maxsize=8)
def templates(size):
    """Every score's strip at this frame size: float32 (2 sides, 22 values, rows, size // 2, 3)."""
    out = np.zeros((2, MAX_SCORE + 1, strip_rows(size), size // 2, 3), np.float32)
    for side in (0, 1):
        for v in range(MAX_SCORE + 1):
            raw = np.empty((RAW_H, RAW_W, 3), np.uint8)
            raw[:] = utils.COLOR_BACKGROUND
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
    field = np.abs(np.median(strip.reshape(*strip.shape[:-3], -1, 3), -2) - utils.COLOR_BACKGROUND).max(-1) < 16
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
