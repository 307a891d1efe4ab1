"""Planning in a world model's imagination, as small interchangeable pieces:

* `Imagination`: the model as a planner sees it (start from frames, step by actions, compare).
* Costs of candidate action sequences: `LatentCost` (distance to the goal latent) and `GraphCost`
  (steps to the goal on `LatentGraph`, the model's one-step edges between dataset frames).
* Searches over sequences: `ExhaustiveSearch` and `CEMSearch`.
* Planners: `SequencePlanner` (a search over a cost, receding horizon) and `ImaginedPlanner` (a
  breadth-first map of the model's own imagined states, `ImaginedGraph`: no dataset frames).

`make_planner` builds the one a `PlanConfig` names; every planner has `start_episode(goal
frames)`, `act(frame) -> action` and `beliefs(frame)` (what it thinks of the current frame).
"""

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from minigrid_dataset import MiniGridTransitions

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [S,F] x [G,F] -> [S,G]
UNREACHABLE = 10_000  # graph cost of a node from which no path to the goal is known
# Candidates go through the model this many at a time, so memory stays bounded whatever their
# number: ~0.5 GB for the encoder-decoder at 64 px (measured ~470 kB per imagined frame), a few MB
# for a JEPA's latents.
PLAN_BATCH = 1024
# a spatial latent's state comparisons hold [positions, rows, states] floats at a time: 64 MB
SAME_STATE_BLOCK = 2**24
# An imagined map compares a spatial latent's new states cell by cell only with this many known
# states, those nearest as whole latents: the cell-by-cell comparison is a small product per map
# position, slow next to one matrix product of whole latents, and all of them made 70% of the
# planning time on a 19x19 map (FourRooms, maps of up to 2,888 states). 4 drew the same maps as
# 16 in half the time (three FourRooms maps of 3,053-3,225 states); 1 and 2 drew others.
SAME_STATE_CANDIDATES = 4
# ... and finds those candidates by sketches of the whole latents: random projections to this many
# dimensions, which keep squared distances within a few tens of percent (Johnson-Lindenstrauss),
# enough to rank a state's near duplicates first. Comparing a FourRooms latent (5,776 numbers)
# whole with every known state was the largest cost left once the candidates were 4.
SKETCH_DIM = 128


