"""Step 7, plan_with_world_model.py: the graph, planners and oracle on a hand-made latent world
whose answers are known (a perfect model of MiniGrid-Empty-8x8's open 6x6 interior), the goal
frames and goal images against the real env, then the command line end to end on a tiny trained
CNN JEPA and its one-line errors."""

import json
import math
import shutil
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, load_npz, ok, run

import plan_with_world_model
from envs import agent_state, current_obs, goal_frames, goal_position, make_env, oracle_steps, resize_frames
from plan_with_world_model import PlanConfig, evaluated_layouts, load_goal_image, rollout_reidentification, run_episode
from planners import DEFAULT_MAX_NODES, UNREACHABLE, Imagination, ImaginedGraph, LatentGraph, make_planner
from wm_common import UserError

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = "MiniGrid-Empty-8x8-v0"
NO_GOAL_ENV = "MiniGrid-KeyCorridorS3R1-v0"  # a ball to pick up, no goal square
SIDE = 8  # Empty-8x8: walls on the border, open cells 1..6
GOAL = (6, 6)
NAV = [0, 1, 2]
# MiniGrid's facing directions, written out here so the test's dynamics do not come from the code under test
DIR_VEC = {0: (1, 0), 1: (0, 1), 2: (-1, 0), 3: (0, -1)}
STATES = [(x, y, d) for y in range(1, SIDE - 1) for x in range(1, SIDE - 1) for d in range(4)]
INDEX = {s: i for i, s in enumerate(STATES)}
GOAL_STATES = [(*GOAL, d) for d in range(4)]
STARTS = [s for s in STATES if s[:2] != GOAL]
CONTRACT_KEYS = {"success_rate", "random_success_rate", "mean_steps", "oracle_mean_steps", "episodes", "env", "horizon", "planner"}


def true_step(s, a, move=True):
    """MiniGrid's left/right/forward on the open grid; the other actions change nothing here."""
    x, y, d = s
    if a == 0:
        return x, y, (d - 1) % 4
    if a == 1:
        return x, y, (d + 1) % 4
    if a == 2 and move:
        nx, ny = x + DIR_VEC[d][0], y + DIR_VEC[d][1]
        if 1 <= nx <= SIDE - 2 and 1 <= ny <= SIDE - 2:
            return nx, ny, d
    return s


def bfs_steps(goal=GOAL):
    """Shortest number of steps from every state to the goal cell, by a forward search from each
    state (independent of the backward searches in the code under test)."""
    dist = {}
    for s in STATES:
        seen, queue = {s: 0}, deque([s])
        while queue:
            u = queue.popleft()
            if u[:2] == goal:
                dist[s] = seen[u]
                break
            for a in NAV:
                v = true_step(u, a)
                if v not in seen:
                    seen[v] = seen[u] + 1
                    queue.append(v)
    return dist


DIST = bfs_steps()
# the state written into a 1x1 "image": (x, y, dir) as three uint8 channels
TOKEN = {s: np.array(s, np.uint8).reshape(1, 1, 3) for s in STATES}


class GridModel(torch.nn.Module):
    """A perfect world model of the open grid: a frame is looked up to its state, the latent of a
    state is a fixed random unit vector (scaled differently by each encoder, which the planner's
    normalisation must undo), and `predict` decodes the latent (nearest row) and applies the true
    dynamics. `move=False` makes forward a no-op (a model that never learned to walk)."""

    def __init__(self, frame_of: dict, move=True, dim=16, seed=0):
        super().__init__()
        self.ids = {frame_of[s].tobytes(): i for i, s in enumerate(STATES)}
        g = torch.Generator().manual_seed(seed)
        self.table = F.normalize(torch.randn(len(STATES), dim, generator=g), dim=-1)
        self.next = torch.tensor([[INDEX[true_step(s, a, move)] for a in range(7)] for s in STATES])

    def state_ids(self, frames):
        return torch.tensor([self.ids[f.tobytes()] for f in frames.numpy()])

    def encode(self, frames):
        return 3.0 * self.table[self.state_ids(frames)]

    def encode_target(self, frames):
        return 0.5 * self.table[self.state_ids(frames)]

    def predict(self, z, a):
        return 2.0 * self.table[self.next[(z @ self.table.T).argmax(1), a]]


def tokens(states):
    return np.stack([TOKEN[s] for s in states])


@pytest.fixture(scope="module")
def imagination():
    return Imagination(GridModel(TOKEN), "jepa_cnn", CPU)


@pytest.fixture(scope="module")
def graph(imagination):
    """Nodes: every state off the goal cell, then the four goal frames."""
    return LatentGraph(imagination, tokens(STARTS), tokens(GOAL_STATES), NAV)


def planner_for(imagination, graph, **cfg):
    planner = make_planner(PlanConfig(**cfg), imagination, NAV, graph, seed=0)
    planner.start_episode(tokens(GOAL_STATES))
    return planner


def frame(s):
    return torch.from_numpy(TOKEN[s][None])


def drive(planner, s, limit=40):
    """Runs an episode of the planner on the true dynamics until the agent stands on the goal
    cell; returns the number of steps."""
    planner.start_episode(tokens(GOAL_STATES))
    for steps in range(limit + 1):
        if s[:2] == GOAL:
            return steps
        s = true_step(s, planner.act(frame(s)))
    return None


# ----------------------------------------------------------------------------- the known world


