"""Scale: parallel collection (--num-envs; worker processes play episodes, the parent writes
them in episode order, so the file holds exactly what one process writes with the same seed),
and datasets stored as directories of memory-mapped arrays."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, collect, load_npz, ok, run

from minigrid_dataset import MiniGridTransitions

ROOT = Path(__file__).resolve().parent.parent


def same_content(a_path, b_path):
    a, b = load_npz(a_path), load_npz(b_path)
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "meta":
            continue
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    ma, mb = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
    for m in (ma, mb):
        m.pop("date")
        m["config"].pop("out")
        m["config"].pop("num_envs")
    assert ma == mb


@pytest.mark.parametrize("env, extra", [("MiniGrid-Empty-8x8-v0", {"start": "random"}), ("CartPole-v1", {"image_size": 32})])
def test_num_envs_writes_the_same_file_as_one_process(tmp_path, env, extra):
    one = collect(tmp_path / "one.npz", env=env, episodes=5, max_steps=12, **extra)
    three = collect(tmp_path / "three.npz", env=env, episodes=5, max_steps=12, num_envs=3, **extra)
    same_content(one, three)
    assert len(np.unique(load_npz(three)["episode"])) == 5


def test_num_envs_through_the_cli(tmp_path):
    out = tmp_path / "cli.npz"
    ok(run("collect_minigrid_data.py", "--episodes", "4", "--max-steps", "8", "--image-size", "32", "--num-envs", "2", "--out", out))
    same_content(collect(tmp_path / "ref.npz", episodes=4, max_steps=8, image_size=32), out)


def test_num_envs_zero_is_a_one_line_error(tmp_path):
    proc = run("collect_minigrid_data.py", "--num-envs", "0", "--out", tmp_path / "x.npz")
    assert_one_line_error(proc, "--num-envs")
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- memory-mapped directories


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    work = tmp_path_factory.mktemp("layouts")
    settings = dict(episodes=6, max_steps=30, image_size=64)
    return collect(work / "data.npz", **settings), collect(work / "data_dir", **settings)


def test_directory_layout_loads_the_same_transitions(both_layouts):
    npz, directory = (MiniGridTransitions(p) for p in both_layouts)
    assert directory.memory_mapped and not npz.memory_mapped
    assert len(npz) == len(directory) and npz.meta["env"] == directory.meta["env"]
    idx = torch.arange(len(npz))
    assert torch.equal(npz.obs, directory.obs) and torch.equal(npz.next_obs(idx), directory.next_obs(idx))
    assert npz.fields.keys() == directory.fields.keys()
    for key in npz.fields:
        assert torch.equal(npz.fields[key], directory.fields[key]), key
    batch_a, batch_b = npz.__getitems__([0, 5, 9]), directory.__getitems__([0, 5, 9])
    assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)


def test_directory_layout_keeps_frames_out_of_process_memory(tmp_path):
    """Loading maps the frames instead of reading them: the process grows by a fraction of their
    bytes (the .npz layout grows by all of them). ~18 MB of frames, so allocator noise of a few
    hundred kB cannot decide the ratio."""
    settings = dict(episodes=10, max_steps=150, image_size=64)
    paths = (collect(tmp_path / "big.npz", **settings), collect(tmp_path / "big_dir", **settings))
    code = (
        "import sys, torch; from benchmark import rss_bytes; from minigrid_dataset import MiniGridTransitions;"
        "b = rss_bytes(); d = MiniGridTransitions(sys.argv[1]); print((rss_bytes() - b) / d.frame_bytes)"
    )
    growth = {}
    for path in paths:
        proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        growth[path.suffix] = float(proc.stdout.strip().splitlines()[-1])
    assert growth[".npz"] > 0.8 and growth[""] < 0.3, growth


def test_rewriting_a_directory_replaces_it_whole(tmp_path):
    out = collect(tmp_path / "d", episodes=3, max_steps=10)
    first = MiniGridTransitions(out)
    out = collect(tmp_path / "d", episodes=2, max_steps=10, overwrite=True)
    assert len(MiniGridTransitions(out)) < len(first) and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_directories_are_one_line_errors(tmp_path, both_layouts):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("minigrid_dataset.py", empty), "without .npy arrays")
    broken = tmp_path / "broken"
    shutil.copytree(both_layouts[1], broken)
    (broken / "obs.npy").write_bytes(b"not an array")
    assert_one_line_error(run("minigrid_dataset.py", broken), "damaged")
    assert_one_line_error(run("collect_minigrid_data.py", "--out", tmp_path / "x.h5"), "must end in .npz")


# ----------------------------------------------------------------------------- a directory of shards


def test_a_directory_of_datasets_loads_as_one_without_copying_frames(tmp_path):
    """Datasets collected apart (other seeds, other machines) under one directory are one
    dataset: every transition's obs and next_obs is the one its own shard gives, episodes stay
    distinct, and the frames stay memory-mapped in their shards."""
    root = tmp_path / "big"
    parts = [collect(root / f"part{i}", seed=10 * i, episodes=3 + i, max_steps=15) for i in range(3)]
    whole = MiniGridTransitions(root)
    singles = [MiniGridTransitions(p) for p in parts]
    assert len(whole) == sum(map(len, singles)) and whole.meta["shards"] == 3
    assert whole.frame_bytes == sum(s.frame_bytes for s in singles) and whole.memory_mapped
    assert len(np.unique(whole.episode)) == sum(len(np.unique(s.episode)) for s in singles)
    at = 0
    for single in singles:
        idx = list(range(len(single)))
        a, b = single.__getitems__(idx), whole.__getitems__([at + i for i in idx])
        for key in ("obs", "next_obs", "action", "reward", "done", "agent_pos"):
            assert torch.equal(a[key], b[key]), key
        at += len(single)
    shuffled = np.random.default_rng(0).permutation(len(whole))[:50].tolist()
    assert torch.equal(whole.__getitems__(shuffled)["obs"], torch.from_numpy(whole.obs.numpy()[shuffled]))


def test_training_reads_a_directory_of_shards(tmp_path, in_process):
    root = tmp_path / "big"
    for i in range(2):
        collect(root / f"part{i}", seed=i * 100, episodes=4)
    in_process("train_jepa.py", "--data", root, "--epochs", "1", "--batch-size", "16", "--out-dir", tmp_path / "run")
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["data_meta"]["shards"] == 2


def test_shards_with_different_frames_are_one_line_error(tmp_path):
    root = tmp_path / "big"
    collect(root / "a", episodes=2)
    collect(root / "b", episodes=2, image_size=16)
    assert_one_line_error(run("minigrid_dataset.py", root), "shard", "must match")


def test_shards_without_a_recorded_action_space_load(tmp_path):
    """meta may record `action_space: null` (the loader accepts it for one file): so must the shard merge."""
    root = tmp_path / "big"
    for i in range(2):
        part = collect(root / f"part{i}", seed=i, episodes=2, max_steps=10)
        meta = json.loads((part / "meta.json").read_text())
        meta["action_space"] = None
        (part / "meta.json").write_text(json.dumps(meta))
    data = MiniGridTransitions(root)
    assert data.meta["shards"] == 2 and data.num_actions >= int(data.fields["action"].max()) + 1


def test_a_copied_shard_is_refused(tmp_path):
    """The same episodes twice would land in training and validation alike."""
    root = tmp_path / "big"
    collect(root / "a", episodes=2, max_steps=10)
    shutil.copytree(root / "a", root / "a_copy")
    assert_one_line_error(run("minigrid_dataset.py", root), "hold the same episodes")
    collect(root / "b", seed=7, episodes=2, max_steps=10)
    shutil.rmtree(root / "a_copy")
    assert MiniGridTransitions(root).meta["shards"] == 2
