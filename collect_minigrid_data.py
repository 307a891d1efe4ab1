"""Step 1: collect transitions (obs_t, action_t, obs_t+1, reward, done) from a Gymnasium env
with a seeded random policy, and save them as one compressed .npz.

    python collect_minigrid_data.py --env MiniGrid-Empty-8x8-v0 --episodes 100 --out data/empty8.npz
    python collect_minigrid_data.py --env CarRacing-v3 --episodes 10 --image-size 64 --frame-skip 2

MiniGrid envs get their observation modes and ground-truth keys (agent cell, direction, goal,
door, carried object) for the probes. Any other env works from pixels, headless: its image
observations when it has them, else `render_mode="rgb_array"` frames, resized to a square
`--image-size`, RGB or grayscale (`--channels`); discrete actions are stored as int64 [N],
continuous (Box) ones as float32 [N,A].

Each frame is stored once: `obs` holds obs_t for every transition, `terminal_obs` the last frame
of each episode, and `next_obs_index` points obs_t+1 into concat(obs, terminal_obs), which is
about half the bytes of storing obs and next_obs separately (minigrid_dataset.py rebuilds
next_obs on load). Episode e is reset with seed `seed + e` and its actions drawn from a generator
seeded by (seed, e), so any episode can be regenerated on its own (`--fixed-layout` resets every
episode with `seed`: one layout, many starts and action sequences).
"""

import collections
import contextlib
import datetime
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset_formats import link_episodes
from envs import (
    NAV_ACTIONS,
    carried,
    cell_pixels,
    door_state,
    goal_position,
    is_minigrid,
    layout_key,
    make_env,
    make_pixel_env,
    nav_moves,
    place_agent_randomly,
    steps_to,
    to_frames,
)
from wm_common import (
    Interrupted,
    StopRequest,
    UserError,
    atomic_write,
    check_seed,
    check_writable_dir,
    cpu_cores,
    fail,
    odd_path,
    run_cli,
    to_jsonable,
    write_json,
)

COLLECTOR_VERSION = 2
DEFAULT_STEP_CAP = 1000  # steps per episode for envs without a time limit of their own
# The models here take 32-128 px frames. A 1024 px RGB frame is 3 MB, so a 256-step MiniGrid
# episode, which stays in RAM until it ends, is already 0.8 GB; beyond that RAM runs out first.
MAX_IMAGE_SIZE = 1024
# An episode's frames stay in RAM until it ends (shards are cut between episodes): a --max-steps
# whose episode would outgrow this is refused (only reachable on envs with no limit of their own).
MAX_EPISODE_BYTES = 4e9
# Each --num-envs worker is a whole Python process with torch and the env (~0.3 GB); past one per
# core they only share the cores, so beyond a few per core they buy nothing and exhaust RAM.
WORKERS_PER_CORE = 4


