"""The collector's file format (design.md), checked against a hand replay of the env, and the
dataset: memory layout, batching, splits and legacy files. Bad files are rows of the one table of
bad inputs in test_reliability.py."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, collect, load_npz, write_npz

from collect_minigrid_data import CollectConfig
from collect_minigrid_data import main as collect_main
from envs import resize_frames
from minigrid_dataset import EpochBatchSampler, MiniGridTransitions, load_arrays, make_loaders, split_episodes, summary
from wm_common import UserError


def replay_env(env_id: str, obs_mode: str, tile: int):
    """The env built by hand (not through the collector's make_env)."""
    import gymnasium as gym
    import minigrid  # noqa: F401
    from minigrid.wrappers import ImgObsWrapper, RGBImgObsWrapper, RGBImgPartialObsWrapper

    env = gym.make(env_id)
    if obs_mode == "rgb":
        env = RGBImgObsWrapper(env, tile_size=tile)
    elif obs_mode == "rgb_partial":
        env = RGBImgPartialObsWrapper(env, tile_size=tile)
    return ImgObsWrapper(env)


def goal_cells(base) -> list[tuple[int, int]]:
    return [
        (x, y)
        for x in range(base.width)
        for y in range(base.height)
        if base.grid.get(x, y) is not None and base.grid.get(x, y).type == "goal"
    ]


def check_against_replay(path, *, env_id, obs_mode, tile, image_size=None, seed=0):
    """Re-runs every episode with reset(seed=seed+e) and the file's actions; frames, positions,
    directions, goal, rewards, terminations and the terminal frame must all match."""
    arrays = load_npz(path)
    data = MiniGridTransitions(path)
    env = replay_env(env_id, obs_mode, tile)
    base = env.unwrapped

    def frame(o):
        if image_size is None:
            return o
        return resize_frames(o[None], image_size)[0]

    try:
        for e in np.unique(arrays["episode"]):
            rows = np.flatnonzero(arrays["episode"] == e)
            assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)), "episode rows must be contiguous"
            o, _ = env.reset(seed=seed + int(e))
            goals = goal_cells(base)
            expected_goal = goals[0] if goals else (-1, -1)
            for i in rows:
                np.testing.assert_array_equal(arrays["obs"][i], frame(o))
                assert tuple(arrays["agent_pos"][i]) == tuple(int(v) for v in base.agent_pos)
                assert arrays["agent_dir"][i] == base.agent_dir
                assert tuple(arrays["goal_pos"][i]) == expected_goal
                o, r, terminated, truncated, _ = env.step(int(arrays["action"][i]))
                assert arrays["reward"][i] == np.float32(r)
                assert arrays["terminated"][i] == terminated
                # obs_t+1 as the dataset rebuilds it equals the env's next frame (the terminal
                # frame at the episode's end)
                np.testing.assert_array_equal(data.next_obs(torch.tensor([i]))[0].numpy(), frame(o))
            assert arrays["done"][rows[-1]] and not arrays["done"][rows[:-1]].any()
    finally:
        env.close()


# ----------------------------------------------------------------------------- collector format


def test_collector_keys_dtypes_shapes(tiny_arrays):
    a = tiny_arrays
    n = len(a["action"])
    n_ep = TINY["episodes"]
    assert n > 0
    expected = {
        "obs": (np.uint8, (n, 32, 32, 3)),
        "action": (np.int64, (n,)),
        "reward": (np.float32, (n,)),
        "done": (np.bool_, (n,)),
        "episode": (np.int64, (n,)),
        "step": (np.int64, (n,)),
        "agent_pos": (np.int64, (n, 2)),
        "agent_dir": (np.int64, (n,)),
        "goal_pos": (np.int64, (n, 2)),
        "next_obs_index": (np.int64, (n,)),
        "terminal_obs": (np.uint8, (n_ep, 32, 32, 3)),
    }
    for key, (dtype, shape) in expected.items():
        assert key in a, key
        assert a[key].dtype == dtype, (key, a[key].dtype)
        assert a[key].shape == shape, (key, a[key].shape)
    assert sorted(np.unique(a["episode"]).tolist()) == list(range(n_ep))
    assert (np.bincount(a["episode"]) <= TINY["max_steps"]).all()
    # step counts 0.. within each episode; done exactly at each episode's last row
    for e in range(n_ep):
        rows = a["episode"] == e
        assert a["step"][rows].tolist() == list(range(rows.sum()))
    assert a["done"].sum() == n_ep
    assert a["done"][-1]
    assert ((a["action"] >= 0) & (a["action"] < 7)).all()
    assert ((a["agent_dir"] >= 0) & (a["agent_dir"] < 4)).all()
    assert (a["goal_pos"] == [6, 6]).all()  # Empty-8x8's goal sits in the bottom-right corner


