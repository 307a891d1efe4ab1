"""Step 1: collect transitions (obs_t, action_t, obs_t+1, reward, done) from a MiniGrid env
with a seeded random policy, and save them as one compressed .npz.

    python collect_minigrid_data.py --env MiniGrid-Empty-8x8-v0 --episodes 100 --out data/empty8.npz

Each frame is stored once: `obs` holds obs_t for every transition, `terminal_obs` the last frame
of each episode, and `next_obs_index` points obs_t+1 into concat(obs, terminal_obs), which is
about half the bytes of storing obs and next_obs separately (minigrid_dataset.py rebuilds
next_obs on load). Episode e is reset with seed `seed + e` and its actions drawn from a generator
seeded by (seed, e), so any episode can be regenerated on its own (`--fixed-layout` resets every
episode with `seed`: one layout, many starts and action sequences).
"""

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wm_common import atomic_write, check_writable_dir, fail, run_cli, to_jsonable

COLLECTOR_VERSION = 2
NAV_ACTIONS = (0, 1, 2)  # MiniGrid's left, right, forward


@dataclass
class CollectConfig:
    env: str = field(default="MiniGrid-Empty-8x8-v0", metadata={"help": "Gymnasium env id (a MiniGrid env)"})
    episodes: int = field(default=100, metadata={"help": "number of episodes to collect"})
    max_steps: int | None = field(default=None, metadata={"help": "cap on steps per episode (default: the env's own limit)"})
    seed: int = field(default=0, metadata={"help": "episode e is reset with seed+e; actions drawn from (seed, e)"})
    out: str = field(default="", metadata={"help": "output .npz (default: data/<env>_<obs>.npz)"})
    image_size: int = field(default=64, metadata={"help": "rgb modes: frames are resized to this square size"})
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
        default="all", metadata={"help": "random policy over all actions, or only left/right/forward", "choices": ["all", "nav"]}
    )
    fixed_layout: bool = field(
        default=False, metadata={"help": "reset every episode with --seed: one layout (vary starts with --start random)"}
    )
    start: str = field(
        default="env",
        metadata={
            "help": "env: the env's own start cell; random: a random empty cell and direction after each reset "
            "(covers the far cells of layouts such as Empty-NxN whose start never changes)",
            "choices": ["env", "random"],
        },
    )


def make_env(env_id: str, obs_mode: str, image_size: int):
    """The MiniGrid env wrapped to give uint8 frames [H,W,C] of the requested mode, plus the
    tile size used. Frames come out at the tile size nearest above `image_size` and are
    area-resized to exactly `image_size` by `resize_frames`."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the MiniGrid ids)
    from minigrid.minigrid_env import MiniGridEnv
    from minigrid.wrappers import ImgObsWrapper, RGBImgObsWrapper, RGBImgPartialObsWrapper

    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        fail(f"unknown env id {env_id!r} ({e}); MiniGrid ids look like MiniGrid-Empty-8x8-v0")
    base = env.unwrapped
    if not isinstance(base, MiniGridEnv):
        env.close()
        fail(f"{env_id} is not a MiniGrid env; this collector records MiniGrid ground truth, pick a MiniGrid-* id")
    if image_size < 8:
        fail(f"--image-size {image_size} is too small; use 8 or more (64 is the default)")
    tile = 0
    if obs_mode == "rgb":
        tile = math.ceil(image_size / max(base.width, base.height))
        env = RGBImgObsWrapper(env, tile_size=tile)
    elif obs_mode == "rgb_partial":
        tile = math.ceil(image_size / base.agent_view_size)
        env = RGBImgPartialObsWrapper(env, tile_size=tile)
    return ImgObsWrapper(env), tile


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """[T,H,W,C] uint8 -> [T,size,size,C] uint8 with area averaging (no aliasing on downscale)."""
    if frames.shape[1:3] == (size, size):
        return frames
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    mode = "area" if frames.shape[1] >= size else "bilinear"
    y = F.interpolate(x, size=(size, size), mode=mode)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def goal_position(base) -> tuple[int, int]:
    for i, obj in enumerate(base.grid.grid):
        if obj is not None and obj.type == "goal":
            return i % base.grid.width, i // base.grid.width
    return -1, -1


def door_state(base) -> int:
    """State of the first door on the grid in MiniGrid's encoding (0 open, 1 closed, 2 locked),
    -1 when the layout has no door."""
    for obj in base.grid.grid:
        if obj is not None and obj.type == "door":
            return 0 if obj.is_open else 2 if obj.is_locked else 1
    return -1


def carried(base) -> int:
    """MiniGrid's object index of what the agent carries, -1 for nothing."""
    from minigrid.core.constants import OBJECT_TO_IDX

    return -1 if base.carrying is None else OBJECT_TO_IDX[base.carrying.type]


def place_agent_randomly(env, rng: np.random.Generator):
    """Moves the agent to a random empty cell facing a random direction and returns the
    observation rendered there (the wrappers' observation() re-renders the current state)."""
    base = env.unwrapped
    free = [(x, y) for y in range(base.height) for x in range(base.width) if base.grid.get(x, y) is None]
    base.agent_pos = np.array(free[rng.integers(len(free))])
    base.agent_dir = int(rng.integers(4))
    return current_obs(env)


def current_obs(env):
    """The observation of the env's current state through its wrapper chain."""
    base = env.unwrapped
    obs = base.gen_obs()
    wrapper = env
    chain = []
    while wrapper is not base:
        chain.append(wrapper)
        wrapper = wrapper.env
    for w in reversed(chain):
        if hasattr(w, "observation"):
            obs = w.observation(obs)
    return obs


