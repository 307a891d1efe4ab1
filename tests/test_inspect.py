"""Step 6, inspect_jepa_model.py: the metrics on inputs whose answer is known (linear probes on
synthetic features, rollout errors of hand-made world models, held-out episode selection), then
the command line end to end on two tiny trained checkpoints, its one-line errors, and a smoke
test of benchmark.py."""

import csv
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, collect, majority_rate, ok, run

from inspect_jepa_model import HORIZONS, linear_probe, probe_labels, probe_suite, rollout_errors, whole_episodes
from losses import collapse_warning
from minigrid_dataset import split_episodes

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROBE_ACC_KEYS = {"agent_pos_acc", "agent_dir_acc", "goal_pos_acc"}
TRAINER_COLLAPSE_LINE = "WARNING: the latents look collapsed"


def strict_json(path):
    """Parses like a strict JSON reader would: NaN and Infinity are not JSON."""

    def reject(token):
        raise AssertionError(f"{path} holds {token}, which is not valid JSON")

    return json.loads(path.read_text(), parse_constant=reject)


def last_val_row(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["phase"] == "val"][-1]


def snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


# ----------------------------------------------------------------------------- linear probes


def grid_labels(n, rng, side=6):
    """A fake dataset's probe fields: agent on a side x side grid of cells (1..side), a direction,
    and a goal that never moves (as in MiniGrid-Empty)."""
    fields = {
        "agent_pos": torch.from_numpy(rng.integers(1, side + 1, size=(n, 2))),
        "agent_dir": torch.from_numpy(rng.integers(0, 4, size=n)),
        "goal_pos": torch.from_numpy(np.tile([side, side], (n, 1))),
    }
    return SimpleNamespace(fields=fields)


@pytest.fixture(scope="module")
def probe_data():
    rng = np.random.default_rng(0)
    n, n_train = 3000, 2000
    data = grid_labels(n, rng)
    tr, te = np.arange(n_train), np.arange(n_train, n)
    return data, tr, te, probe_labels(data, tr), probe_labels(data, te), rng


def test_probe_labels_one_class_per_cell(probe_data):
    data, tr, _, lab_tr, _, _ = probe_data
    pos = data.fields["agent_pos"].numpy()[tr]
    assert set(lab_tr) == {"agent_pos", "agent_dir", "goal_pos"}
    assert len(np.unique(lab_tr["agent_pos"])) == len(np.unique(pos, axis=0)) == 36
    same = lab_tr["agent_pos"][:, None] == lab_tr["agent_pos"][None, :]
    assert np.array_equal(same, (pos[:, None, :] == pos[None, :, :]).all(-1))
    assert np.array_equal(lab_tr["agent_dir"], data.fields["agent_dir"].numpy()[tr])
    assert len(np.unique(lab_tr["goal_pos"])) == 1


def test_probe_suite_recovers_features_that_encode_the_state(probe_data):
    """Cell coordinates and one-hot direction through fixed random linear maps into 16 dims, plus
    tiny noise: a linear probe must decode the exact cell and direction on held-out samples."""
    data, tr, te, lab_tr, lab_te, rng = probe_data
    pos = data.fields["agent_pos"].numpy().astype(float)
    direction = np.eye(4)[data.fields["agent_dir"].numpy()]
    feats = np.concatenate([pos @ rng.normal(size=(2, 8)), direction @ rng.normal(size=(4, 8))], axis=1)
    feats += 0.01 * rng.normal(size=feats.shape)
    res = probe_suite(feats[tr], feats[te], lab_tr, lab_te, seed=0)
    assert set(res) == PROBE_ACC_KEYS
    assert res["agent_pos_acc"] >= 0.95, res
    assert res["agent_dir_acc"] >= 0.95, res
    assert res["goal_pos_acc"] == 1.0, res  # one goal cell: every held-out sample is that class


def test_probe_suite_on_noise_is_about_chance(probe_data):
    _, tr, te, lab_tr, lab_te, rng = probe_data
    feats = rng.normal(size=(len(tr) + len(te), 32))
    res = probe_suite(feats[tr], feats[te], lab_tr, lab_te, seed=0)
    for key in ("agent_pos", "agent_dir"):
        chance = majority_rate(lab_tr[key], lab_te[key])
        assert 0 <= res[f"{key}_acc"] <= chance + 0.15, (key, res, chance)
    assert res["agent_pos_acc"] < 0.2  # 36 cells: chance is ~1/36


