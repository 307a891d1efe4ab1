"""Parallel collection (--num-envs): worker processes play episodes, the parent writes them in
episode order, so the file holds exactly what one process writes with the same seed."""

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, collect, load_npz, ok, run


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
