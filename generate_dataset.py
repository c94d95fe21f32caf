"""Record Atari gameplay (frames + the player's actions) for training the world model: Pong, or any ALE game.

    python generate_dataset.py --agent random --episodes 2 --max-episode-frames 100 --out /tmp/pong  # smoke
    python generate_dataset.py --game Breakout --agent random --episodes 40 --out data/breakout  # any game
    python generate_dataset.py --list-games                   # the games ALE has
    python generate_dataset.py --agent tracker --episodes 50 --workers 2 --out data/pong   # rallies
    python generate_dataset.py --agent dqn --train-steps 20000 --episodes 20 --out data/pong_dqn
    python generate_dataset.py --bench                        # recording vs bare ALE stepping, frames/s

Agents (--agent random, tracker, dqn, ppo) are described in agents.py; dqn / ppo are trained for
--train-steps on the game and saved to --agent-path on the first run, which later runs reuse; the
tracker plays Pong only. Whatever the agent, with probability --epsilon the recorder starts a random
action held for 1..--hold-max frames, so every action shows up in every situation. In a game with
lives and a FIRE action (Breakout), the first action after the reset and after each lost life is
FIRE, which serves: random play keeps the game going.
--max-pool auto (the default) stores the pixel-wise max of each step's last two raw frames for every
game but Pong (objects drawn on alternate frames stay visible; Pong does not flicker and keeps the
recordings its models were trained on); on / off force it. meta.json holds the game, its action
names (the same index means different things in different games) and max_pool.

Alignment: an episode file holds N frames and
    frames   (N, S, S, 3) uint8  frames[k] is the k-th observation; frames[0], the reset one, has another palette
    actions  (N,) int64          actions[k] is taken after seeing frames[k] and leads to frames[k+1];
                                 actions[N-1] ended the game or hit --max-episode-frames, and its
                                 resulting frame is not stored (its reward is last_reward)
    rewards  (N,) float32        rewards[k] came with frames[k] (the step that produced it); rewards[0] = 0
    dones    (N,) bool           True only at k = N-1;  t_index (N,) int64: t_index[k] = k
and scalars seed, agent, epsilon, last_reward, terminated (game over, not the cap), ball_returns (Pong; -1
elsewhere). Any .npz with frames and actions, beside a meta.json naming the actions, trains as well
(README, "Train on your own game").

--frame-size 96: under area averaging (utils.resize_frame) the 2x4 ball becomes a ~1.2x1.8 px blob
that stays visible, and 96 = 8 * 12 gives the VAE's f8 downsampling a 12x12 latent.

Determinism: episode j is reset with seed + j and draws its random actions from a generator seeded
with (seed, j), so it is the same whichever worker records it (worker i takes the i-th, (i+W)-th, ...
missing episode). Resume: files appear by atomic rename; a re-run with the same --out keeps the
finished episodes, deletes stray temporary files and records the missing ones.
Ball returns (Pong): the ball's horizontal motion turning from rightward to leftward in the right
quarter of the screen (only the player's paddle sends it back there), from pong.detect_objects.
"""

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
from queue import Empty

import numpy as np

import games
import pong
from agents import ensure_agent, make_agent
from dataset import load_episode, read_meta
from utils import INTERRUPTS, FrameResizer, arg, atomic_savez, atomic_write_text, die, parse_config

CHUNK = 256  # raw frames handed to the writer thread at a time (~25 MB)