def test_linear_probe_single_training_class_scores_the_match_rate():
    x = np.random.default_rng(0).normal(size=(10, 3))
    assert linear_probe(x[:6], np.full(6, 7), x[6:], np.array([7, 7, 8, 9]), seed=0) == 0.5


# ----------------------------------------------------------------------------- rollouts


class ChainWorld(torch.nn.Module):
    """A world model whose answers are known: the state is an integer on a chain, the latent of
    state s is row s of a fixed random orthonormal table, and `predict` decodes the state
    (nearest row) and applies the true dynamics s' = s + action. `mode="constant"` predicts one
    fixed unit vector whatever the input."""

    def __init__(self, num_states=64, mode="exact", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table, _ = torch.linalg.qr(torch.randn(num_states, num_states, generator=g))
        self.constant = F.normalize(torch.randn(num_states, generator=g), dim=0)
        self.mode = mode

    def encode(self, state):
        return self.table[state]

    def encode_target(self, state):
        return self.table[state]

    def predict(self, z, action):
        if self.mode == "constant":
            return self.constant.expand(len(z), -1)
        return self.table[(z @ self.table.T).argmax(-1) + action]

    def rollout(self, z, actions):
        out = []
        for t in range(actions.shape[1]):
            z = self.predict(z, actions[:, t])
            out.append(z)
        return torch.stack(out, dim=1)


def chain_episodes(num_episodes=100, seed=0):
    """Episodes of 5-30 steps laid out one after another. Each step moves +1 with probability
    0.3, else stays. Even episodes start at state 0, odd ones at 32, so the state never carries
    over an episode boundary: a rollout that ran across one would be visibly wrong even for the
    exact model. Returns (episode, state, action, next_state, lengths)."""
    rng = np.random.default_rng(seed)
    cols = {"episode": [], "state": [], "action": [], "next_state": []}
    lengths = []
    for e in range(num_episodes):
        n = int(rng.integers(5, 31))
        action = (rng.random(n) < 0.3).astype(np.int64)
        states = 32 * (e % 2) + np.concatenate([[0], np.cumsum(action)])
        for k, v in zip(cols, (np.full(n, e), states[:-1], action, states[1:]), strict=True):
            cols[k].append(v)
        lengths.append(n)
    episode, state, action, next_state = (np.concatenate(v) for v in cols.values())
    return episode, torch.from_numpy(state), torch.from_numpy(action), torch.from_numpy(next_state), np.array(lengths)


def rollout_of(model, episode, state, action, next_state):
    z0 = model.encode(state)
    return rollout_errors(model, z0, model.encode_target(next_state), model.encode_target(state), action, episode, CPU)


@pytest.fixture(scope="module")
def chain():
    return chain_episodes()


def test_exact_world_model_has_zero_rollout_error_far_below_copying(chain):
    episode, state, action, next_state, _ = chain
    model = ChainWorld()
    # the hand-made model is right: one step of its own rollout equals the next state's latent
    assert torch.equal(model.rollout(model.encode(state), action[:, None])[:, 0], model.encode_target(next_state))
    res = rollout_of(model, episode, state, action, next_state)
    assert res["horizons"] == list(range(1, 11)) == HORIZONS
    assert len(res["error"]) == len(res["copy_baseline_error"]) == len(res["num_starts"]) == len(HORIZONS)
    for h, err, copy in zip(res["horizons"], res["error"], res["copy_baseline_error"], strict=True):
        assert err < 1e-6, (h, res["error"])
        assert copy > 0.25, (h, res["copy_baseline_error"])
    copies = res["copy_baseline_error"]
    # the state has moved away from s_t more often the further ahead one looks
    assert all(b > a for a, b in zip(copies, copies[1:], strict=False)), copies
    assert copies[-1] > 0.9  # ~chance: after 10 steps the state has almost always moved


def test_rollout_counts_only_within_episode_starts(chain):
    """Starts at horizon h are the steps with h-1 more steps after them in the same episode."""
    episode, state, action, next_state, lengths = chain
    res = rollout_of(ChainWorld(), episode, state, action, next_state)
    expected = [int(np.maximum(lengths - h + 1, 0).sum()) for h in HORIZONS]
    assert res["num_starts"] == expected
    assert all(b < a for a, b in zip(expected, expected[1:], strict=False))
    # a pair across an episode boundary would give the exact model a non-zero error
    assert max(res["error"]) < 1e-6, res["error"]


def test_rollout_start_near_episode_end_is_dropped_not_wrapped():
    """Two episodes whose lengths (3 and 12) differ: horizons past 3 only have starts from the
    second one, and none past 12."""
    episode = np.repeat([0, 1], [3, 12])
    action = torch.ones(15, dtype=torch.int64)
    state = torch.from_numpy(np.concatenate([np.arange(3) + 40, np.arange(12)]))
    res = rollout_of(ChainWorld(), episode, state, action, state + 1)
    assert res["num_starts"] == [15, 13, 11, 9, 8, 7, 6, 5, 4, 3]
    assert max(res["error"]) < 1e-6, res["error"]


def test_constant_predictor_scores_chance_or_worse(chain):
    episode, state, action, next_state, _ = chain
    res = rollout_of(ChainWorld(mode="constant"), episode, state, action, next_state)
    for h, err in zip(res["horizons"], res["error"], strict=True):
        assert math.isfinite(err) and err >= 0.95, (h, res["error"])


@pytest.mark.parametrize("spread", [None, 0.1])
def test_best_constant_predictor_scores_chance_or_worse(chain, spread):
    """The best a predictor that ignores the latent and the action can do: output the mean
    direction of the targets. spread=0.1: latents c + 0.1 * table[s], bunched around c as a
    half-collapsed encoder's are (every state still distinct)."""
    episode, state, action, next_state, _ = chain
    table = ChainWorld().table
    if spread is not None:
        table = F.normalize(torch.randn(64, generator=torch.Generator().manual_seed(1)), dim=0) + spread * table
    centre = F.normalize(F.normalize(table[next_state], dim=-1).mean(0), dim=0)

    class Centre(torch.nn.Module):
        def predict(self, z, a):
            return centre.expand(len(z), -1)

    res = rollout_errors(Centre(), table[state], table[next_state], table[state], action, episode, CPU)
    assert min(res["error"]) >= 0.9, res["error"]


def test_fully_collapsed_model_does_not_get_a_perfect_rollout_score(chain):
    episode, _, action, _, _ = chain

    class Collapsed(torch.nn.Module):
        def predict(self, z, a):
            return z

    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)).expand(len(episode), -1)
    res = rollout_errors(Collapsed(), z, z, z, action, episode, CPU)
    # undefined (NaN) or chance-like are both honest; 0 claims perfect prediction
    assert not any(e < 0.5 for e in res["error"]), res["error"]


