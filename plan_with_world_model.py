"""Step 7: reach goals by planning with a trained world model (latent MPC), against a random
policy and a shortest-path oracle.

    python plan_with_world_model.py --checkpoint checkpoints/jepa_cnn --env MiniGrid-Empty-8x8-v0

The goal is the observation of the agent standing on the goal cell (rendered through the same
observation wrappers as the data, one frame per facing direction) or a `--goal-obs` image. At each
step the planner imagines action sequences with the model from the current observation, scores
them, executes the first action of the best and plans again (receding horizon).

Planners: `exhaustive` scores every sequence of `--horizon` actions; `cem` samples sequences from
per-step categorical distributions refitted to the elites. All candidates are rolled out as one
batch: one model call per imagined step. Costs: `latent` is the distance between an imagined
latent and the nearest goal latent (unit-vector squared distance; pixel MSE for the
encoder-decoder), aggregated over the horizon by `--aggregate` (min, final or sum); `graph` is
the number of steps from the imagined state to the goal on a graph whose nodes are the distinct
frames of the training data (plus the goal frames) and whose edges are the model's own one-step
predictions, each snapped to the nearest node, so imagined states are re-grounded on real ones
instead of drifting over long rollouts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from envs import (
    NAV_ACTIONS,
    agent_state,
    current_obs,
    goal_frames,
    goal_position,
    layout_key,
    make_env,
    model_frames,
    nav_moves,
    oracle_steps,
    place_agent_randomly,
)
from minigrid_dataset import MiniGridTransitions
from models import model_from_checkpoint
from wm_common import (
    atomic_write,
    check_seed,
    check_writable_dir,
    choose_device,
    fail,
    load_checkpoint,
    odd_path,
    run_cli,
    seed_everything,
    write_json,
)

if TYPE_CHECKING:
    from planners import Imagination, LatentGraph

# torch, and the planners that import it (a second of start-up), are imported where a plan is
# made, so --help and a bad flag or path answer at once.

PATHS_DRAWN = 4
# Imagined states one executed action may cost: candidates x horizon (x CEM iterations). Measured
# on one core here, the CNN JEPA imagines ~150k states/s (7^6 sequences x 6 steps in 4.7 s), so
# 1e6 is ~7 s per action and an Empty-8x8 episode (at most 256 actions) stays under half an hour;
# one more step of an exhaustive horizon multiplies it by 7 (hours per episode), and --horizon 20
# (7^20 sequences) held 14.6 GB after 36 s before scoring any. The encoder-decoder imagines whole
# frames through its ViT, ~250 states/s (2401 x 4 in 38 s): 10k is its ~40 s per action.
MAX_IMAGINED = 1_000_000
MAX_IMAGINED_FRAMES = 10_000
# settings each planner does not read (a value given for one is a note, not silently dropped)
UNUSED_BY = {
    "exhaustive": ("samples", "iterations", "elites", "merge", "max_nodes"),
    "cem": ("merge", "max_nodes"),
    "imagined": ("horizon", "cost", "aggregate", "samples", "iterations", "elites", "graph_data"),
}


@dataclass
class PlanConfig:
    checkpoint: str = field(default="checkpoints/jepa_cnn", metadata={"help": "run directory or model.pt of a trained world model"})
    env: str = field(default="", metadata={"help": "MiniGrid env id (default: the env the checkpoint's data came from)"})
    episodes: int = field(default=20, metadata={"help": "episodes to plan (and the same starts for the random policy)"})
    seed: int = field(
        default=1000, metadata={"help": "episode e resets with seed+e (default 1000: seeds the collector's default did not use)"}
    )
    out_dir: str = field(default="planning", metadata={"help": "where plan.json and plan.png go"})
    planner: str = field(
        default="exhaustive",
        metadata={
            "help": "exhaustive / cem: search over action sequences scored by --cost; imagined: breadth-first search over the "
            "model's own imagined states from the current frame (no dataset frames: works on unseen layouts)",
            "choices": ["exhaustive", "cem", "imagined"],
        },
    )
    horizon: int = field(default=3, metadata={"help": "imagined steps per plan"})
    cost: str = field(
        default="graph",
        metadata={
            "help": "latent: distance to the goal latent; graph: steps to the goal on the model's graph of data frames",
            "choices": ["latent", "graph"],
        },
    )
    aggregate: str = field(
        default="min", metadata={"help": "how per-step costs over the horizon combine", "choices": ["min", "final", "sum"]}
    )
    samples: int = field(default=256, metadata={"help": "cem: sequences sampled per iteration"})
    iterations: int = field(default=4, metadata={"help": "cem: refits of the sampling distribution"})
    elites: int = field(default=32, metadata={"help": "cem: best sequences the distribution is refitted to"})
    merge: float = field(
        default=0.5,
        metadata={"help": "imagined: two imagined states are one when closer than this share of the shortest real step"},
    )
    max_nodes: int = field(
        default=0,
        metadata={
            "help": "imagined: most states one search imagines (0: 8 per position of a spatial latent's map, twice the states of "
            "an agent with 4 headings on every cell; 3000 for other latents)"
        },
    )
    start: str = field(
        default="random",
        metadata={"help": "env: the env's own start; random: a random empty cell and direction", "choices": ["env", "random"]},
    )
    fixed_layout: bool = field(
        default=False, metadata={"help": "reset every episode with --seed: plan on one layout (e.g. the one collected with --fixed-layout)"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "step limit per episode (default: the env's own)"})
    goal_obs: str = field(default="", metadata={"help": "goal image (.png or .npy, HxWxC) instead of the rendered goal state"})
    graph_data: str = field(default="", metadata={"help": "cost graph: frames for the nodes (default: the checkpoint's training data)"})
    device: str = field(default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": ["auto", "cpu", "cuda", "mps"]})


def load_goal_image(path: str, shape: list[int]) -> np.ndarray:
    """A user's goal image as uint8 [1,H,W,C] of the model's frame shape. A NaN or inf pixel has
    no colour (the cast to uint8 would make one up), so such an image is refused."""
    p = Path(path)
    odd = odd_path(p)
    if odd:
        fail(f"--goal-obs {path} is {odd}, not an image file")
    if not p.is_file():
        fail(f"--goal-obs {path} not found")
    try:
        if p.suffix == ".npy":
            img = np.load(p, allow_pickle=False)
        else:
            import matplotlib.image

            img = matplotlib.image.imread(p)
    except Exception as e:
        fail(f"--goal-obs {path} is not a readable image ({type(e).__name__}); give a .png or a .npy array HxWxC")
    if img.dtype.kind not in "biuf" or img.size == 0:
        fail(f"--goal-obs {path} holds no pixel values (dtype {img.dtype}, shape {list(img.shape)}); give a .png or a .npy array HxWxC")
    if not np.isfinite(img).all():
        fail(f"--goal-obs {path} has {int(img.size - np.isfinite(img).sum())} non-finite (NaN or inf) values; give a real image")
    if img.dtype != np.uint8:
        img = np.clip(np.round(np.asarray(img, np.float64) * (255 if img.max() <= 1 else 1)), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[-1] == 4 and shape[-1] == 3:
        img = img[..., :3]
    if list(img.shape) != list(shape):
        fail(f"--goal-obs {path} has shape {list(img.shape)} but the model takes frames {shape}")
    return img[None]


def episode_seed(cfg: PlanConfig, e: int) -> int:
    return cfg.seed if cfg.fixed_layout else cfg.seed + e


def run_episode(
    env,
    planner: Any,
    actions: list[int],
    cfg: PlanConfig,
    e: int,
    image_size,
    goal_obs,
    channels: int = 3,
    film: list | None = None,
) -> dict[str, Any]:
    """One episode from the seeded start: the planner's when given, else a uniform random policy
    over the same actions."""
    import torch

    base = env.unwrapped
    obs, _ = env.reset(seed=episode_seed(cfg, e))
    rng = np.random.default_rng([cfg.seed, e])
    oracle = oracle_steps(base)
    if cfg.start == "random":
        obs = place_agent_randomly(env, rng)
        # some layouts have pockets walled off from the goal (SimpleCrossingS9N2): a start there
        # is an episode no planner can win, so the start is drawn again (the same draws for the
        # random policy's episode)
        for _ in range(100):
            if not oracle or agent_state(base) in oracle:
                break
            obs = place_agent_randomly(env, rng)
    start = agent_state(base)
    limit = cfg.max_steps or base.max_steps
    if planner is not None:
        planner.start_episode(goal_obs if goal_obs is not None else goal_frames(env, image_size, channels))
    act_rng = np.random.default_rng([cfg.seed, e, 1])
    path, reward, trace, t0 = [start[:2]], 0.0, [], time.perf_counter()
    if film is not None:
        film.append(base.get_frame(highlight=True, tile_size=16))
    for _ in range(limit):
        if planner is None:
            a = int(act_rng.choice(actions))
        else:
            frame = torch.from_numpy(model_frames(obs[None], image_size, channels))
            state = agent_state(base)
            beliefs = (oracle.get(state, np.nan), *planner.beliefs(frame))
            a = planner.act(frame)
            trace.append((*beliefs, planner.cost_to_go))
        obs, reward, terminated, truncated, _ = env.step(a)
        path.append((int(base.agent_pos[0]), int(base.agent_pos[1])))
        if film is not None:
            film.append(base.get_frame(highlight=True, tile_size=16))
        if terminated or truncated:
            break
    return {
        **(planner.episode_report() if planner is not None else {}),
        "seed": episode_seed(cfg, e),
        "start": list(start),
        "goal": list(goal_position(base)),
        "success": bool(reward > 0),
        "steps": len(path) - 1,
        "oracle_steps": oracle.get(start),
        "seconds": time.perf_counter() - t0,
        "path": path,
        "trace": trace,  # per planned step: (oracle steps, latent distance to goal, graph cost, imagined steps to go)
    }


# layouts of the training data compared grid by grid with the evaluation's (a reset is ~1 ms)
MAX_LAYOUTS_COMPARED = 5000


def evaluated_layouts(env, env_id: str, meta: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Were the evaluation's layouts in the training data? Compared as drawn, grid by grid, not by
    seed: an env such as Empty-8x8 draws one room whatever the seed."""
    trained_env, config = meta.get("env"), meta.get("config") or {}
    first, count = meta.get("seed"), meta.get("episodes")
    report: dict[str, Any] = {"env": env_id, "layout_seeds": [min(seeds), max(seeds)], "layouts": len(set(seeds))}
    if trained_env != env_id:
        report.update(seen_in_training=None, summary=f"another env than training's ({trained_env})")
        return report
    if not (isinstance(first, int) and isinstance(count, int)):
        report.update(seen_in_training=None, summary="unknown: the training data does not record its reset seeds")
        return report
    if isinstance(meta.get("reset_seeds"), list):  # collected with --exclude-layouts: the seeds it used
        train_seeds = meta["reset_seeds"]
    else:
        train_seeds = [first] if config.get("fixed_layout") or meta.get("fixed_layout") else range(first, first + count)
    compared = list(train_seeds)[:MAX_LAYOUTS_COMPARED]
    trained = {layout_key(env, s) for s in compared}
    seen = sum(layout_key(env, s) in trained for s in sorted(set(seeds)))
    scope = f"{len(trained)} distinct layouts from reset seeds {compared[0]}..{compared[-1]}"
    if len(compared) < len(train_seeds):
        scope += f" (the first {MAX_LAYOUTS_COMPARED} of {len(train_seeds)} compared)"
    verdict = "none of them in training" if seen == 0 else f"{seen} of them drawn identically in training"
    report.update(
        seen_in_training=seen,
        training_layouts=len(trained),
        summary=f"{report['layouts']} layouts (reset seeds {min(seeds)}..{max(seeds)}), {verdict}; training had {scope}",
    )
    return report


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Rank correlation (ties get their average rank); None when undefined."""

    def ranks(v: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return (starts + (counts - 1) / 2)[inverse]

    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return None
    return float(np.corrcoef(ranks(x[keep]), ranks(y[keep]))[0, 1])


def diagnose(episodes: list[dict]) -> dict[str, Any]:
    """Does what the planner scores track the true distance? Rank correlations, over every state
    the planner visited, of the oracle's steps-to-goal with the latent distance to the goal, with
    the graph's cost-to-go and with the imagined map's steps to go (1 = perfectly ordered). For
    the imagined planner also its own work: maps drawn from scratch per episode, and the share of
    steps spent trying steps not yet taken (when its map held no way to the goal)."""
    from planners import UNREACHABLE

    trace = np.array([row for ep in episodes for row in ep["trace"]], np.float64).reshape(-1, 4)
    imagined = bool(episodes) and "maps_drawn" in episodes[0]
    return {
        "states": len(trace),
        "spearman_latent_distance_vs_oracle": spearman(trace[:, 1], trace[:, 0]),
        "spearman_graph_cost_vs_oracle": spearman(np.where(trace[:, 2] >= UNREACHABLE, np.nan, trace[:, 2]), trace[:, 0]),
        # over the states where the imagined map reached the goal (how many: states_with_imagined_path)
        "spearman_imagined_steps_vs_oracle": spearman(trace[:, 3], trace[:, 0]),
        "states_with_imagined_path": int(np.isfinite(trace[:, 3]).sum()),
        "maps_per_episode": float(np.mean([ep["maps_drawn"] for ep in episodes])) if imagined else None,
        "share_of_steps_exploring": sum(ep["steps_exploring"] for ep in episodes) / max(1, len(trace)) if imagined else None,
    }


# the rollout diagnostic: imagined steps from every true state, on the first evaluation layouts
REID_DEPTHS, REID_LAYOUTS = (1, 4, 16), 2


def rollout_reidentification(env, imagination: Imagination, actions: list[int], seeds: list[int], image_size, channels: int, seed: int):
    """Do the model's rollouts stay on the layout's states? The imagined map merges a prediction
    into the state it is nearest, so a model plans only as deep as this holds. On the first
    evaluation layouts, from every true state (agent cell and heading) the model imagines k steps
    of random left/right/forward; a rollout is re-identified when, of all the layout's true
    states, the one whose frame is nearest its end is the state the world reached. Nearest by
    each of the planner's views (a spatial latent: cell by cell and whole). `one_step` is the
    same for every state and each action once, by kind of step: turns, steps forward that move
    the agent, and steps forward into a wall ("blocked", where the world does not change: a
    model that predicts those as half a move adds a state that is none of the layout's to every
    map, and its maps grow past the layout's size); `one_step_error` the median distance of
    those predictions from the right state, over that state's distance to its nearest other
    (the map merges what is within half its unit step). Uses the true grid: a diagnostic, never the
    planner's input. None when the model's actions lack the three."""
    import torch

    if not set(NAV_ACTIONS) <= set(actions):
        return None
    views = (
        {"whole": imagination.distance}
        if imagination.cells is None
        else {"cells": imagination.same_state_distance, "whole": imagination.distance}
    )
    rng = np.random.default_rng([seed, 2])
    hits: dict[str, list[list[float]]] = {view: [[] for _ in REID_DEPTHS] for view in views}
    step_kinds, step_hits, step_errors = [], {view: [] for view in views}, {view: [] for view in views}
    layouts = sorted(set(seeds))[:REID_LAYOUTS]
    base, counted = env.unwrapped, 0
    for layout in layouts:
        env.reset(seed=layout)
        moves = nav_moves(base)
        states = list(moves)
        index = {s: i for i, s in enumerate(states)}
        frames = []
        for x, y, d in states:
            base.agent_pos, base.agent_dir = np.array((x, y)), d
            frames.append(current_obs(env))
        frames = torch.from_numpy(model_frames(np.stack(frames), image_size, channels))
        known, start = imagination.target(frames), imagination.start(frames)  # [S,F], [S,...]
        counted += len(states)
        kinds, hits_now, errors_now = one_step_hits(imagination, views, known, start, states, moves, index)
        step_kinds.append(kinds)
        for view in views:
            step_hits[view].append(hits_now[view])
            step_errors[view].append(errors_now[view])
        for j, depth in enumerate(REID_DEPTHS):
            walk = rng.integers(0, len(NAV_ACTIONS), (len(states), depth))  # [S,k] indices into NAV_ACTIONS
            ends = []
            for i, s in enumerate(states):
                for a in walk[i]:
                    s = moves[s][a]
                ends.append(index[s])
            imagined = imagine(imagination, start, walk)
            for view, distance in views.items():
                nearest = distance(imagined, known).argmin(1).cpu().numpy()
                hits[view][j].extend((nearest == np.array(ends)).tolist())
    return {
        "layouts": layouts,
        "states": counted,
        "depths": list(REID_DEPTHS),
        **{view: [float(np.mean(h)) for h in per_depth] for view, per_depth in hits.items()},
        "one_step": by_kind(step_kinds, step_hits, np.mean),
        "one_step_error": by_kind(step_kinds, step_errors, np.median),
    }


def by_kind(kinds: list, values: dict[str, list], reduce) -> dict[str, dict[str, float | None]]:
    """Per view, `reduce` over the values of each kind of step (None: the layouts had none)."""
    kinds_all = np.concatenate(kinds)
    out = {}
    for view, parts in values.items():
        v = np.concatenate(parts)
        out[view] = {kind: float(reduce(v[kinds_all == kind])) if (kinds_all == kind).any() else None for kind in STEP_KINDS}
    return out


STEP_KINDS = ("turn", "forward", "blocked")


def one_step_hits(imagination: Imagination, views: dict, known, start, states: list, moves: dict, index: dict):
    """Every state [S,...] `start` stepped once by each of left, right, forward: the kind of each
    step [3S] (STEP_KINDS) and, per view, whether the prediction is nearest, of the layout's states
    (`known` [S,F]), the state the world reached [3S], and its distance from that state over the
    distance between that state and its nearest other [3S] (under 0.5: nearer the right state
    than halfway to any other)."""
    import torch

    # moves[s] lists where left, right and forward lead
    ends = np.array([index[moves[s][a]] for a in range(len(NAV_ACTIONS)) for s in states])
    kinds = np.array(["turn" if a < 2 else "forward" if moves[s][a] != s else "blocked" for a in range(len(NAV_ACTIONS)) for s in states])
    walk = np.repeat(np.arange(len(NAV_ACTIONS)), len(states))[:, None]  # [3S,1]
    imagined = imagine(imagination, start.repeat(len(NAV_ACTIONS), *[1] * (start.dim() - 1)), walk)
    hits, errors = {}, {}
    for view, distance in views.items():
        separation = distance(known, known).fill_diagonal_(torch.inf).min(1).values.cpu().numpy()  # [S]
        d = distance(imagined, known).cpu().numpy()  # [3S,S]
        hits[view] = d.argmin(1) == ends
        errors[view] = d[np.arange(len(ends)), ends] / np.maximum(separation[ends], 1e-12)
    return kinds, hits, errors


def imagine(imagination: Imagination, state, walk: np.ndarray):
    """The states [B,...] stepped by each row's actions (indices into NAV_ACTIONS, [B,k]): [B,F].
    PLAN_BATCH states at a time through the model (the encoder-decoder's are whole frames)."""
    import torch

    from planners import PLAN_BATCH

    out = []
    for at in range(0, len(walk), PLAN_BATCH):
        part = state[at : at + PLAN_BATCH]
        for t in range(walk.shape[1]):
            part = imagination.step(part, torch.tensor(NAV_ACTIONS)[walk[at : at + PLAN_BATCH, t]])
        out.append(imagination.embed(part))
    return torch.cat(out)


def summarise(runs: list[dict], prefix: str = "") -> dict[str, Any]:
    wins = [r for r in runs if r["success"]]
    ratios = [r["steps"] / r["oracle_steps"] for r in wins if r["oracle_steps"]]
    return {
        f"{prefix}success_rate": len(wins) / len(runs),
        f"{prefix}mean_steps": float(np.mean([r["steps"] for r in wins])) if wins else None,
        f"{prefix}steps_over_oracle": float(np.mean(ratios)) if ratios else None,
    }


def draw(env_id: str, env, episodes: list[dict], out_png: Path) -> None:
    """The first episodes' paths drawn over the grid: start (circle), goal (star), path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = episodes[:PATHS_DRAWN]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 4.3), squeeze=False)
    base = env.unwrapped
    for ax, ep in zip(axes[0], shown, strict=False):
        env.reset(seed=ep["seed"])
        tile = 16
        ax.imshow(base.grid.render(tile, agent_pos=(-1, -1), agent_dir=0))
        xy = (np.array(ep["path"]) + 0.5) * tile
        ax.plot(xy[:, 0], xy[:, 1], "-", color="tab:cyan", lw=2, alpha=0.8)
        ax.plot(*xy[0], "o", color="tab:orange", ms=10)
        ax.plot(*(np.array(ep["goal"]) + 0.5) * tile, "*", color="yellow", ms=16, mec="k")
        verdict = "reached" if ep["success"] else "failed"
        ax.set(title=f"seed {ep['seed']}: {verdict} in {ep['steps']} steps (oracle {ep['oracle_steps']})", xticks=[], yticks=[])
    fig.suptitle(env_id)
    fig.tight_layout()
    atomic_write(out_png, lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)


def save_gif(frames: list[np.ndarray], path: Path) -> None:
    """The first planned episode as an animation, 4 frames per second (Pillow ships with matplotlib)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    atomic_write(path, lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0))


def check_model_actions(model_config: dict[str, Any], actions: list[int], env_id: str) -> None:
    """The planner feeds the model MiniGrid's discrete action ids: a model of vector actions (e.g.
    trained on CarRacing) or with fewer actions than those would crash mid-run."""
    if model_config.get("continuous_actions"):
        fail(
            f"the checkpoint's model takes continuous actions ({model_config.get('num_actions')}-dim vectors) but {env_id}'s "
            "actions are discrete; plan with a model trained on data from a MiniGrid env"
        )
    known = int(model_config.get("num_actions", 0))
    if max(actions) >= known:
        fail(f"the checkpoint's model knows {known} actions but planning on {env_id} uses action ids up to {max(actions)}")


def check_budget(cfg: PlanConfig, n_actions: int, frames: bool) -> None:
    """Refuses a planner setting whose imagined states per executed action are beyond reach (see
    MAX_IMAGINED): an exhaustive horizon grows them exponentially."""
    limit = MAX_IMAGINED_FRAMES if frames else MAX_IMAGINED
    which = " for a model that imagines whole frames" if frames else ""
    if cfg.planner == "imagined":
        if cfg.max_nodes * n_actions > limit:
            fail(
                f"--max-nodes {cfg.max_nodes} x {n_actions} actions imagined states per action are above the limit of {limit:,}{which} "
                f"(memory and time); use --max-nodes {limit // n_actions} at most"
            )
    elif cfg.planner == "exhaustive":
        # n ** horizon for a horizon of 10**30 would take forever to compute: past 64 steps the count is far off anyway
        states = n_actions ** min(cfg.horizon, 64) * cfg.horizon
        if states > limit:
            longest = max((h for h in range(1, 64) if n_actions**h * h <= limit), default=0)
            fail(
                f"--planner exhaustive --horizon {cfg.horizon} imagines {n_actions}^{cfg.horizon} sequences x {cfg.horizon} steps "
                f"per action, above the limit of {limit:,} imagined states{which} (memory and time); use --planner cem"
                + (f", or --horizon {longest} at most" if longest else "")
            )
    elif cfg.samples * cfg.horizon * cfg.iterations > limit:
        fail(
            f"--samples {cfg.samples} x --horizon {cfg.horizon} x --iterations {cfg.iterations} imagined states per action are "
            f"above the limit of {limit:,}{which} (memory and time); lower them"
        )


def build_graph(
    data_path: str | None, imagination: Imagination, goals: np.ndarray, actions: list[int]
) -> tuple[LatentGraph, dict[str, Any]]:
    """The dataset-graph planner's graph over the frames of `data_path`, and its report."""
    from planners import UNREACHABLE, LatentGraph

    if not data_path:
        fail("the checkpoint does not record its data; pass --graph-data")
    data = MiniGridTransitions(data_path)
    if list(data.frame_shape) != list(goals.shape[1:]):
        fail(f"--graph-data {data_path} has frames {list(data.frame_shape)}, the model takes {list(goals.shape[1:])}")
    t0 = time.perf_counter()
    graph = LatentGraph(imagination, np.concatenate([data.obs.numpy(), data.terminal_obs.numpy()]), goals, actions)
    report = {
        "data": str(data_path),
        "nodes": len(graph.edges),
        "seconds": time.perf_counter() - t0,
        "edge_accuracy": graph.edge_accuracy(data),
        "nodes_with_path_to_goal": float(np.mean(graph.cost_to_goal < UNREACHABLE)),
    }
    print(
        f"graph: {report['nodes']} nodes from {data_path}, built in {report['seconds']:.1f} s; the model's edges "
        f"reproduce {report['edge_accuracy']:.1%} of the data's transitions; "
        f"{report['nodes_with_path_to_goal']:.1%} of nodes reach the first episode's goal"
    )
    return graph, report


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def check_plan_flags(cfg: PlanConfig) -> None:
    for name in ("episodes", "horizon", "samples", "iterations", "elites"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_nodes < 0:
        fail(f"--max-nodes must be at least 1 (or 0: sized from the model's latent), got {cfg.max_nodes}")
    if not 0 < cfg.merge < 1:
        fail(f"--merge must be between 0 and 1 (a share of one step's distance), got {cfg.merge}")
    if cfg.elites > cfg.samples:
        fail(f"--elites ({cfg.elites}) cannot exceed --samples ({cfg.samples})")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        fail(f"--max-steps must be at least 1, got {cfg.max_steps}")
    check_seed(cfg.seed)


def open_world(cfg: PlanConfig, ckpt: dict[str, Any]) -> tuple[Any, str, Any, int, list[int], np.ndarray | None]:
    """The env to plan in, made as the model's data was (view, frame size, channels, actions),
    checked against the model: (env, env id, image size, channels, actions, the user's goal image)."""
    meta = ckpt["data_meta"]
    env_id = cfg.env or meta.get("env") or fail("the checkpoint does not record its env; pass --env")
    obs_mode = meta.get("obs_mode", "rgb")
    image_size = None if obs_mode == "symbolic" else (meta.get("config") or {}).get("image_size", meta.get("frame_shape", [64])[0])
    env, _ = make_env(env_id, obs_mode, image_size or 64)
    channels = int((meta.get("config") or {}).get("channels", 3))
    sample = model_frames(env.reset(seed=episode_seed(cfg, 0))[0][None], image_size, channels)
    if goal_position(env.unwrapped) == (-1, -1):
        fail(f"{env_id} has no goal cell to plan to; pick an env with a goal square (e.g. MiniGrid-Empty-8x8-v0, MiniGrid-FourRooms-v0)")
    frame_shape = list(meta.get("frame_shape") or [])
    if frame_shape and list(sample.shape[1:]) != frame_shape:
        fail(f"{env_id} renders frames {list(sample.shape[1:])} but the model takes {frame_shape}")
    goal_obs = load_goal_image(cfg.goal_obs, list(sample.shape[1:])) if cfg.goal_obs else None
    n_actions = int(env.action_space.n)
    actions = list(NAV_ACTIONS) if (meta.get("config") or {}).get("actions") == "nav" else list(range(n_actions))
    check_model_actions(ckpt["model_config"], actions, env_id)
    if cfg.max_steps is not None and cfg.max_steps > env.unwrapped.max_steps:
        fail(
            f"--max-steps {cfg.max_steps} is above {env_id}'s own limit of {env.unwrapped.max_steps} steps, where every episode "
            f"ends anyway; use at most {env.unwrapped.max_steps} or leave --max-steps out"
        )
    return env, env_id, image_size, channels, actions, goal_obs


def note_settings(cfg: PlanConfig, meta: dict[str, Any]) -> None:
    if cfg.env and meta.get("env") and cfg.env != meta["env"]:
        print(f"note: planning on {cfg.env} with a model trained on data from {meta['env']}")
    unused = [f"--{name.replace('_', '-')}" for name in UNUSED_BY[cfg.planner] if getattr(cfg, name) != getattr(PlanConfig(), name)]
    if unused:
        print(
            f"note: {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by --planner {cfg.planner} (ignored)",
            file=sys.stderr,
        )


def make_report(cfg: PlanConfig, ckpt: dict[str, Any], env, env_id: str, cost: str, runs: tuple[list, list], graph_report) -> dict:
    planned, random_runs = runs
    meta = ckpt["data_meta"]
    oracle = [r["oracle_steps"] for r in planned if r["oracle_steps"] is not None]
    return {
        "env": env_id,
        "checkpoint": str(cfg.checkpoint),
        "arch": ckpt["arch"],
        "planner": cfg.planner,
        "horizon": cfg.horizon,
        "cost": cost,
        "aggregate": cfg.aggregate,
        "start": cfg.start,
        "episodes": cfg.episodes,
        "step_limit": cfg.max_steps or env.unwrapped.max_steps,
        **summarise(planned),
        **summarise(random_runs, "random_"),
        "oracle_mean_steps": float(np.mean(oracle)) if oracle else None,
        "seconds_per_episode": float(np.mean([r["seconds"] for r in planned])),
        "graph": graph_report,
        "trained_on": {k: meta.get(k) for k in ("path", "env", "seed", "episodes", "start", "fixed_layout")},
        "evaluated_on": evaluated_layouts(env, env_id, meta, [episode_seed(cfg, e) for e in range(cfg.episodes)]),
        "diagnostics": diagnose(planned),
        "config": {k: getattr(cfg, k) for k in ("samples", "iterations", "elites", "seed", "fixed_layout", "goal_obs")},
        "per_episode": [{k: v for k, v in r.items() if k != "trace"} for r in planned],
        "random_per_episode": [{k: r[k] for k in ("seed", "success", "steps")} for r in random_runs],
    }


def print_summary(cfg: PlanConfig, report: dict[str, Any], out: Path) -> None:
    ratio = report["steps_over_oracle"]
    search = "imagined search" if cfg.planner == "imagined" else f"{cfg.planner} H={cfg.horizon} cost={report['cost']}/{cfg.aggregate}"
    print(
        f"{report['env']}, {report['arch']} + {search}, {cfg.start} starts: "
        f"success {report['success_rate']:.2f} (random policy {report['random_success_rate']:.2f}), mean steps "
        f"{report['mean_steps'] if report['mean_steps'] is None else round(report['mean_steps'], 1)} vs oracle "
        f"{report['oracle_mean_steps']:.1f} ({'n/a' if ratio is None else f'{ratio:.2f}x'} on successes), "
        f"{report['seconds_per_episode']:.2f} s per episode"
    )
    print(f"evaluated on {report['evaluated_on']['summary']}")
    d = report["diagnostics"]
    print(
        f"does the cost track the true distance? rank correlation with the oracle's steps over {d['states']} visited states: "
        f"latent distance {_fmt(d['spearman_latent_distance_vs_oracle'])}, graph cost {_fmt(d['spearman_graph_cost_vs_oracle'])}, "
        f"imagined steps to go {_fmt(d['spearman_imagined_steps_vs_oracle'])} (over the {d['states_with_imagined_path']} where the map reached the goal)"
    )
    if d["maps_per_episode"] is not None:
        print(
            f"imagined maps drawn per episode {d['maps_per_episode']:.1f}; "
            f"{d['share_of_steps_exploring']:.0%} of steps spent trying steps where the map held no way to the goal"
        )
    reid = d["rollout_reidentification"]
    if reid is not None:
        shares = ", ".join(f"{view} " + " / ".join(f"{x:.2f}" for x in reid[view]) for view in ("cells", "whole") if view in reid)
        print(
            f"imagined rollouts of {'/'.join(map(str, reid['depths']))} random steps from each of the {reid['states']} true states of "
            f"layouts {', '.join(map(str, reid['layouts']))} that end nearest the state reached: {shares}"
        )
        view = "cells" if "cells" in reid else "whole"
        kinds = ", ".join(
            f"{kind} {x:.2f} (error {reid['one_step_error'][view][kind]:.2f})"
            for kind, x in reid["one_step"][view].items()
            if x is not None
        )
        print(
            f"one-step predictions nearest the state reached, by kind ({view} view; error: median distance over the gap to the nearest other state): {kinds}"
        )
    print(f"Saved {out / 'plan.json'}, {out / 'plan.png'}, {out / 'plan.gif'} (the first episode)")


def main(cfg: PlanConfig) -> dict[str, Any]:
    from tqdm import tqdm

    check_plan_flags(cfg)
    ckpt = load_checkpoint(cfg.checkpoint)
    env, env_id, image_size, channels, actions, goal_obs = open_world(cfg, ckpt)
    check_budget(cfg, len(actions), frames=ckpt["arch"] == "encdec_vit" and (cfg.cost == "latent" or cfg.planner == "imagined"))
    # the imagined search's cost is its own: steps through the map it imagines
    cost = "imagined_steps" if cfg.planner == "imagined" else cfg.cost
    note_settings(cfg, ckpt["data_meta"])
    out = check_writable_dir(cfg.out_dir, "--out-dir")
    seed_everything(cfg.seed)
    device = choose_device(cfg.device)
    from planners import Imagination, make_planner

    imagination = Imagination(model_from_checkpoint(ckpt).to(device), ckpt["arch"], device)
    graph, graph_report = None, None
    if cost == "graph":
        goals = goal_obs if goal_obs is not None else goal_frames(env, image_size, channels)  # the first episode's layout
        graph, graph_report = build_graph(cfg.graph_data or ckpt["data_meta"].get("path"), imagination, goals, actions)
    planner = make_planner(cfg, imagination, actions, graph, cfg.seed)
    planned, random_runs, film = [], [], []
    bar = tqdm(range(cfg.episodes), desc=f"plan {env_id}", unit="ep", dynamic_ncols=True)
    for e in bar:
        planned.append(run_episode(env, planner, actions, cfg, e, image_size, goal_obs, channels, film if e == 0 else None))
        random_runs.append(run_episode(env, None, actions, cfg, e, image_size, goal_obs, channels))
        bar.set_postfix(success=f"{np.mean([r['success'] for r in planned]):.2f}", refresh=False)
    bar.close()
    report = make_report(cfg, ckpt, env, env_id, cost, (planned, random_runs), graph_report)
    seeds = [episode_seed(cfg, e) for e in range(cfg.episodes)]
    report["diagnostics"]["rollout_reidentification"] = rollout_reidentification(
        env, imagination, actions, seeds, image_size, channels, cfg.seed
    )
    if cfg.planner == "imagined":  # the search's size as used: --max-nodes 0 sizes it from the latent
        report["config"].update(merge=cfg.merge, max_nodes=planner.imagined.max_nodes)
    write_json(out / "plan.json", report)
    draw(env_id, env, planned, out / "plan.png")
    save_gif(film, out / "plan.gif")
    env.close()
    print_summary(cfg, report, out)
    return report


if __name__ == "__main__":
    run_cli(main, PlanConfig, description=__doc__.split("\n\n")[0])
