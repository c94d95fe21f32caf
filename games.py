"""Any Atari game of the Arcade Learning Environment: its name, its environment, its actions.

    game, env_id = resolve("Breakout")           # also "breakout", "ALE/Breakout-v5" -> ("breakout", ...)
    env = AtariEnv(env_id, frameskip=4, max_pool=True)
    names = env.action_names                     # the minimal action set: ['NOOP', 'FIRE', 'RIGHT', 'LEFT']
    game, names = from_config(checkpoint_config)  # what a model was trained on (Pong before issue #28)
    keymap = KeyMap(game, names); keymap((up, down, left, right, fire))  # play.py's keys -> an action index

The same action index means different things in different games (2 is RIGHT in Pong, UP in
Boxing), so a recording's meta.json and every checkpoint store the game and its action names, and
every script reads them from there. gymnasium and ale-py are imported only here, and only when an
environment is made: training and generation need neither.

Flicker: many games draw some objects on alternate frames (SpaceInvaders' shots, Asteroids). With
max_pool a step returns the pixel-wise max of its last two raw frames, as DIAMOND, IRIS and
DreamerV3 record; without it, the last raw frame (ALE v5's default).
"""

import itertools

import numpy as np


def _registry():
    """{rom id: 'ALE/Name-v5'} for every ALE game gymnasium knows."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    roms = set(ale_py.roms.get_all_rom_ids())
    out = {}
    for name, spec in gym.registry.items():
        game = (spec.kwargs or {}).get("game")
        if (
            name.startswith("ALE/")
            and name.endswith("-v5")
            and game in roms
            and spec.kwargs.get("obs_type", "rgb") == "rgb"
        ):
            out[game] = name
    return out


def _key(name):
    return name.lower().replace("_", "").replace("-", "")


def resolve(name):
    """A game's short name ('breakout'), CamelCase name or ALE id -> (rom id, gymnasium id), or ValueError."""
    games = _registry()
    wanted = name[len("ALE/") :].rsplit("-v", 1)[0] if name.startswith("ALE/") else name
    hit = [g for g in games if _key(g) == _key(wanted)]
    if not hit:
        close = sorted(g for g in games if _key(wanted)[:3] in _key(g))[:8]
        hint = (
            f"; did you mean {', '.join(close)}?" if close else f" (one of {len(games)}, e.g. pong, breakout, freeway)"
        )
        raise ValueError(f"unknown game {name!r}{hint}")
    return hit[0], games[hit[0]]


def action_meanings(env_id):
    """The minimal action set's names of a game, from the emulator."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make(env_id)
    try:
        return list(env.unwrapped.get_action_meanings())
    finally:
        env.close()


class AtariEnv:
    """An ALE game stepped `frameskip` raw frames at a time; the step's frame is the last raw one, or with
    max_pool the pixel-wise max of the last two. reset/step as gymnasium's (obs, reward, terminated,
    truncated, info); info["lives"] as ALE counts them."""

    def __init__(self, env_id, frameskip=4, sticky=0.0, max_pool=False):
        import ale_py
        import gymnasium as gym

        gym.register_envs(ale_py)
        self.frameskip, self.max_pool = frameskip, max_pool and frameskip > 1
        # max_pool steps the emulator one raw frame at a time (ALE applies sticky actions per raw frame either way)
        skip = 1 if self.max_pool else frameskip
        self.env = gym.make(env_id, frameskip=skip, repeat_action_probability=sticky)
        self.action_names = list(self.env.unwrapped.get_action_meanings())

    def reset(self, seed=None):
        return self.env.reset(seed=seed)

    def step(self, action):
        if not self.max_pool:
            return self.env.step(action)
        total, prev = 0.0, None
        for i in range(self.frameskip):
            obs, r, terminated, truncated, info = self.env.step(action)
            total += float(r)
            if terminated or truncated:
                break
            if i == self.frameskip - 2:
                prev = obs
        if prev is not None:
            obs = np.maximum(obs, prev)
        return obs, total, terminated, truncated, info

    def close(self):
        self.env.close()


# -----------------------------------------------------------------------------
# the keyboard: play.py's arrows and Space spell a game's actions


KEYS = ("Up", "Down", "Left", "Right", "Space")  # a key state is (up, down, left, right, fire), in this order
WORDS = ("UP", "DOWN", "LEFT", "RIGHT", "FIRE")  # the part of an ALE action name each key stands for


class KeyMap:
    """The arrows and Space -> a game's actions, built once from its name and action names: a key state spells
    UP/DOWN + RIGHT/LEFT + FIRE (opposite arrows cancel); where the game lacks that name, the longest name spelled
    by fewer of the keys, Space kept first, then Up/Down, so that a pressed Space fires (Breakout has no UP or
    RIGHTFIRE: Up+Space and Right+Space are FIRE); NOOP when none is left."""

    def __init__(self, game, action_names):
        self.names = list(action_names)
        aliases = {}
        if game == "pong":
            import pong

            aliases = pong.KEY_ALIASES
        self.words = [aliases.get(w, w) for w in WORDS]
        self.table = {keys: self._spell(keys) for keys in itertools.product((False, True), repeat=len(KEYS))}
        self.noop = self.table[(False,) * len(KEYS)]

    def _spell(self, keys):
        held = {w for k, w in zip(keys, self.words) if k and w}
        for pair in ({"UP", "DOWN"}, {"LEFT", "RIGHT"}):
            if pair <= held:
                held -= pair
        parts = [w for w in ("FIRE", "UP", "DOWN", "RIGHT", "LEFT") if w in held]  # kept first on a tie
        for n in range(len(parts), 0, -1):  # the fewest parts dropped
            for kept in itertools.combinations(parts, n):
                name = "".join(w for w in ("UP", "DOWN", "RIGHT", "LEFT", "FIRE") if w in kept)  # ALE's order
                if name in self.names:
                    return self.names.index(name)
        return self.names.index("NOOP") if "NOOP" in self.names else 0

    def __call__(self, keys):
        """(up, down, left, right, fire) -> action index."""
        return self.table[tuple(bool(k) for k in keys)]

    def key(self, name):
        """A key alone ("Up", ..., "Space") -> the action index it gives."""
        return self(tuple(k == name for k in KEYS))

    def keys_text(self):
        """What each key does alone, e.g. Pong's "Up: RIGHT  Down: LEFT  Space: FIRE"; keys that do nothing left out."""
        return "  ".join(f"{k}: {self.names[self.key(k)]}" for k in KEYS if self.key(k) != self.noop) or "no key acts"

    def actions_text(self):
        """Every action and the fewest keys that give it, e.g. "... RIGHTFIRE: Up+Space ..."."""
        how = {}
        for keys in sorted(self.table, key=sum):  # fewest keys first
            how.setdefault(self.table[keys], "+".join(k for k, held in zip(KEYS, keys) if held) or "no key")
        return "  ".join(f"{name}: {how.get(i, '(no key)')}" for i, name in enumerate(self.names))


def from_config(config):
    """(game, action names) a checkpoint's config or a recording's meta.json names. Those made before
    issue #28 hold Pong and say so by their env id, or by nothing at all."""
    names = config.get("action_names")
    game = config.get("game") or ("pong" if "Pong" in str(config.get("env_id", "ALE/Pong-v5")) else "")
    if names is None and game == "pong":
        import pong

        names = pong.ACTION_NAMES
    if not names:
        raise ValueError("names no actions: an 'action_names' list is needed (see README, the data format)")
    return game or "unknown", list(names)