def test_bfs_reference_matches_the_oracle_on_the_real_env():
    """The test's own shortest paths agree with oracle_steps on the real Empty-8x8 grid (two
    independent searches), and MiniGrid's direction vectors are the ones written out here."""
    from minigrid.core.constants import DIR_TO_VEC

    assert {d: tuple(int(v) for v in DIR_TO_VEC[d]) for d in range(4)} == DIR_VEC
    env, _ = make_env(ENV, "rgb", 64)
    env.reset(seed=0)
    oracle = oracle_steps(env.unwrapped)
    assert oracle == DIST
    assert max(DIST.values()) == 12 and DIST[(1, 1, 2)] == 12


def test_graph_edges_are_the_true_dynamics_and_costs_the_shortest_paths(graph):
    nodes = STARTS + GOAL_STATES
    assert len(graph.edges) == len(nodes)
    assert graph.goal_nodes.tolist() == [len(STARTS) + d for d in range(4)]
    for i, s in enumerate(nodes):
        assert graph.index[TOKEN[s].tobytes()] == i
        assert [nodes[j] for j in graph.edges[i]] == [true_step(s, a) for a in NAV], s
        assert graph.cost_to_goal[i] == DIST[s], s
    # snapping a state's latent lands on its own node
    ids = graph.snap(F.normalize(graph.imagination.model.table[[INDEX[s] for s in nodes]], dim=-1))
    assert ids.tolist() == list(range(len(nodes)))


def test_goal_frame_already_in_the_data_is_that_node(imagination):
    """The data holds every state, the goal frames among them, some twice: the goal nodes are the
    data's own rows, no node is duplicated, and the costs are still the shortest paths."""
    frames = tokens(STATES + STATES[:10])
    g = LatentGraph(imagination, frames, tokens(GOAL_STATES), NAV, batch=50)
    assert len(g.edges) == len(STATES)
    assert g.goal_nodes.tolist() == sorted(INDEX[s] for s in GOAL_STATES)
    assert g.cost_to_goal.tolist() == [DIST[s] for s in STATES]
    assert (g.cost_to_goal[g.goal_nodes] == 0).all()


def test_graph_of_a_model_that_cannot_walk_reaches_the_goal_from_nowhere():
    imag = Imagination(GridModel(TOKEN, move=False), "jepa_cnn", CPU)
    g = LatentGraph(imag, tokens(STARTS), tokens(GOAL_STATES), NAV)
    assert (g.cost_to_goal[: len(STARTS)] == UNREACHABLE).all()
    assert (g.cost_to_goal[len(STARTS) :] == 0).all()


@pytest.mark.parametrize("horizon", [1, 2, 3])
def test_graph_cost_planner_walks_shortest_paths(imagination, graph, horizon):
    planner = planner_for(imagination, graph, planner="exhaustive", cost="graph", horizon=horizon)
    steps = {s: drive(planner, s) for s in STARTS}
    assert steps == {s: DIST[s] for s in STARTS}


def test_latent_cost_planner_takes_a_shortest_path_when_the_goal_is_in_reach(imagination):
    horizon = 3
    planner = planner_for(imagination, None, planner="exhaustive", cost="latent", horizon=horizon)
    near = [s for s in STARTS if DIST[s] <= horizon]
    assert len(near) == 18  # the goal cell's own ring: 1, 2 or 3 steps away
    for s in near:
        a = planner.act(frame(s))
        assert DIST[true_step(s, a)] == DIST[s] - 1, (s, a)
        assert drive(planner, s) == DIST[s], s


@pytest.mark.parametrize("cost, aggregate", [("graph", "min"), ("latent", "sum"), ("latent", "final")])
@pytest.mark.parametrize("horizon", [2, 3])
def test_cem_finds_the_exhaustive_minimum(imagination, graph, cost, aggregate, horizon):
    """CEM's chosen sequence costs what the best of all sequences costs, from every start. Graph
    costs are exact; latent costs of one state computed in different rows of a batched cdist can
    differ by float rounding (a few 1e-7), far below the gaps between distinct states. (Latent cost
    with `min` is left out: its 1e-6 earlier-arrival bonus is itself at the mercy of that
    rounding once the sequence stays on the goal.)"""
    kw = dict(cost=cost, aggregate=aggregate, horizon=horizon)
    exhaustive = planner_for(imagination, graph, planner="exhaustive", **kw)
    cem = planner_for(imagination, graph, planner="cem", samples=256, elites=32, iterations=3, **kw)
    seqs = exhaustive.search.sequences
    tol = 0 if cost == "graph" else 1e-6
    for s in STARTS:
        costs = exhaustive.scores(frame(s), seqs)
        best = cem.search.best(lambda q, s=s: cem.scores(frame(s), q))
        j = int(((seqs == best).all(1)).nonzero()[0, 0])
        assert float(costs[j]) == pytest.approx(float(costs.min()), abs=tol), (s, best.tolist(), float(costs[j]), float(costs.min()))


def test_cem_graph_planner_walks_shortest_paths(imagination, graph):
    planner = planner_for(imagination, graph, planner="cem", cost="graph", horizon=3, samples=64, elites=8, iterations=3)
    assert {s: drive(planner, s) for s in STARTS} == {s: DIST[s] for s in STARTS}


