"""The inspector's evaluation controls and the collector's start/door/carry additions: the
shuffled-label control, the saturation flag, the optional probe keys, probes of k-step
predictions against a hand-made exact world model, the provenance of evaluation data, the
collector's --start random, door_state and carrying, and the inspector end to end on three tiny
checkpoints (one per architecture)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_one_line_error, collect, load_npz, majority_rate, ok, run

from inspect_jepa_model import (
    SATURATED,
    InspectConfig,
    evaluated_elsewhere,
    predicted_features,
    predicted_probes,
    probe_keys,
    probe_labels,
    probe_suite,
    saturation,
    shuffled,
)
from inspect_jepa_model import main as inspect_main
from minigrid_dataset import split_episodes
from wm_common import UserError, parse_config

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EMPTY = "MiniGrid-Empty-8x8-v0"
DOORKEY = "MiniGrid-DoorKey-5x5-v0"
PROBE_ACC_KEYS = {"agent_pos_acc", "agent_dir_acc", "goal_pos_acc"}


# ----------------------------------------------------------------------------- shuffled-label control


@pytest.fixture(scope="module")
def cell_probe_data():
    """1500 samples of an agent on a 6x6 grid; features are the one-hot of its cell (exact)."""
    rng = np.random.default_rng(0)
    n, n_train, side = 1500, 1000, 6
    pos = rng.integers(1, side + 1, size=(n, 2))
    data = SimpleNamespace(fields={"agent_pos": torch.from_numpy(pos)})
    feats = np.eye(side * side)[(pos[:, 0] - 1) * side + pos[:, 1] - 1]
    tr, te = np.arange(n_train), np.arange(n_train, n)
    return feats[tr], feats[te], probe_labels(data, tr, ["agent_pos"]), probe_labels(data, te, ["agent_pos"])


def test_shuffled_labels_bring_an_exact_probe_down_to_the_majority_rate(cell_probe_data):
    f_tr, f_te, lab_tr, lab_te = cell_probe_data
    real = probe_suite(f_tr, f_te, lab_tr, lab_te, seed=0)
    assert set(real) == {"agent_pos_acc"}
    assert real["agent_pos_acc"] >= 0.99, real
    majority = majority_rate(lab_tr["agent_pos"], lab_te["agent_pos"])
    assert majority < 0.1  # 36 cells: the control must have room to sit far below the real probe
    for seed in (0, 1):
        control = probe_suite(f_tr, f_te, shuffled(lab_tr, seed), lab_te, seed=0)
        assert control["agent_pos_acc"] <= majority + 0.1, (seed, control, majority)


def test_shuffled_is_a_deterministic_permutation_per_seed():
    rng = np.random.default_rng(3)
    labels = {"agent_pos": rng.integers(0, 50, size=500), "agent_dir": rng.integers(0, 4, size=500)}
    before = {k: v.copy() for k, v in labels.items()}
    a, again, other = shuffled(labels, 7), shuffled(labels, 7), shuffled(labels, 8)
    assert set(a) == set(labels)
    for k in labels:
        assert np.array_equal(labels[k], before[k])  # the input is left alone
        assert np.array_equal(np.sort(a[k]), np.sort(labels[k]))  # same multiset of labels
        assert np.array_equal(a[k], again[k])  # same seed, same permutation
        assert not np.array_equal(a[k], labels[k])  # actually shuffled
        assert not np.array_equal(a[k], other[k])  # another seed, another permutation


# ----------------------------------------------------------------------------- saturation


def test_saturation_flags_a_probe_that_a_baseline_already_solves():
    baselines = {
        "random_encoder": {"agent_pos_acc": 0.30, "goal_pos_acc": 0.20},
        "pixels": {"agent_pos_acc": 0.96, "goal_pos_acc": 0.25},
        "majority_class": {"agent_pos_acc": 0.05, "goal_pos_acc": 0.10},
        "shuffled_labels": {"agent_pos_acc": 0.05, "goal_pos_acc": 0.10},
    }
    assert saturation(baselines) == {"agent_pos_acc": True, "goal_pos_acc": False}


@pytest.mark.parametrize("baseline", ["random_encoder", "pixels", "majority_class"])
def test_saturation_threshold_is_inclusive(baseline):
    def with_score(score):
        b = {name: {"agent_dir_acc": 0.25} for name in ("random_encoder", "pixels", "majority_class", "shuffled_labels")}
        b[baseline]["agent_dir_acc"] = score
        return b

    assert saturation(with_score(SATURATED)) == {"agent_dir_acc": True}
    assert saturation(with_score(SATURATED - 1e-6)) == {"agent_dir_acc": False}


# ----------------------------------------------------------------------------- optional probe keys


def fields_with(**extra):
    n = 6
    base = {
        "agent_pos": torch.ones(n, 2, dtype=torch.int64),
        "agent_dir": torch.zeros(n, dtype=torch.int64),
        "goal_pos": torch.full((n, 2), 3, dtype=torch.int64),
    }
    return SimpleNamespace(fields={**base, **{k: torch.tensor(v, dtype=torch.int64) for k, v in extra.items()}})


def test_probe_keys_add_door_and_carrying_only_when_the_layout_has_them():
    none = [-1] * 6
    assert probe_keys(fields_with()) == ["agent_pos", "agent_dir", "goal_pos"]
    assert probe_keys(fields_with(door_state=none, carrying=none)) == ["agent_pos", "agent_dir", "goal_pos"]
    assert probe_keys(fields_with(door_state=[2, 2, 1, 0, 0, 1], carrying=none)) == ["agent_pos", "agent_dir", "goal_pos", "door_state"]
    assert probe_keys(fields_with(door_state=none, carrying=[-1, -1, 5, 5, -1, -1])) == ["agent_pos", "agent_dir", "goal_pos", "carrying"]
    data = fields_with(door_state=[2, 2, 2, 2, 2, 2], carrying=[-1, 5, 5, 5, 5, 5])  # one state all along still counts
    assert probe_keys(data) == ["agent_pos", "agent_dir", "goal_pos", "door_state", "carrying"]
    labels = probe_labels(data, np.arange(6), probe_keys(data))
    assert labels["door_state"].tolist() == [2] * 6 and labels["carrying"].tolist() == [-1, 5, 5, 5, 5, 5]


def test_probes_are_skipped_not_crashed_when_a_probe_field_is_missing():
    data = fields_with(door_state=[2, 2, 1, 0, 0, 1])
    del data.fields["agent_pos"]
    assert probe_keys(data) == []


# ----------------------------------------------------------------------------- probes of k-step predictions

SIDE = 5  # the fake world: an agent on a 5x5 grid of cells; its frame is 5x5x1, 255 at its cell
MOVES = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]])  # action -> (dx, dy), clipped at the walls


class CellWorld(torch.nn.Module):
    """An exact world model of the fake world: the latent is the one-hot of the agent's cell read
    off the frame, and `predict` applies the true dynamics. `ignore_action=True` returns z as is."""

    def __init__(self, ignore_action=False):
        super().__init__()
        self.ignore_action = ignore_action

    def encode(self, obs):
        return obs.flatten(1).float() / 255

    def predict(self, z, action):
        if self.ignore_action:
            return z
        cell = z.argmax(-1)
        x, y = cell % SIDE, cell // SIDE
        move = torch.from_numpy(MOVES)[action]
        x, y = (x + move[:, 0]).clamp(0, SIDE - 1), (y + move[:, 1]).clamp(0, SIDE - 1)
        return F.one_hot(y * SIDE + x, SIDE * SIDE).float()


def cell_dataset(num_episodes=60, seed=0):
    """Episodes of 3-15 steps under uniformly random actions, each from a random cell (so a
    prediction that ran into the next episode would be wrong). Shaped like MiniGridTransitions:
    `obs` uint8 [N,H,W,C], `fields`, `episode`, len()."""
    rng = np.random.default_rng(seed)
    pos, actions, episode = [], [], []
    for e in range(num_episodes):
        n = int(rng.integers(3, 16))
        p = rng.integers(0, SIDE, size=2)
        for _ in range(n):
            a = int(rng.integers(len(MOVES)))
            pos.append(p.copy())
            actions.append(a)
            episode.append(e)
            p = np.clip(p + MOVES[a], 0, SIDE - 1)
    pos = np.array(pos)
    n = len(pos)
    obs = np.zeros((n, SIDE, SIDE, 1), np.uint8)
    obs[np.arange(n), pos[:, 1], pos[:, 0], 0] = 255
    fields = {
        "action": torch.tensor(actions),
        "agent_pos": torch.from_numpy(pos),
        "agent_dir": torch.zeros(n, dtype=torch.int64),
        "goal_pos": torch.full((n, 2), SIDE - 1, dtype=torch.int64),
    }

    class Fake(SimpleNamespace):
        def __len__(self):
            return len(self.obs)

    return Fake(obs=torch.from_numpy(obs), fields=fields, episode=np.array(episode))


@pytest.fixture(scope="module")
def cells():
    data = cell_dataset()
    train_idx, test_idx = split_episodes(data.episode, 0.3, 0)
    return data, train_idx, test_idx


def test_cell_world_is_exact_for_one_step(cells):
    data, _, _ = cells
    model = CellWorld()
    same = np.flatnonzero(data.episode[1:] == data.episode[:-1])  # rows whose next row is the next step
    z = model.encode(data.obs)
    assert torch.equal(model.predict(z[same], data.fields["action"][same]), z[same + 1])


@pytest.mark.parametrize("ignore_action", [False, True])
def test_predicted_features_rows_are_start_plus_h_within_the_episode(cells, ignore_action):
    data, train_idx, _ = cells
    episode, n = data.episode, len(data)
    model = CellWorld(ignore_action=ignore_action)
    out = predicted_features(model, False, data, train_idx, [1, 3], batch_size=16, device=CPU)
    assert sorted(out) == [1, 3]
    last_row = {e: np.flatnonzero(episode == e).max() for e in np.unique(episode)}
    z_all = model.encode(data.obs).numpy()
    for h, (feats, rows) in out.items():
        expected = np.array([i + h for i in train_idx if i + h <= last_row[episode[i]]])
        assert np.array_equal(rows, expected), h
        assert len(rows) < len(train_idx)  # starts within h of their episode's end were dropped
        assert np.all(episode[rows] == episode[rows - h]) and rows.max() < n
        # the exact model's h-step prediction is the latent of the frame at t+h; ignoring the
        # action leaves the latent of the frame at t
        assert np.array_equal(feats, z_all[rows - h] if ignore_action else z_all[rows]), h


@pytest.fixture(scope="module")
def cell_probes(cells):
    data, train_idx, test_idx = cells
    cfg = InspectConfig(probe_horizons=[1, 3], batch_size=32, device="cpu", seed=0)
    out = {}
    for name, model in (("exact", CellWorld()), ("ignore", CellWorld(ignore_action=True))):
        z_tr, z_te = model.encode(data.obs[train_idx]).numpy(), model.encode(data.obs[test_idx]).numpy()
        keys = ["agent_pos", "agent_dir", "goal_pos"]
        out[name] = predicted_probes(model, False, data, train_idx, test_idx, z_tr, z_te, keys, cfg, CPU)
    return out


def test_predicted_probes_report_shape(cells, cell_probes):
    data, _, test_idx = cells
    episode = data.episode
    for res in cell_probes.values():
        assert res["horizons"] == [1, 3]
        assert "goal_pos_acc" not in res and "goal_pos_acc" not in res["from_current_latent"]  # the goal never moves
        for key in ("agent_pos_acc", "agent_dir_acc"):
            assert len(res[key]) == len(res["from_current_latent"][key]) == 2
        lengths = np.unique(episode[test_idx], return_counts=True)[1]
        assert res["num_test"] == [int(np.maximum(lengths - h, 0).sum()) for h in (1, 3)]


def test_exact_predictions_know_where_the_agent_will_be(cell_probes):
    res = cell_probes["exact"]
    for i, h in enumerate(res["horizons"]):
        pred, current = res["agent_pos_acc"][i], res["from_current_latent"]["agent_pos_acc"][i]
        assert pred >= 0.99, (h, res)
        assert current <= 0.6 and current <= pred - 0.35, (h, res)  # the agent moves: obs_t alone is not enough
    assert res["from_current_latent"]["agent_pos_acc"][1] < res["from_current_latent"]["agent_pos_acc"][0]


def test_a_predictor_that_ignores_the_action_scores_like_the_current_latent(cell_probes):
    ignore, exact = cell_probes["ignore"], cell_probes["exact"]
    for key in ("agent_pos_acc", "agent_dir_acc"):
        assert ignore[key] == pytest.approx(ignore["from_current_latent"][key], abs=1e-9), key
        # same encoder, same rows: the obs_t control does not depend on the predictor
        assert ignore["from_current_latent"][key] == pytest.approx(exact["from_current_latent"][key], abs=1e-9), key
    assert max(ignore["agent_pos_acc"]) <= 0.6


# ----------------------------------------------------------------------------- provenance of evaluation data


@pytest.mark.parametrize(
    ("evaluated", "present", "absent"),
    [
        ({"env": EMPTY, "seed": 6, "episodes": 4}, ["none used in training"], ["overlap"]),  # adjacent: 6.. after 0..5
        ({"env": EMPTY, "seed": 100, "episodes": 4}, ["none used in training"], ["overlap"]),
        ({"env": EMPTY, "seed": 5, "episodes": 4}, ["overlap"], ["none used"]),  # seed 5 is training's last
        ({"env": EMPTY, "seed": 0, "episodes": 1}, ["overlap"], ["none used"]),
        ({"env": EMPTY, "seed": 2, "episodes": 1}, ["overlap"], ["none used"]),  # inside training's range
        ({"env": DOORKEY, "seed": 0, "episodes": 6}, [DOORKEY, EMPTY], ["overlap", "none used"]),
        ({}, ["provenance is not recorded"], ["overlap", "none used"]),
        ({"env": EMPTY}, ["provenance is not recorded"], ["overlap", "none used"]),
    ],
)
def test_evaluated_elsewhere_says_what_the_data_tests(evaluated, present, absent):
    trained = {"env": EMPTY, "seed": 0, "episodes": 6}
    text = evaluated_elsewhere(trained, evaluated)
    for fragment in present:
        assert fragment in text, (fragment, text)
    for fragment in absent:
        assert fragment not in text, (fragment, text)


def test_evaluated_elsewhere_names_a_different_view_or_start_distribution():
    trained = {"env": EMPTY, "seed": 0, "episodes": 6, "obs_mode": "rgb", "start": "env"}
    text = evaluated_elsewhere(trained, {**trained, "seed": 6, "obs_mode": "rgb_partial", "start": "random"})
    assert "observations rgb_partial (trained on rgb)" in text and "starts random (trained on env)" in text, text
    assert "observations" not in evaluated_elsewhere(trained, {**trained, "seed": 6})


def test_evaluated_elsewhere_without_training_provenance():
    assert "provenance is not recorded" in evaluated_elsewhere({}, {"env": EMPTY, "seed": 0, "episodes": 6})


# ----------------------------------------------------------------------------- collector: start cell, door, carried object


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """{name: arrays}: 10 one-step episodes of Empty-8x8 from random starts (twice, same seed:
    once through the command line, once in-process) and from the env's start, and a few DoorKey
    episodes."""
    d = tmp_path_factory.mktemp("collect")
    cli = ["--env", EMPTY, "--episodes", "10", "--max-steps", "1", "--image-size", "32", "--seed", "0", "--start", "random"]
    ok(run("collect_minigrid_data.py", *cli, "--out", d / "random.npz"))
    empty = dict(env=EMPTY, episodes=10, max_steps=1, image_size=32, seed=0)
    collect(d / "random_again.npz", **empty, start="random")
    collect(d / "env.npz", **empty, start="env")
    # seed 1: the random policy picks the key up and opens the door in these episodes
    collect(d / "doorkey.npz", env=DOORKEY, episodes=4, max_steps=60, image_size=40, seed=1, actions="all")
    return {name: load_npz(d / f"{name}.npz") for name in ("random", "random_again", "env", "doorkey")}


def first_steps(arrays):
    first = arrays["step"] == 0
    assert first.sum() == len(np.unique(arrays["episode"]))
    return arrays["agent_pos"][first], arrays["agent_dir"][first]


def test_random_start_covers_many_cells_and_env_start_one(collected):
    pos_env, dir_env = first_steps(collected["env"])
    pos_rand, dir_rand = first_steps(collected["random"])
    assert len(pos_env) == len(pos_rand) == 10
    assert len({tuple(p) for p in pos_env}) == 1 and len(set(dir_env.tolist())) == 1
    assert len({tuple(p) for p in pos_rand}) >= 6, pos_rand
    assert len(set(dir_rand.tolist())) >= 2, dir_rand
    assert json.loads(str(collected["random"]["meta"]))["start"] == "random"
    assert json.loads(str(collected["env"]["meta"]))["start"] == "env"


def test_random_start_cells_are_empty_floor_and_the_first_frame_shows_them(collected):
    """Each episode's first cell is floor (no wall, no goal) and its stored first frame is the one
    the env renders with the agent there, not the frame of the env's own start."""
    from envs import current_obs, make_env

    env, _ = make_env(EMPTY, "rgb", 32)
    a = collected["random"]
    first = np.flatnonzero(a["step"] == 0)
    for i in first:
        e, (x, y), d = int(a["episode"][i]), a["agent_pos"][i], int(a["agent_dir"][i])
        reset_obs, _ = env.reset(seed=e)  # the collector resets episode e with seed 0 + e
        base = env.unwrapped
        assert base.grid.get(int(x), int(y)) is None, (e, x, y, base.grid.get(int(x), int(y)))
        assert (x, y) != tuple(a["goal_pos"][i])
        start_cell = tuple(int(v) for v in base.agent_pos) == (x, y) and base.agent_dir == d
        base.agent_pos, base.agent_dir = (int(x), int(y)), d
        assert np.array_equal(a["obs"][i], current_obs(env)), e
        assert start_cell or not np.array_equal(a["obs"][i], reset_obs), e
    env.close()