@dataclasses.dataclass
class Config:
    out: str = arg("data/pong", "output directory (re-running resumes it)")
    episodes: int = arg(10, "number of episodes")
    max_episode_frames: int = arg(5000, "frames per episode at most (longer games are cut)")
    frame_size: int = arg(96, "stored frames are frame_size x frame_size (a positive multiple of 8)")
    game: str = arg("pong", "ALE game: short name (pong, breakout, freeway), CamelCase or id (ALE/Pong-v5)")
    agent: str = arg("dqn", "who plays (tracker: Pong only)", choices=["dqn", "ppo", "random", "tracker"])
    epsilon: float = arg(0.2, "probability of starting a random action held for 1..hold_max frames")
    hold_max: int = arg(8, "longest hold of a random action, in frames")
    seed: int = arg(0, "episode j is reset with seed + j; all randomness derives from it")
    workers: int = arg(1, "recording processes")
    frameskip: int = arg(4, "ALE frames per step")
    sticky: float = arg(0.0, "ALE repeat_action_probability")
    max_pool: str = arg("auto", "store the max of each step's last 2 raw frames; auto: all but Pong",
                        choices=["auto", "on", "off"])  # fmt: skip
    train_steps: int = arg(20000, "dqn/ppo training steps when --agent-path does not exist yet")
    agent_path: str = arg("runs/agents/{agent}_{game}.zip", "trained agent file ({agent}, {game}: short name)")
    list_games: bool = arg(False, "list the ALE games (short names) and exit")
    bench: bool = arg(False, "benchmark recording against bare ALE stepping, then exit")
    bench_frames: int = arg(3000, "frames per benchmark run")


def make_env(cfg):
    """The game as recorded (cfg.game is a short name, from check_config; cfg.max_pool "on" or "off")."""
    return games.AtariEnv(games.resolve(cfg.game)[1], cfg.frameskip, cfg.sticky, cfg.max_pool == "on")


# -----------------------------------------------------------------------------
# recording


def _resize_and_find_ball(resizer, raw, is_pong):
    """The writer thread's work on a chunk of raw frames: (K, S, S, 3) frames and (K,) Pong's ball x (NaN elsewhere)."""
    frames = resizer(raw)
    if not is_pong:
        return frames, np.full(len(frames), np.nan, np.float32)
    # chunks of 32 frames stay in cache: 1.3x faster than detect_objects' default, the same values
    return frames, pong.detect_objects(frames, chunk=32)["ball_xy"][:, 0]


def _save_episode(path, chunks, arrays, is_pong):
    frames, ball_x = (np.concatenate(a) for a in zip(*(c.result() for c in chunks)))  # (N, S, S, 3), (N,)
    returns = pong.count_returns(ball_x, frames.shape[2]) if is_pong else -1
    atomic_savez(path, frames=frames, ball_returns=returns, **arrays)
    return os.path.basename(path)


def record(cfg, episodes):
    """Record the given episode indices into cfg.out; yields ("frames", n) and ("episode", name)."""
    env = make_env(cfg)
    agent, n_actions, is_pong = make_agent(cfg, env.action_names), len(env.action_names), cfg.game == "pong"
    fire = env.action_names.index("FIRE") if "FIRE" in env.action_names else None
    # one writer thread resizes, finds the ball and compresses while this one steps ALE; `jobs` bounds its backlog
    writer, jobs = concurrent.futures.ThreadPoolExecutor(1), collections.deque()

    def submit(job, is_episode=False):
        jobs.append((job, is_episode))
        return job

    def drain(limit):
        while jobs and (jobs[0][0].done() or len(jobs) > limit):
            job, is_episode = jobs.popleft()
            result = job.result()  # re-raises the writer's errors here
            if is_episode:
                yield "episode", result

    try:
        for j in episodes:
            rng = np.random.default_rng([cfg.seed, j])
            obs, info = env.reset(seed=cfg.seed + j)
            agent.reset(rng)
            lives = info.get("lives", 0)
            serve = fire is not None and lives > 0  # a game with lives waits for FIRE after the reset and each loss
            resizer, raw, chunks, actions, rewards = FrameResizer(cfg.frame_size, obs.shape), [obs], [], [], [0.0]
            hold = held = 0
            for k in range(cfg.max_episode_frames):
                a = agent.act(obs)  # always asked, so stateful agents see every frame
                if hold == 0 and rng.random() < cfg.epsilon:
                    held, hold = int(rng.integers(n_actions)), int(rng.integers(1, cfg.hold_max + 1))
                if hold:
                    a, hold = held, hold - 1
                if serve:
                    a, serve = fire, False
                actions.append(a)
                obs, r, terminated, truncated, info = env.step(a)
                if fire is not None and info.get("lives", 0) < lives:
                    serve = True
                lives = info.get("lives", 0)
                if terminated or truncated or k == cfg.max_episode_frames - 1:
                    break
                rewards.append(r)
                raw.append(obs)
                if len(raw) == CHUNK:
                    chunks.append(submit(writer.submit(_resize_and_find_ball, resizer, raw, is_pong)))
                    yield from drain(8)
                    yield "frames", len(raw)
                    raw = []
            if raw:
                chunks.append(submit(writer.submit(_resize_and_find_ball, resizer, raw, is_pong)))
            n = len(actions)
            arrays = dict(actions=np.array(actions, np.int64), rewards=np.array(rewards, np.float32))
            arrays.update(dones=np.arange(n) == n - 1, t_index=np.arange(n), seed=cfg.seed + j, agent=cfg.agent)
            arrays.update(epsilon=cfg.epsilon, last_reward=np.float32(r), terminated=bool(terminated))
            path = os.path.join(cfg.out, f"episode_{j:05d}.npz")
            submit(writer.submit(_save_episode, path, chunks, arrays, is_pong), is_episode=True)
            yield "frames", len(raw)
            yield from drain(8)
        yield from drain(0)
    finally:  # also when the caller stops early (generator close): the queued writes finish, episodes whole
        writer.shutdown(wait=True)
        env.close()