@pytest.mark.parametrize("cells", [None, (16, 4, 4)])  # a latent vector, or read as a 4x4 map of 16 channels
def test_imagined_search_walks_shortest_paths_without_any_dataset_frame(cells):
    """From each start the search sees only the current frame and the goal frames: the map it
    imagines re-identifies every state (the perfect model predicts each exactly), so it holds
    the grid's states and no more, and following it is a shortest path. (256 dimensions: among
    random unit vectors in fewer, some distinct states are closer than the merge radius, which
    a trained encoder avoids by learning to tell states apart.)"""
    imag = Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU)
    imag.cells = cells  # (a 4x4 map would cap the search at 128 states: the grid has 144)
    planner = planner_for(imag, None, planner="imagined", max_nodes=DEFAULT_MAX_NODES)
    starts = STARTS if cells is None else STARTS[::5]  # the map's two views: a fifth of the starts is enough
    assert {s: drive(planner, s) for s in starts} == {s: DIST[s] for s in starts}
    actions, nodes = planner.imagined.search(frame((1, 1, 2)), planner.goal)
    assert len(actions) == DIST[(1, 1, 2)] == len(nodes)


def test_imagined_planner_learns_walls_its_model_does_not_know_without_drawing_a_new_map():
    """The model knows the open grid; the world has a wall across column 4 with a gap at the
    bottom row. Each time forward bumps into the wall, the planner corrects that one step in its
    map and plans again within it: it reaches the goal, bumps into each wall cell at most once
    (planning afresh from the frame would imagine the same open step again, and bump forever),
    and never draws a second map."""
    wall = {(4, y) for y in range(1, SIDE - 2)}

    def walled_step(s, a):
        t = true_step(s, a)
        return s if t[:2] in wall else t

    planner = planner_for(Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU), None, planner="imagined")
    s, bumps = (1, 1, 0), []
    for _ in range(80):
        if s[:2] == GOAL:
            break
        a = planner.act(frame(s))
        t = walled_step(s, a)
        if t == s and true_step(s, a) != s:
            bumps.append(s)
        s = t
    assert s[:2] == GOAL
    assert 1 <= len(bumps) == len(set(bumps)) <= len(wall), bumps
    assert planner.episode_report() == {"maps_drawn": 1, "steps_exploring": 0}  # the map always held a way


def test_imagined_planner_tries_steps_when_its_model_walls_off_the_goal():
    """The opposite error: the world is the open grid, but the model believes a wall along
    column 4 (forward across it changes nothing). Every map from the west half is closed and
    holds no way to the goal; the planner tries the steps it has not taken until one leads out
    of the map (across the imagined wall), draws a map there, and reaches the goal. It crosses
    in fewer steps than there are steps to try in the west half (72 states x 3 actions): it
    walks from one untried step to the nearest next, never back and forth."""
    model = GridModel(TOKEN, dim=256)
    for y in range(1, SIDE - 1):
        model.next[INDEX[(3, y, 0)], 2] = INDEX[(3, y, 0)]
        model.next[INDEX[(4, y, 2)], 2] = INDEX[(4, y, 2)]
    planner = planner_for(Imagination(model, "jepa_cnn", CPU), None, planner="imagined")
    s, tried = (1, 1, 0), []
    for _ in range(4 * len(STATES)):
        if s[:2] == GOAL:
            break
        a = planner.act(frame(s))
        if s[0] < 4:
            tried.append((s, a))
        s = true_step(s, a)
    assert s[:2] == GOAL
    assert len(tried) < 3 * 3 * (SIDE - 2) * 4
    report = planner.episode_report()
    assert report["maps_drawn"] == 2  # the first map, and one from across the wall
    assert report["steps_exploring"] == len(tried)  # west of the wall every step explored


def test_imagined_planner_leaves_a_loop_by_the_step_it_took_least_there(monkeypatch):
    """A map that keeps sending the agent forward into a wall (a model that splits states draws
    such maps anew at every frame): the agent takes the planned step REPEATS - 1 times at that
    frame, then the action it took least there, and so on round the actions."""
    planner = planner_for(Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU), None, planner="imagined")
    monkeypatch.setattr(planner.imagined, "path_from", lambda source: ([2], [source]))
    s, taken = (6, 1, 3), []  # facing the north wall: forward changes nothing
    for _ in range(3):
        taken.append(planner.act(frame(s)))
    assert planner.REPEATS == 3 and taken == [2, 2, 0]
    planner.start_episode(tokens(GOAL_STATES))  # a new episode forgets the counts
    assert planner.act(frame(s)) == 2


def test_imagined_cost_to_go_is_the_true_distance_along_the_way_with_a_perfect_model():
    """What the diagnostics correlate with the oracle: after each action, the imagined map's
    steps to the goal from the state acted in. With a perfect model it is the true distance at
    every step of the walk, whether the planner searched again or followed its path."""
    planner = planner_for(Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU), None, planner="imagined")
    s = (1, 1, 2)
    while s[:2] != GOAL:
        a = planner.act(frame(s))
        assert planner.cost_to_go == DIST[s], s
        s = true_step(s, a)


def test_without_a_path_to_the_goal_the_imagined_planner_has_no_cost_to_go():
    imag = Imagination(GridModel(TOKEN, move=False, dim=256), "jepa_cnn", CPU)
    planner = planner_for(imag, None, planner="imagined")
    planner.act(frame((1, 1, 0)))
    assert not planner.imagined.reached and math.isnan(planner.cost_to_go)


@pytest.fixture
def token_frames(monkeypatch):
    """The real Empty-8x8 env, its frames the test's tokens of the agent's (x, y, dir)."""
    monkeypatch.setattr(plan_with_world_model, "current_obs", lambda env: TOKEN[agent_state(env.unwrapped)])
    env, _ = make_env(ENV, "rgb", 64)
    return env