def test_random_start_is_deterministic_for_a_seed(collected):
    a, b = collected["random"], collected["random_again"]
    assert a.keys() == b.keys()
    for key in a:
        if key == "meta":
            ma, mb = json.loads(str(a[key])), json.loads(str(b[key]))
            for m in (ma, mb):  # what may differ: when and where it was written
                m.pop("date"), m["config"].pop("out")
            assert ma == mb
        else:
            assert np.array_equal(a[key], b[key]), key


def test_empty_layout_records_no_door_and_nothing_carried(collected):
    for name in ("env", "random"):
        arrays = collected[name]
        assert arrays["door_state"].shape == arrays["carrying"].shape == arrays["action"].shape
        assert np.all(arrays["door_state"] == -1) and np.all(arrays["carrying"] == -1), name


def test_doorkey_records_door_state_and_carried_key(collected):
    from minigrid.core.constants import OBJECT_TO_IDX

    key = OBJECT_TO_IDX["key"]
    a = collected["doorkey"]
    door, carrying, action, episode = a["door_state"], a["carrying"], a["action"], a["episode"]
    assert set(door.tolist()) <= {0, 1, 2} and set(carrying.tolist()) <= {-1, key}
    first = a["step"] == 0
    assert np.all(door[first] == 2) and np.all(carrying[first] == -1)  # DoorKey starts locked, hands empty
    # this seed's random policy picks the key up and unlocks the door, so the checks below bite
    assert key in carrying and 0 in door
    same = episode[1:] == episode[:-1]
    t = np.flatnonzero(same)  # row t and t+1 are consecutive steps
    door_changed = t[door[t + 1] != door[t]]
    assert np.all(action[door_changed] == 5), "the door changes only on toggle"
    unlocked = door_changed[door[door_changed] == 2]
    assert len(unlocked) > 0 and np.all(carrying[unlocked] == key), "a locked door opens only with the key"
    assert np.all(door[unlocked + 1] == 0)
    picked = t[(carrying[t] == -1) & (carrying[t + 1] == key)]
    dropped = t[(carrying[t] == key) & (carrying[t + 1] == -1)]
    assert len(picked) > 0 and np.all(action[picked] == 3), "the key is carried only after pickup"
    assert np.all(action[dropped] == 4)


