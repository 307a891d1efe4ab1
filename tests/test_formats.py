"""Minari datasets in and out, and TensorBoard event files: datasets made by minari's own
DataCollector train and inspect through the same commands as our .npz with the same numbers,
our collection exported to Minari loads back equal, and the event files hold metrics.csv's
values."""

import csv
import json
import sys

import numpy as np
import pytest
from conftest import assert_one_line_error, ok, run

minari = pytest.importorskip("minari", reason="the Minari tests need `make setup-dev` (minari[hdf5,create])")
pytest.importorskip("jax", reason="minari's DataCollector needs minari[create] (jax)")

import dataset_formats  # noqa: E402
from collect_minigrid_data import CollectConfig  # noqa: E402
from collect_minigrid_data import main as collect_main  # noqa: E402
from envs import make_env  # noqa: E402
from minigrid_dataset import load_arrays  # noqa: E402
from wm_common import UserError  # noqa: E402

ENV, SIZE = "MiniGrid-Empty-5x5-v0", 40  # tile 8: frames need no resizing
SAME = ("obs", "terminal_obs", "next_obs_index", "action", "reward", "done", "terminated", "episode")
TERMS = ("loss", "pred_loss", "std_loss", "cov_loss", "idm_loss")


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our own collection: 3 episodes of Empty-5x5, nav actions, 30 steps at most."""
    out = tmp_path_factory.mktemp("ours") / "ours.npz"
    collect_main(CollectConfig(env=ENV, episodes=3, max_steps=30, image_size=SIZE, seed=0, actions="nav", out=str(out)))
    return out


def replay_with_datacollector(arrays: dict[str, np.ndarray], dataset_id: str) -> None:
    """The same episodes (same reset seeds, same actions) recorded by minari's DataCollector over
    our RGB wrapper."""
    env, _ = make_env(ENV, "rgb", SIZE)
    env = minari.DataCollector(env, jpeg_encoding=False)
    for e in np.unique(arrays["episode"]):
        env.reset(seed=int(e))
        for a in arrays["action"][arrays["episode"] == e]:
            env.step(int(a))
    env.create_dataset(dataset_id=dataset_id, algorithm_name="random")


def losses(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: r[k] for k in ("step", "phase", *TERMS)} for r in csv.DictReader(f)]


def test_datacollector_minigrid_trains_and_inspects_like_our_npz(ours, minari_root, tmp_path, in_process):
    mine, _, _ = load_arrays(ours)
    replay_with_datacollector(mine, "minigrid/empty5x5-mine-v0")
    theirs, meta, _ = load_arrays("minigrid/empty5x5-mine-v0")
    for key in SAME:
        np.testing.assert_array_equal(theirs[key], mine[key], err_msg=key)
    assert meta["env"] == ENV and meta["action_space"] == {"type": "discrete", "n": 7}
    by_folder, _, _ = load_arrays(minari_root / "minigrid" / "empty5x5-mine-v0")
    np.testing.assert_array_equal(by_folder["obs"], mine["obs"])

    reports = {}
    for name, data in (("npz", str(ours)), ("minari", "minigrid/empty5x5-mine-v0")):
        out = tmp_path / name
        in_process("train_jepa.py", "--data", data, "--steps", "6", "--batch-size", "16", "--log-every", "2", "--out-dir", out / "run")
        in_process("inspect_jepa_model.py", "--checkpoint", out / "run", "--data", data, "--out-dir", out / "insp", "--probe-horizons", "1")
        reports[name] = (losses(out / "run"), json.loads((out / "insp" / "eval.json").read_text()))
    assert reports["npz"][0] == reports["minari"][0] and len(reports["npz"][0]) >= 3
    (_, a), (_, b) = reports["npz"], reports["minari"]
    model_a, model_b = next(iter(a["models"].values())), next(iter(b["models"].values()))
    measured = ("pred_loss", "pred_cosine", "embedding_std", "effective_rank", "collapse_warning", "rollout", "num_eval_transitions")
    for key in measured:
        assert model_a[key] == model_b[key], key
    assert model_a["probe"] and not model_b["probe"]  # our collector records positions; a DataCollector's MiniGrid data has none


def test_datacollector_cartpole_rendered_frames(minari_root, tmp_path, in_process):
    import gymnasium as gym

    class Shrink(gym.ObservationWrapper):
        """Every 12th pixel of the 400x600 render (gymnasium's ResizeObservation needs opencv)."""

        def __init__(self, env):
            super().__init__(env)
            self.observation_space = gym.spaces.Box(0, 255, (34, 50, 3), np.uint8)

        def observation(self, frame):
            return frame[::12, ::12]

    env = gym.make("CartPole-v1", render_mode="rgb_array", max_episode_steps=8)
    env = Shrink(gym.wrappers.AddRenderObservation(env, render_only=True))
    env = minari.DataCollector(env, jpeg_encoding=False)
    rng, lengths = np.random.default_rng(0), []
    for e in range(3):
        env.reset(seed=e)
        done, steps = False, 0
        while not done:  # CartPole's own end or the 8-step limit
            *_, terminated, truncated, _ = env.step(int(rng.integers(2)))
            done, steps = terminated or truncated, steps + 1
        lengths.append(steps)
    env.create_dataset(dataset_id="cartpole/pixels-v0", algorithm_name="random")
    arrays, meta, _ = load_arrays("cartpole/pixels-v0")
    assert arrays["obs"].shape == (sum(lengths), 34, 50, 3) and arrays["obs"].dtype == np.uint8
    assert np.bincount(arrays["episode"]).tolist() == lengths
    assert arrays["done"].sum() == 3 and arrays["terminal_obs"].shape == (3, 34, 50, 3)
    assert meta["env"] == "CartPole-v1" and meta["action_space"] == {"type": "discrete", "n": 2}
    in_process(
        "train_jepa.py",
        "--data",
        "cartpole/pixels-v0",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--val-fraction",
        "0.34",
        "--out-dir",
        tmp_path / "cp",
    )


def test_datacollector_continuous_actions_map_to_float_vectors(minari_root):
    import gymnasium as gym

    env = gym.make("Pendulum-v1", render_mode="rgb_array", max_episode_steps=4)
    env = minari.DataCollector(gym.wrappers.AddRenderObservation(env, render_only=True), jpeg_encoding=False)
    env.reset(seed=0)
    taken = []
    for _ in range(4):
        taken.append(env.action_space.sample())
        env.step(taken[-1])
    env.create_dataset(dataset_id="pendulum/pixels-v0", algorithm_name="random")
    arrays, meta, _ = load_arrays("pendulum/pixels-v0")
    assert arrays["action"].dtype == np.float32 and arrays["action"].shape == (4, 1)
    np.testing.assert_allclose(arrays["action"], np.stack(taken))
    assert meta["action_space"]["type"] == "box" and meta["action_space"]["shape"] == [1]
    assert arrays["obs"].shape[1:] == (500, 500, 3) and arrays["done"].tolist() == [False, False, False, True]


def test_vector_observations_are_rendered_by_replay_as_our_collector_renders(minari_root, tmp_path):
    """CartPole's observations are state vectors: the reader recovers the env, replays each episode
    from its recorded seed and actions, and renders the frames our collector stores for the same
    seeds and actions."""
    import gymnasium as gym

    ours = tmp_path / "cartpole.npz"
    collect_main(CollectConfig(env="CartPole-v1", episodes=2, max_steps=8, seed=0, out=str(ours)))
    mine, _, _ = load_arrays(ours)
    env = minari.DataCollector(gym.make("CartPole-v1", max_episode_steps=8))
    for e in np.unique(mine["episode"]):
        env.reset(seed=int(e))
        for a in mine["action"][mine["episode"] == e]:
            env.step(int(a))
    env.create_dataset(dataset_id="cartpole/vectors-v0", algorithm_name="random")
    theirs, meta, _ = load_arrays("cartpole/vectors-v0")
    assert theirs["obs"].shape == mine["obs"].shape == (len(mine["action"]), 64, 64, 3)
    for key in SAME:
        np.testing.assert_array_equal(theirs[key], mine[key], err_msg=key)
    assert meta["obs_mode"].startswith("rgb, rendered by replaying")


def test_a_replay_that_is_not_the_recorded_episode_is_refused():
    from types import SimpleNamespace

    replay = dataset_formats._Replay("CartPole-v1", "d")
    episode = SimpleNamespace(actions=np.zeros(3, np.int64), rewards=np.array([1.0, 1.0, 1.0]), terminations=np.zeros(3, bool))
    assert replay.frames(episode, 0, 0).shape == (4, 64, 64, 3)
    episode.rewards = np.array([1.0, 1.0, 5.0])
    with pytest.raises(UserError, match="replaying episode 0 from its seed gives other rewards or ends at step 2"):
        replay.frames(episode, 0, 0)
    with pytest.raises(UserError, match="episode 3 has no recorded reset seed"):
        replay.frames(episode, None, 3)


def test_export_to_minari_loads_back_equal(ours, minari_root):
    ok(run("collect_minigrid_data.py", "--env", ENV, "--episodes", "3", "--max-steps", "30", "--image-size", SIZE, "--actions", "nav",
           "--format", "minari", "--out", "wm/empty5x5-random-v0"))  # fmt: skip
    mine, meta, _ = load_arrays(ours)
    exported = minari.load_dataset("wm/empty5x5-random-v0")
    assert exported.total_episodes == 3 and exported.total_steps == len(mine["action"])
    frames = np.concatenate([mine["obs"], mine["terminal_obs"]])
    for e, episode in enumerate(exported.iterate_episodes()):
        rows = np.flatnonzero(mine["episode"] == e)
        np.testing.assert_array_equal(episode.observations[:-1], mine["obs"][rows])
        np.testing.assert_array_equal(episode.observations[-1], frames[mine["next_obs_index"][rows[-1]]])
        np.testing.assert_array_equal(episode.actions, mine["action"][rows])
        np.testing.assert_array_equal(episode.rewards, mine["reward"][rows])
        np.testing.assert_array_equal(episode.terminations, mine["terminated"][rows])
        assert episode.truncations[-1] == (not mine["terminated"][rows[-1]])
    back, back_meta, _ = load_arrays("wm/empty5x5-random-v0")
    assert sorted(back) == sorted(mine)
    for key in mine:
        np.testing.assert_array_equal(back[key], mine[key], err_msg=key)
    assert back_meta["env"] == meta["env"] and back_meta["config"]["format"] == "minari"


def test_export_refuses_to_replace_without_overwrite(minari_root, in_process):
    args = ("--env", ENV, "--episodes", "1", "--max-steps", "5", "--image-size", SIZE, "--format", "minari", "--out", "wm/once-v0")
    in_process("collect_minigrid_data.py", *args)
    before = sorted(p.name for p in (minari_root / "wm" / "once-v0" / "data").iterdir())
    assert_one_line_error(run("collect_minigrid_data.py", *args), "already exists", "--overwrite")
    assert sorted(p.name for p in (minari_root / "wm" / "once-v0" / "data").iterdir()) == before
    in_process("collect_minigrid_data.py", *args, "--overwrite")
    assert not [p for p in minari_root.rglob("*") if ".tmp" in p.name or ".old" in p.name or p.suffix == ".npz"]


@pytest.mark.parametrize(
    "out, fragment",
    [("", "needs --out <dataset id>"), ("no-version", "not a Minari dataset id"), ("a/b/../c-v0", "not a Minari dataset id")],
)
def test_export_bad_ids(minari_root, out, fragment):
    args = ["--env", ENV, "--episodes", "1", "--format", "minari"] + (["--out", out] if out else [])
    assert_one_line_error(run("collect_minigrid_data.py", *args), fragment)
    assert not minari_root.exists() or not any(minari_root.rglob("*.hdf5"))


def test_unknown_id_names_where_minari_looks(minari_root):
    assert_one_line_error(run("minigrid_dataset.py", "nobody/nothing-v0"), "not found", str(minari_root))


def test_missing_minari_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)  # import minari now raises ImportError
    with pytest.raises(UserError, match=r"make setup-extras"):
        dataset_formats.require_minari()


def test_tensorboard_holds_the_metrics_csv_values_and_resume_drops_redone_steps(tiny_npz, tmp_path, in_process):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ("--data", tiny_npz, "--batch-size", "16", "--log-every", "2", "--out-dir", out)
    in_process("train_jepa.py", *args, "--epochs", "1")
    in_process("train_jepa.py", *args, "--epochs", "2", "--resume")
    board = EventAccumulator(str(out))
    board.Reload()
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    checked = 0
    for row in rows:
        for key, value in row.items():
            if key in ("step", "epoch", "phase") or value == "":
                continue
            events = {e.step: e.value for e in board.Scalars(f"{row['phase']}/{key}")}
            assert events[int(row["step"])] == pytest.approx(float(value), rel=1e-5, abs=1e-7), (row["phase"], key)
            checked += 1
    assert checked >= 20 and {"train/loss", "val/loss", "val/effective_rank"} <= set(board.Tags()["scalars"])
    # the resumed run logged each step once: TensorBoard dropped what the first run wrote past its checkpoint
    assert [e.step for e in board.Scalars("train/loss")] == [int(r["step"]) for r in rows if r["phase"] == "train"]