def test_rollouts_of_a_perfect_model_end_on_the_state_reached(token_frames):
    """The rollout diagnostic: from every true state of the layout (the 144 of Empty-8x8's open
    interior, on each of the two evaluation layouts named), a perfect model's k-step rollout is
    nearest the state the world reached, at every depth."""
    imag = Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU)
    reid = rollout_reidentification(token_frames, imag, NAV, [1000, 1001, 1002], None, 3, seed=0)
    assert reid == {
        "layouts": [1000, 1001],
        "states": 2 * len(STATES),
        "depths": [1, 4, 16],
        "whole": [1.0, 1.0, 1.0],
        "one_step": {"whole": {"turn": 1.0, "forward": 1.0, "blocked": 1.0}},
        "one_step_error": {"whole": {"turn": 0.0, "forward": 0.0, "blocked": 0.0}},
    }


def test_rollouts_of_a_model_that_cannot_walk_drift_off_with_depth(token_frames):
    """A model that never moves the agent ends its rollouts where turns alone lead: right when the
    walk's forward steps hit a wall or were none (one step: 2/3 of the actions are turns, and a
    sixth of the states face a wall), wrong ever more often with depth. Cell by cell too, for a
    spatial latent; and None when the model lacks left/right/forward."""
    imag = Imagination(GridModel(TOKEN, move=False, dim=256), "jepa_cnn", CPU)
    reid = rollout_reidentification(token_frames, imag, NAV, [1000], None, 3, seed=0)
    one, four, sixteen = reid["whole"]
    assert 0.6 < one < 0.85 and four < one and sixteen < 0.2
    # by kind: its turns are right, and so are its steps into walls (the world stays put too)
    assert reid["one_step"] == {"whole": {"turn": 1.0, "forward": 0.0, "blocked": 1.0}}
    # a step forward it predicts as staying put is at least as far from the right state as that
    # state's nearest other is
    errors = reid["one_step_error"]["whole"]
    assert errors["turn"] == errors["blocked"] == 0.0 and errors["forward"] >= 1.0
    imag.cells = (16, 4, 4)
    assert set(rollout_reidentification(token_frames, imag, NAV, [1000], None, 3, seed=0)) == {
        "layouts",
        "states",
        "depths",
        "cells",
        "whole",
        "one_step",
        "one_step_error",
    }
    assert rollout_reidentification(token_frames, imag, [0, 1], [1000], None, 3, seed=0) is None


def test_imagined_search_size_is_taken_from_the_latent_map():
    """--max-nodes 0: 8 states per position of a spatial latent's map (4 headings, twice over),
    3000 for a latent without one; a value given is kept."""
    imag = Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU)
    assert ImaginedGraph(imag, [0, 1, 2], 0.5).max_nodes == DEFAULT_MAX_NODES == 3000
    imag.cells = (16, 4, 4)  # as a spatial latent: 16 channels on a 4x4 map
    assert ImaginedGraph(imag, [0, 1, 2], 0.5).max_nodes == 8 * 4 * 4
    assert ImaginedGraph(imag, [0, 1, 2], 0.5, max_nodes=7).max_nodes == 7


def test_a_spatial_map_compares_states_both_ways_each_in_its_own_steps():
    """A spatial latent's distance in the map is the nearer of the cell-by-cell and the whole-latent
    views, each divided by its shortest real step; a view whose steps were all too small to
    tell apart says only "identical" (0) or "apart" (inf). A latent without a map has one view."""
    imag = Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU)
    assert len(ImaginedGraph(imag, NAV, 0.5).views) == 1
    imag.cells = (16, 4, 4)
    g = ImaginedGraph(imag, NAV, 0.5)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 256, generator=gen), torch.randn(3, 256, generator=gen)
    g.scales = [2.0, 0.25]
    expected = torch.minimum(imag.same_state_distance(a, b) / 2.0, imag.distance(a, b) / 0.25)
    torch.testing.assert_close(g.distance(a, b), expected)
    g.scales = [0.0, 0.0]
    assert g.distance(a, torch.cat([a[:1], b])).tolist()[0] == [0.0, *[math.inf] * 3]
    # the search measures both views' steps from its first state
    planner = planner_for(imag, None, planner="imagined")
    planner.act(frame((1, 1, 0)))
    assert all(s > 0 for s in planner.imagined.scales) and planner.imagined.scales[0] != planner.imagined.scales[1]


