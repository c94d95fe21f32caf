"""Who plays while generate_dataset.py records a game (in Pong, the right, green paddle).

Every agent has reset(rng), called at each episode start, and act(raw RGB frame) -> action index.
random: uniform actions over the game's action set. tracker (Pong only, pong.TrackerAgent): scripted;
moves the paddle toward the ball's height found by pong.detect_objects on the raw frame, NOOP within a
4 px dead zone. It returns the ball often: this is the agent that gives the world model rallies and
points won by the player. dqn / ppo: stable-baselines3 CnnPolicy on the standard Atari preprocessing
(AtariWrapper with frame_skip=1 over the recorder's env, which already skips --frameskip frames: 84x84
grey, 4 stacked frames), trained by train_agent on the game (without --max-pool's pooling) and saved to
--agent-path, which later runs reuse. When recording, the agent sees a replica of that preprocessing
of the frames it records.
A DQN trained for minutes on a CPU plays close to random: rl-baselines3-zoo trains Pong DQN for 1e7
steps, and it scores above zero after roughly 1-2M steps: 3-6 h at 100 steps/s, 7-14 h at the
~40 steps/s measured on the (shared) 2-core dev machine, where the default 20000 steps take ~9 min.

stable-baselines3 and torch are imported only by the dqn / ppo code, so random and tracker need neither.
"""

import os
import time

import numpy as np

import games
from utils import die


class RandomAgent:
    """Uniform random actions from the episode's generator."""

    def __init__(self, n_actions):
        self.n_actions = n_actions

    def reset(self, rng):
        self.rng = rng

    def act(self, obs):
        return int(self.rng.integers(self.n_actions))


class SB3Agent:
    """A trained SB3 policy, fed by a replica of AtariWrapper(frame_skip=1) + VecFrameStack(4)."""

    def __init__(self, algo, path):
        import stable_baselines3
        import torch

        torch.set_num_threads(1)  # see train_agent
        self.model = getattr(stable_baselines3, algo.upper()).load(path, device="cpu")

    def reset(self, rng):
        self.stack = np.zeros((84, 84, 4), np.uint8)  # VecFrameStack starts from zeros

    def act(self, obs):
        import cv2

        grey = cv2.cvtColor(obs, cv2.COLOR_RGB2GRAY)  # WarpFrame
        self.stack[..., :-1] = self.stack[..., 1:]
        self.stack[..., -1] = cv2.resize(grey, (84, 84), interpolation=cv2.INTER_AREA)
        return int(self.model.predict(self.stack, deterministic=True)[0])


def agent_path(cfg):
    return cfg.agent_path.format(agent=cfg.agent, game=cfg.game)


def make_agent(cfg, action_names):
    """The agent named by cfg.agent for a game with these actions; dqn / ppo load agent_path(cfg) (train_agent)."""
    if cfg.agent in ("dqn", "ppo"):
        return SB3Agent(cfg.agent, agent_path(cfg))
    if cfg.agent == "tracker":
        import pong

        return pong.TrackerAgent()
    return RandomAgent(len(action_names))


def train_agent(cfg, path):
    """Train an SB3 DQN/PPO on the standard Atari preprocessing and save it atomically to `path`."""
    import torch
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    # one thread: with two, a busy 2-core machine made each forward 30x slower (OpenMP waits)
    torch.set_num_threads(1)

    env_kwargs = {"frameskip": cfg.frameskip, "repeat_action_probability": cfg.sticky}
    n_envs = 1 if cfg.agent == "dqn" else 4
    venv = make_atari_env(
        games.resolve(cfg.game)[1], n_envs, cfg.seed, wrapper_kwargs={"frame_skip": 1}, env_kwargs=env_kwargs
    )
    venv = VecFrameStack(venv, 4)
    if cfg.agent == "dqn":  # rl-baselines3-zoo's Atari settings, but a 10k replay buffer (~300 MB)
        algo = DQN
        kw = dict(buffer_size=min(cfg.train_steps, 10_000), learning_starts=min(cfg.train_steps // 10, 10_000))
        kw.update(learning_rate=1e-4, batch_size=32, train_freq=4, target_update_interval=1000)
        kw.update(exploration_fraction=0.1, exploration_final_eps=0.01, optimize_memory_usage=True)
        kw.update(replay_buffer_kwargs={"handle_timeout_termination": False})
    else:
        algo = PPO
        kw = dict(n_steps=128, batch_size=256, n_epochs=4, learning_rate=2.5e-4, clip_range=0.1, ent_coef=0.01)
    model = algo("CnnPolicy", venv, seed=cfg.seed, device="cpu", **kw)
    print(f"training {cfg.agent} on {cfg.game} for {cfg.train_steps} steps (a strong Pong agent needs ~1e6-1e7)")
    t0 = time.time()
    model.learn(cfg.train_steps)
    dt = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.zip"  # SB3 appends .zip to other names
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(
        f"trained {cfg.agent} for {cfg.train_steps} steps in {dt:.0f}s "
        f"({cfg.train_steps / dt:.0f} steps/s), saved {path}"
    )


def ensure_agent(cfg):
    """dqn / ppo: train the agent into --agent-path once, reuse it afterwards; a bad file is a one-line error."""
    if cfg.agent not in ("dqn", "ppo"):
        return
    path = agent_path(cfg)
    if os.path.exists(path):
        print(f"reusing trained {cfg.agent} agent {path} (delete it to retrain)")
    else:
        train_agent(cfg, path)
    try:
        make_agent(cfg, [])
    except Exception as e:  # noqa: BLE001 - a wrong or damaged agent file
        die(f"cannot load {cfg.agent} agent {path}: {type(e).__name__}: {str(e)[:200]}")