def test_collector_meta(tiny_arrays):
    meta = json.loads(str(tiny_arrays["meta"]))
    assert meta["env"] == "MiniGrid-Empty-8x8-v0"
    assert meta["seed"] == 0
    assert meta["episodes"] == TINY["episodes"]
    assert meta["obs_mode"] == "rgb"
    assert meta["image_shape"] == [32, 32, 3]
    assert meta["action_space"] == {"type": "discrete", "n": 7}
    assert meta["max_steps"] == 40
    assert isinstance(meta["collector_version"], int)
    assert meta["date"]
    assert meta["config"]["image_size"] == 32
    assert meta["cell_px"] == 4  # Empty-8x8 at 32 px: whole cells of 4 px


def test_next_obs_is_next_frame_within_episode_and_terminal_at_end(tiny_npz, tiny_arrays):
    data = MiniGridTransitions(tiny_npz)
    ep = tiny_arrays["episode"]
    n = len(ep)
    nxt = data.next_obs(torch.arange(n)).numpy()
    assert nxt.dtype == np.uint8 and nxt.shape == tiny_arrays["obs"].shape
    same = np.flatnonzero(ep[:-1] == ep[1:])
    np.testing.assert_array_equal(nxt[same], tiny_arrays["obs"][same + 1])
    ends = np.flatnonzero(tiny_arrays["done"])
    np.testing.assert_array_equal(nxt[ends], tiny_arrays["terminal_obs"])
    # the agent moves in a random walk: not every next frame is a copy of the current one
    assert (nxt != tiny_arrays["obs"]).any(axis=(1, 2, 3)).sum() > n // 10


def test_rgb_matches_a_hand_replay_of_the_env(tiny_npz):
    # 32 px on an 8x8 grid is tile 4 exactly: frames are the env's own, no resize
    check_against_replay(tiny_npz, env_id="MiniGrid-Empty-8x8-v0", obs_mode="rgb", tile=4)


def test_symbolic_mode_matches_replay_with_random_goal_and_start(tmp_path):
    path = collect(tmp_path / "four.npz", env="MiniGrid-FourRooms-v0", episodes=3, max_steps=15, obs="symbolic", seed=5)
    a = load_npz(path)
    assert a["obs"].dtype == np.uint8 and a["obs"].shape[1:] == (7, 7, 3)
    assert json.loads(str(a["meta"]))["obs_mode"] == "symbolic"
    # FourRooms places agent and goal at random: the seeds must actually vary them
    assert len({tuple(a["goal_pos"][a["episode"] == e][0]) for e in range(3)}) > 1
    check_against_replay(path, env_id="MiniGrid-FourRooms-v0", obs_mode="symbolic", tile=0, seed=5)


def test_rgb_partial_mode_matches_replay(tmp_path):
    path = collect(tmp_path / "partial.npz", episodes=2, max_steps=12, obs="rgb_partial")
    a = load_npz(path)
    assert a["obs"].dtype == np.uint8 and a["obs"].shape[1:] == (32, 32, 3)
    assert json.loads(str(a["meta"]))["obs_mode"] == "rgb_partial"
    # tile ceil(32/7) = 5 -> 35 px, area-resized to 32
    check_against_replay(path, env_id="MiniGrid-Empty-8x8-v0", obs_mode="rgb_partial", tile=5, image_size=32)


def test_rgb_resized_frames_have_requested_size(tmp_path):
    path = collect(tmp_path / "r.npz", episodes=1, max_steps=5, image_size=56)
    a = load_npz(path)
    assert a["obs"].shape[1:] == (56, 56, 3) and a["terminal_obs"].shape[1:] == (56, 56, 3)


def test_env_without_goal_has_minus_one_goal_pos(tmp_path):
    path = collect(tmp_path / "fetch.npz", env="MiniGrid-Fetch-5x5-N2-v0", episodes=2, max_steps=5, obs="symbolic")
    assert (load_npz(path)["goal_pos"] == -1).all()