@pytest.mark.parametrize("block", [2**24, 50])  # one block, or a few rows at a time
def test_spatial_same_state_distance_is_the_largest_distance_of_one_position(monkeypatch, block):
    """On a spatial latent [C,h,w], two states' distance is the largest over positions of the
    squared distance of their unit vectors there (a brute force here); one cell changed by a unit
    vector's opposite is 4, however small the map's other changes."""
    monkeypatch.setattr("planners.SAME_STATE_BLOCK", block)
    imag = Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU)
    imag.cells = c, h, w = (4, 3, 5)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, c * h * w, generator=gen), torch.randn(6, c * h * w, generator=gen)
    unit = lambda x: F.normalize(x.view(len(x), c, h * w), dim=1)  # noqa: E731
    brute = ((unit(a)[:, None] - unit(b)[None]) ** 2).sum(2).amax(2)  # [7,6]
    torch.testing.assert_close(imag.same_state_distance(a, b), brute, atol=1e-5, rtol=1e-5)
    flipped = a[:1].clone().view(c, h * w)
    flipped[:, 4] *= -1
    near = a[:1] + 1e-3 * torch.randn(1, c * h * w, generator=gen)
    assert imag.same_state_distance(a[:1], torch.cat([flipped.view(1, -1), near]))[0].tolist() == pytest.approx([4.0, 0.0], abs=1e-3)
    assert imag.same_state_distance(a[:0], b).shape == (0, 6)
    # the same distance for named pairs only (row i against the states index[i] names) and, from
    # the same gather, the whole unit latents' squared distance
    index = torch.tensor([[5, 0], [2, 2], [1, 4], [0, 3], [3, 1], [4, 5], [1, 0]])
    ua, ub = F.normalize(a, dim=1), F.normalize(b, dim=1)
    whole, cells = imag.distances_at(ua, ub, index)
    torch.testing.assert_close(whole, imag.distance(ua, ub).gather(1, index), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cells, brute.gather(1, index), atol=1e-5, rtol=1e-5)


def test_a_map_compares_each_prediction_only_with_its_candidates_nearest_as_whole_latents(monkeypatch):
    """The map's growth compares a row exactly (the nearer of the two views) with the
    `SAME_STATE_CANDIDATES` states nearest it as whole latents and calls the others inf; the
    candidates are found by sketches (random projections) when the latent is large, and the
    sketches find the same ones as the latents do when one state is much nearer than the rest."""
    monkeypatch.setattr("planners.SAME_STATE_CANDIDATES", 3)
    monkeypatch.setattr("planners.SKETCH_DIM", 32)
    imag = Imagination(GridModel(TOKEN, dim=256), "jepa_cnn", CPU)
    imag.cells = (16, 4, 4)
    g = ImaginedGraph(imag, NAV, 0.5)
    g.scales = [2.0, 0.25]
    gen = torch.Generator().manual_seed(3)
    b = F.normalize(torch.randn(9, 256, generator=gen), dim=1)
    a = F.normalize(b[[4, 0, 7, 2, 2, 8]] + 0.05 * torch.randn(6, 256, generator=gen), dim=1)
    full, whole = g.distance(a, b), imag.distance(a, b)
    nearest = whole.topk(3, dim=1, largest=False).indices
    near = g._near(a, b, None, None)
    torch.testing.assert_close(near.gather(1, nearest), full.gather(1, nearest), atol=1e-5, rtol=1e-5)
    assert torch.isinf(near[torch.ones_like(near, dtype=torch.bool).scatter_(1, nearest, False)]).all()
    # by sketches the far candidates may be others, the near duplicate is among them
    sketched = g._near(a, b, g._sketch(a), g._sketch(b))
    compared = torch.isfinite(sketched)
    assert compared.sum(1).tolist() == [3] * 6
    torch.testing.assert_close(sketched[compared], full[compared], atol=1e-5, rtol=1e-5)
    assert near.argmin(1).tolist() == sketched.argmin(1).tolist() == [4, 0, 7, 2, 2, 8]
    assert g._sketch(a).shape == (6, 32) and torch.equal(g._sketch(a), g._sketch(a))
    torch.testing.assert_close(g._near(a, b[:3], None, None), full[:, :3])  # no more states than candidates: all


def test_imagined_search_of_a_model_that_cannot_walk_stays_small_and_only_turns():
    """Forward changes nothing in this model: the imagined map is the four directions of the
    start cell, merged however often they are reached, and the search never walks."""
    imag = Imagination(GridModel(TOKEN, move=False, dim=256), "jepa_cnn", CPU)
    planner = planner_for(imag, None, planner="imagined")
    a = planner.act(frame((1, 1, 0)))
    assert planner.imagined.nodes == 4 and a in (0, 1, 2)


# ----------------------------------------------------------------------------- the real env


def test_random_starts_are_ones_from_which_the_goal_can_be_reached():
    """SimpleCrossingS9N2 has layouts with pockets walled off from the goal; an episode started
    in one is lost whatever the planner does. Reset seeds 10004, 10005 and 10016 drew such a
    start for episodes 4, 5 and 16 of --seed 10000 before starts were drawn again."""
    env, _ = make_env("MiniGrid-SimpleCrossingS9N2-v0", "rgb", 72)
    cfg = PlanConfig(seed=10000, max_steps=1)
    for e in (4, 5, 16):
        episode = run_episode(env, None, NAV, cfg, e, 72, None)
        assert episode["oracle_steps"] is not None, e


def test_oracle_steps_on_empty_8x8_by_hand():
    env, _ = make_env(ENV, "rgb", 64)
    env.reset(seed=0)
    base = env.unwrapped
    start = (int(base.agent_pos[0]), int(base.agent_pos[1]), int(base.agent_dir))
    assert start == (1, 1, 0) and goal_position(base) == GOAL
    oracle = oracle_steps(base)
    assert oracle[start] == 11  # 5 forward east, turn right, 5 forward south
    assert all(oracle[(*GOAL, d)] == 0 for d in range(4))
    assert oracle[(5, 6, 0)] == 1 and oracle[(6, 5, 1)] == 1  # next to the goal, facing it
    assert oracle[(5, 6, 2)] == 3  # facing away: two turns, then forward
    assert (0, 0, 0) not in oracle and (7, 3, 1) not in oracle  # walls are not states
    assert len(oracle) == 36 * 4