def _worker(cfg, episodes, queue, parent, stop_all):
    stop = INTERRUPTS.install()  # a terminal's Ctrl-C reaches every worker too
    gen = record(cfg, episodes)
    try:
        for msg in gen:
            if stop or stop_all.is_set() or os.getppid() != parent:  # asked to stop, or the parent was killed
                queue.cancel_join_thread()  # nobody may read the rest: never block on exit for it
                return
            queue.put(msg)
    except KeyboardInterrupt:  # a second signal
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent, which exits with it
        queue.put(("error", f"{type(e).__name__}: {e}"))
    finally:
        gen.close()
    queue.put(("exit", None))


def record_parallel(cfg, todo):
    """Workers 0..W-1 record todo[i::W] in separate processes; yields their messages.

    Closing the generator (the caller stopped on a signal) asks the workers to stop after their
    current chunk; each saves nothing half done, and one that has not stopped within 8 s is killed.
    """
    ctx = mp.get_context("spawn")
    queue, stop_all = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_worker, args=(cfg, todo[i :: cfg.workers], queue, os.getpid(), stop_all), daemon=True)
        for i in range(min(cfg.workers, len(todo)))
    ]
    for p in procs:
        p.start()
    running = len(procs)
    try:
        while running:
            try:
                kind, value = queue.get(timeout=1.0)
            except Empty:  # nothing for a second: check that no worker stopped without saying so
                if any(p.exitcode not in (None, 0) for p in procs) or not any(p.is_alive() for p in procs):
                    raise RuntimeError("a recording worker stopped unexpectedly") from None
                continue
            running -= kind == "exit"
            if kind == "error":
                raise RuntimeError(value)
            if kind != "exit":
                yield kind, value
    finally:  # done, an error, or the caller stopped: end the workers still running
        stop_all.set()
        deadline = time.time() + 8
        while any(p.is_alive() for p in procs) and time.time() < deadline:
            try:  # keep the queue drained, so that no worker blocks on a full pipe
                queue.get(timeout=0.1)
            except Empty:
                pass
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


# -----------------------------------------------------------------------------
# checks, resume, summary, benchmark