def test_nav_actions_only_left_right_forward(tmp_path):
    path = collect(tmp_path / "nav.npz", episodes=4, max_steps=30, actions="nav")
    a = load_npz(path)
    assert set(np.unique(a["action"]).tolist()) == {0, 1, 2}


def test_same_seed_identical_different_seed_different(tmp_path):
    p1 = collect(tmp_path / "a.npz", episodes=3, max_steps=20, seed=7)
    p2 = collect(tmp_path / "b.npz", episodes=3, max_steps=20, seed=7)
    p3 = collect(tmp_path / "c.npz", episodes=3, max_steps=20, seed=8)
    a, b, c = load_npz(p1), load_npz(p2), load_npz(p3)
    assert a.keys() == b.keys()
    for k in a:
        if k != "meta":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma, mb = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
    for m in (ma, mb):
        m.pop("date"), m["config"].pop("out")
    assert ma == mb
    assert not (len(a["action"]) == len(c["action"]) and np.array_equal(a["action"], c["action"]))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"episodes": 0}, "--episodes"),
        ({"max_steps": 0}, "--max-steps"),
        ({"image_size": 4}, "--image-size"),
        ({"env": "MiniGrid-Nope-v0"}, "unknown env id"),
        ({"env": "CartPole-v1", "obs": "rgb_partial"}, "not a MiniGrid env"),
        ({"env": "CartPole-v1", "actions": "nav"}, "not a MiniGrid env"),
        ({"frame_skip": 2}, "--frame-skip is for non-MiniGrid envs"),
        ({"env": "CartPole-v1", "frame_skip": 0}, "--frame-skip must be at least 1"),
        ({"policy_noise": -0.1}, "--policy-noise is a probability"),
        ({"policy_noise": 1.5}, "--policy-noise is a probability"),
        ({"policy_noise": float("nan")}, "--policy-noise is a probability"),
        ({"env": "CartPole-v1", "policy": "waypoints"}, "not a MiniGrid env"),
        ({"policy_noise": 0.25}, "add --policy waypoints"),
    ],
)
def test_collector_bad_config_is_user_error(tmp_path, overrides, match):
    with pytest.raises(UserError, match=match):
        collect(tmp_path / "x.npz", **overrides)
    assert not (tmp_path / "x.npz").exists()


def cells_per_episode(data: dict[str, np.ndarray]) -> float:
    return float(np.mean([len({tuple(p) for p in data["agent_pos"][data["episode"] == e]}) for e in np.unique(data["episode"])]))


def test_waypoint_walks_travel(tmp_path):
    """Without noise every step of a waypoint walk turns or moves (a shortest path never bumps
    into a wall) and the walk covers more cells than independent random actions. meta says which
    policy made the data."""
    flags = {"actions": "nav", "episodes": 6, "max_steps": 60, "start": "random", "env": "MiniGrid-SimpleCrossingS9N1-v0"}
    plain = load_npz(collect(tmp_path / "plain.npz", **flags))
    walk = load_npz(collect(tmp_path / "walk.npz", policy="waypoints", policy_noise=0.0, **flags))
    state = np.column_stack([walk["agent_pos"], walk["agent_dir"]])
    same_episode = walk["episode"][1:] == walk["episode"][:-1]
    assert (state[1:] != state[:-1]).any(1)[same_episode].all()
    assert cells_per_episode(walk) > 1.5 * cells_per_episode(plain)
    meta, plain_meta = json.loads(str(walk["meta"])), json.loads(str(plain["meta"]))
    assert meta["policy"].startswith("shortest paths to random cells") and meta["policy_noise"] == 0.0
    assert plain_meta["policy"].startswith("uniform random") and "policy_noise" not in plain_meta


def test_collector_out_must_be_npz(tmp_path):
    with pytest.raises(UserError, match=".npz"):
        collect_main(CollectConfig(out=str(tmp_path / "x.npy"), episodes=1, max_steps=2))


# ----------------------------------------------------------------------------- dataset