# ----------------------------------------------------------------------------- held-out episodes


@pytest.mark.parametrize("k", [0, 1, 40, 150, 10_000])
def test_whole_episodes_returns_complete_episodes_about_k(k):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 25, size=30)
    episode = np.repeat(np.arange(30), lengths)
    held_out = np.arange(1, 30, 3)  # the episodes a split put on the validation side
    idx = np.flatnonzero(np.isin(episode, held_out))
    out = whole_episodes(idx, episode, k, np.random.default_rng(k))
    assert np.isin(out, idx).all()
    assert np.all(np.diff(out) > 0)  # in data order: a rollout needs row i+1 to follow row i
    chosen = np.unique(episode[out])
    assert len(chosen) >= 1
    for e in chosen:  # every chosen episode complete
        assert np.array_equal(out[episode[out] == e], idx[episode[idx] == e]), e
    assert len(chosen) == 1 or len(out) <= k, (k, len(out))  # over k only when one episode is already more
    if k >= len(idx):
        assert np.array_equal(out, idx)
    else:  # stops only when the next episode would not fit
        assert len(out) > k - lengths[held_out].max(), (k, len(out))


# ----------------------------------------------------------------------------- command line, end to end


@pytest.fixture(scope="module")
def runs(tiny_run):
    """The session's two tiny CNN checkpoints with and without VICReg, trained 1 epoch on one-step
    windows with the unit-vector loss on the shared 32 px data: {name: (run dir, trainer stdout)}."""
    return {name: tiny_run(name) for name in ("vicreg", "none")}


@pytest.fixture(scope="module")
def pair(work, runs, tiny_npz):
    out = work / "pair"
    proc = run(
        "inspect_jepa_model.py",
        *("--checkpoint", runs["vicreg"][0], "--checkpoint", runs["none"][0]),
        *("--data", tiny_npz, "--out-dir", out, "--device", "cpu"),
    )
    return out, ok(proc)


