"""Collecting for planning on unseen layouts: --exclude-layouts keeps the evaluation's layouts out
of the data (compared grid by grid) and records the seeds used; --through-goal lets an episode
walk over the goal, so the agent-on-goal frame a planner's goal image shows is in the data."""

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, load_npz, run

from collect_minigrid_data import CollectConfig
from collect_minigrid_data import main as collect_main
from envs import layout_key, make_env
from plan_with_world_model import evaluated_layouts

CROSSING = "MiniGrid-SimpleCrossingS9N1-v0"  # 42 layouts in all: seed ranges overlap in layouts


def test_excluded_layouts_are_not_in_the_data_and_the_seeds_are_recorded(tmp_path):
    out = tmp_path / "d.npz"
    collect_main(CollectConfig(env=CROSSING, episodes=12, max_steps=3, image_size=36, seed=0, exclude_layouts="0:10", out=str(out)))
    meta = json.loads(str(load_npz(out)["meta"]))
    seeds = meta["reset_seeds"]
    assert len(seeds) == 12 and seeds == sorted(set(seeds)) and meta["exclude_layouts"] == "0:10"
    env, _ = make_env(CROSSING, "rgb", 36)
    excluded = {layout_key(env, s) for s in range(0, 10)}
    assert not {layout_key(env, s) for s in seeds} & excluded
    assert len(excluded) >= 5  # the check above is not vacuous
    skipped = [s for s in range(seeds[-1]) if s not in seeds]
    assert skipped and all(layout_key(env, s) in excluded for s in skipped)  # only excluded layouts were passed over
    report = evaluated_layouts(env, CROSSING, meta, list(range(0, 10)))
    assert report["seen_in_training"] == 0, report


def test_an_env_of_one_layout_has_nothing_to_hold_out_and_says_so(tmp_path, capsys):
    """Empty rooms draw one layout for every seed: `make plan-unseen ENV=MiniGrid-Empty-8x8-v0`
    must still run, the data differing from the evaluation by start cells only, and the
    evaluation report must say its layouts were in training."""
    out, empty = tmp_path / "e.npz", "MiniGrid-Empty-5x5-v0"
    cfg = CollectConfig(
        env=empty, episodes=4, max_steps=3, image_size=40, seed=0, exclude_layouts="10000:10005", start="random", out=str(out)
    )
    collect_main(cfg)
    assert "draws one layout for all 5 seeds" in capsys.readouterr().out
    meta = json.loads(str(load_npz(out)["meta"]))
    assert meta["reset_seeds"] == [0, 1, 2, 3]
    env, _ = make_env(empty, "rgb", 40)
    assert evaluated_layouts(env, empty, meta, list(range(10000, 10005)))["seen_in_training"] == 5


def test_without_exclusion_the_same_seeds_overlap_in_layouts(tmp_path):
    """The reason for --exclude-layouts: disjoint seed ranges still share layouts here."""
    env, _ = make_env(CROSSING, "rgb", 36)
    assert {layout_key(env, s) for s in range(0, 60)} & {layout_key(env, s) for s in range(100, 110)}


def test_through_goal_walks_over_the_goal_until_the_step_limit(tmp_path):
    out = tmp_path / "g.npz"
    collect_main(
        CollectConfig(env="MiniGrid-Empty-5x5-v0", episodes=8, max_steps=60, image_size=40, seed=0, through_goal=True, out=str(out))
    )
    a = load_npz(out)
    lengths = np.bincount(a["episode"])
    assert (lengths == 60).all()  # no episode ended at the goal
    reached = np.flatnonzero(a["terminated"])
    assert len(reached) and not a["done"][reached].all()  # the goal was reached mid-episode
    on_goal = (a["agent_pos"] == a["goal_pos"]).all(1)
    assert on_goal.any()  # the agent stood on the goal cell in some obs_t, and stepped on from there


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--exclude-layouts", "10:5"], "--exclude-layouts must be START:END"),
        (["--exclude-layouts", "ten"], "--exclude-layouts must be START:END"),
        (["--env", "CartPole-v1", "--through-goal"], "apply to MiniGrid only"),
        (["--env", "CartPole-v1", "--exclude-layouts", "0:5"], "apply to MiniGrid only"),
        (["--fixed-layout", "--seed", "3", "--exclude-layouts", "3:4"], "draws a layout that --exclude-layouts"),
    ],
)
def test_bad_held_out_flags_are_one_line(tmp_path, args, fragment):
    out = tmp_path / "x.npz"
    base = ["--env", "MiniGrid-Empty-5x5-v0", "--episodes", "2", "--max-steps", "3", "--out", str(out)]
    assert_one_line_error(run("collect_minigrid_data.py", *base, *args), fragment)
    assert not out.exists()