def walk_onto_goal(env, d, forward):
    """The observation the env returns with the agent arriving on the goal facing d: by stepping
    forward from the neighbouring cell, or by turning right on the goal cell."""
    env.reset(seed=0)
    base = env.unwrapped
    if forward:
        base.agent_pos = np.array((GOAL[0] - DIR_VEC[d][0], GOAL[1] - DIR_VEC[d][1]))
        base.agent_dir = d
        obs, reward, terminated, _, _ = env.step(2)
        assert terminated and reward > 0
    else:
        base.agent_pos = np.array(GOAL)
        base.agent_dir = (d - 1) % 4
        obs, *_ = env.step(1)
    assert tuple(base.agent_pos) == GOAL and base.agent_dir == d
    return resize_frames(obs[None], 64)[0]


@pytest.mark.parametrize("mode", ["rgb", "rgb_partial"])
def test_goal_frames_match_the_real_observation_on_the_goal(mode):
    env, _ = make_env(ENV, mode, 64)
    env.reset(seed=0)
    base = env.unwrapped
    base.agent_pos, base.agent_dir = np.array((3, 4)), 2
    before = current_obs(env)
    goals = goal_frames(env, 64)
    assert goals.shape == (4, 64, 64, 3) and goals.dtype == np.uint8
    assert tuple(base.agent_pos) == (3, 4) and base.agent_dir == 2
    assert np.array_equal(current_obs(env), before)
    assert len({g.tobytes() for g in goals}) == 4  # the facing direction shows
    for d in range(4):
        assert np.array_equal(goals[d], walk_onto_goal(env, d, forward=False)), d
    for d in (0, 1):  # east and south of the goal are walls: only these can be walked in
        assert np.array_equal(goals[d], walk_onto_goal(env, d, forward=True)), d


def test_load_goal_image(tmp_path):
    import matplotlib.image

    shape = [32, 32, 3]
    img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    np.save(tmp_path / "goal.npy", img)
    got = load_goal_image(str(tmp_path / "goal.npy"), shape)
    assert got.dtype == np.uint8 and got.shape == (1, 32, 32, 3)
    assert np.array_equal(got[0], img)

    matplotlib.image.imsave(tmp_path / "goal.png", img)
    got = load_goal_image(str(tmp_path / "goal.png"), shape)
    assert got.dtype == np.uint8 and np.array_equal(got[0], img)

    np.save(tmp_path / "small.npy", img[:16, :16])
    cases = {
        "small.npy": r"has shape \[16, 16, 3\] but the model takes frames \[32, 32, 3\]",
        "missing.png": "not found",
        "garbage.png": "not a readable image",
        "garbage.npy": "not a readable image",
    }
    (tmp_path / "garbage.png").write_bytes(b"\x00not an image at all" * 10)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage" * 10)
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as info:
            load_goal_image(str(tmp_path / name), shape)
        assert "\n" not in str(info.value) and name in str(info.value)


def test_edge_accuracy_on_real_frames(tiny_npz):
    """A perfect model of the rendered 32 px frames reproduces every transition of the tiny data;
    one whose forward is a no-op exactly those where forward did not move the agent."""
    from minigrid_dataset import MiniGridTransitions

    env, _ = make_env(ENV, "rgb", 32)
    env.reset(seed=0)
    base = env.unwrapped
    rendered = {}
    for s in STATES:
        base.agent_pos, base.agent_dir = np.array(s[:2]), s[2]
        rendered[s] = resize_frames(current_obs(env)[None], 32)[0]
    assert len({f.tobytes() for f in rendered.values()}) == len(STATES)
    env.reset(seed=0)
    goals = goal_frames(env, 32)
    assert [g.tobytes() for g in goals] == [rendered[s].tobytes() for s in GOAL_STATES]

    data = MiniGridTransitions(tiny_npz)
    arrays = load_npz(tiny_npz)
    frames = np.concatenate([arrays["obs"], arrays["terminal_obs"]])
    nxt = frames[arrays["next_obs_index"]]
    moved = (arrays["action"] == 2) & (nxt != arrays["obs"]).any(axis=(1, 2, 3))
    assert 0 < moved.mean() < 1
    actions = list(range(7))
    perfect = LatentGraph(Imagination(GridModel(rendered), "jepa_cnn", CPU), frames, goals, actions)
    assert len(perfect.edges) == len({f.tobytes() for f in np.concatenate([frames, goals])})
    assert perfect.edge_accuracy(data) == 1.0
    lame = LatentGraph(Imagination(GridModel(rendered, move=False), "jepa_cnn", CPU), frames, goals, actions)
    assert lame.edge_accuracy(data) == pytest.approx(1 - moved.mean())


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    """The session's one-epoch CNN JEPA on the shared tiny data (read only)."""
    return tiny_run("cnn")[0]


def plan_args(checkpoint, out, *extra):
    return ("--checkpoint", checkpoint, "--episodes", "3", "--out-dir", out, "--max-steps", "30", "--device", "cpu", *extra)


def plan(checkpoint, out, *extra):
    return run("plan_with_world_model.py", *plan_args(checkpoint, out, *extra))


@pytest.fixture(scope="module")
def planned(work, checkpoint, in_process):
    """Three runs: graph cost (twice, same seed: the second in this process, so the two also
    agree across processes) and latent cost with CEM."""
    cem = ("--cost", "latent", "--planner", "cem", "--horizon", "4", "--samples", "32", "--elites", "8", "--iterations", "2")
    ok(plan(checkpoint, work / "graph"))
    in_process("plan_with_world_model.py", *plan_args(checkpoint, work / "graph_again"))
    ok(plan(checkpoint, work / "cem", *cem))
    return {name: work / name for name in ("graph", "graph_again", "cem")}