@pytest.fixture(scope="module")
def single(work, runs):
    """One checkpoint, no --data: the data path comes from the checkpoint."""
    out = work / "single"
    proc = run("inspect_jepa_model.py", "--checkpoint", runs["vicreg"][0] / "model.pt", "--out-dir", out, "--device", "cpu")
    return out, ok(proc)


@pytest.fixture(scope="module")
def data48(work):
    return collect(work / "d48.npz", episodes=2, max_steps=10, image_size=48)


def flat(tree, prefix=""):
    """{"a": {"b": [1, 2]}} -> {"a.b.0": 1, "a.b.1": 2}"""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in flat(sub, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def assert_finite_number(value, what):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (what, value)
    assert math.isfinite(value), (what, value)


def test_inspect_two_checkpoints_writes_eval_png_and_compare(pair, tiny_npz):
    out, proc = pair
    assert sorted(p.name for p in out.iterdir()) == ["compare.md", "eval.json", "inspection.png"]  # no temp files
    png = (out / "inspection.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and len(png) > 1000
    compare = (out / "compare.md").read_text()
    for name in ("vicreg", "none"):
        assert f"| {name} | jepa_cnn |" in proc.stdout, proc.stdout
        assert f"| {name} | jepa_cnn |" in compare, compare

    ev = strict_json(out / "eval.json")
    assert ev["data"]["path"] == str(tiny_npz)
    assert set(ev["models"]) == {"vicreg", "none"}
    with np.load(tiny_npz) as z:
        episode = z["episode"]
    _, val_idx = split_episodes(episode, 0.1, 0)
    val_lengths = np.unique(episode[val_idx], return_counts=True)[1]
    for name, m in ev["models"].items():
        assert m["arch"] == "jepa_cnn"
        for key in ("pred_loss", "pred_cosine", "embedding_std", "effective_rank"):
            assert_finite_number(m[key], (name, key))
        assert m["pred_loss"] >= 0 and -1 <= m["pred_cosine"] <= 1
        assert m["embedding_std"] >= 0 and 1 <= m["effective_rank"] <= m["latent_dim"]
        assert isinstance(m["collapse_warning"], bool)
        for where, probe in (
            ("probe", m["probe"]),
            ("random_encoder", m["baselines"]["random_encoder"]),
            ("pixels", m["baselines"]["pixels"]),
        ):
            assert PROBE_ACC_KEYS <= set(probe), (name, where, probe)
            for key in PROBE_ACC_KEYS:
                assert_finite_number(probe[key], (name, where, key))
                assert 0 <= probe[key] <= 1, (name, where, key, probe[key])
            assert probe["goal_pos_acc"] == 1.0  # the goal of Empty-8x8 never moves: one class
        ro = m["rollout"]
        assert ro["horizons"] == list(range(1, 11))
        assert len(ro["error"]) == len(ro["copy_baseline_error"]) == 10
        for key in ("error", "copy_baseline_error"):
            for h, v in zip(ro["horizons"], ro[key], strict=True):
                assert_finite_number(v, (name, key, h))
                assert v >= 0
        # evaluated on exactly the trainer's held-out episodes, each whole
        assert m["num_eval_transitions"] == len(val_idx)
        assert ro["num_starts"] == [int(np.maximum(val_lengths - h + 1, 0).sum()) for h in HORIZONS]
        assert m["evaluated_on"].startswith("held-out episodes")


def test_inspector_and_trainer_agree_on_collapse(pair, runs):
    """Both measure the online latents of the same held-out episodes with the same model, so the
    numbers match the trainer's last validation row and the verdict is the one
    losses.collapse_warning gives for them (reg=none collapses at this budget, vicreg need not
    escape it yet)."""
    out, proc = pair
    ev = json.loads((out / "eval.json").read_text())
    flagged = 0
    for name, (run_dir, train_stdout) in runs.items():
        m = ev["models"][name]
        row = last_val_row(run_dir)
        std, rank = float(row["embedding_std"]), float(row["effective_rank"])
        assert m["embedding_std"] == pytest.approx(std, rel=1e-3, abs=1e-6), name
        assert m["effective_rank"] == pytest.approx(rank, rel=1e-3), name
        assert m["pred_loss"] == pytest.approx(float(row["pred_loss"]), rel=1e-3, abs=1e-9), name
        verdict = collapse_warning(std, rank, m["latent_dim"])
        assert m["collapse_warning"] is verdict, (name, std, rank)
        last_epoch = train_stdout.split("Epoch 01 finished")[-1]
        assert (TRAINER_COLLAPSE_LINE in last_epoch) == verdict, name
        flagged += verdict
    assert ev["models"]["none"]["reg"] == "none" and ev["models"]["vicreg"]["reg"] == "vicreg"
    if TRAINER_COLLAPSE_LINE in runs["none"][1]:
        assert ev["models"]["none"]["collapse_warning"] is True
    assert proc.stdout.count("WARNING: collapsed latents") == flagged


def test_inspect_without_data_uses_the_checkpoint_data_and_matches_the_pair_run(single, pair, tiny_npz):
    out, proc = single
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "inspection.png"]  # one model: no compare.md
    assert (out / "inspection.png").read_bytes()[:8] == PNG_SIGNATURE
    assert f"on {tiny_npz}" in proc.stdout
    ev = strict_json(out / "eval.json")
    assert ev["data"]["path"] == str(tiny_npz)
    assert list(ev["models"]) == ["vicreg"]
    alone = ev["models"]["vicreg"]
    assert alone["evaluated_on"].startswith("held-out episodes")
    # inspecting a model alone or beside another gives it the same numbers
    beside = json.loads((pair[0] / "eval.json").read_text())["models"]["vicreg"]
    keys = ("pred_loss", "pred_cosine", "embedding_std", "effective_rank", "collapse_warning", "probe", "baselines", "rollout")
    a, b = flat({k: alone[k] for k in keys}), flat({k: beside[k] for k in keys})
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        else:
            assert a[key] == b[key], key


BAD_INPUTS = {
    "no checkpoint": (lambda w, r, d: ["--data", d], ["--checkpoint"]),
    "missing checkpoint": (lambda w, r, d: ["--checkpoint", w / "nope", "--data", d], ["nope", "not found"]),
    "random bytes checkpoint": (lambda w, r, d: ["--checkpoint", w / "garbage.pt", "--data", d], ["garbage.pt"]),
    "torch file not a checkpoint": (lambda w, r, d: ["--checkpoint", w / "weights.pt", "--data", d], ["weights.pt"]),
    "frames do not match the data": (lambda w, r, d: ["--checkpoint", r, "--data", w / "d48.npz"], ["[32, 32, 3]", "[48, 48, 3]"]),
    "missing data file": (lambda w, r, d: ["--checkpoint", r, "--data", w / "nope.npz"], ["nope.npz", "not found"]),
}


@pytest.fixture(scope="module")
def bad_files(work, data48):
    """garbage.pt (random bytes), weights.pt (a torch file that is no checkpoint), d48.npz."""
    (work / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"weights": torch.zeros(3)}, work / "weights.pt")
    return work


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_and_keeps_earlier_output(case, tmp_path, bad_files, runs, single, tiny_npz):
    """Each bad input exits with one `error:` line and leaves the good output already in
    --out-dir byte for byte as it was."""
    out = tmp_path / "out"
    shutil.copytree(single[0], out)
    before = snapshot(out)
    make_args, fragments = BAD_INPUTS[case]
    proc = run("inspect_jepa_model.py", *make_args(bad_files, runs["vicreg"][0], tiny_npz), "--out-dir", out, "--device", "cpu")
    assert_one_line_error(proc, *fragments)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    ok(run("benchmark.py", "--out", out, "--episodes", "2", "--train-steps", "10", timeout=300))
    res = strict_json(out)
    assert {"collect", "data", "train_jepa_cnn"} <= set(res)
    ratios = {
        "collect": ["bare_over_collector", "bare_over_collector_with_write"],
        "data": ["ram_over_frame_bytes", "ram_bytes_per_transition_over_naive", "disk_over_naive_uncompressed"],
        "train_jepa_cnn": ["model_only_over_loop"],
    }
    for section, keys in ratios.items():
        for key in keys:
            v = res[section][key]
            assert_finite_number(v, (section, key))
            assert v > 0, (section, key, v)
    # the docs' table is built from bench.json as read back (its dict keys are strings)
    from benchmark import summary_rows

    rows = summary_rows(res)
    assert len(rows) >= 10 and all(isinstance(name, str) and detail is not None for name, _, detail in rows)