def test_frames_stay_uint8_without_float_copy(tiny_npz, tiny_arrays):
    data = MiniGridTransitions(tiny_npz)
    n, n_ep = len(tiny_arrays["action"]), TINY["episodes"]
    frame = 32 * 32 * 3
    assert data.obs.dtype == torch.uint8 and data.terminal_obs.dtype == torch.uint8
    # each frame stored once: N obs + one terminal frame per episode, one byte per value
    assert data.frame_bytes == data.obs.nbytes + data.terminal_obs.nbytes == (n + n_ep) * frame
    assert data.frame_bytes < 2 * n * frame
    # nothing frame-sized is held as float anywhere on the dataset
    for name, value in vars(data).items():
        tensors = value.values() if isinstance(value, dict) else [value]
        for t in tensors:
            if isinstance(t, (torch.Tensor, np.ndarray)) and t.dtype in (torch.float32, torch.float64, np.float32, np.float64):
                assert t.nbytes < n * frame // 4, f"{name} holds a large float copy"
    # obs is a view on one buffer, not a per-item copy
    assert data.obs.is_contiguous() and data.obs.untyped_storage().nbytes() == data.obs.nbytes
    batch = data.__getitems__(list(range(10)))
    assert batch["obs"].dtype == torch.uint8 and batch["next_obs"].dtype == torch.uint8
    assert batch["obs"].shape == (10, 32, 32, 3)


def test_getitems_equals_stacked_getitem(tiny_npz, tiny_arrays):
    data = MiniGridTransitions(tiny_npz)
    ends = np.flatnonzero(tiny_arrays["done"]).tolist()
    idx = [0, 1, 5, *ends, len(data) - 1, 3]
    batch = data.__getitems__(idx)
    items = [data[i] for i in idx]
    assert set(batch) == set(items[0])
    for k in batch:
        assert torch.equal(batch[k], torch.stack([it[k] for it in items])), k
    assert {"obs", "next_obs", "action", "reward", "done", "episode", "agent_pos", "agent_dir", "goal_pos"} <= set(batch)
    assert data.num_actions == 7 and data.frame_shape == (32, 32, 3)
    assert data.notes == []


def test_split_episodes_disjoint_and_deterministic(tiny_arrays):
    ep = tiny_arrays["episode"]
    train, val = split_episodes(ep, 0.3, seed=1)
    assert len(train) and len(val)
    assert set(ep[train]).isdisjoint(ep[val])
    assert len(train) + len(val) == len(ep)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(ep)))
    t2, v2 = split_episodes(ep, 0.3, seed=1)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    # a different seed gives some different split over a few tries
    splits = {tuple(sorted(set(ep[split_episodes(ep, 0.3, seed=s)[1]]))) for s in range(8)}
    assert len(splits) > 1


def test_split_episodes_extremes():
    ep = np.repeat(np.arange(3), 4)
    for frac in (0.01, 0.99):
        train, val = split_episodes(ep, frac, seed=0)
        assert len(np.unique(ep[train])) >= 1 and len(np.unique(ep[val])) >= 1
    for frac in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="val-fraction"):
            split_episodes(ep, frac, seed=0)


def test_split_single_episode_is_user_error():
    with pytest.raises(UserError, match="at least 2"):
        split_episodes(np.zeros(50, np.int64), 0.1, seed=0)


def test_epoch_batch_sampler_orders():
    idx = np.arange(100, 200)
    s = EpochBatchSampler(idx, 16, shuffle=True, seed=3, drop_last=True)
    assert len(s) == 6
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    assert all(len(b) == 16 for b in e0 + e1)
    assert len(e0) == 6
    for order in (e0, e1):
        flat = [i for b in order for i in b]
        assert len(set(flat)) == len(flat) == 96 and set(flat) <= set(idx.tolist())
    # the order depends only on (seed, epoch)
    s2 = EpochBatchSampler(idx, 16, shuffle=True, seed=3, drop_last=True)
    s2.set_epoch(1)
    assert list(s2) == e1
    s2.set_epoch(0)
    assert list(s2) == e0
    s3 = EpochBatchSampler(idx, 16, shuffle=True, seed=4, drop_last=True)
    assert list(s3) != e0


def test_epoch_batch_sampler_no_shuffle_keeps_everything_in_order():
    idx = np.arange(10, 60)
    s = EpochBatchSampler(idx, 16, shuffle=False, seed=0, drop_last=False)
    assert len(s) == 4
    batches = list(s)
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert [i for b in batches for i in b] == idx.tolist()