@dataclass
class CollectConfig:
    env: str = field(
        default="MiniGrid-Empty-8x8-v0", metadata={"help": "Gymnasium env id (MiniGrid, classic control, CarRacing-v3, ALE/Pong-v5, ...)"}
    )
    episodes: int = field(default=100, metadata={"help": "number of episodes to collect"})
    max_steps: int | None = field(
        default=None, metadata={"help": "cap on stored transitions per episode, each --frame-skip env steps (default: the env's own limit)"}
    )
    seed: int = field(default=0, metadata={"help": "episode e is reset with seed+e; actions drawn from (seed, e)"})
    out: str = field(
        default="",
        metadata={
            "help": "output .npz, or a directory name for memory-mapped arrays (default: data/<env>_<obs>.npz); "
            "with --format minari, the Minari dataset id (e.g. minigrid/empty8x8-random-v0)"
        },
    )
    format: str = field(
        default="npz",
        metadata={
            "help": "npz: this project's .npz or array directory; minari: a local Minari dataset that minari.load_dataset opens "
            "(needs `make setup-extras`)",
            "choices": ["npz", "minari"],
        },
    )
    image_size: int = field(default=64, metadata={"help": "frames are resized to this square size (not MiniGrid's symbolic mode)"})
    channels: int = field(default=3, metadata={"help": "3: RGB frames; 1: grayscale", "choices": [1, 3]})
    num_envs: int = field(default=1, metadata={"help": "worker processes playing episodes in parallel (same file as one process)"})
    frame_skip: int = field(default=1, metadata={"help": "repeat each action this many env steps (rewards summed); store every k-th frame"})
    obs: str = field(
        default="rgb",
        metadata={
            "help": "rgb: full grid rendered; rgb_partial: the agent's egocentric view; symbolic: MiniGrid's 7x7x3 encoding",
            "choices": ["rgb", "rgb_partial", "symbolic"],
        },
    )
    config: str = field(
        default="", metadata={"help": "YAML file (e.g. config.yaml): its data-collection keys set these flags; flags override it"}
    )
    actions: str = field(
        default="all",
        metadata={"help": "all: a random policy over every action; nav: only left, right and forward", "choices": ["all", "nav"]},
    )
    fixed_layout: bool = field(
        default=False, metadata={"help": "reset every episode with --seed: one layout (vary starts with --start random)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue an interrupted collection into --out (same flags) from its saved shards"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing dataset at --out (only once the new one is complete)"})
    shard_mb: float = field(
        default=256.0, metadata={"help": "RAM cap: once this many MB of episodes are buffered they go to a shard on disk"}
    )
    start: str = field(
        default="env",
        metadata={
            "help": "env: the env's own start cell; random: a random empty cell and direction after each reset "
            "(covers the far cells of layouts such as Empty-NxN whose start never changes)",
            "choices": ["env", "random"],
        },
    )
    exclude_layouts: str = field(
        default="",
        metadata={
            "help": "MiniGrid: START:END, reset seeds whose layouts the data must not hold (e.g. a planner's evaluation seeds); "
            "a seed that draws one of them is passed over for the next, and meta records the seeds used"
        },
    )
    through_goal: bool = field(
        default=False,
        metadata={
            "help": "MiniGrid: an episode goes on when the agent reaches the goal (or lava) and ends only at --max-steps, "
            "so the data shows the agent standing on the goal and leaving it (a goal image for planning is such a frame)"
        },
    )
    policy: str = field(
        default="random",
        metadata={
            "help": "MiniGrid: random: independent random actions; waypoints: walk by shortest paths to one random cell after "
            "another, a random action with probability --policy-noise (walks that cross gaps and doors, which random "
            "actions seldom do; uses the true grid, as a data-collection script may)",
            "choices": ["random", "waypoints"],
        },
    )
    policy_noise: float = field(
        default=0.5, metadata={"help": "with --policy waypoints: the probability of a random action instead of the walk's"}
    )


def action_sampler(space):
    """(draw(rng) -> the action to store, to_env(stored) -> the action to step with, space
    description for meta) for the random policy."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        start = int(space.start)
        return (lambda rng: int(rng.integers(space.n))), (lambda a: start + a), {"type": "discrete", "n": int(space.n)}
    if isinstance(space, spaces.Box):
        low = np.where(np.isfinite(space.low), space.low, -1.0).reshape(-1).astype(np.float32)
        high = np.where(np.isfinite(space.high), space.high, 1.0).reshape(-1).astype(np.float32)
        desc = {"type": "box", "shape": [int(low.size)], "low": low.tolist(), "high": high.tolist()}
        return (lambda rng: rng.uniform(low, high).astype(np.float32)), (lambda a: a.reshape(space.shape)), desc
    fail(f"action space {space} is not supported; use an env with Discrete or Box actions")


def run_pixel_episode(env, source: str, episode: int, cfg: CollectConfig, sampler) -> dict[str, np.ndarray]:
    """One seeded episode of a non-MiniGrid env; each stored transition is `frame_skip` env
    steps with the same action."""
    draw, to_env, _ = sampler
    rng = np.random.default_rng([cfg.seed, episode])
    obs, _ = env.reset(seed=cfg.seed + episode)

    def frame(o) -> np.ndarray:
        image = o if source == "observation" else env.render()
        if image is None:
            fail(f"{cfg.env} gives neither image observations nor rgb_array frames; pick an env that renders")
        return to_frames(np.asarray(image)[None], cfg.channels, cfg.image_size)[0]

    limit = cfg.max_steps or getattr(env.spec, "max_episode_steps", None) or DEFAULT_STEP_CAP
    frames, actions, rewards, terms = [frame(obs)], [], [], []
    for _ in range(limit):
        a = draw(rng)
        total, terminated, truncated = 0.0, False, False
        for _ in range(cfg.frame_skip):
            obs, r, terminated, truncated, _ = env.step(to_env(a))
            total += float(r)
            if terminated or truncated:
                break
        frames.append(frame(obs))
        actions.append(a)
        rewards.append(total)
        terms.append(terminated)
        if terminated or truncated:
            break
    action_dtype = np.float32 if isinstance(actions[0], np.ndarray) else np.int64
    return episode_arrays(np.stack(frames), np.asarray(actions, action_dtype), rewards, terms)


def episode_arrays(frames: np.ndarray, actions: np.ndarray, rewards: list, terms: list) -> dict[str, np.ndarray]:
    """One episode's per-step arrays from its T+1 frames and T actions, rewards, terminations;
    `terminal_obs` is the frame after the last step."""
    t = len(actions)
    done = np.zeros(t, bool)
    done[-1] = True
    return {
        "obs": frames[:-1],
        "terminal_obs": frames[-1:],
        "action": actions,
        "reward": np.asarray(rewards, np.float32),
        "done": done,
        "terminated": np.asarray(terms, bool),
        "step": np.arange(t, dtype=np.int64),
    }


def parse_seed_range(text: str, flag: str) -> range:
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match or int(match[1]) >= int(match[2]):
        fail(f"{flag} must be START:END, reset seeds START to END-1 (e.g. 10000:10020), got {text!r}")
    return range(int(match[1]), int(match[2]))


MAX_EXCLUDING_EPISODES = 1_000_000  # --exclude-layouts lists every episode's seed up front (and in meta)


def reset_seeds(env, cfg: CollectConfig) -> Sequence[int]:
    """The reset seed of every episode: --seed + e (or --seed with --fixed-layout), except that
    with --exclude-layouts a seed whose layout is one of the excluded seeds' is passed over for the
    next one."""
    if not cfg.exclude_layouts:
        return range(cfg.seed, cfg.seed + 1) if cfg.fixed_layout else range(cfg.seed, cfg.seed + cfg.episodes)
    held_out = parse_seed_range(cfg.exclude_layouts, "--exclude-layouts")
    excluded = {layout_key(env, s) for s in held_out}
    first = {layout_key(env, s) for s in range(cfg.seed, cfg.seed + 5)}
    if len(held_out) > 1 and excluded == first and len(first) == 1 and not cfg.fixed_layout:
        # Empty rooms: every seed draws the one layout (all the held-out seeds and the first five
        # of the data's), so none can be held out; the evaluation then differs from the data by
        # its start cells only (its plan.json says so)
        print(f"note: {cfg.env} draws one layout for all {len(held_out)} seeds --exclude-layouts names: nothing to hold out")
        return range(cfg.seed, cfg.seed + cfg.episodes)
    if cfg.fixed_layout:
        if layout_key(env, cfg.seed) in excluded:
            fail(
                f"--fixed-layout --seed {cfg.seed} draws a layout that --exclude-layouts {cfg.exclude_layouts} excludes; pick another --seed"
            )
        return range(cfg.seed, cfg.seed + 1)
    if cfg.episodes > MAX_EXCLUDING_EPISODES:
        fail(f"--exclude-layouts lists each episode's seed: at most {MAX_EXCLUDING_EPISODES:,} episodes, got {cfg.episodes}")
    seeds, candidate = [], cfg.seed
    while len(seeds) < cfg.episodes:
        if candidate - cfg.seed > 100 * cfg.episodes + 1000:
            fail(f"{cfg.env}: the seeds from {cfg.seed} on draw only layouts that --exclude-layouts {cfg.exclude_layouts} excludes")
        if layout_key(env, candidate) not in excluded:
            seeds.append(candidate)
        candidate += 1
    return seeds


class WaypointWalk:
    """A data policy that travels: it draws a random reachable cell, walks there by a shortest
    left/right/forward path on the true grid, then draws another. Independent random actions
    mostly turn on the spot and bump into walls, so they rarely pass a one-cell gap (Simple-
    Crossing S9N1, 250 episodes x 60 steps: 52 entries into the gap in 15,000 steps, 480 with
    these walks), and a model of them predicted the step into the gap of an unseen layout as
    blocked (a model of these walks predicts it right)."""

    def __init__(self, base, rng: np.random.Generator, noise: float):
        self.base, self.rng, self.noise = base, rng, noise
        self.moves = nav_moves(base)
        self.cells = sorted({(x, y) for x, y, _ in self.moves})
        self.dist: dict[tuple[int, int, int], int] = {}

    def action(self, random_action: int) -> int:
        """The walk's next action, or `random_action` (drawn by the caller) with probability noise."""
        if self.rng.random() < self.noise:
            return random_action
        state = (*self.base.agent_pos, self.base.agent_dir)
        if self.dist.get(state, 0) == 0:  # arrived, unreachable or not started: a new destination
            self.dist = steps_to(self.moves, self.cells[self.rng.integers(len(self.cells))])
            if self.dist.get(state, 0) == 0:
                return random_action
        return next(a for a, nxt in zip(NAV_ACTIONS, self.moves[state], strict=True) if self.dist.get(nxt) == self.dist[state] - 1)


def run_episode(env, episode: int, cfg: CollectConfig, n_actions: int, image_size: int, seed: int) -> dict[str, np.ndarray]:
    """One episode, reset with `seed`. Returns per-step arrays plus `terminal_obs` (the frame
    after the last step)."""
    base = env.unwrapped
    rng = np.random.default_rng([cfg.seed, episode])
    choices = np.array(NAV_ACTIONS if cfg.actions == "nav" else range(n_actions))
    obs, _ = env.reset(seed=seed)
    if cfg.start == "random":
        obs = place_agent_randomly(env, rng)
    goal = goal_position(base)
    limit = cfg.max_steps if cfg.max_steps is not None else base.max_steps
    frames, actions, rewards, terms, pos, dirs, doors, carry = [obs], [], [], [], [], [], [], []
    walk = WaypointWalk(base, rng, cfg.policy_noise) if cfg.policy == "waypoints" else None
    for _ in range(limit):
        a = int(rng.choice(choices))
        if walk is not None:
            a = walk.action(a)
        pos.append(base.agent_pos)
        dirs.append(base.agent_dir)
        doors.append(door_state(base))
        carry.append(carried(base))
        obs, r, terminated, truncated, _ = env.step(a)
        frames.append(obs)
        actions.append(a)
        rewards.append(r)
        terms.append(terminated)
        if truncated or (terminated and not cfg.through_goal):
            break
    t = len(actions)
    all_frames = np.stack(frames)
    if cfg.obs != "symbolic":
        all_frames = to_frames(all_frames, cfg.channels, image_size)
    return {
        **episode_arrays(all_frames, np.asarray(actions, np.int64), rewards, terms),
        "agent_pos": np.asarray(pos, np.int64).reshape(t, 2),
        "agent_dir": np.asarray(dirs, np.int64),
        "goal_pos": np.tile(np.asarray(goal, np.int64), (t, 1)),
        "door_state": np.asarray(doors, np.int64),
        "carrying": np.asarray(carry, np.int64),
    }


def assemble(episodes: list[dict[str, np.ndarray]], meta: dict) -> dict[str, np.ndarray]:
    """Concatenates episodes into the .npz layout of design.md (compact next_obs)."""
    out = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]}
    out.update(link_episodes(np.array([len(e["action"]) for e in episodes])))
    out["meta"] = np.array(json.dumps(meta))
    return out