@pytest.mark.parametrize("mode", ["rgb", "rgb_partial", "symbolic"])
def test_place_agent_randomly_returns_the_observation_of_the_new_state(mode):
    from envs import make_env, place_agent_randomly

    env, _ = make_env(EMPTY, mode, 64)
    moved = 0
    for seed in range(4):
        reset_obs, _ = env.reset(seed=seed)
        start = tuple(int(v) for v in env.unwrapped.agent_pos)
        obs = place_agent_randomly(env, np.random.default_rng(seed))
        pos = tuple(int(v) for v in env.unwrapped.agent_pos)
        assert env.unwrapped.grid.get(*pos) is None
        after_noop, *_ = env.step(6)  # "done": in Empty the agent stays where it is
        assert tuple(int(v) for v in env.unwrapped.agent_pos) == pos
        assert np.array_equal(obs, after_noop), (mode, seed)
        if pos != start:
            moved += 1
            assert not np.array_equal(obs, reset_obs)  # the frame shows the new place, not the reset one
    env.close()
    assert moved >= 3


# ----------------------------------------------------------------------------- inspector, end to end

ARCHS = {"cnn": "jepa_cnn", "vit": "jepa_vit", "encdec": "encdec_vit"}


@pytest.fixture(scope="module")
def three_runs(tiny_run):
    """The session's one-epoch checkpoint of each architecture on the shared 32 px data: {name: run dir}."""
    return {name: tiny_run(name)[0] for name in ARCHS}