def test_imagined_planner_end_to_end_records_its_search_size(work, checkpoint):
    """--planner imagined through the CLI: the contract keys, its own cost, and the search size it
    used (the tiny checkpoint's latent is a vector, not a map: the fixed default)."""
    out = work / "imagined"
    ok(plan(checkpoint, out, "--planner", "imagined"))
    report = json.loads((out / "plan.json").read_text())
    assert CONTRACT_KEYS <= set(report) and report["cost"] == "imagined_steps"
    assert report["config"]["max_nodes"] == DEFAULT_MAX_NODES and report["config"]["merge"] == 0.5
    d = report["diagnostics"]
    assert d["states"] == sum(e["steps"] for e in report["per_episode"])
    assert 0 <= d["states_with_imagined_path"] <= d["states"]
    # every episode draws its first map; exploring steps are steps taken
    assert all(e["maps_drawn"] >= 1 and 0 <= e["steps_exploring"] <= e["steps"] for e in report["per_episode"])
    assert d["maps_per_episode"] == np.mean([e["maps_drawn"] for e in report["per_episode"]])
    assert d["share_of_steps_exploring"] == sum(e["steps_exploring"] for e in report["per_episode"]) / d["states"]
    reid = d["rollout_reidentification"]
    assert reid["layouts"] == [1000, 1001] and reid["depths"] == [1, 4, 16] and reid["states"] == 2 * len(STATES)
    assert all(0 <= x <= 1 for x in reid["whole"]) and "cells" not in reid
    assert all(0 <= x <= 1 for x in reid["one_step"]["whole"].values())
    assert all(x >= 0 for x in reid["one_step_error"]["whole"].values())


def check_report(out, planner, horizon):
    report = json.loads((out / "plan.json").read_text())
    assert CONTRACT_KEYS <= set(report), CONTRACT_KEYS - set(report)
    assert report["env"] == ENV  # no --env given: the checkpoint's data's env
    assert report["planner"] == planner and report["horizon"] == horizon
    assert report["episodes"] == 3 and report["step_limit"] == 30
    for key in ("success_rate", "random_success_rate"):
        assert 0 <= report[key] <= 1
    assert report["seconds_per_episode"] > 0
    d = report["diagnostics"]
    assert d["states"] == sum(e["steps"] for e in report["per_episode"])  # one belief per step taken
    assert d["states_with_imagined_path"] == 0 and d["spearman_imagined_steps_vs_oracle"] is None  # no imagined map here
    assert d["maps_per_episode"] is None and d["share_of_steps_exploring"] is None
    for key in ("spearman_latent_distance_vs_oracle", "spearman_graph_cost_vs_oracle"):
        assert d[key] is None or -1 <= d[key] <= 1
    episodes = report["per_episode"]
    assert len(episodes) == 3 and len(report["random_per_episode"]) == 3
    assert [e["seed"] for e in episodes] == [1000, 1001, 1002]
    for ep in episodes:
        start = tuple(ep["start"])
        assert start in DIST and ep["oracle_steps"] == DIST[start]  # random starts off the goal
        assert ep["goal"] == list(GOAL)
        assert 1 <= ep["steps"] <= 30 and len(ep["path"]) == ep["steps"] + 1
        assert ep["path"][0] == list(start[:2])
        for (x0, y0), (x1, y1) in zip(ep["path"], ep["path"][1:], strict=False):
            assert abs(x1 - x0) + abs(y1 - y0) <= 1
        assert ep["success"] == (ep["path"][-1] == list(GOAL))
        if ep["success"]:
            assert ep["steps"] >= ep["oracle_steps"]
        else:
            assert ep["steps"] == 30
    wins = [e["steps"] for e in episodes if e["success"]]
    assert report["success_rate"] == len(wins) / 3
    assert report["mean_steps"] == (np.mean(wins) if wins else None)
    assert report["oracle_mean_steps"] == pytest.approx(np.mean([e["oracle_steps"] for e in episodes]))
    assert (out / "plan.png").read_bytes().startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(out / "plan.gif") as gif:  # the first episode, 250 ms per state (Pillow merges repeated frames)
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        assert gif.format == "GIF" and sum(durations) == 250 * (episodes[0]["steps"] + 1)
    return report


def test_cli_graph_cost(planned, tiny_npz):
    report = check_report(planned["graph"], "exhaustive", 3)
    assert report["cost"] == "graph"
    arrays = load_npz(tiny_npz)
    env, _ = make_env(ENV, "rgb", 32)
    env.reset(seed=0)
    frames = np.concatenate([arrays["obs"], arrays["terminal_obs"], goal_frames(env, 32)])
    assert report["graph"]["nodes"] == len({f.tobytes() for f in frames})
    assert 0 <= report["graph"]["edge_accuracy"] <= 1


def test_cli_latent_cost_cem(planned):
    report = check_report(planned["cem"], "cem", 4)
    assert report["cost"] == "latent" and report["graph"] is None
    assert report["config"]["samples"] == 32 and report["config"]["elites"] == 8


def test_cli_same_seed_same_episodes(planned):
    def episodes(name):
        report = json.loads((planned[name] / "plan.json").read_text())
        return [{k: v for k, v in e.items() if k != "seconds"} for e in report["per_episode"]], report["random_per_episode"]

    assert episodes("graph") == episodes("graph_again")


