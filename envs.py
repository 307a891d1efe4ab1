"""The environment side, written once: Gymnasium envs made headless (with one-line errors for
unknown ids and missing extras), MiniGrid envs wrapped to give frames, frames resized the way
the data stores them, and MiniGrid's ground truth (goal, doors, what is carried, the layout, the
agent placed anywhere, shortest paths, the goal as the agent would see it)."""

import math
import os
from collections import deque

import numpy as np

from wm_common import fail

EXTRAS_HINT = "run `make setup-extras` (installs ale-py for Atari, box2d for CarRacing)"


NAV_ACTIONS = (0, 1, 2)  # MiniGrid's left, right, forward


def gym_make(env_id: str, **kwargs):
    """gym.make with one-line errors for unknown ids and uninstalled extras; registers the
    MiniGrid and (when installed) Atari ids first."""
    # headless: pygame-based renderers must not look for a display or a sound card
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the MiniGrid ids)

    if env_id.startswith("ALE/"):
        try:
            import ale_py
        except ImportError:
            fail(f"{env_id} needs the Atari extra, which is not installed: {EXTRAS_HINT}")
        gym.register_envs(ale_py)
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as e:
        if "box2d" in str(e).lower():
            fail(f"{env_id} needs Box2D, which is not installed: {EXTRAS_HINT}")
        fail(f"{env_id} needs an optional dependency that is not installed: {str(e).splitlines()[0][:160]}")
    except gym.error.Error as e:
        fail(f"unknown env id {env_id!r} ({str(e)[:120]}); ids look like MiniGrid-Empty-8x8-v0, CartPole-v1, CarRacing-v3, ALE/Pong-v5")


def is_minigrid(env_id: str) -> bool:
    from minigrid.minigrid_env import MiniGridEnv

    env = gym_make(env_id)
    try:
        return isinstance(env.unwrapped, MiniGridEnv)
    finally:
        env.close()


def make_env(env_id: str, obs_mode: str, image_size: int):
    """The MiniGrid env wrapped to give uint8 frames [H,W,C] of the requested mode, plus the
    tile size used. Frames come out at the tile size nearest above `image_size` and are
    area-resized to exactly `image_size` by `resize_frames`."""
    from minigrid.minigrid_env import MiniGridEnv
    from minigrid.wrappers import ImgObsWrapper, RGBImgObsWrapper, RGBImgPartialObsWrapper

    env = gym_make(env_id)
    base = env.unwrapped
    if not isinstance(base, MiniGridEnv):
        env.close()
        fail(f"{env_id} is not a MiniGrid env; this step needs MiniGrid's grid (ground truth, goal cell), pick a MiniGrid-* id")
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


def cell_pixels(env, obs_mode: str, image_size: int, tile: int) -> int:
    """Pixels per grid cell in the frames when a cell is whole pixels (the render was not
    resized: `image_size` is the tile times a square grid), else 0. A spatial encoder uses it to
    make one cell one position of its map."""
    base = env.unwrapped
    side = {"rgb": (base.width, base.height), "rgb_partial": (base.agent_view_size,) * 2}.get(obs_mode)
    return tile if side is not None and side[0] == side[1] and tile * side[0] == image_size else 0


def make_pixel_env(env_id: str):
    """Any Gymnasium env as a source of frames, headless: (env, "observation") when its
    observations are images, else (env, "render") made with render_mode="rgb_array"."""
    env = gym_make(env_id)
    if image_space(env.observation_space):
        return env, "observation"
    env.close()
    return gym_make(env_id, render_mode="rgb_array"), "render"


def image_space(space) -> bool:
    """Is this observation space already a picture (uint8 [H,W], [H,W,1|3|4])?"""
    from gymnasium import spaces

    if not isinstance(space, spaces.Box) or space.dtype != np.uint8:
        return False
    shape = space.shape
    return (len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3, 4))) and min(shape[:2]) >= 8


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