def test_make_loaders_batches(tiny_npz):
    data = MiniGridTransitions(tiny_npz)
    train, val = make_loaders(data, batch_size=16, val_fraction=0.2, seed=0)
    train_idx, val_idx = train.batch_sampler.indices, val.batch_sampler.indices
    assert set(data.episode[train_idx]).isdisjoint(data.episode[val_idx])
    train.batch_sampler.set_epoch(0)
    batches = list(train)
    assert len(batches) == len(train_idx) // 16
    for b in batches:
        assert b["frames"].shape == (16, 2, 32, 32, 3) and b["frames"].dtype == torch.uint8
        assert b["actions"].shape == (16, 1) and b["actions"].dtype == torch.int64
    seen = sum(len(b["frames"]) for b in val)
    assert seen == len(val_idx)


def test_val_batches_never_leave_one_transition_alone():
    """A lone last validation transition would make batch statistics (VICReg's variance) NaN:
    it joins the batch before it."""
    for n in (17, 33, 49):
        s = EpochBatchSampler(np.arange(n), 16, shuffle=False, seed=0, drop_last=False)
        sizes = [len(b) for b in s]
        assert sum(sizes) == n and min(sizes) >= 2 and len(s) == len(sizes)
    assert [len(b) for b in EpochBatchSampler(np.arange(18), 16, shuffle=False, seed=0, drop_last=False)] == [16, 2]


def test_make_loaders_train_split_smaller_than_batch_is_user_error(tiny_npz):
    data = MiniGridTransitions(tiny_npz)
    with pytest.raises(UserError, match="fewer than --batch-size"):
        make_loaders(data, batch_size=len(data), val_fraction=0.2, seed=0)
    with pytest.raises(UserError, match="--batch-size"):
        make_loaders(data, batch_size=0)


def test_summary_text(tiny_npz, tiny_arrays):
    text = summary(MiniGridTransitions(tiny_npz))
    assert f"transitions   {len(tiny_arrays['action'])}" in text
    assert f"episodes      {TINY['episodes']}" in text
    assert "actions       0:" in text
    assert "MiniGrid-Empty-8x8-v0" in text


# ----------------------------------------------------------------------------- legacy files


def test_legacy_seed003_file_loads(tmp_path, tiny_npz, tiny_arrays):
    data = MiniGridTransitions(tiny_npz)
    n = len(data)
    nxt = data.next_obs(torch.arange(n)).numpy()
    legacy = write_npz(
        tmp_path / "legacy.npz",
        obs=tiny_arrays["obs"],
        actions=tiny_arrays["action"],
        next_obs=nxt,
        rewards=tiny_arrays["reward"],
        dones=tiny_arrays["done"],
    )
    old = MiniGridTransitions(legacy)
    assert len(old) == n
    assert np.array_equal(old.episode, tiny_arrays["episode"])  # recovered from dones
    assert torch.equal(old.next_obs(torch.arange(n)), torch.from_numpy(nxt))
    assert torch.equal(old.fields["action"], torch.from_numpy(tiny_arrays["action"]))
    assert old.obs.dtype == torch.uint8
    notes = " ".join(old.notes)
    assert "metadata for probes is missing" in notes
    assert "episodes recovered from 'done'" in notes
    assert old.num_actions == int(tiny_arrays["action"].max()) + 1
    batch = old.__getitems__([0, n - 1])
    assert batch["obs"].shape == (2, 32, 32, 3)
    # split and loaders work on it
    train, val = make_loaders(old, batch_size=16, val_fraction=0.2, seed=0)
    assert set(old.episode[train.batch_sampler.indices]).isdisjoint(old.episode[val.batch_sampler.indices])


def test_legacy_int32_actions_and_float_dones(tmp_path):
    obs = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    p = write_npz(
        tmp_path / "legacy.npz",
        obs=obs,
        actions=np.array([0, 1, 2, 0, 1, 2], np.int32),
        next_obs=obs[::-1].copy(),
        rewards=np.zeros(6, np.float64),
        dones=np.array([0, 0, 1, 0, 0, 1], np.float32),
    )
    data = MiniGridTransitions(p)
    assert data.fields["action"].dtype == torch.int64
    assert data.fields["reward"].dtype == torch.float32
    assert data.fields["done"].dtype == torch.bool
    assert data.episode.tolist() == [0, 0, 0, 1, 1, 1]


def test_load_arrays_returns_meta_and_notes(tiny_npz):
    arrays, meta, notes = load_arrays(tiny_npz)
    assert meta["env"] == "MiniGrid-Empty-8x8-v0"
    assert notes == []
    assert "meta" not in arrays