def check_config(cfg):
    """One-line errors for bad flags, before anything is written."""
    if cfg.frame_size <= 0 or cfg.frame_size % 8:
        die(f"--frame-size must be a positive multiple of 8 (the VAE downsamples by 8), got {cfg.frame_size}")
    for name in ("episodes", "max_episode_frames", "workers", "hold_max", "frameskip", "train_steps", "bench_frames"):
        if getattr(cfg, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("epsilon", "sticky"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            die(f"--{name} must be a probability in [0, 1], got {getattr(cfg, name)}")
    try:
        game = games.resolve(cfg.game)[0]
    except ValueError as e:
        die(f"--game: {e} (python generate_dataset.py --list-games)")
    if cfg.agent == "tracker" and game != "pong":
        die(f"--agent tracker plays Pong only (it follows Pong's ball); for {game} use random, dqn or ppo")
    max_pool = {"auto": "off" if game == "pong" else "on"}.get(cfg.max_pool, cfg.max_pool)
    return dataclasses.replace(cfg, game=game, max_pool=max_pool)


def recording_meta(cfg):
    """What meta.json says of a recording made with cfg (check_config's): the flags, the env id, the actions."""
    meta = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("bench", "bench_frames", "list_games")}
    env_id = games.resolve(cfg.game)[1]
    return meta | dict(env_id=env_id, max_pool=cfg.max_pool == "on", action_names=games.action_meanings(env_id))


def prepare_out(cfg):
    """Check --out against this config, clean stray temporary files; return the episodes to record."""
    meta_path, new = os.path.join(cfg.out, "meta.json"), recording_meta(cfg)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        die(f"--out {cfg.out} exists and is not a directory")
    if os.path.isfile(meta_path):
        try:
            old = read_meta(cfg.out)
        except ValueError as e:
            die(str(e))
        for key in ("env_id", "frame_size", "frameskip", "sticky", "max_pool"):
            if old.get(key, False) != new[key]:  # recordings from before --max-pool have none
                die(f"{cfg.out} holds a recording with {key}={old.get(key)!r}, not {new[key]!r}; use another --out")
    todo = []
    for j in range(cfg.episodes):
        path = os.path.join(cfg.out, f"episode_{j:05d}.npz")
        if not os.path.exists(path):
            todo.append(j)
            continue
        try:
            shape = load_episode(path, frames=False)["frames_shape"]
        except ValueError:
            print(f"{path} is unreadable: recording it again")
            todo.append(j)
            continue
        if shape[1:3] != (cfg.frame_size, cfg.frame_size):
            die(f"{path} has {shape[1]}x{shape[2]} frames, not {cfg.frame_size}; use another --out")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        for name in os.listdir(cfg.out):
            if name.startswith(".tmp-"):  # left by a killed run (utils' atomic writes)
                os.remove(os.path.join(cfg.out, name))
        atomic_write_text(meta_path, json.dumps({**new, "complete": False}, indent=1))
    except OSError as e:
        die(f"cannot write to --out {cfg.out}: {e.strerror or e}")
    return todo


def summarize(cfg, run):
    """Per-episode and total counts of every episode file in cfg.out, written to meta.json."""
    files = sorted(f for f in os.listdir(cfg.out) if f.startswith("episode_") and f.endswith(".npz"))
    meta = recording_meta(cfg)
    names = meta["action_names"]
    episodes, hist = [], np.zeros(len(names), np.int64)
    for name in files:
        ep = load_episode(os.path.join(cfg.out, name), frames=False)
        r = np.append(ep["rewards"], ep.get("last_reward", 0.0))
        counts = np.bincount(ep["actions"], minlength=len(names))
        hist += counts
        e = dict(file=name, seed=ep.get("seed"), agent=ep.get("agent"), frames=len(ep["actions"]))
        e.update(points_won=int((r > 0).sum()), points_lost=int((r < 0).sum()), episode_return=float(r.sum()))
        e.update(ball_returns=int(ep.get("ball_returns", -1)), terminated=bool(ep.get("terminated")))
        episodes.append({**e, "action_counts": counts.tolist()})
    keys = ("frames", "points_won", "points_lost") + (("ball_returns",) if cfg.game == "pong" else ())
    total = {k: sum(e[k] for e in episodes) for k in keys}
    total.update(episodes=len(episodes), bytes_on_disk=sum(os.path.getsize(os.path.join(cfg.out, f)) for f in files))
    total.update(action_histogram=dict(zip(names, hist.tolist())))
    meta.update(seeds=f"episode j is reset with seed + j = {cfg.seed} + j", complete=True)
    meta.update(total=total, last_run=run, per_episode=episodes)
    atomic_write_text(os.path.join(cfg.out, "meta.json"), json.dumps(meta, indent=1))
    return total


def bench(cfg):
    """Frames/s of recording (random agent, resize, compression, saving) against bare ALE stepping."""
    cfg = check_config(dataclasses.replace(cfg, agent="random", workers=1))
    env, rng = make_env(cfg), np.random.default_rng(cfg.seed)
    episodes = max(1, cfg.bench_frames // 1000)  # a random-play game of Pong lasts ~750-1000 frames

    def recording():
        with tempfile.TemporaryDirectory() as d:
            c = dataclasses.replace(cfg, out=d, max_episode_frames=cfg.bench_frames // episodes)
            n = sum(v for kind, v in record(c, range(episodes)) if kind == "frames")
            return n, sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))

    def bare(n):
        env.reset(seed=cfg.seed)
        for _ in range(n):
            _, _, terminated, truncated, _ = env.step(int(rng.integers(len(env.action_names))))
            if terminated or truncated:
                env.reset()

    best = {}
    for _ in range(2):  # alternate, keep each one's best round: this machine is shared
        for name in ("record", "bare"):
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "record":
                n, size = recording()
            else:
                bare(n)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if name not in best or wall < best[name][0]:
                best[name] = (wall, cpu)
    (rw, rc), (bw, bc) = best["record"], best["bare"]
    print(f"{cfg.game}, frameskip {cfg.frameskip}, max-pool {cfg.max_pool}, {n} frames per run, best of 2, one worker:")
    print(f"  bare ALE stepping : {n / bw:7.0f} frames/s  {bc / n * 1e6:5.0f} CPU us/frame")
    print(
        f"  recording         : {n / rw:7.0f} frames/s  {rc / n * 1e6:5.0f} CPU us/frame "
        f"(resize to {cfg.frame_size}, compress, save: {size / n:.0f} bytes/frame)"
    )
    print(f"  ratio recording/bare: {bw / rw:.2f} wall-clock, {bc / rc:.2f} CPU time")


def main(cfg):
    if cfg.list_games:
        return print(" ".join(sorted(games._registry())))
    if cfg.bench:
        return bench(cfg)
    cfg = check_config(cfg)
    todo = prepare_out(cfg)
    if todo:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # training an agent: SIGTERM stops it as Ctrl-C
        try:
            ensure_agent(cfg)
        except KeyboardInterrupt:
            die("interrupted while training the agent; nothing saved", 130)
    stop = INTERRUPTS.install()  # from here on, a signal stops the recording between two chunks
    from tqdm import tqdm

    print(
        f"recording {len(todo)} of {cfg.episodes} episodes of {cfg.game} into {cfg.out} "
        f"({cfg.agent}, {cfg.workers} workers)"
    )
    t0, saved = time.time(), 0
    bar = tqdm(total=None, unit="frame", desc="recording", dynamic_ncols=True)
    gen = record(cfg, todo) if cfg.workers == 1 else record_parallel(cfg, todo)
    try:
        for kind, value in gen:
            if kind == "frames":
                bar.update(value)
            else:
                saved += 1
                bar.set_postfix(episodes=f"{saved}/{len(todo)}")
            if stop:
                break
    except KeyboardInterrupt:  # a second signal
        pass
    finally:
        gen.close()  # the writes in flight finish; workers stop
        bar.close()
    if stop:
        die(f"interrupted ({stop.name}); the {saved} finished episodes are kept: run the same command again to resume",
            stop.exit_code)  # fmt: skip
    dt = time.time() - t0
    run = dict(episodes=len(todo), frames=bar.n, seconds=round(dt, 2), frames_per_s=round(bar.n / max(dt, 1e-9), 1))
    total = summarize(cfg, run)
    hist = "  ".join(f"{k} {v}" for k, v in total["action_histogram"].items())
    print(f"recorded {len(todo)} episodes, {bar.n} frames in {dt:.1f}s ({run['frames_per_s']:.0f} frames/s)")
    print(
        f"{cfg.out}: {total['episodes']} episodes, {total['frames']} frames, {total['bytes_on_disk'] / 1e6:.2f} MB "
        f"({total['bytes_on_disk'] / max(total['frames'], 1):.0f} bytes/frame)"
    )
    print(f"actions: {hist}")
    returns = f"; the player's paddle returned the ball {total['ball_returns']} times" if cfg.game == "pong" else ""
    print(f"points won {total['points_won']}, lost {total['points_lost']}{returns}")
    if total["episodes"] > cfg.episodes:
        print(f"note: {cfg.out} also holds episodes beyond --episodes {cfg.episodes} (kept, counted above)")


if __name__ == "__main__":
    main(parse_config(Config, description=__doc__.split("\n\n")[0]))