# ----------------------------------------------------------------------------- writing
# Every write goes to a temp name next to its target and is renamed into place once complete, so
# a failed or killed run never leaves a half dataset where a good one was. Temp names carry the
# writer's pid: `.<name>.tmp<pid><suffix>` for files (wm_common.atomic_write's naming),
# `.<name>.tmp<pid>` for directories being built and `.<name>.old<pid>` for the directory they
# replace. A SIGKILL leaves them behind; the next run writing the same target removes them.


@contextlib.contextmanager
def writing(path: Path, then: str) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a quota, a read-only or vanished directory)
    becomes one line naming the path, the problem and `then` (what is kept, what to do). The
    writers below have removed their temp files by the time it gets here."""
    try:
        yield
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}; the previous {path.name}, if any, is unchanged); {then}")
    except UserError as e:  # wm_common's writers word their own failures: add what to do next
        fail(f"{e}; {then}")


def _save_npy(path: Path, value: np.ndarray) -> None:
    np.save(path, value)


def _reserve(path: Path) -> None:
    """Allocates the whole of a freshly created memmap file now: open_memmap makes a sparse file,
    and writing through the map into a full disk kills the process with SIGBUS instead of raising
    ENOSPC where it can be answered."""
    if hasattr(os, "posix_fallocate"):
        with path.open("r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def _swap_into_place(out: Path, fill: Callable[[Path], None]) -> None:
    """Builds a directory next to `out` with `fill(tmp_dir)` and renames it into place; an older
    directory is moved aside only once the new one is complete, and deleted after. On any error
    the temp directory is removed and `out` is left as it was."""
    tmp, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
    moved = False
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # our own pid: a leftover of no running writer
        tmp.mkdir(parents=True)
        fill(tmp)
        if os.path.lexists(out):
            out.rename(old)
            moved = True
        tmp.rename(out)
    except BaseException:
        if moved and not os.path.lexists(out):
            old.rename(out)  # the earlier data goes back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_array_dir(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """The directory layout: one uncompressed .npy per key plus meta.json, so the loader can
    memory-map the frames and datasets larger than RAM stay readable."""

    def fill(tmp: Path) -> None:
        for key, value in arrays.items():
            if key == "meta":
                (tmp / "meta.json").write_text(str(value))
            else:
                _save_npy(tmp / f"{key}.npy", value)

    _swap_into_place(out, fill)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this run has written nothing yet: a file with its pid is an earlier process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid we can ask about: leave its files alone
    return True


def _leftover(entry: Path, targets: str, is_dir: Callable[[str], bool]) -> tuple[str, str] | None:
    """(target name, 'tmp' or 'old') when `entry` is clearly a temp of this module's own writing
    of a target whose name matches the regex `targets`: the naming above, a writer no longer
    running, a regular file for file targets and for directories only what the collector writes.
    None for anything else, which is then never touched."""
    m = re.fullmatch(rf"\.({targets})\.(tmp|old)(\d*)(.*)", entry.name)
    if m is None or entry.is_symlink():
        return None
    name, kind, pid, rest = m.groups()
    if pid and _running(int(pid)):
        return None  # another collector is writing it right now
    if not is_dir(name):
        return (name, kind) if kind == "tmp" and pid and rest == Path(name).suffix and entry.is_file() else None
    if rest or not entry.is_dir():  # (pid-less .tmp/.old directories: the names earlier versions used)
        return None
    ours = all(f.is_file() and not f.is_symlink() and (f.suffix == ".npy" or f.name == "meta.json") for f in entry.iterdir())
    return (name, kind) if ours else None


def remove_leftovers(folder: Path, targets: str, is_dir: Callable[[str], bool]) -> None:
    """Removes what killed runs left of their writes into `folder` (see _leftover) and says so in
    one line. A `.old` directory whose target is missing holds the only copy of earlier data (the
    run died between its two renames): kept, and named."""
    if not folder.is_dir():
        return
    removed = []
    for entry in sorted(folder.iterdir()):
        found = _leftover(entry, targets, is_dir)
        if found is None:
            continue
        name, kind = found
        if kind == "old" and not os.path.lexists(folder / name):
            print(f"note: {entry} holds the earlier {name} that an interrupted write moved aside; rename it back or delete it")
            continue
        (shutil.rmtree if entry.is_dir() else Path.unlink)(entry)
        removed.append(entry.name)
    if removed:
        print(f"note: removed {len(removed)} temporary file(s) left in {folder} by an interrupted collection: {', '.join(removed)}")


# ----------------------------------------------------------------------------- shards
# A long collection keeps at most --shard-mb of frames in RAM: full buffers go to shards in
# `.<out>.parts/` (each a directory of .npy, the episodes' own arrays concatenated, plus their
# lengths) and `progress.json` records which are complete. Interrupted, the shards stay and
# --resume carries on from the next episode; finished, they are merged into --out.

RESUME_KEYS = (
    "env",
    "seed",
    "max_steps",
    "image_size",
    "channels",
    "frame_skip",
    "obs",
    "actions",
    "fixed_layout",
    "start",
    "through_goal",
    "policy",
    "policy_noise",
)


def parts_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


def read_progress(parts: Path) -> dict:
    """The interrupted collection's record, its shards checked to be what write_shard left: a
    FIFO or a loop where an array should be would hang or crash the merge at the very end."""
    path = parts / "progress.json"
    odd = odd_path(path)
    if odd:
        fail(f"{path} is {odd}, not the file an interrupted collection writes; delete {parts} and collect again")
    try:
        progress = json.loads(path.read_text())
        progress = {"settings": dict(progress["settings"]), "shards": [dict(s) for s in progress["shards"]]}
    except (OSError, ValueError, KeyError, TypeError):
        fail(f"{parts} holds no readable progress.json; delete it and collect again")
    for shard in progress["shards"]:
        name = str(shard.get("name"))
        d = parts / name
        if not re.fullmatch(r"shard_\d{5}", name) or not d.is_dir() or not (d / "length.npy").is_file():
            fail(
                f"{parts}: shard {d.name} named in progress.json is {odd_path(d) or 'missing or incomplete'}; delete {parts} and collect again"
            )
        for f in d.iterdir():
            odd = odd_path(f)
            if odd:
                fail(f"{f} is {odd}, not a file of the shard; delete {parts} and collect again")
    return progress


def write_shard(parts: Path, progress: dict, buffer: list[dict[str, np.ndarray]]) -> None:
    name = f"shard_{len(progress['shards']):05d}"
    arrays = {k: np.concatenate([e[k] for e in buffer]) for k in buffer[0]}
    arrays["length"] = np.array([len(e["action"]) for e in buffer], np.int64)
    done = sum(s["episodes"] for s in progress["shards"])
    kept = (
        f"the {done} episodes before it stay in {parts}: free some space and continue with the same command and --resume"
        if done
        else "free some space and run again"
    )
    record = {"name": name, "episodes": len(buffer), "transitions": len(arrays["action"])}
    try:
        with writing(parts / name, kept):
            parts.mkdir(exist_ok=True)
            write_array_dir(parts / name, arrays)
            write_json(parts / "progress.json", {**progress, "shards": [*progress["shards"], record]})
    except UserError:
        if not done:
            shutil.rmtree(parts, ignore_errors=True)  # nothing to resume: a bare parts directory would only block the next run
        raise
    progress["shards"].append(record)  # the shard counts only once progress.json names it


def merge_shards(parts: Path, progress: dict, out: Path, meta: dict) -> None:
    """Shards -> --out. A directory is filled key by key through memory maps, so RAM stays
    bounded however large the data; a .npz is assembled in RAM (np.savez needs whole arrays)."""
    shards = [parts / s["name"] for s in progress["shards"]]
    lengths = np.concatenate([np.load(d / "length.npy") for d in shards])
    keys = sorted(f.stem for f in shards[0].glob("*.npy") if f.stem != "length")
    linked = link_episodes(lengths)
    if out.suffix == ".npz":
        arrays = {k: np.concatenate([np.load(d / f"{k}.npy") for d in shards]) for k in keys}
        arrays.update(linked, meta=np.array(json.dumps(meta)))
        atomic_write(out, lambda p: _savez(p, arrays))
        return

    def fill(tmp: Path) -> None:
        for key in keys:
            pieces = [np.load(d / f"{key}.npy", mmap_mode="r") for d in shards]
            dest = np.lib.format.open_memmap(
                tmp / f"{key}.npy", mode="w+", dtype=pieces[0].dtype, shape=(sum(map(len, pieces)), *pieces[0].shape[1:])
            )
            _reserve(tmp / f"{key}.npy")
            at = 0
            for piece in pieces:
                dest[at : at + len(piece)] = piece
                at += len(piece)
            dest.flush()
            del dest
        for key, value in linked.items():
            _save_npy(tmp / f"{key}.npy", value)
        (tmp / "meta.json").write_text(json.dumps(meta))

    _swap_into_place(out, fill)


def _savez(p: Path, arrays: dict[str, np.ndarray]) -> None:
    with p.open("wb") as f:
        np.savez_compressed(f, **arrays)


def open_source(cfg: CollectConfig, minigrid_env: bool):
    """(env, episode(e) -> arrays, action space for meta, meta about the frames) for cfg.env."""
    if minigrid_env:
        env, tile = make_env(cfg.env, cfg.obs, cfg.image_size)
        n_actions = int(env.action_space.n)
        seeds = reset_seeds(env, cfg)
        cell_px = cell_pixels(env, cfg.obs, cfg.image_size, tile)
        extra = {
            "tile_size": tile,
            "cell_px": cell_px,
            "start": cfg.start,
            "fixed_layout": cfg.fixed_layout,
            "through_goal": cfg.through_goal,
        }
        if cfg.policy != "random":
            extra.update(policy_noise=cfg.policy_noise)
        if cfg.exclude_layouts:
            extra.update(exclude_layouts=cfg.exclude_layouts, reset_seeds=list(seeds))
        return (
            env,
            lambda e: run_episode(env, e, cfg, n_actions, cfg.image_size, seeds[0] if cfg.fixed_layout else seeds[e]),
            {"type": "discrete", "n": n_actions},
            {"obs_mode": cfg.obs, "extra": extra},
        )
    env, source = make_pixel_env(cfg.env)
    sampler = action_sampler(env.action_space)
    return env, (lambda e: run_pixel_episode(env, source, e, cfg, sampler)), sampler[2], {"obs_mode": f"pixels ({source})", "extra": {}}


_WORKER_EPISODE = None  # a --num-envs worker process's own env, opened once


def _init_worker(cfg: CollectConfig) -> None:
    global _WORKER_EPISODE
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)  # one core per worker: the parallelism is across processes
    _WORKER_EPISODE = open_source(cfg, is_minigrid(cfg.env))[1]


def _worker_episode(e: int) -> dict[str, np.ndarray]:
    return _WORKER_EPISODE(e)


def _in_order(pool, episodes: range, ahead: int) -> Iterator[dict[str, np.ndarray]]:
    """The workers' episodes in episode order, like pool.map, but with at most `ahead` submitted
    at a time: Executor.map submits every episode before the first result, a future each, so a
    huge --episodes would fill RAM before anything is collected."""
    todo = iter(episodes)
    pending = collections.deque(pool.submit(_worker_episode, e) for e in itertools.islice(todo, ahead))
    while pending:
        result = pending.popleft().result()
        e = next(todo, None)
        if e is not None:
            pending.append(pool.submit(_worker_episode, e))
        yield result


def check_flags(cfg: CollectConfig) -> None:
    """The numeric flags that need no env: one line for each value that would crash, hang or
    silently do nothing."""
    if cfg.episodes < 1:
        fail(f"--episodes must be at least 1, got {cfg.episodes}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        fail(f"--max-steps must be at least 1, got {cfg.max_steps}")
    check_seed(cfg.seed)
    if not 8 <= cfg.image_size <= MAX_IMAGE_SIZE:
        fail(f"--image-size {cfg.image_size} is out of range; use 8 to {MAX_IMAGE_SIZE} (64 is the default)")
    if cfg.frame_skip < 1:
        fail(f"--frame-skip must be at least 1, got {cfg.frame_skip}")
    if not 0 <= cfg.policy_noise <= 1:  # also refuses NaN
        fail(f"--policy-noise is a probability, from 0 to 1, got {cfg.policy_noise}")
    if cfg.policy == "random" and cfg.policy_noise != CollectConfig.policy_noise:
        fail("--policy-noise is the waypoint walk's share of random actions; add --policy waypoints")
    cores = cpu_cores()
    if not 1 <= cfg.num_envs <= WORKERS_PER_CORE * cores:
        fail(
            f"--num-envs must be from 1 to {WORKERS_PER_CORE * cores} ({WORKERS_PER_CORE} per CPU core here; each worker is a "
            f"whole process and more than one per core adds no speed), got {cfg.num_envs}"
        )
    if not (cfg.shard_mb > 0 and math.isfinite(cfg.shard_mb)):
        fail(f"--shard-mb must be a positive number of MB, got {cfg.shard_mb}")
    if cfg.exclude_layouts:
        parse_seed_range(cfg.exclude_layouts, "--exclude-layouts")


def check_out(out: Path, cfg: CollectConfig) -> bool:
    """Refuses an --out the collector must not write; returns whether it holds data already."""
    what = "a .npz file" if out.suffix == ".npz" else "a dataset directory"
    odd = odd_path(out)
    if odd:
        fail(f"--out {out} is {odd}, not {what}; choose another name")
    if out.suffix != ".npz":
        if out.suffix:
            fail(f"--out {out} must end in .npz (one compressed file) or be a directory name (memory-mapped arrays)")
        if out.resolve() in (Path.cwd(), *Path.cwd().parents) or out.name in ("", ".", ".."):
            fail(f"--out {cfg.out} names the working directory or one above it; give the dataset directory a name of its own")
        if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "obs.npy").is_file()):
            # the directory layout replaces --out whole: never something that is not a dataset
            fail(f"--out {out} exists and is not a dataset directory from this collector; choose a new name")
        return out.is_dir() and any(out.iterdir())
    if out.is_dir():
        fail(f"--out {out} is a directory; a .npz output needs a file name")
    return out.is_file()


def check_against_env(cfg: CollectConfig, env, minigrid_env: bool) -> None:
    """--max-steps and --frame-skip against the env's own episode limit: a cap above it would
    change nothing (episodes end there), a skip past it leaves one transition per episode."""
    limit = env.unwrapped.max_steps if minigrid_env else getattr(env.spec, "max_episode_steps", None)
    if cfg.frame_skip > (limit or DEFAULT_STEP_CAP):
        has = f"an episode of {cfg.env} has ({limit})" if limit else f"the collector plays in an env without a limit ({DEFAULT_STEP_CAP})"
        fail(f"--frame-skip {cfg.frame_skip} is more env steps than {has}: each episode would be a single transition; use a smaller value")
    most = limit and -(-limit // cfg.frame_skip)  # stored transitions: each is --frame-skip env steps
    if most and cfg.max_steps is not None and cfg.max_steps > most:
        per = f" of {cfg.frame_skip} env steps" if cfg.frame_skip > 1 else ""
        fail(
            f"--max-steps {cfg.max_steps} is above the {most} transitions{per} an episode of {cfg.env} can have "
            f"(its own limit: {limit} steps), where every episode ends anyway; use at most {most} or leave --max-steps out"
        )
    steps = cfg.max_steps or limit or DEFAULT_STEP_CAP
    frame_bytes = 7 * 7 * 3 if minigrid_env and cfg.obs == "symbolic" else cfg.image_size**2 * cfg.channels
    if (steps + 1) * frame_bytes > MAX_EPISODE_BYTES:
        fail(
            f"one episode of {steps} steps would hold {(steps + 1) * frame_bytes / 1e9:.0f} GB of frames in RAM (an episode is kept "
            f"whole until it ends); use --max-steps {int(MAX_EPISODE_BYTES // frame_bytes) - 1} at most or a smaller --image-size"
        )


def minari_staging(cfg: CollectConfig) -> Path:
    """With --format minari, the episodes are first collected into a .npz beside minari's datasets
    (so an interrupted collection resumes as any other), then exported. Refuses an id that
    exists unless --overwrite."""
    import dataset_formats

    if not cfg.out:
        fail("--format minari needs --out <dataset id>, e.g. --out minigrid/empty8x8-random-v0")
    dataset_formats.check_dataset_id(cfg.out)
    if (dataset_formats.datasets_root() / cfg.out).exists() and not cfg.overwrite:
        fail(
            f"Minari dataset {cfg.out} already exists in {dataset_formats.datasets_root()}; pass --overwrite to replace it or pick another id"
        )
    root = check_writable_dir(dataset_formats.datasets_root(), "Minari datasets directory")
    return root / f".{cfg.out.replace('/', '_')}.collecting.npz"


def export_minari(staging: Path, cfg: CollectConfig) -> Path:
    """The collected .npz as the Minari dataset --out; the .npz goes once the dataset is written."""
    import dataset_formats
    from minigrid_dataset import load_arrays

    arrays, meta, _ = load_arrays(staging)
    target = dataset_formats.write(arrays, meta, cfg.out, cfg.overwrite)
    staging.unlink()
    return target


def output_path(cfg: CollectConfig) -> tuple[Path, bool]:
    """Where the collection goes, and whether a dataset is there already."""
    if cfg.format == "minari":
        return minari_staging(cfg), False
    out = Path(cfg.out or f"data/{cfg.env.replace('/', '_')}_{cfg.obs}.npz")  # ALE/Pong-v5 -> data/ALE_Pong-v5_rgb.npz
    return out, check_out(out, cfg)


def check_env_flags(cfg: CollectConfig, minigrid_env: bool) -> None:
    if minigrid_env and cfg.frame_skip != 1:
        fail("--frame-skip is for non-MiniGrid envs: a MiniGrid step is already one grid move")
    if not minigrid_env and (
        cfg.obs != "rgb"
        or cfg.actions != "all"
        or cfg.start != "env"
        or cfg.fixed_layout
        or cfg.through_goal
        or cfg.exclude_layouts
        or cfg.policy != "random"
    ):
        fail(
            f"{cfg.env} is not a MiniGrid env: --obs, --actions nav, --start, --fixed-layout, --through-goal, --exclude-layouts and "
            "--policy apply to MiniGrid only"
        )


def resume_progress(cfg: CollectConfig, out: Path, parts: Path) -> dict:
    """The shards an interrupted collection kept (with --resume, under the same flags), or a
    fresh start; kept shards without --resume are refused, never dropped."""
    if os.path.lexists(parts) and not parts.is_dir():
        fail(f"{parts}, where a collection into {out} keeps its shards, is {odd_path(parts) or 'a file'}; remove it")
    settings = {k: getattr(cfg, k) for k in RESUME_KEYS}
    progress = {"settings": settings, "shards": []}
    if cfg.resume:
        if not parts.is_dir():
            fail(f"--resume: no interrupted collection into {out} (no {parts}); collect without --resume")
        progress = read_progress(parts)
        # a setting newer than the interrupted collection was at its default there
        defaults = CollectConfig()
        changed = [k for k in RESUME_KEYS if progress["settings"].get(k, getattr(defaults, k)) != settings[k]]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            fail(f"--resume: {flags} differ from the interrupted collection's; resume with the same flags")
    elif parts.is_dir():
        fail(f"{parts} holds an interrupted collection into {out}; continue it with --resume or delete that directory")
    first = sum(s["episodes"] for s in progress["shards"])
    if first > cfg.episodes:
        fail(f"--resume: the interrupted collection already has {first} episodes, more than --episodes {cfg.episodes}")
    return progress


def play(cfg: CollectConfig, env, episode: Callable, parts: Path, progress: dict) -> tuple[list[dict[str, np.ndarray]], int]:
    """Plays the episodes still to do (in --num-envs workers), sending full buffers to shards.
    Returns the episodes still buffered and the transitions played. Ctrl-C or SIGTERM ends the
    current episode, keeps everything played as a shard and raises Interrupted."""
    from tqdm import tqdm

    first = sum(s["episodes"] for s in progress["shards"])
    buffer: list[dict[str, np.ndarray]] = []
    buffered_bytes, total, pool = 0, 0, None
    todo = range(first, cfg.episodes)
    if cfg.num_envs > 1:
        # Episodes are independent (seeded by e), so workers can play them in any order; they
        # come back in episode order: the file is the one a single process writes.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(cfg.num_envs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(cfg,))
        results = _in_order(pool, todo, 2 * cfg.num_envs)
    else:
        results = map(episode, todo)
    bar = tqdm(results, total=cfg.episodes, initial=first, desc=f"collect {cfg.env}", unit="ep", dynamic_ncols=True)
    stopped = 0
    with StopRequest("collection") as stop:
        try:
            for ep in bar:
                buffer.append(ep)
                buffered_bytes += sum(v.nbytes for v in ep.values())
                total += len(ep["action"])
                bar.set_postfix(transitions=total, refresh=False)
                if buffered_bytes >= cfg.shard_mb * 1e6:
                    write_shard(parts, progress, buffer)
                    buffer, buffered_bytes = [], 0
                if stop.requested:
                    stopped = stop.requested
                    break
        finally:
            bar.close()
            env.close()
            if pool is not None:
                pool.shutdown(wait=not stopped, cancel_futures=True)
    if stopped:
        if buffer:
            write_shard(parts, progress, buffer)
        done = sum(s["episodes"] for s in progress["shards"])
        raise Interrupted(
            f"interrupted after {done} of {cfg.episodes} episodes, kept in {parts}; continue with the same command and --resume", stopped
        )
    if progress["shards"] and buffer:
        write_shard(parts, progress, buffer)
    return buffer, total


def policy_description(cfg: CollectConfig) -> str:
    random = f"uniform random over {'left/right/forward' if cfg.actions == 'nav' else 'all actions'}"
    if cfg.policy == "waypoints":
        return f"shortest paths to random cells, {random} with probability {cfg.policy_noise}"
    return random


def collection_meta(cfg: CollectConfig, frame_shape: list[int], space: dict, source_meta: dict) -> dict:
    return {
        "env": cfg.env,
        "seed": cfg.seed,
        "episodes": cfg.episodes,
        "max_steps": cfg.max_steps,
        "obs_mode": source_meta["obs_mode"],
        "image_shape": frame_shape,
        "action_space": space,
        "frame_skip": cfg.frame_skip,
        "policy": policy_description(cfg),
        **source_meta["extra"],
        "collector_version": COLLECTOR_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": to_jsonable(cfg),
    }


def write_dataset(out: Path, parts: Path, progress: dict, buffer: list[dict[str, np.ndarray]], meta: dict) -> None:
    """The shards merged into --out, or the buffered episodes written to it, atomically."""
    if progress["shards"]:
        with writing(out, f"the episodes stay in {parts}: free some space and finish with the same command and --resume"):
            merge_shards(parts, progress, out, meta)
        shutil.rmtree(parts)
        return
    arrays = assemble(buffer, meta)
    with writing(out, "free some space and run again"):
        if out.suffix == ".npz":
            atomic_write(out, lambda p: _savez(p, arrays))
        else:
            write_array_dir(out, arrays)


def main(cfg: CollectConfig) -> Path:
    check_flags(cfg)
    out, has_data = output_path(cfg)
    minigrid_env = is_minigrid(cfg.env)
    check_env_flags(cfg, minigrid_env)
    parts = parts_dir(out)
    progress = resume_progress(cfg, out, parts)
    env, episode, space, source_meta = open_source(cfg, minigrid_env)
    try:
        check_against_env(cfg, env, minigrid_env)
        if has_data and not cfg.overwrite:
            fail(
                f"--out {out} already holds a dataset; pass --overwrite to replace it (once the new one is complete) or choose another --out"
            )
        check_writable_dir(out.parent, "output directory")
    except UserError:
        env.close()
        raise
    remove_leftovers(out.parent, re.escape(out.name), lambda name: out.suffix != ".npz")
    remove_leftovers(parts, r"shard_\d{5}|progress\.json", lambda name: name != "progress.json")
    buffer, total = play(cfg, env, episode, parts, progress)
    first_frames = buffer[0]["obs"] if not progress["shards"] else np.load(parts / progress["shards"][0]["name"] / "obs.npy", mmap_mode="r")
    frame_shape = list(first_frames.shape[1:])
    meta = collection_meta(cfg, frame_shape, space, source_meta)
    write_dataset(out, parts, progress, buffer, meta)
    if cfg.format == "minari":
        out = export_minari(out, cfg)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    n = sum(s["transitions"] for s in progress["shards"]) or total
    print(
        f"Saved {n} transitions from {cfg.episodes} episodes ({frame_shape[0]}x{frame_shape[1]}x{frame_shape[2]} "
        f"{meta['obs_mode']}) to {out} ({size / 1e6:.1f} MB)"
    )
    return out


# seed 000's names for the collection settings; its model and training keys belong to the trainers
CONFIG_ALIASES = {
    "environment_name": "env",
    "num_episodes_data_collection": "episodes",
    "max_steps_per_episode_data_collection": "max_steps",
    "input_channels": "channels",
}
TRAINER_KEYS = (
    "patch_size",
    "latent_dim",
    "decoder_dim",
    "num_heads",
    "num_encoder_layers",
    "num_decoder_layers",
    "mlp_dim",
    "action_emb_dim",
    "jepa_predictor_hidden_dim",
    "ema_decay",
    "vicreg_sim_coeff",
    "vicreg_std_coeff",
    "vicreg_cov_coeff",
    "batch_size",
    "learning_rate",
    "num_epochs",
)

if __name__ == "__main__":
    run_cli(main, CollectConfig, description=__doc__.split("\n\n")[0], aliases=CONFIG_ALIASES, ignored=TRAINER_KEYS)