@pytest.fixture(scope="module")
def three(work, three_runs, tiny_npz):
    out = work / "three"
    checkpoints = [arg for name in three_runs for arg in ("--checkpoint", three_runs[name])]
    proc = ok(
        run("inspect_jepa_model.py", *checkpoints, "--data", tiny_npz, "--out-dir", out, "--device", "cpu", "--probe-horizons", "1", "2")
    )
    return out, proc


def strict_json(path):
    def reject(token):
        raise AssertionError(f"{path} holds {token}, which is not valid JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def is_score(v):
    return isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v <= 1


def test_three_architectures_write_the_eval_contract(three, tiny_npz):
    out, _ = three
    ev = strict_json(out / "eval.json")
    assert list(ev["models"]) == list(ARCHS)
    with np.load(tiny_npz) as z:
        episode = z["episode"]
    _, val_idx = split_episodes(episode, 0.1, 0)
    val_lengths = np.unique(episode[val_idx], return_counts=True)[1]
    horizons = [1, 2]
    for name, m in ev["models"].items():
        # design.md's contract
        assert m["arch"] == ARCHS[name]
        for key in ("pred_loss", "pred_cosine", "embedding_std", "effective_rank"):
            assert isinstance(m[key], float), (name, key, m[key])
        assert isinstance(m["collapse_warning"], bool)
        assert set(m["probe"]) == PROBE_ACC_KEYS and all(is_score(v) for v in m["probe"].values()), (name, m["probe"])
        for baseline in ("random_encoder", "pixels", "majority_class", "shuffled_labels"):
            b = m["baselines"][baseline]
            assert set(b) == PROBE_ACC_KEYS and all(is_score(v) for v in b.values()), (name, baseline, b)
        ro = m["rollout"]
        assert ro["horizons"] == list(range(1, 11)) and len(ro["error"]) == len(ro["copy_baseline_error"]) == 10
        # the new keys
        maj = m["baselines"]["majority_class"]
        assert maj["goal_pos_acc"] == 1.0  # one goal cell in Empty-8x8
        sat = m["probe_saturated"]
        assert set(sat) == PROBE_ACC_KEYS and all(isinstance(v, bool) for v in sat.values())
        for k in PROBE_ACC_KEYS:
            best = max(m["baselines"][b][k] for b in ("random_encoder", "pixels", "majority_class"))
            assert sat[k] is (best >= SATURATED), (name, k)
        assert sat["goal_pos_acc"] is True and "goal_pos" in m["probe_note"]
        pp = m["probe_predicted"]
        assert pp["horizons"] == horizons
        assert set(k for k in pp if k.endswith("_acc")) == {"agent_pos_acc", "agent_dir_acc"}
        assert set(pp["from_current_latent"]) == {"agent_pos_acc", "agent_dir_acc"}
        for k in ("agent_pos_acc", "agent_dir_acc"):
            assert len(pp[k]) == len(pp["from_current_latent"][k]) == len(horizons)
            assert all(is_score(v) for v in pp[k] + pp["from_current_latent"][k]), (name, k, pp)
        assert pp["num_test"] == [int(np.maximum(val_lengths - h, 0).sum()) for h in horizons]
        assert m["trained_on"] == {"path": str(tiny_npz), "env": EMPTY, "obs_mode": "rgb", "seed": 0, "episodes": 6, "start": "env"}
        assert m["evaluated_on"].startswith("held-out episodes of the training data")


def test_three_architectures_write_a_png_and_a_one_row_per_model_table(three):
    out, proc = three
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "eval.json", "inspection.png"]
    png = (out / "inspection.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 1000
    compare = (out / "compare.md").read_text()
    rows = [line for line in compare.splitlines() if line.startswith("| ") and not line.startswith("| model |")]
    assert len(rows) == 3, compare
    for name, arch in ARCHS.items():
        assert sum(row.startswith(f"| {name} | {arch} |") for row in rows) == 1, (name, compare)
        assert f"| {name} | {arch} |" in proc.stdout


def test_inspecting_data_of_other_seeds_says_so(work, three_runs):
    """In-process with explicit horizons [1, 2], on the same env collected from reset seeds 6..11,
    just after training's 0..5."""
    other = collect(work / "other_seeds.npz", seed=TINY["episodes"])
    out = work / "other_out"
    cfg = InspectConfig(checkpoint=[str(three_runs["cnn"])], data=str(other), out_dir=str(out), device="cpu", probe_horizons=[2, 1, 2])
    result = inspect_main(cfg)
    assert result["data"]["seed"] == 6 and result["data"]["env"] == EMPTY
    m = strict_json(out / "eval.json")["models"]["cnn"]
    assert m["trained_on"]["seed"] == 0 and m["trained_on"]["path"] != str(other)
    assert "none used in training" in m["evaluated_on"] and "overlap" not in m["evaluated_on"], m["evaluated_on"]
    pp = m["probe_predicted"]
    assert pp["horizons"] == [1, 2]  # sorted, duplicates dropped
    for k in ("agent_pos_acc", "agent_dir_acc"):
        assert len(pp[k]) == len(pp["from_current_latent"][k]) == 2


def test_probe_horizon_below_one_is_an_error_that_writes_nothing(tmp_path, three_runs):
    out = tmp_path / "out"
    cfg = InspectConfig(checkpoint=[str(three_runs["cnn"])], out_dir=str(out), device="cpu", probe_horizons=[1, 0])
    with pytest.raises(UserError, match="--probe-horizons"):
        inspect_main(cfg)
    assert not out.exists()


def test_probe_horizons_flag_parses_to_ints():
    cfg = parse_config(InspectConfig, ["--checkpoint", "x", "--probe-horizons", "1", "--probe-horizons", "2"])
    assert cfg.probe_horizons == [1, 2]
    cfg = parse_config(InspectConfig, ["--checkpoint", "x", "y", "--probe-horizons", "4", "2"])
    assert cfg.probe_horizons == [4, 2] and cfg.checkpoint == ["x", "y"]


def test_probe_horizons_zero_on_the_command_line_is_a_one_line_error(tmp_path, three_runs):
    out = tmp_path / "out"
    proc = run("inspect_jepa_model.py", "--checkpoint", three_runs["cnn"], "--probe-horizons", "0", "--out-dir", out, "--device", "cpu")
    assert_one_line_error(proc, "--probe-horizons")
    assert not out.exists()