class Imagination:
    """The world model as the planner sees it. `start` maps frames to the state the model steps
    from, `step` advances states by actions, `embed` maps states to vectors comparable with
    `target(frames)`. A JEPA's state is its latent (predictions live in the target encoder's
    space); the encoder-decoder's is a frame, and its vectors are pixels."""

    def __init__(self, model: torch.nn.Module, arch: str, device: torch.device):
        self.model, self.device, self.pixels = model, device, arch == "encdec_vit"
        # a spatial latent is a map [C,h,w], one position per grid cell
        self.cells = getattr(model, "map_shape", None)

    @torch.no_grad()
    def start(self, frames: torch.Tensor) -> torch.Tensor:
        frames = frames.to(self.device)
        if self.pixels:
            return frames.permute(0, 3, 1, 2).float() / self.model.config.pixel_scale  # [B,C,H,W]
        return self.model.encode(frames)  # [B,D]

    @torch.no_grad()
    def target(self, frames: torch.Tensor) -> torch.Tensor:
        if self.pixels:
            return self.start(frames).flatten(1)
        return F.normalize(self.model.encode_target(frames.to(self.device)), dim=-1)

    @torch.no_grad()
    def step(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        action = action.to(self.device)
        if self.pixels:
            return self.model.step_frames(state, action)
        return self.model.predict(state, action)

    def embed(self, state: torch.Tensor) -> torch.Tensor:
        return state.flatten(1) if self.pixels else F.normalize(state, dim=-1)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[S,F] x [G,F] -> [S,G]: pixel MSE, or squared distance of unit latents."""
        d = torch.cdist(a, b).pow(2)
        return d / a.shape[1] if self.pixels else d

    def same_state_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[S,F] x [G,F] -> [S,G], the distance that re-identifies states. For a spatial latent,
        the largest over map positions of the squared distance of that position's unit vectors:
        two states differ where any one cell differs, however small the cell, while prediction
        noise spread thinly over the map does not add up. (Measured on held-out SimpleCrossing
        layouts: the median prediction error is 0.085 of the distance to the nearest other state
        this way, 0.18 with the whole latent.) Otherwise `distance`."""
        if self.cells is None:
            return self.distance(a, b)
        c, h, w = self.cells
        # unit vectors u, v: |u - v|^2 = 2 - 2 u.v, so the largest distance is the smallest dot
        # product, one batched product per position (half the time of cdist's)
        b = _unit_cells(b.reshape(len(b), c, h * w)).permute(2, 1, 0)  # [P,C,G]
        rows = max(1, SAME_STATE_BLOCK // (h * w * max(1, len(b[0, 0]))))  # bounded memory: [P,rows,G] at a time
        out = []
        for part in a.split(rows):
            part = _unit_cells(part.reshape(len(part), c, h * w)).permute(2, 0, 1)  # [P,rows,C]
            out.append((2 - 2 * torch.bmm(part, b).amin(0)).clamp_(min=0))
        return torch.cat(out) if out else a.new_zeros(0, len(b[0, 0]))

    def distances_at(self, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[S,F] x [G,F] unit latents (as `embed` and `target` give), index [S,k] -> ([S,k],
        [S,k]): a spatial latent's `distance` and `same_state_distance` of each row of a to the k
        states of b its row of index names, both from one gather of those states (the gather is
        the cost: [S,k,F] numbers)."""
        c, h, w = self.cells
        rows = max(1, SAME_STATE_BLOCK // (h * w * c * max(1, index.shape[1])))  # [rows,k,C,P] at a time
        b = b.reshape(len(b), c, h * w)
        # each state's cell lengths once, not once per row naming it: two FourRooms maps (3,290 and
        # 3,800 states, one thread) took 19.0 s this way against 29.7, the results unchanged
        b_lengths = _cell_lengths(b)  # [G,P]
        whole, cells = [], []
        for part, at in zip(a.split(rows), index.split(rows), strict=True):
            u = part.reshape(len(part), 1, c, h * w)  # [rows,1,C,P]
            dots = (u * b[at]).sum(2)  # [rows,k,P]: per position, unnormalised
            # whole latents are unit vectors: |u - v|^2 = 2 - 2 u.v, u.v the sum over positions
            whole.append((2 - 2 * dots.sum(2)).clamp_(min=0))
            cells.append((2 - 2 * (dots / (_cell_lengths(u) * b_lengths[at])).amin(2)).clamp_(min=0))
        if not whole:
            return a.new_zeros(index.shape), a.new_zeros(index.shape)
        return torch.cat(whole), torch.cat(cells)


def _cell_lengths(maps: torch.Tensor) -> torch.Tensor:
    """Feature maps [...,C,P] -> [...,P]: the length of each position's C-vector (F.normalize
    along C, whose stride is P, took 5x longer than dividing by these)."""
    return maps.pow(2).sum(-2).sqrt_().clamp_(min=1e-12)


def _unit_cells(maps: torch.Tensor) -> torch.Tensor:
    """Feature maps [...,C,P] with each position's C-vector scaled to unit length."""
    return maps / _cell_lengths(maps).unsqueeze(-2)


class LatentGraph:
    """Nodes: the distinct frames of the data, plus the goal frames of the current episode.
    Edges: for each node and action, the model's one-step prediction snapped to the nearest node.
    `cost_to_goal` holds each node's number of steps to a goal node (UNREACHABLE if none).
    `set_goal` swaps the goal (layouts whose goal moves get theirs each episode): a prediction
    nearer to a goal frame than to any data frame becomes an edge into that goal."""

    def __init__(self, imagination: Imagination, frames: np.ndarray, goal_frames: np.ndarray, actions: list[int], batch: int = 512):
        first: dict[bytes, int] = {}
        for i, f in enumerate(frames):
            first.setdefault(f.tobytes(), i)
        self.frames = frames[sorted(first.values())]  # [U,H,W,C] uint8
        self.imagination, self.actions, self.batch = imagination, actions, batch
        self.data_index = {f.tobytes(): i for i, f in enumerate(self.frames)}
        self.data_vectors = self._targets(self.frames)  # [U,F]
        n = len(self.frames)
        predicted = []  # per action: [U,F] embeddings of the predicted next states
        for a in actions:
            out = []
            for i in range(0, n, batch):
                state = imagination.start(torch.from_numpy(self.frames[i : i + batch]))
                out.append(imagination.embed(imagination.step(state, torch.full((len(state),), a))))
            predicted.append(torch.cat(out))
        self.predicted = torch.stack(predicted, dim=1)  # [U,A,F]
        dist = self._distances(self.predicted.flatten(0, 1), self.data_vectors)  # [U*A,U]
        best = dist.min(dim=1)
        self.data_edges = best.indices.view(n, len(actions)).cpu().numpy()  # [U,A]
        self.data_edge_dist = best.values.view(n, len(actions)).cpu()
        self.set_goal(goal_frames)

    def _targets(self, frames: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(frames)
        return torch.cat([self.imagination.target(t[i : i + self.batch]) for i in range(0, len(t), self.batch)])

    def _distances(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.imagination.distance(a[i : i + self.batch], b) for i in range(0, len(a), self.batch)])

    def set_goal(self, goal_frames: np.ndarray) -> None:
        """Goal frames already in the data are those nodes; the others are appended."""
        n, n_actions = len(self.frames), len(self.actions)
        self.index = dict(self.data_index)
        goals, new = [], []
        for g in goal_frames:
            key = g.tobytes()
            if key not in self.index:
                self.index[key] = n + len(new)
                new.append(g)
            goals.append(self.index[key])
        self.goal_nodes = np.array(sorted(set(goals)))
        self.vectors = self.data_vectors
        edges = self.data_edges
        if new:
            new_vectors = self._targets(np.stack(new))
            self.vectors = torch.cat([self.data_vectors, new_vectors])
            d = self._distances(self.predicted.flatten(0, 1), new_vectors).min(dim=1)
            nearer = (d.values.view(n, n_actions) < self.data_edge_dist).numpy()
            edges = np.where(nearer, n + d.indices.view(n, n_actions).cpu().numpy(), edges)
            state = self.imagination.start(torch.from_numpy(np.stack(new)))
            from_goals = torch.stack(
                [self.imagination.embed(self.imagination.step(state, torch.full((len(new),), a))) for a in self.actions], 1
            )
            edges = np.concatenate(
                [edges, self._distances(from_goals.flatten(0, 1), self.vectors).argmin(1).view(len(new), n_actions).cpu().numpy()]
            )
        self.edges = edges  # [nodes, A]
        self.cost_to_goal = self._steps_to_goal()

    def snap(self, vectors: torch.Tensor) -> torch.Tensor:
        """[S,F] -> index of the nearest node [S]."""
        return self.imagination.distance(vectors, self.vectors).argmin(dim=1)

    def _steps_to_goal(self) -> np.ndarray:
        preds: list[list[int]] = [[] for _ in range(len(self.edges))]
        for u, row in enumerate(self.edges):
            for v in set(row.tolist()):
                preds[v].append(u)
        cost = np.full(len(self.edges), UNREACHABLE, np.int64)
        cost[self.goal_nodes] = 0
        queue = deque(self.goal_nodes.tolist())
        while queue:
            v = queue.popleft()
            for u in preds[v]:
                if cost[u] == UNREACHABLE:
                    cost[u] = cost[v] + 1
                    queue.append(u)
        return cost

    def edge_accuracy(self, data: MiniGridTransitions) -> float | None:
        """Fraction of the data's transitions (frame, action -> next frame) that the model's graph
        of data frames reproduces: how far its one-step predictions can be trusted for planning."""
        obs, nxt, act = data.obs.numpy(), data.next_obs(torch.arange(len(data))).numpy(), data.fields["action"].numpy()
        column = {a: j for j, a in enumerate(self.actions)}
        hits = total = 0
        for o, n, a in zip(obs, nxt, act, strict=True):
            if int(a) not in column:
                continue
            total += 1
            hits += self.data_edges[self.data_index[o.tobytes()], column[int(a)]] == self.data_index.get(n.tobytes(), -1)
        return hits / total if total else None


def step_scale(steps: torch.Tensor) -> float:
    """The (squared) distance of the smallest real step among imagined steps [N]: what two
    distinct neighbouring states are apart. Steps under a tenth of the largest are actions that
    changed nothing (forward into a wall, a no-op), only model noise. In a spatial latent a move
    forward shifts a few cells while a turn redraws the whole view, so the smallest real step, not
    the largest, bounds what may be merged."""
    real = steps[steps > 0.1 * steps.max()]
    return float(real.min()) if len(real) else 0.0


@torch.no_grad()
def local_steps(
    imagination: "Imagination", state: torch.Tensor, vector: torch.Tensor, actions: torch.Tensor, distance: Distance
) -> torch.Tensor:
    """The distances (by `distance`) of every imagined step within two actions of a state [1,...]
    (its vector [1,F]): A first steps and A*A second ones. Two levels, because from a state facing
    a wall the only real first steps are turns, larger than the forward steps everywhere else."""
    n = len(actions)
    first = imagination.step(state.expand(n, *state.shape[1:]), actions)  # [A,...]
    v1 = imagination.embed(first)
    second = imagination.embed(imagination.step(first.repeat_interleave(n, 0), actions.repeat(n)))  # [A*A,F]
    d1 = distance(vector, v1)[0]
    d2 = [distance(v1[i : i + 1], second[i * n : (i + 1) * n])[0] for i in range(n)]
    return torch.cat([d1, *d2])


def first_of_each(candidates: torch.Tensor, near: np.ndarray) -> list[int]:
    """Of the candidate states (indices), the first of each group that is one state, given which
    of them are near which (`near` [k,k]): a candidate near one kept before it is that state
    reached twice."""
    covered = np.zeros(len(candidates), bool)
    kept = []
    for j in range(len(candidates)):
        if not covered[j]:
            kept.append(int(candidates[j]))
            covered |= near[j]
    return kept


DEFAULT_MAX_NODES = 3000  # an imagined search's size when the latent has no map to size it by
# An imagined map steps this many of its states at a time, then looks for the goal: a map stops
# growing within a chunk's new states of its size, where stepping a whole breadth-first layer
# overshot it (FourRooms maps capped at 2,888 states reached 4,221, and time grows with the
# square of the states: each new one is compared with every known one).
EXPAND_CHUNK = 256


class ImaginedGraph:
    """A map drawn by the model alone, from the current frame: breadth-first, every known state is
    stepped by every action, and a prediction within `merge` of a known state is that state
    (re-identification, as PPGS does), else a new node. Merging re-grounds imagination on the
    state it first reached, so long paths do not drift; and the cost becomes the number of steps
    through the imagined map, which follows walls and gaps where latent distance cuts through
    them. No dataset frame is needed: this plans on layouts the model never saw.

    The map is kept while the agent walks it: `locate` finds a frame among its states, `record`
    keeps where a step the agent took really led, `grow` extends the search when such a record
    cut the way to the goal, `path_from` is the shortest path from any state, and `explore_from`
    the way to the nearest step not yet tried.

    Distances are relative: in units of the shortest real step from the map's first state (see
    `step_scale`), so the merge radius, `merge` steps, needs no tuning per model. A spatial latent
    is compared two ways, each in its own units, and two states are one when either says so:
    cell by cell (`Imagination.same_state_distance`), where a step that changes one cell is as far
    as one that changes many, and as whole latents, where an error at one cell is diluted by the
    rest. Each alone failed where the other held (measured on held-out SimpleCrossing layouts,
    three trainings): cell by cell, one model's predictions of turns erred at single cells on the
    edge of the agent's highlighted view, up to 3 radii off, so its frames were never
    re-identified (a new map every step, 2 of 20 episodes failed); whole, another model's
    imagined step onto the goal stayed 1.1-2.2 radii from the goal frame (2 of 20 failed).

    The size of a map needs no tuning either (`max_nodes` 0): a spatial latent's map has h x w
    positions, an agent on one of them faces one of 4 ways, and a map of more than twice those
    states has split states it should have merged; growing it further costs time (each new state
    is compared with every known one). (Measured on held-out SimpleCrossing layouts, 9x9 maps:
    the slow episodes, 20-70 s, were those whose searches ran to a fixed cap of 3,000 states.)"""

    def __init__(self, imagination: Imagination, actions: list[int], merge: float, max_nodes: int = 0):
        self.imagination, self.actions, self.merge = imagination, torch.tensor(actions), merge
        cells = imagination.cells
        self.max_nodes = max_nodes or (8 * cells[1] * cells[2] if cells else DEFAULT_MAX_NODES)
        self.searches = 0  # maps drawn from scratch this episode, each a full search
        self.vectors: torch.Tensor | None = None  # [N,F] of the map's states; None: no map yet
        self.nodes, self.reached = 0, False  # of the map and its last path
        # a spatial latent's two views of a distance (see above); else its one
        self.views: list[Distance] = [imagination.distance] if cells is None else [imagination.same_state_distance, imagination.distance]
        self.scales = [1.0] * len(self.views)  # the shortest real step from the map's first state, per view
        self.projection: torch.Tensor | None = None  # [F,K]: makes sketches (see `_sketch`)

    def forget(self) -> None:
        """Drops the map (a new episode's layout is another)."""
        self.vectors, self.searches = None, 0

    @torch.no_grad()
    def search(self, frame: torch.Tensor, goal: torch.Tensor) -> tuple[list[int], list[int]]:
        """Draws a new map from the frame [1,H,W,C] (its state 0) towards the goal vectors [G,F];
        returns `path_from(0)`."""
        im = self.imagination
        self.goal, self.searches = goal, self.searches + 1
        self.states, self.vectors = im.start(frame), im.target(frame)  # [1,...], [1,F]
        self.sketches = self._sketch(self.vectors)  # [1,K], or None: candidates found exactly
        self.scales = [step_scale(local_steps(im, self.states, self.vectors, self.actions, view)) for view in self.views]
        self.goal_dist = self.distance(self.vectors, goal).min(1).values  # [N]
        # edges[i, a]: the state action a leads to from state i (-1: not imagined); states
        # [0, expanded) have been stepped by every action, the rest are the frontier
        self.edges, self.expanded = np.full((1, len(self.actions)), -1), 0
        self.tried = np.zeros((1, len(self.actions)), bool)  # steps the agent has taken (edges as they really are)
        self.grow(0)
        return self.path_from(0)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[S,F] x [G,F] -> [S,G] in units of the map's shortest real step: the nearer of the views
        (a view whose steps were all too small to tell apart says only "identical" or "apart")."""
        im = self.imagination
        if im.cells is None:
            return _in_units(im.distance(a, b), self.scales[0])
        whole = im.distance(a, b)  # a fresh [S,G]: scaled in place
        cells = _in_units(im.same_state_distance(a, b), self.scales[0])
        return torch.minimum(_in_units(whole, self.scales[1]), cells, out=cells)

    def _sketch(self, vectors: torch.Tensor) -> torch.Tensor | None:
        """[S,F] -> [S,K]: the vectors' sketches (see `SKETCH_DIM`), None where the latent is no
        spatial map or already small: then candidates are found by the latents themselves."""
        if self.imagination.cells is None or vectors.shape[1] <= 4 * SKETCH_DIM:
            return None
        if self.projection is None:  # fixed, so the same frames draw the same map
            gen = torch.Generator().manual_seed(0)
            self.projection = (torch.randn(vectors.shape[1], SKETCH_DIM, generator=gen) / SKETCH_DIM**0.5).to(vectors.device)
        return vectors @ self.projection

    def _near(self, a: torch.Tensor, b: torch.Tensor, a_sketch: torch.Tensor | None, b_sketch: torch.Tensor | None) -> torch.Tensor:
        """`distance` as the map's growth uses it: each row of a is compared only with the
        `SAME_STATE_CANDIDATES` states of b nearest it as whole latents (by their sketches when
        given), inf for the others."""
        im = self.imagination
        if im.cells is None or len(b) <= SAME_STATE_CANDIDATES:
            return self.distance(a, b)
        rough = torch.cdist(a_sketch, b_sketch) if a_sketch is not None else im.distance(a, b)  # [S,G]
        index = rough.topk(SAME_STATE_CANDIDATES, dim=1, largest=False).indices  # [S,k]
        whole, cells = im.distances_at(a, b, index)
        near = torch.minimum(_in_units(whole, self.scales[1]), _in_units(cells, self.scales[0]))
        return torch.full_like(rough, torch.inf).scatter_(1, index, near)

    def grow(self, source: int) -> None:
        """Extends the map breadth-first, a chunk of states at a time, until it holds a path from
        `source` to the goal, is full, or imagines nothing new."""
        while not self.closed and len(self.vectors) < self.max_nodes:
            if self._bfs(source)[2] is not None:
                return
            self._expand()

    @property
    def closed(self) -> bool:
        """Every state is stepped by every action, and each step is a known state: imagining
        further, from here or anywhere in the map, adds nothing."""
        return self.expanded == len(self.vectors)

    @torch.no_grad()
    def _expand(self) -> None:
        """Steps the next `EXPAND_CHUNK` unexpanded states by every action, in the order they were
        found (so the map grows breadth-first, as a queue), and adds what is new."""
        im, n_actions = self.imagination, len(self.actions)
        frontier = torch.arange(self.expanded, min(len(self.vectors), self.expanded + EXPAND_CHUNK))
        # every frontier state x every action, one batch: [F*A,...]
        nxt = im.step(self.states[frontier].repeat_interleave(n_actions, 0), self.actions.repeat(len(frontier)))
        vec = im.embed(nxt)
        sk = self._sketch(vec)

        def near(i: torch.Tensor | list[int], j: torch.Tensor | list[int]) -> torch.Tensor:  # of these predictions
            return self._near(vec[i], vec[j], None if sk is None else sk[i], None if sk is None else sk[j])

        near_known, lead = self._near(vec, self.vectors, sk, self.sketches).min(1)  # [F*A]: nearest known state
        unknown = near_known > self.merge
        candidates = unknown.nonzero().flatten()
        fresh = first_of_each(candidates, (near(candidates, candidates) <= self.merge).cpu().numpy()) if len(candidates) else []
        first = len(self.vectors)
        if fresh:
            # a new prediction leads to the fresh state it is (or was merged into)
            lead[unknown] = first + near(unknown.nonzero().flatten(), fresh).argmin(1)
            self.states, self.vectors = torch.cat([self.states, nxt[fresh]]), torch.cat([self.vectors, vec[fresh]])
            if sk is not None:
                self.sketches = torch.cat([self.sketches, sk[fresh]])
            self.goal_dist = torch.cat([self.goal_dist, self.distance(vec[fresh], self.goal).min(1).values])
        end = self.expanded + len(frontier)
        self.edges[self.expanded : end] = lead.reshape(len(frontier), n_actions).cpu().numpy()
        self.edges = np.concatenate([self.edges, np.full((len(fresh), n_actions), -1)])
        self.tried = np.concatenate([self.tried, np.zeros((len(fresh), n_actions), bool)])
        self.expanded = end

    def _bfs(self, source: int) -> tuple[dict[int, int], list[int], int | None]:
        """Breadth-first over the map's edges from `source`: each reached state's parent, the
        states in the order reached, and the first goal state reached (None: none is)."""
        at_goal = (self.goal_dist <= self.merge).cpu().numpy()
        parent, order, queue = {source: -1}, [], deque([source])
        while queue:
            node = queue.popleft()
            order.append(node)
            if at_goal[node]:
                return parent, order, node
            for nxt in self.edges[node].tolist():
                if nxt >= 0 and nxt not in parent:
                    parent[nxt] = node
                    queue.append(nxt)
        return parent, order, None

    def _path(self, parent: dict[int, int], source: int, target: int) -> tuple[list[int], list[int]]:
        nodes, node = [], target
        while node != source:
            nodes.append(node)
            node = parent[node]
        nodes.reverse()
        actions, at = [], source
        for node in nodes:
            actions.append(int(np.flatnonzero(self.edges[at] == node)[0]))
            at = node
        return actions, nodes

    def path_from(self, source: int) -> tuple[list[int], list[int]]:
        """The shortest imagined path from state `source` to the nearest goal state, else to the
        reachable state nearest the goal in latent distance: its action indices and the states
        it should meet."""
        parent, order, goal = self._bfs(source)
        self.nodes, self.reached = len(self.vectors), goal is not None
        if goal is None:
            dist = self.goal_dist.cpu().numpy()
            goal = min(order, key=lambda node: dist[node])
        return self._path(parent, source, goal)

    def explore_from(self, source: int) -> tuple[list[int], list[int]]:
        """When the map holds no way to the goal: the shortest path to the nearest state with an
        action the agent has not tried there, then that action. Steps the model imagines to
        change nothing come first (a wall the model imagines where the world has a gap is found
        only by stepping into it; a turn is rarely wrong), then the others, each time the one
        predicted to land nearest the goal. Empty when every reachable step has been tried."""
        parent, order, _ = self._bfs(source)
        dist = np.append(self.goal_dist.cpu().numpy(), np.inf)  # edge -1: a step out of the map
        for blocked_only in (True, False):
            for node in order:
                untried = np.flatnonzero(~self.tried[node] & (self.edges[node] == node if blocked_only else True))
                if len(untried):
                    action = int(untried[np.argmin(dist[self.edges[node, untried]])])
                    actions, nodes = self._path(parent, source, node)
                    return [*actions, action], [*nodes, int(self.edges[node, action])]
        return [], []

    @torch.no_grad()
    def locate(self, vector: torch.Tensor, expected: int | None = None) -> int | None:
        """The map's state a frame's vector [1,F] is (the expected one first, when it is within
        the merge radius), or None when it is none of them."""
        if self.vectors is None:
            return None
        d = self.distance(vector, self.vectors)[0]
        if expected is not None and expected >= 0 and float(d[expected]) <= self.merge:
            return expected
        node = int(d.argmin())
        return node if float(d[node]) <= self.merge else None

    def record(self, node: int, action: int, arrived: int | None) -> None:
        """The agent took `action` from `node` and arrived at state `arrived` (None: one not in
        the map): the map keeps what really happened, which may not be what it imagined."""
        self.edges[node, action] = -1 if arrived is None else arrived
        self.tried[node, action] = True


def _in_units(d: torch.Tensor, scale: float) -> torch.Tensor:
    """Distances [S,G] divided in place by a view's scale; a zero scale (the view cannot tell steps
    apart) leaves only identical (0) and apart (inf)."""
    return d.div_(scale) if scale > 0 else torch.where(d > 0, torch.inf, 0.0)


class LatentCost:
    """Per-step cost of candidate sequences: the squared distance from each imagined state to the
    nearest goal latent (pixel MSE for the encoder-decoder)."""

    def __init__(self, imagination: Imagination, actions: torch.Tensor):
        self.imagination, self.actions = imagination, actions
        self.goal: torch.Tensor | None = None

    def per_step(self, frame: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """frame [1,H,W,C], action indices [S,H] -> costs [S,H]."""
        im = self.imagination
        # PLAN_BATCH candidates at a time through the model: memory stays bounded however many
        start, chunks = im.start(frame), []
        for part in choice.split(PLAN_BATCH):
            state, per_step = start.expand(len(part), *start.shape[1:]), []
            for h in range(choice.shape[1]):
                state = im.step(state, self.actions[part[:, h]])
                per_step.append(im.distance(im.embed(state), self.goal).min(dim=1).values.cpu())
            chunks.append(torch.stack(per_step, dim=1))
        return torch.cat(chunks)


class GraphCost:
    """Per-step cost of candidate sequences: steps to the goal on the graph of dataset frames,
    plus the steps taken. Re-grounded imagination: the frame snaps to its node and each imagined
    step follows the model's own one-step edge, so errors do not compound over the horizon."""

    def __init__(self, imagination: Imagination, graph: LatentGraph):
        self.imagination, self.graph = imagination, graph

    def per_step(self, frame: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        s, horizon = choice.shape
        node = self.graph.snap(self.imagination.target(frame)).cpu().numpy().repeat(s)
        per_step = []
        for h in range(horizon):
            node = self.graph.edges[node, choice[:, h].numpy()]
            per_step.append(torch.from_numpy(self.graph.cost_to_goal[node]).float() + h + 1)
        return torch.stack(per_step, dim=1)  # [S,H]


def aggregate(costs: torch.Tensor, how: str) -> torch.Tensor:
    """Per-step costs [S,H] -> one cost per sequence [S]: the last, the sum, or the minimum (among
    equal minima the earlier arrival wins)."""
    if how == "final":
        return costs[:, -1]
    if how == "sum":
        return costs.sum(1)
    return costs.min(1).values + 1e-6 * costs.argmin(1).float()


class ExhaustiveSearch:
    """Every sequence of `horizon` actions."""

    def __init__(self, n_actions: int, horizon: int):
        self.sequences = torch.tensor(list(itertools.product(range(n_actions), repeat=horizon)))  # [A^H,H]

    def best(self, score) -> torch.Tensor:
        return self.sequences[score(self.sequences).argmin()]


class CEMSearch:
    """Cross-entropy method over discrete sequences: per-step categorical distributions refitted
    to the `elites` best of `samples` sequences, `iterations` times."""

    def __init__(self, n_actions: int, horizon: int, samples: int, iterations: int, elites: int, seed: int):
        self.n_actions, self.horizon, self.samples, self.iterations, self.elites = n_actions, horizon, samples, iterations, elites
        self.generator = torch.Generator().manual_seed(seed)

    def best(self, score) -> torch.Tensor:
        probs = torch.full((self.horizon, self.n_actions), 1 / self.n_actions)
        best, best_cost = None, float("inf")
        for _ in range(self.iterations):
            seqs = torch.multinomial(probs, self.samples, replacement=True, generator=self.generator).T  # [S,H]
            costs = score(seqs)
            elite = seqs[costs.argsort()[: self.elites]]
            if costs.min() < best_cost:
                best, best_cost = seqs[costs.argmin()], float(costs.min())
            counts = F.one_hot(elite, self.n_actions).float().mean(0)  # [H,A]
            probs = 0.9 * counts + 0.1 / self.n_actions  # keep every action possible
        return best


class _GoalPlanner:
    """What every planner shares: the goal latents of the episode, the dataset graph's goal (when
    there is a graph), and `beliefs`, the planner's view of a frame for the diagnostics."""

    def __init__(self, imagination: Imagination, actions: list[int], graph: LatentGraph | None):
        self.imagination, self.actions, self.graph = imagination, torch.tensor(actions), graph
        self.goal: torch.Tensor | None = None
        # steps to the goal the planner believed after its last action (NaN: it had no such belief)
        self.cost_to_go = float("nan")

    def start_episode(self, goal_frames: np.ndarray) -> None:
        self.goal = self.imagination.target(torch.from_numpy(goal_frames))
        if self.graph is not None:
            self.graph.set_goal(goal_frames)

    def episode_report(self) -> dict[str, Any]:
        """What the planner did this episode beyond its actions (for plan.json)."""
        return {}

    @torch.no_grad()
    def beliefs(self, frame: torch.Tensor) -> tuple[float, float]:
        """The latent distance of the frame to the nearest goal latent, and its graph cost-to-go
        (NaN without a graph)."""
        vec = self.imagination.target(frame)
        latent = float(self.imagination.distance(vec, self.goal).min())
        graph = float(self.graph.cost_to_goal[int(self.graph.snap(vec)[0])]) if self.graph is not None else float("nan")
        return latent, graph


class SequencePlanner(_GoalPlanner):
    """Receding horizon: search action sequences scored by a cost, execute the first action of the
    best, plan again. Every candidate is imagined in one batch per step."""

    def __init__(self, imagination: Imagination, actions: list[int], graph: LatentGraph | None, cost, search, how: str):
        super().__init__(imagination, actions, graph)
        self.cost, self.search, self.how = cost, search, how

    def start_episode(self, goal_frames: np.ndarray) -> None:
        super().start_episode(goal_frames)
        self.cost.goal = self.goal

    def scores(self, frame: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Cost of each candidate [S] given as action indices [S,H] from the frame [1,H,W,C]."""
        return aggregate(self.cost.per_step(frame, choice), self.how)

    def act(self, frame: torch.Tensor) -> int:
        best = self.search.best(lambda seqs: self.scores(frame, seqs))
        return int(self.actions[best[0]])


class ImaginedPlanner(_GoalPlanner):
    """Follows the shortest path through the imagined map, kept for the episode. A frame that is
    not the state the path expected is looked up in the map, the step just taken is recorded as
    it really went (forward into a wall the model thought open leads back to the same state), and
    the path is planned again within the map, grown if the record cut it. When the map, complete,
    holds no way to the goal, the agent tries the steps it has not taken, nearest first: the
    model may be wrong about a wall. A new map is drawn only when the frame is none of the map's
    states, or the agent is at the edge of a full map nearest the goal, nearer than where any
    map was drawn before. (Measured on held-out
    SimpleCrossing layouts: drawing a new map on every surprise, the model's one wrong step was
    imagined again from the same state at every step, and the episode spent its 324 steps at the
    wall, each step a full search.)

    The agent also remembers, per frame it has seen, how often it took each action there: a
    frame met again with the same action planned a `REPEATS`-th time is a loop (the world is
    deterministic, the map keeps sending it round), so it takes the action it took least there
    instead. (Measured on a held-out FourRooms layout: a model that splits states drew a new map at
    every step and walked a cycle of four frames until the episode ended.)"""

    REPEATS = 3

    def __init__(self, imagination: Imagination, actions: list[int], merge: float, max_nodes: int):
        super().__init__(imagination, actions, None)
        self.imagined = ImaginedGraph(imagination, actions, merge, max_nodes)
        self.expected: int | None = None  # the state the last action should lead to
        self.taken: tuple[int, int] | None = None  # (state, action index) of the last action
        self.exploring = 0  # steps this episode taken towards a step not yet tried
        # the latent distance to the goal of the frame nearest it a map was drawn from: a map
        # is centred again only nearer the goal, so new maps cannot go back and forth
        self.nearest_centre = float("inf")
        self.taken_at: dict[bytes, np.ndarray] = {}  # frame -> times each action was taken there

    def start_episode(self, goal_frames: np.ndarray) -> None:
        super().start_episode(goal_frames)
        self.imagined.forget()
        self.expected, self.taken, self.exploring, self.nearest_centre = None, None, 0, float("inf")
        self.taken_at = {}

    def episode_report(self) -> dict[str, Any]:
        return {"maps_drawn": self.imagined.searches, "steps_exploring": self.exploring}

    def act(self, frame: torch.Tensor) -> int:
        im, g = self.imagination, self.imagined
        vector = im.target(frame)
        here = g.locate(vector, self.expected)
        if self.taken is not None:
            g.record(*self.taken, here)
        to_goal = float(im.same_state_distance(vector, self.goal).min())
        if here is not None:
            g.grow(here)
            actions, nodes = g.path_from(here)
            if not actions and not g.closed and here != 0 and to_goal < self.nearest_centre:
                here = None  # at the edge of a full map, nearer the goal than any map's centre yet: centre one here
        if here is None:
            (actions, nodes), here = g.search(frame, self.goal), 0
            self.nearest_centre = min(self.nearest_centre, to_goal)
        self.cost_to_go = float(len(actions)) if g.reached else float("nan")
        if not g.reached and (g.closed or not actions):
            # nothing left to imagine here: step by step to the nearest step not yet tried (each
            # step shortens the way to it, so the agent cannot go back and forth); a step out of
            # the map draws a new one there
            actions, nodes = g.explore_from(here)
            self.exploring += 1
        if not actions:  # every step tried: the one step predicted to get closest
            start = im.start(frame)
            nxt = im.embed(im.step(start.expand(len(self.actions), *start.shape[1:]), self.actions))
            self.expected, self.taken = None, None
            return self._count(frame, int(im.same_state_distance(nxt, self.goal).min(1).values.argmin()))
        choice = self._count(frame, actions[0])
        self.taken = (here, choice)
        self.expected = nodes[0] if choice == actions[0] else (None if g.edges[here, choice] < 0 else int(g.edges[here, choice]))
        return int(self.actions[choice])

    def _count(self, frame: torch.Tensor, choice: int) -> int:
        """The action index to take at this frame: `choice`, unless taken there `REPEATS` - 1
        times already (a loop), then the one taken least there."""
        counts = self.taken_at.setdefault(frame.cpu().numpy().tobytes(), np.zeros(len(self.actions), np.int64))
        if counts[choice] >= self.REPEATS - 1:
            choice = int(counts.argmin())
        counts[choice] += 1
        return choice


def make_planner(cfg: Any, imagination: Imagination, actions: list[int], graph: LatentGraph | None, seed: int):
    """The planner a PlanConfig names (`planner`, `cost`, `aggregate` and their settings)."""
    if cfg.planner == "imagined":
        return ImaginedPlanner(imagination, actions, cfg.merge, cfg.max_nodes)
    action_ids = torch.tensor(actions)
    cost = GraphCost(imagination, graph) if cfg.cost == "graph" else LatentCost(imagination, action_ids)
    if cfg.planner == "exhaustive":
        search: Any = ExhaustiveSearch(len(actions), cfg.horizon)
    else:
        search = CEMSearch(len(actions), cfg.horizon, cfg.samples, cfg.iterations, cfg.elites, seed)
    return SequencePlanner(imagination, actions, graph, cost, search, cfg.aggregate)