def run_episode(env, episode: int, cfg: CollectConfig, n_actions: int, image_size: int) -> dict[str, np.ndarray]:
    """One seeded episode. Returns per-step arrays plus `terminal_obs` (the frame after the last
    step)."""
    base = env.unwrapped
    rng = np.random.default_rng([cfg.seed, episode])
    choices = np.array(NAV_ACTIONS if cfg.actions == "nav" else range(n_actions))
    obs, _ = env.reset(seed=cfg.seed if cfg.fixed_layout else cfg.seed + episode)
    if cfg.start == "random":
        obs = place_agent_randomly(env, rng)
    goal = goal_position(base)
    limit = cfg.max_steps if cfg.max_steps is not None else base.max_steps
    frames, actions, rewards, terms, pos, dirs, doors, carry = [obs], [], [], [], [], [], [], []
    for _ in range(limit):
        a = int(rng.choice(choices))
        pos.append(base.agent_pos)
        dirs.append(base.agent_dir)
        doors.append(door_state(base))
        carry.append(carried(base))
        obs, r, terminated, truncated, _ = env.step(a)
        frames.append(obs)
        actions.append(a)
        rewards.append(r)
        terms.append(terminated)
        if terminated or truncated:
            break
    t = len(actions)
    all_frames = np.stack(frames)
    if cfg.obs != "symbolic":
        all_frames = resize_frames(all_frames, image_size)
    done = np.zeros(t, bool)
    done[-1] = True
    return {
        "obs": all_frames[:-1],
        "terminal_obs": all_frames[-1:],
        "action": np.asarray(actions, np.int64),
        "reward": np.asarray(rewards, np.float32),
        "done": done,
        "terminated": np.asarray(terms, bool),
        "step": np.arange(t, dtype=np.int64),
        "agent_pos": np.asarray(pos, np.int64).reshape(t, 2),
        "agent_dir": np.asarray(dirs, np.int64),
        "goal_pos": np.tile(np.asarray(goal, np.int64), (t, 1)),
        "door_state": np.asarray(doors, np.int64),
        "carrying": np.asarray(carry, np.int64),
    }


def assemble(episodes: list[dict[str, np.ndarray]], meta: dict) -> dict[str, np.ndarray]:
    """Concatenates episodes into the .npz layout of design.md (compact next_obs)."""
    lengths = np.array([len(e["action"]) for e in episodes])
    n = int(lengths.sum())
    out = {k: np.concatenate([e[k] for e in episodes]) for k in episodes[0] if k != "terminal_obs"}
    out["terminal_obs"] = np.concatenate([e["terminal_obs"] for e in episodes])
    out["episode"] = np.repeat(np.arange(len(episodes), dtype=np.int64), lengths)
    # obs_t+1 is the next row of `obs` inside an episode, and the episode's terminal frame at its end.
    next_index = np.arange(1, n + 1, dtype=np.int64)
    ends = np.cumsum(lengths) - 1
    next_index[ends] = n + np.arange(len(episodes))
    out["next_obs_index"] = next_index
    out["meta"] = np.array(json.dumps(meta))
    return out


def main(cfg: CollectConfig) -> Path:
    from tqdm import tqdm

    if cfg.episodes < 1:
        fail(f"--episodes must be at least 1, got {cfg.episodes}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        fail(f"--max-steps must be at least 1, got {cfg.max_steps}")
    out = Path(cfg.out or f"data/{cfg.env.replace('/', '_')}_{cfg.obs}.npz")
    if out.suffix != ".npz":
        fail(f"--out {out} must end in .npz")
    env, tile = make_env(cfg.env, cfg.obs, cfg.image_size)
    check_writable_dir(out.parent, "output directory")
    n_actions = int(env.action_space.n)
    episodes: list[dict[str, np.ndarray]] = []
    interrupted, total = False, 0
    bar = tqdm(range(cfg.episodes), desc=f"collect {cfg.env}", unit="ep", dynamic_ncols=True)
    try:
        for e in bar:
            episodes.append(run_episode(env, e, cfg, n_actions, cfg.image_size))
            total += len(episodes[-1]["action"])
            bar.set_postfix(transitions=total, refresh=False)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: saving the {len(episodes)} complete episodes", flush=True)
    finally:
        bar.close()
        env.close()
    if not episodes:
        fail("no complete episode was collected; nothing written")
    frame_shape = list(episodes[0]["obs"].shape[1:])
    meta = {
        "env": cfg.env,
        "seed": cfg.seed,
        "episodes": len(episodes),
        "max_steps": cfg.max_steps,
        "obs_mode": cfg.obs,
        "image_shape": frame_shape,
        "tile_size": tile,
        "action_space": {"type": "discrete", "n": n_actions},
        "start": cfg.start,
        "fixed_layout": cfg.fixed_layout,
        "policy": f"uniform random over {'left/right/forward' if cfg.actions == 'nav' else 'all actions'}",
        "collector_version": COLLECTOR_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": to_jsonable(cfg),
    }
    arrays = assemble(episodes, meta)

    def write(p: Path) -> None:
        with p.open("wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(out, write)
    n = len(arrays["action"])
    print(
        f"Saved {n} transitions from {len(episodes)} episodes ({frame_shape[0]}x{frame_shape[1]}x{frame_shape[2]} "
        f"{cfg.obs}) to {out} ({out.stat().st_size / 1e6:.1f} MB)"
    )
    if interrupted:
        raise KeyboardInterrupt
    return out


# seed 000's names for the collection settings; its model and training keys belong to the trainers
CONFIG_ALIASES = {
    "environment_name": "env",
    "num_episodes_data_collection": "episodes",
    "max_steps_per_episode_data_collection": "max_steps",
}
TRAINER_KEYS = (
    "patch_size",
    "input_channels",
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