@pytest.fixture(scope="module")
def good_out(work, planned):
    out = work / "kept"
    shutil.copytree(planned["graph"], out)
    return out


@pytest.fixture(scope="module")
def bad_goal(work):
    path = work / "small_goal.npy"
    np.save(path, np.zeros((16, 16, 3), np.uint8))
    return path


def test_key_corridor_has_no_goal_cell():
    """The no-goal case below relies on this env having no goal square after a reset."""
    env, _ = make_env(NO_GOAL_ENV, "rgb", 32)
    env.reset(seed=1000)
    assert goal_position(env.unwrapped) == (-1, -1)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--env", "NoSuchEnv-v0"), ("unknown env id", "NoSuchEnv-v0")),
        (("--env", NO_GOAL_ENV), ("has no goal cell", NO_GOAL_ENV)),
        (("--goal-obs", "BAD_GOAL"), ("has shape [16, 16, 3]", "[32, 32, 3]")),
        (("--checkpoint", "NO_CHECKPOINT"), ("not found",)),
        (("--horizon", "0"), ("--horizon must be at least 1",)),
        (("--elites", "64", "--samples", "8", "--planner", "cem"), ("--elites (64) cannot exceed --samples (8)",)),
    ],
    ids=["unknown-env", "no-goal-env", "goal-obs-shape", "missing-checkpoint", "horizon-0", "elites-over-samples"],
)
def test_cli_bad_inputs(work, checkpoint, good_out, bad_goal, args, fragments):
    subst = {"BAD_GOAL": str(bad_goal), "NO_CHECKPOINT": str(work / "nope")}
    args = [subst.get(a, a) for a in args]
    before = {p.name: p.read_bytes() for p in good_out.iterdir()}
    ckpt = [] if "--checkpoint" in args else ["--checkpoint", checkpoint]
    proc = run("plan_with_world_model.py", *ckpt, "--episodes", "2", "--out-dir", good_out, "--device", "cpu", *args)
    assert_one_line_error(proc, *fragments)
    assert {p.name: p.read_bytes() for p in good_out.iterdir()} == before


def test_cli_goal_obs_plans_to_the_given_image(work, checkpoint, in_process):
    env, _ = make_env(ENV, "rgb", 32)
    env.reset(seed=0)
    path = work / "goal.npy"
    np.save(path, goal_frames(env, 32)[0])
    out = work / "goal_obs"
    in_process("plan_with_world_model.py", *plan_args(checkpoint, out, "--goal-obs", path, "--max-steps", "5"))
    assert json.loads((out / "plan.json").read_text())["config"]["goal_obs"] == str(path)


def test_set_goal_moves_the_goal_for_the_next_episode(imagination):
    """Layouts whose goal moves (FourRooms) re-aim the graph per episode: after set_goal the
    costs are the shortest paths to the new cell, whether its frames are data nodes or new."""
    g = LatentGraph(imagination, tokens(STATES), tokens(GOAL_STATES), NAV)
    assert len(g.edges) == len(STATES)  # the goal frames are data frames: nothing appended
    corner = (1, 1)
    g.set_goal(tokens([(*corner, d) for d in range(4)]))
    assert len(g.edges) == len(STATES)
    to_corner = bfs_steps(corner)
    for s in STATES:
        assert g.cost_to_goal[g.index[TOKEN[s].tobytes()]] == to_corner[s], s
    without_goal_cell = LatentGraph(imagination, tokens(STARTS), tokens([(*corner, d) for d in range(4)]), NAV)
    without_goal_cell.set_goal(tokens(GOAL_STATES))  # frames the data lacks: appended, with the model's edges
    assert len(without_goal_cell.edges) == len(STARTS) + 4
    assert all(without_goal_cell.cost_to_goal[without_goal_cell.index[TOKEN[s].tobytes()]] == DIST[s] for s in STARTS)


@pytest.mark.parametrize(
    "env_id, episodes, eval_seeds, seen",
    [
        ("MiniGrid-FourRooms-v0", 20, list(range(100, 110)), 0),  # random walls: other seeds, other layouts
        ("MiniGrid-FourRooms-v0", 20, [3, 100, 4], 2),  # two of them were collected
        ("MiniGrid-Empty-8x8-v0", 20, list(range(1000, 1005)), 5),  # one room whatever the seed
        # 42 layouts in all: 250 training seeds draw every one, so no seed range is held out
        ("MiniGrid-SimpleCrossingS9N1-v0", 250, list(range(10000, 10020)), 20),
    ],
)
def test_plan_json_says_whether_the_layouts_were_in_the_training_data(env_id, episodes, eval_seeds, seen):
    """Compared grid by grid, not by seed: Empty-8x8 draws one room for every seed, and
    SimpleCrossingS9N1 only 42."""
    env, _ = make_env(env_id, "rgb", 64)
    meta = {"env": env_id, "seed": 0, "episodes": episodes, "config": {"fixed_layout": False}}
    report = evaluated_layouts(env, env_id, meta, eval_seeds)
    assert report["seen_in_training"] == seen and report["layouts"] == len(eval_seeds)
    assert ("none of them in training" in report["summary"]) == (seen == 0)
    other = evaluated_layouts(env, "MiniGrid-Empty-5x5-v0", meta, eval_seeds)
    assert other["seen_in_training"] is None and "another env" in other["summary"]