def to_frames(images, channels: int, size: int) -> np.ndarray:
    """Pictures [T,H,W] or [T,H,W,1|3|4] (any size) -> uint8 [T,size,size,channels]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    x = x[..., :3].astype(np.uint8, copy=False)
    if channels == 1 and x.shape[-1] == 3:
        x = np.round(x @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]  # ITU-R 601 luma
    elif channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return resize_frames(np.ascontiguousarray(x), size)


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


def agent_state(base) -> tuple[int, int, int]:
    """The agent's (x, y, direction) on a MiniGrid env: the key of `oracle_steps`."""
    return int(base.agent_pos[0]), int(base.agent_pos[1]), int(base.agent_dir)


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


def layout_key(env, seed: int) -> bytes:
    """The layout a reset with `seed` draws: the grid's cells, without the agent."""
    env.reset(seed=seed)
    return env.unwrapped.grid.encode().tobytes()


def model_frames(raw: np.ndarray, image_size: int | None, channels: int = 3) -> np.ndarray:
    """Env frames -> the model's frames: resized (and grayscale) as the collector stored them;
    symbolic observations pass through."""
    return raw if image_size is None else to_frames(raw, channels, image_size)


def goal_frames(env, image_size: int | None, channels: int = 3) -> np.ndarray:
    """The observation with the agent on the goal cell, once per facing direction, rendered through
    the env's own wrappers so it matches a real observation there exactly; [4,H,W,C] uint8."""
    base = env.unwrapped
    pos, direction = np.array(base.agent_pos), base.agent_dir
    base.agent_pos = np.array(goal_position(base))
    frames = []
    for d in range(4):
        base.agent_dir = d
        frames.append(current_obs(env))
    base.agent_pos, base.agent_dir = pos, direction
    return model_frames(np.stack(frames), image_size, channels)


def nav_moves(base) -> dict[tuple[int, int, int], tuple[tuple[int, int, int], ...]]:
    """Every passable (x, y, dir) of the true grid and where left, right and forward take it
    (forward into a wall, a closed door or lava stays put)."""
    from minigrid.core.constants import DIR_TO_VEC

    def passable(x: int, y: int) -> bool:
        cell = base.grid.get(x, y)
        return cell is None or (cell.can_overlap() and cell.type != "lava")

    states = [(x, y, d) for x in range(base.width) for y in range(base.height) for d in range(4) if passable(x, y)]
    moves = {}
    for x, y, d in states:
        dx, dy = DIR_TO_VEC[d]
        ahead = (x + dx, y + dy, d) if passable(x + dx, y + dy) else (x, y, d)
        moves[(x, y, d)] = ((x, y, (d - 1) % 4), (x, y, (d + 1) % 4), ahead)
    return moves


def steps_to(moves: dict, cell: tuple[int, int]) -> dict[tuple[int, int, int], int]:
    """Shortest number of left/right/forward steps from every (x, y, dir) to `cell` (any
    direction), by breadth-first search backwards over `nav_moves`; unreachable states are absent."""
    preds: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {s: [] for s in moves}
    for s, nexts in moves.items():
        for nxt in nexts:
            preds[nxt].append(s)
    dist = {(*cell, d): 0 for d in range(4) if (*cell, d) in moves}
    queue = deque(dist)
    while queue:
        s = queue.popleft()
        for p in preds[s]:
            if p not in dist:
                dist[p] = dist[s] + 1
                queue.append(p)
    return dist


def oracle_steps(base) -> dict[tuple[int, int, int], int]:
    """Shortest number of left/right/forward steps from every (x, y, dir) to the goal cell on
    the true grid."""
    goal = goal_position(base)
    return steps_to(nav_moves(base), goal) if goal != (-1, -1) else {}


def action_label(env_id: str, action) -> str:
    """An action as a reader knows it: MiniGrid's by name (left, right, forward, ...), other
    discrete actions by number, continuous ones as their vector."""
    a = np.asarray(action)
    if a.ndim:
        return "[" + ", ".join(f"{v:.2f}" for v in a.tolist()) + "]"
    if env_id.startswith(("MiniGrid", "BabyAI")):
        from minigrid.core.actions import Actions

        try:
            return Actions(int(a)).name
        except ValueError:
            pass
    return str(int(a))
