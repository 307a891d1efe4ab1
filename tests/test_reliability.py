"""Issue 9, reliability: every bad input is answered clearly. One table enumerates the bad inputs
(data files, checkpoints, envs, output locations, flag values) and runs each through the real
command line of the stage that meets it; property-based tests then throw generated malformed
arrays at the data loader.

The contract for every bad input: exit code 2, exactly one stderr line starting `error: ` that
names the problem, no traceback, no warning that would print, and nothing good on disk changed:
the good dataset, array directory and run directories the cases read are hashed once and checked
after every case, and every good file a case points a writing stage at (a run to --overwrite or
--resume, an output directory, a data file to replace) is a copy hashed before and after.

The table runs in-process through `wm_common.run_cli` with the arguments each script's
`__main__` block passes (a torch import per case would cost ~3 s); END_TO_END rows also run as
real subprocesses. Rows marked xfail are bugs in files outside this task, each described in its
reason; strict, so a fix turns them into failures until the mark is removed.
"""

import dataclasses
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_one_line_error, collect, load_npz, run, write_npz
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import collect_minigrid_data
import inspect_jepa_model
import minigrid_dataset
import plan_with_world_model
import train_encdec
import train_jepa
import training
import wm_common
from collect_minigrid_data import assemble, episode_arrays, write_array_dir
from minigrid_dataset import MAX_DISCRETE_ACTIONS, MiniGridTransitions, make_loaders, summary
from wm_common import UserError

# ----------------------------------------------------------------------------- the stages' command lines

# name -> (script file, module, config class, the keyword arguments its __main__ block gives run_cli)
SCRIPTS = {
    "collect": (
        "collect_minigrid_data.py",
        collect_minigrid_data,
        collect_minigrid_data.CollectConfig,
        dict(aliases=collect_minigrid_data.CONFIG_ALIASES, ignored=collect_minigrid_data.TRAINER_KEYS),
    ),
    "summary": ("minigrid_dataset.py", minigrid_dataset, minigrid_dataset.SummaryConfig, {}),
    "train_jepa": (
        "train_jepa.py",
        train_jepa,
        train_jepa.TrainConfig,
        dict(aliases=training.SEED000_ALIASES, ignored=training.SEED000_COLLECTION_KEYS + train_jepa.ENCDEC_KEYS),
    ),
    "train_encdec": (
        "train_encdec.py",
        train_encdec,
        train_encdec.EncDecTrainConfig,
        dict(aliases=training.SEED000_ALIASES, ignored=training.SEED000_COLLECTION_KEYS + train_encdec.JEPA_KEYS),
    ),
    "inspect": ("inspect_jepa_model.py", inspect_jepa_model, inspect_jepa_model.InspectConfig, {}),
    "plan": ("plan_with_world_model.py", plan_with_world_model, plan_with_world_model.PlanConfig, {}),
}
# small models and one epoch: were a bad input accepted, the run would still end quickly
FAST = ["--epochs", "1", "--batch-size", "16", "--latent-dim", "16", "--device", "cpu", "--log-every", "100", "--seed", "0"]
SMALL_VIT = ["--patch-size", "8", "--num-heads", "2", "--mlp-dim", "32", "--num-encoder-layers", "1"]
SMALL_ENCDEC = [*SMALL_VIT, "--decoder-dim", "16", "--num-decoder-layers", "1", "--num-examples", "2"]
# the warnings Python hides by default outside __main__; any other would print one more stderr line
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def call(script: str, argv: list) -> int:
    """Runs a stage's command line in-process and returns its exit code (0 when it returns).
    Any exception but SystemExit propagates and fails the test: a user would see a traceback."""
    _, module, cfg_cls, kw = SCRIPTS[script]
    try:
        wm_common.run_cli(module.main, cfg_cls, argv=[str(a) for a in argv], **kw)
    except SystemExit as e:
        return 0 if e.code is None else e.code
    return 0


def assert_one_line_error_in_process(script: str, argv: list, capsys, *fragments: str) -> str:
    """conftest.assert_one_line_error for an in-process run, plus: no warning that would print."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = call(script, argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    shown = [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    assert not shown, [f"{w.category.__name__}: {w.message}" for w in shown]
    return lines[0]


def digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under root: any change, addition or removal shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- good files


@dataclasses.dataclass
class World:
    """Good artefacts the cases read. None may change; a case that points a writing stage at one
    gets a copy (`keep`), checked the same way."""

    root: Path
    data: Path  # the tiny dataset, 32x32 frames
    arrays: dict[str, np.ndarray]  # its arrays (copy before changing)
    data_dir: Path  # the same transitions in the collector's directory layout
    data16: Path  # a dataset of 16x16 frames
    jepa: Path  # a CNN JEPA run directory trained on `data`
    encdec: Path  # an encoder-decoder run directory trained on `data`
    inspection: Path  # an inspect --out-dir holding an earlier eval.json
    planning: Path  # a plan --out-dir holding an earlier plan.json
    afile: Path  # a regular file: afile/x cannot be created, whoever runs the tests
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)

    def keep(self, path: Path, tmp: Path) -> Path:
        """A copy of a good artefact under tmp/good/ (made once per case)."""
        dst = tmp / "good" / path.relative_to(self.root)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, dst)
        return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_npz) -> World:
    root = tmp_path_factory.mktemp("reliability_world")
    data = root / "data" / "good.npz"
    data.parent.mkdir()
    shutil.copy(tiny_npz, data)
    arrays = load_npz(data)
    write_array_dir(root / "data" / "good_dir", arrays)
    w = World(
        root=root,
        data=data,
        arrays=arrays,
        data_dir=root / "data" / "good_dir",
        data16=collect(root / "data" / "small16.npz", image_size=16, episodes=4, max_steps=12),
        jepa=root / "runs" / "jepa",
        encdec=root / "runs" / "encdec",
        inspection=root / "inspection",
        planning=root / "planning",
        afile=root / "afile.txt",
    )
    assert call("train_jepa", ["--data", data, "--out-dir", w.jepa, *FAST]) == 0
    assert call("train_encdec", ["--data", data, "--out-dir", w.encdec, *FAST, *SMALL_ENCDEC]) == 0
    for d, name in ((w.inspection, "eval.json"), (w.planning, "plan.json")):
        d.mkdir()
        (d / name).write_text('{"earlier": "results"}\n')
    w.afile.write_text("a regular file\n")
    w.hashes = digest(root)
    return w


# ----------------------------------------------------------------------------- bad files and command lines


def bad_npz(w: World, tmp: Path, drop: tuple[str, ...] = (), **changes: np.ndarray) -> Path:
    """The good dataset's arrays with keys dropped or replaced, as tmp/bad.npz."""
    arrays = {k: v for k, v in w.arrays.items() if k not in drop}
    arrays.update(changes)
    return write_npz(tmp / "bad.npz", **arrays)


def truncated(src: Path, dst: Path, end: int | None = None) -> Path:
    """The first half of src (or its bytes up to `end`) as dst."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) // 2 if end is None else end])
    return dst


def zeroed_middle(src: Path, dst: Path) -> Path:
    """src with 64 bytes in its middle zeroed: a real zip whose member's contents are damaged."""
    raw = bytearray(src.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    dst.write_bytes(bytes(raw))
    return dst


def random_bytes(dst: Path, n: int = 4096) -> Path:
    dst.write_bytes(np.random.default_rng(0).bytes(n))
    return dst


def damaged_dir(w: World, tmp: Path, damage: Callable[[Path], object]) -> Path:
    """A copy of the good array directory with `damage(dir)` done to it."""
    d = tmp / "arrays"
    shutil.copytree(w.data_dir, d)
    damage(d)
    return d


def with_action(w: World, row: int, value: int) -> np.ndarray:
    return poked(w, "action", row, value)


def poked(w: World, key: str, row: int, value: int) -> np.ndarray:
    """The good dataset's `key` array with one row set to `value`."""
    a = w.arrays[key].copy()
    a[row] = value
    return a


def vector_actions(w: World) -> np.ndarray:
    return np.zeros((len(w.arrays["obs"]), 2), np.float32)


def twelve_actions(w: World, tmp: Path) -> Path:
    """The good frames with a 9 among the actions and a recorded space of 12 (the model has 7)."""
    meta = {"env": "MiniGrid-Empty-8x8-v0", "action_space": {"type": "discrete", "n": 12}}
    return bad_npz(w, tmp, action=with_action(w, 3, 9), meta=np.array(json.dumps(meta)))


def legacy_with_short_next_obs(w: World, tmp: Path) -> Path:
    """Seed 003's layout (a full next_obs array) whose next_obs has one frame fewer than obs."""
    kept = {k: w.arrays[k] for k in ("obs", "action", "reward", "done")}
    return write_npz(tmp / "bad.npz", next_obs=w.arrays["obs"][:-1], **kept)


def empty_npz(tmp: Path) -> Path:
    """Every array a transitions file needs, each with no rows, and no meta."""
    frames = np.zeros((0, 32, 32, 3), np.uint8)
    rows = dict(action=np.zeros(0, np.int64), reward=np.zeros(0, np.float32), done=np.zeros(0, bool), episode=np.zeros(0, np.int64))
    return write_npz(tmp / "empty.npz", obs=frames, terminal_obs=frames, next_obs_index=np.zeros(0, np.int64), **rows)


def small_collection(tmp: Path, **kw) -> Path:
    return collect(tmp / "small.npz", **{**TINY, **kw})


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): code run at load time, which is what
    torch.load(weights_only=True) exists to stop."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickled_code_checkpoint(w: World, tmp: Path) -> Path:
    """A real checkpoint (every key present) whose data_meta also holds a code-running object;
    loading it unsafely creates tmp/MARKER."""
    ckpt = torch.load(w.jepa / "model.pt", map_location="cpu", weights_only=True)
    ckpt["data_meta"] = dict(ckpt["data_meta"], note=_OpensAFile(tmp / "MARKER"))
    path = tmp / "evil" / "model.pt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path


def run_dir_with(tmp: Path, make: Callable[[Path], object]) -> Path:
    """tmp/run/ holding a model.pt made by `make(path)`."""
    (tmp / "run").mkdir()
    make(tmp / "run" / "model.pt")
    return tmp / "run"


def yaml_file(tmp: Path, text: str) -> Path:
    p = tmp / "config.yaml"
    p.write_text(text)
    return p


def saved(obj, path: Path) -> Path:
    """obj written to path: np.save for .npy, torch.save otherwise."""
    if path.suffix == ".npy":
        np.save(path, obj)
    else:
        torch.save(obj, path)
    return path


def train(w: World, t: Path, data, *extra) -> list:
    """train_jepa onto a copy of the good JEPA run with --overwrite: were the input accepted, the
    earlier run would be moved aside and replaced."""
    return ["--data", data, "--out-dir", w.keep(w.jepa, t), "--overwrite", *FAST, *extra]


def resume(w: World, t: Path, run: Path, data=None, *extra) -> list:
    """--resume of a copy of a good run."""
    return ["--data", data or w.data, "--out-dir", w.keep(run, t), "--resume", *FAST, *extra]


def inspect(w: World, t: Path, *extra, checkpoint=None, data=None) -> list:
    argv = ["--checkpoint", checkpoint or w.jepa, "--out-dir", w.keep(w.inspection, t), "--device", "cpu", "--max-samples", "64"]
    return argv + (["--data", data] if data else []) + list(extra)


def plan(w: World, t: Path, *extra, checkpoint=None) -> list:
    base = ["--checkpoint", checkpoint or w.jepa, "--out-dir", w.keep(w.planning, t), "--device", "cpu", "--episodes", "1"]
    return [*base, "--horizon", "1", *extra]


def collect_into(w: World, t: Path, *extra, out=None) -> list:
    """collect onto a copy of the good dataset (or `out`)."""
    return ["--episodes", "1", "--max-steps", "3", "--image-size", "16", "--out", out or w.keep(w.data, t), *extra]


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    id: str
    script: str
    argv: Callable[[World, Path], list]  # (good files, a fresh tmp dir) -> the command line
    fragments: tuple[str, ...]  # what the error line must say
    marker: bool = False  # the case carries a code-running pickle: tmp/MARKER must not appear


def case(id, script, argv, *fragments, marker=False, bug=None):
    marks = [pytest.mark.xfail(strict=True, reason=f"bug: {bug}")] if bug else []
    return pytest.param(Case(id, script, argv, fragments, marker), id=id, marks=marks)


CASES = [
    # --- data files ----------------------------------------------------------------------------
    case("truncated_npz", "train_jepa", lambda w, t: train(w, t, truncated(w.data, t / "cut.npz")), "cut.npz", "collect_minigrid_data.py"),
    case(
        "truncated_npz_tail",
        "summary",
        lambda w, t: [truncated(w.data, t / "tail.npz", -100)],
        "tail.npz is not a readable .npz",
        "collect_minigrid_data.py",
    ),
    case(
        "truncated_npz_header",
        "summary",
        lambda w, t: [truncated(w.data, t / "head.npz", 40)],
        "head.npz is not a readable .npz",
        "collect_minigrid_data.py",
    ),
    case("zip_member_damaged", "summary", lambda w, t: [zeroed_middle(w.data, t / "flipped.npz")], "flipped.npz is not a readable .npz"),
    case(
        "random_bytes_npz",
        "train_jepa",
        lambda w, t: train(w, t, random_bytes(t / "noise.npz")),
        "noise.npz",
        "not an .npz (not a zip archive)",
        "re-run collect_minigrid_data.py",
    ),
    case("empty_file_npz", "summary", lambda w, t: [random_bytes(t / "empty.npz", 0)], "empty.npz", "not an .npz (empty)"),
    case("missing_data_file", "train_jepa", lambda w, t: train(w, t, t / "nowhere.npz"), "nowhere.npz", "not found"),
    case("wrong_keys", "train_jepa", lambda w, t: train(w, t, write_npz(t / "weights.npz", w1=np.zeros(3))), "lacks keys", "has w1"),
    case("missing_next_obs_keys", "summary", lambda w, t: [bad_npz(w, t, drop=("next_obs_index",))], "lacks keys next_obs"),
    *(
        case(f"missing_key_{key}", "summary", lambda w, t, key=key: [bad_npz(w, t, drop=(key,))], f"lacks keys {key} (has")
        for key in ("obs", "action", "reward", "done")
    ),
    case(
        "pickled_object_array_in_npz",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, episode=np.array([{"a": 1}] * len(w.arrays["obs"]), dtype=object))),
        "not a readable .npz",
    ),
    case("npy_file_as_data", "summary", lambda w, t: [w.data_dir / "obs.npy"], "obs.npy is not an .npz (a single .npy array)"),
    case("checkpoint_as_data", "train_jepa", lambda w, t: train(w, t, w.jepa / "model.pt"), "model.pt", "lacks keys"),
    case("run_dir_as_data", "summary", lambda w, t: [w.jepa], "directory without .npy arrays"),
    case("float_obs", "train_jepa", lambda w, t: train(w, t, bad_npz(w, t, obs=w.arrays["obs"] / 255.0)), "'obs' must be uint8", "float64"),
    case(
        "float32_obs",
        "summary",
        lambda w, t: [bad_npz(w, t, obs=w.arrays["obs"].astype(np.float32) / 255)],
        "'obs' must be uint8",
        "float32",
    ),
    case(
        "float_discrete_actions",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, action=w.arrays["action"].astype(np.float32))),
        "'action' must be integers",
    ),
    case(
        "string_actions",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, action=w.arrays["action"].astype(str))),
        "'action' must be integers",
        "<U",
    ),
    case("string_obs", "summary", lambda w, t: [bad_npz(w, t, obs=np.full(len(w.arrays["obs"]), "frame"))], "'obs' must be uint8"),
    case(
        "string_rewards",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, reward=np.full(len(w.arrays["obs"]), "none"))),
        "'reward' must be numbers",
    ),
    case("string_dones", "train_jepa", lambda w, t: train(w, t, bad_npz(w, t, done=w.arrays["done"].astype(str))), "'done' must be bool"),
    case(
        "complex_rewards",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, reward=w.arrays["reward"].astype(np.complex64))),
        "'reward' must be numbers",
    ),
    case(
        "obs_3d",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, obs=w.arrays["obs"][..., 0])),
        "'obs' must be uint8 frames [N,H,W,C]",
        "[240, 32, 32]",
    ),
    case(
        "obs_scalar",
        "summary",
        lambda w, t: [bad_npz(w, t, obs=np.array(3, np.uint8))],
        "'obs' must be uint8 frames [N,H,W,C]",
        "got uint8 []",
    ),
    case(
        "terminal_obs_smaller_than_obs",
        "summary",
        lambda w, t: [bad_npz(w, t, terminal_obs=w.arrays["terminal_obs"][:, :16])],
        "'terminal_obs' must be uint8 frames like 'obs'",
    ),
    case("legacy_next_obs_rows_differ", "summary", lambda w, t: [legacy_with_short_next_obs(w, t)], "'next_obs' must match 'obs'"),
    case(
        "obs_zero_size_frames",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, obs=w.arrays["obs"][:, :0], terminal_obs=w.arrays["terminal_obs"][:, :0])),
        "at least one pixel",
    ),
    case(
        "action_rows_differ_from_obs_rows",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, action=w.arrays["action"][:-3])),
        "'action' has 237 rows but 'obs' has 240",
    ),
    case("action_scalar", "summary", lambda w, t: [bad_npz(w, t, action=np.array(3))], "'action' must be [N]"),
    case(
        "reward_rows_differ",
        "summary",
        lambda w, t: [bad_npz(w, t, reward=w.arrays["reward"][:-1])],
        "'reward' must have shape [240], got [239]",
    ),
    case(
        "next_obs_index_out_of_range",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, next_obs_index=w.arrays["next_obs_index"] + len(w.arrays["terminal_obs"]))),
        "'next_obs_index' points outside the stored frames",
    ),
    case(
        "next_obs_index_one_past_the_end",
        "summary",
        lambda w, t: [bad_npz(w, t, next_obs_index=poked(w, "next_obs_index", 3, len(w.arrays["obs"]) + len(w.arrays["terminal_obs"])))],
        "'next_obs_index' points outside the stored frames",
    ),
    case(
        "negative_next_obs_index",
        "summary",
        lambda w, t: [bad_npz(w, t, next_obs_index=poked(w, "next_obs_index", 3, -1))],
        "'next_obs_index' points outside the stored frames",
    ),
    case(
        "next_obs_index_rows_differ",
        "summary",
        lambda w, t: [bad_npz(w, t, next_obs_index=w.arrays["next_obs_index"][:-1])],
        "'next_obs_index' must be integers [N=240]",
    ),
    case(
        "episode_ids_wrong_length",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, episode=w.arrays["episode"][1:])),
        "'episode' must be integers",
    ),
    case(
        "agent_pos_one_column",
        "summary",
        lambda w, t: [bad_npz(w, t, agent_pos=w.arrays["agent_pos"][:, 0])],
        "'agent_pos' must have shape [240, 2]",
    ),
    case(
        "agent_pos_strings",
        "inspect",
        lambda w, t: inspect(w, t, data=bad_npz(w, t, agent_pos=w.arrays["agent_pos"].astype(str))),
        "'agent_pos' must be integers",
    ),
    case(
        "empty_dataset",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, **{k: v[:0] for k, v in w.arrays.items() if k != "meta"})),
        "holds no transitions",
    ),
    case("empty_dataset_without_meta", "summary", lambda w, t: [empty_npz(t)], "empty.npz holds no transitions"),
    case(
        "dataset_smaller_than_one_batch",
        "train_jepa",
        lambda w, t: train(w, t, small_collection(t, episodes=3, max_steps=3), "--unroll", "1"),
        "fewer than --batch-size 16",
    ),
    case(
        "single_episode_no_val_split",
        "train_jepa",
        lambda w, t: train(w, t, small_collection(t, episodes=1, max_steps=30)),
        "has 1 episode",
        "at least 2",
    ),
    case(
        "action_outside_recorded_action_space",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, action=with_action(w, 5, 7))),
        "outside the recorded action space of 7",
    ),
    case(
        "action_far_outside_recorded_action_space",
        "summary",
        lambda w, t: [bad_npz(w, t, action=with_action(w, 5, 100))],
        "actions range 0..100",
        "outside the recorded action space of 7",
    ),
    case(
        "negative_action",
        "summary",
        lambda w, t: [bad_npz(w, t, action=with_action(w, 0, -1))],
        "actions range -1..",
        "outside the recorded action space of 7",
    ),
    case(
        "huge_action_ids_without_action_space",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, drop=("meta",), action=with_action(w, 0, 10**9))),
        f"more than {MAX_DISCRETE_ACTIONS} actions",
    ),
    case(
        "nan_continuous_actions",
        "train_jepa",
        lambda w, t: train(
            w, t, bad_npz(w, t, drop=("meta",), action=np.where(np.arange(240)[:, None] == 3, np.nan, 0.5).astype(np.float32))
        ),
        "finite floats",
        "NaN",
    ),
    case(
        "meta_not_json", "train_jepa", lambda w, t: train(w, t, bad_npz(w, t, meta=np.array("{env: oops"))), "'meta' entry that is not JSON"
    ),
    case(
        "meta_not_an_object",
        "summary",
        lambda w, t: [bad_npz(w, t, meta=np.array(json.dumps([1, 2])))],
        "'meta' entry that is not a JSON object",
    ),
    case(
        "pickled_object_meta",
        "summary",
        lambda w, t: [bad_npz(w, t, meta=np.array([{"env": "x"}], dtype=object))],
        "bad.npz is not a readable .npz",
    ),
    case(
        "meta_action_space_not_an_object",
        "train_jepa",
        lambda w, t: train(w, t, bad_npz(w, t, meta=np.array(json.dumps({"action_space": "discrete(7)"})))),
        "'action_space' must be a JSON object",
    ),
    case(
        "meta_action_count_not_a_number",
        "summary",
        lambda w, t: [bad_npz(w, t, meta=np.array(json.dumps({"action_space": {"type": "discrete", "n": "7"}})))],
        "action_space 'n'",
    ),
    case(
        "dir_truncated_npy",
        "train_jepa",
        lambda w, t: train(w, t, damaged_dir(w, t, lambda d: truncated(d / "obs.npy", d / "obs.npy"))),
        "obs.npy is damaged",
    ),
    case(
        "dir_empty_npy",
        "train_jepa",
        lambda w, t: train(w, t, damaged_dir(w, t, lambda d: (d / "action.npy").write_bytes(b""))),
        "action.npy is damaged",
    ),
    case(
        "dir_random_bytes_npy",
        "summary",
        lambda w, t: [damaged_dir(w, t, lambda d: random_bytes(d / "reward.npy", 300))],
        "reward.npy is damaged",
    ),
    case(
        "dir_meta_json_not_text",
        "train_jepa",
        lambda w, t: train(w, t, damaged_dir(w, t, lambda d: (d / "meta.json").write_bytes(b"\xff\xfe\x00{"))),
        "meta.json is not readable text",
    ),
    case(
        "dir_wrong_shape_npy",
        "inspect",
        lambda w, t: inspect(w, t, data=damaged_dir(w, t, lambda d: np.save(d / "reward.npy", np.zeros(7, np.float32)))),
        "'reward' must have shape [240]",
    ),
    case("empty_directory", "train_jepa", lambda w, t: train(w, t, t), "directory without .npy arrays"),
    case("graph_data_truncated", "plan", lambda w, t: plan(w, t, "--graph-data", truncated(w.data, t / "cut.npz")), "cut.npz"),
    # --- checkpoints ---------------------------------------------------------------------------
    case(
        "encdec_checkpoint_to_jepa_resume",
        "train_jepa",
        lambda w, t: resume(w, t, w.encdec),
        "holds a encdec_vit model, expected jepa_cnn",
    ),
    case(
        "jepa_checkpoint_to_encdec_resume",
        "train_encdec",
        lambda w, t: resume(w, t, w.jepa, None, *SMALL_ENCDEC),
        "holds a jepa_cnn model, expected encdec_vit",
    ),
    case(
        "cnn_checkpoint_to_vit_resume",
        "train_jepa",
        lambda w, t: resume(w, t, w.jepa, None, "--arch", "vit", *SMALL_VIT),
        "holds a jepa_cnn model, expected jepa_vit",
    ),
    case(
        "random_bytes_checkpoint",
        "inspect",
        lambda w, t: inspect(w, t, checkpoint=random_bytes(t / "model.pt")),
        "not a readable checkpoint",
    ),
    case(
        "truncated_checkpoint",
        "plan",
        lambda w, t: plan(w, t, checkpoint=truncated(w.jepa / "model.pt", t / "model.pt")),
        "not a readable checkpoint",
    ),
    case(
        "empty_checkpoint_resume",
        "train_jepa",
        lambda w, t: ["--data", w.data, "--out-dir", run_dir_with(t, lambda p: p.write_bytes(b"")), "--resume", *FAST],
        "not a readable checkpoint",
    ),
    case(
        "state_dict_not_a_checkpoint",
        "inspect",
        lambda w, t: inspect(w, t, checkpoint=saved(torch.nn.Linear(2, 2).state_dict(), t / "w.pt")),
        "not a checkpoint of this project",
    ),
    case("data_as_checkpoint", "inspect", lambda w, t: inspect(w, t, checkpoint=w.data), "good.npz is not a readable checkpoint"),
    case("checkpoint_not_found", "inspect", lambda w, t: inspect(w, t, checkpoint=t / "no_run"), "no_run", "not found"),
    case(
        "pickled_code_checkpoint_inspect",
        "inspect",
        lambda w, t: inspect(w, t, checkpoint=pickled_code_checkpoint(w, t)),
        "not a readable checkpoint",
        marker=True,
    ),
    case(
        "pickled_code_checkpoint_resume",
        "train_jepa",
        lambda w, t: ["--data", w.data, "--out-dir", pickled_code_checkpoint(w, t).parent, "--resume", *FAST],
        "not a readable checkpoint",
        marker=True,
    ),
    case(
        "pickled_code_checkpoint_plan",
        "plan",
        lambda w, t: plan(w, t, checkpoint=pickled_code_checkpoint(w, t)),
        "not a readable checkpoint",
        marker=True,
    ),
    case("image_size_mismatch_inspect", "inspect", lambda w, t: inspect(w, t, data=w.data16), "takes frames [32, 32, 3]", "[16, 16, 3]"),
    case(
        "image_size_mismatch_jepa_resume",
        "train_jepa",
        lambda w, t: resume(w, t, w.jepa, w.data16, "--epochs", "2", "--batch-size", "8"),
        "--resume: the run was trained with --data",
        "small16.npz",
    ),
    case(
        "image_size_mismatch_encdec_resume",
        "train_encdec",
        lambda w, t: resume(w, t, w.encdec, w.data16, *SMALL_ENCDEC, "--epochs", "2", "--batch-size", "8"),
        "--resume: the run was trained with --data",
        "small16.npz",
    ),
    case("image_size_mismatch_plan_graph_data", "plan", lambda w, t: plan(w, t, "--graph-data", w.data16), "--graph-data", "[16, 16, 3]"),
    case(
        "goal_image_wrong_shape",
        "plan",
        lambda w, t: plan(w, t, "--goal-obs", saved(np.zeros((16, 16, 3), np.uint8), t / "goal.npy")),
        "--goal-obs",
        "[16, 16, 3]",
    ),
    case("goal_image_random_bytes", "plan", lambda w, t: plan(w, t, "--goal-obs", random_bytes(t / "goal.png")), "not a readable image"),
    case(
        "vector_action_data_for_discrete_model_inspect",
        "inspect",
        lambda w, t: inspect(w, t, data=bad_npz(w, t, drop=("meta",), action=vector_actions(w))),
        "action",
    ),
    case(
        "vector_action_data_for_discrete_model_resume",
        "train_jepa",
        lambda w, t: resume(w, t, w.jepa, bad_npz(w, t, drop=("meta",), action=vector_actions(w)), "--epochs", "2"),
        "--resume: the run was trained with --data",
    ),
    case(
        "lr_schedule_changed_on_resume",
        "train_jepa",
        lambda w, t: resume(w, t, w.jepa, None, "--epochs", "2", "--lr-schedule", "cosine"),
        "--resume: the run was trained with --lr-schedule constant (now cosine)",
    ),
    case(
        "more_actions_than_the_model_inspect",
        "inspect",
        lambda w, t: inspect(w, t, data=twelve_actions(w, t)),
        "action",
    ),
    case(
        "more_actions_than_the_model_resume",
        "train_jepa",
        lambda w, t: resume(w, t, w.jepa, twelve_actions(w, t), "--epochs", "2"),
        "--resume: the run was trained with --data",
    ),
    # --- envs and output locations ---------------------------------------------------------------
    case("unknown_env_id", "collect", lambda w, t: collect_into(w, t, "--env", "MiniGrid-NoSuchRoom-v0"), "unknown env id", "NoSuchRoom"),
    case("plan_unknown_env_id", "plan", lambda w, t: plan(w, t, "--env", "NoSuchEnv-v9"), "unknown env id"),
    case("plan_non_minigrid_env", "plan", lambda w, t: plan(w, t, "--env", "CartPole-v1"), "not a MiniGrid env"),
    case("collect_out_under_a_file", "collect", lambda w, t: collect_into(w, t, out=w.afile / "out.npz"), "cannot create output directory"),
    case(
        "collect_out_dir_layout_under_a_file",
        "collect",
        lambda w, t: collect_into(w, t, out=w.afile / "sub" / "arrays"),
        "cannot create output directory",
    ),
    case(
        "collect_out_is_the_working_directory",
        "collect",
        lambda w, t: collect_into(w, t, out="."),
        "--out",
    ),
    case("collect_out_bad_suffix", "collect", lambda w, t: collect_into(w, t, out=t / "data.txt"), "must end in .npz"),
    case(
        "collect_out_is_an_existing_run_dir",
        "collect",
        lambda w, t: collect_into(w, t, out=w.keep(w.jepa, t)),
        "--out",
    ),
    case(
        "train_out_dir_under_a_file",
        "train_jepa",
        lambda w, t: ["--data", w.data, "--out-dir", w.afile / "run", *FAST],
        "cannot create --out-dir",
    ),
    case("inspect_out_dir_under_a_file", "inspect", lambda w, t: inspect(w, t, "--out-dir", w.afile / "insp"), "cannot create --out-dir"),
    case("plan_out_dir_under_a_file", "plan", lambda w, t: plan(w, t, "--out-dir", w.afile / "plan"), "cannot create --out-dir"),
    case(
        "train_existing_run_without_resume_or_overwrite",
        "train_jepa",
        lambda w, t: ["--data", w.data, "--out-dir", w.keep(w.jepa, t), *FAST],
        "already holds a run",
    ),
    # --- flag values ---------------------------------------------------------------------------
    case("negative_epochs", "train_jepa", lambda w, t: train(w, t, w.data, "--epochs", "-1"), "--epochs must be at least 1"),
    case(
        "zero_epochs", "train_encdec", lambda w, t: ["--data", w.data, "--out-dir", w.keep(w.encdec, t), *FAST, "--epochs", "0"], "--epochs"
    ),
    case("zero_batch_size", "train_jepa", lambda w, t: train(w, t, w.data, "--batch-size", "0"), "--batch-size must be at least 1"),
    case("negative_batch_size", "train_jepa", lambda w, t: train(w, t, w.data, "--batch-size", "-4"), "--batch-size"),
    case(
        "val_fraction_zero", "train_jepa", lambda w, t: train(w, t, w.data, "--val-fraction", "0"), "--val-fraction must be between 0 and 1"
    ),
    case("val_fraction_above_one", "train_jepa", lambda w, t: train(w, t, w.data, "--val-fraction", "1.5"), "--val-fraction"),
    case("val_fraction_nan", "train_jepa", lambda w, t: train(w, t, w.data, "--val-fraction", "nan"), "--val-fraction"),
    case(
        "val_fraction_not_a_number",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--val-fraction", "half"),
        "--val-fraction",
        "invalid float",
    ),
    case("unknown_arch", "train_jepa", lambda w, t: train(w, t, w.data, "--arch", "transformer"), "--arch", "invalid choice"),
    case("epochs_not_a_number", "train_jepa", lambda w, t: train(w, t, w.data, "--epochs", "five"), "--epochs", "invalid int"),
    case("zero_lr", "train_jepa", lambda w, t: train(w, t, w.data, "--lr", "0"), "--lr must be positive"),
    case("zero_log_every", "train_jepa", lambda w, t: train(w, t, w.data, "--log-every", "0"), "--log-every"),
    case("unknown_device", "train_jepa", lambda w, t: train(w, t, w.data, "--device", "tpu"), "--device", "invalid choice"),
    case("unknown_flag", "train_jepa", lambda w, t: train(w, t, w.data, "--no-such-flag", "1"), "unrecognized arguments"),
    case("negative_num_workers", "train_jepa", lambda w, t: train(w, t, w.data, "--num-workers", "-1"), "--num-workers"),
    case(
        "vit_heads_do_not_divide_latent",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--arch", "vit", *SMALL_VIT, "--num-heads", "3"),
        "num_heads",
    ),
    case(
        "yaml_unknown_key",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--config", yaml_file(t, "learning_rat: 0.1\n")),
        "unknown keys learning_rat",
    ),
    case("yaml_not_a_mapping", "train_jepa", lambda w, t: train(w, t, w.data, "--config", yaml_file(t, "- 1\n- 2\n")), "must be a mapping"),
    case("collect_zero_episodes", "collect", lambda w, t: collect_into(w, t, "--episodes", "0"), "--episodes must be at least 1"),
    case("collect_zero_max_steps", "collect", lambda w, t: collect_into(w, t, "--max-steps", "0"), "--max-steps must be at least 1"),
    case("collect_tiny_image_size", "collect", lambda w, t: collect_into(w, t, "--image-size", "4"), "--image-size 4"),
    case("inspect_zero_probe_horizon", "inspect", lambda w, t: inspect(w, t, "--probe-horizons", "0"), "--probe-horizons"),
    case("plan_zero_horizon", "plan", lambda w, t: plan(w, t, "--horizon", "0"), "--horizon must be at least 1"),
    case("plan_zero_max_steps", "plan", lambda w, t: plan(w, t, "--max-steps", "0"), "--max-steps must be at least 1"),
    case("plan_elites_above_samples", "plan", lambda w, t: plan(w, t, "--planner", "cem", "--samples", "4", "--elites", "8"), "--elites"),
    case(
        "negative_weight_decay",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--weight-decay", "-1"),
        "--weight-decay",
    ),
    case(
        "nan_lr",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--lr", "nan"),
        "--lr",
    ),
    case(
        "negative_seed",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--seed", "-1"),
        "--seed",
    ),
    case(
        "collect_negative_seed",
        "collect",
        lambda w, t: collect_into(w, t, "--seed", "-5"),
        "--seed",
    ),
    case(
        "plan_negative_seed",
        "plan",
        lambda w, t: plan(w, t, "--seed", "-5"),
        "--seed",
    ),
    case(
        "zero_latent_dim",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--latent-dim", "0"),
        "--latent-dim",
    ),
    case(
        "vit_zero_patch_size",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--arch", "vit", *SMALL_VIT, "--patch-size", "0"),
        "--patch-size",
    ),
    case(
        "ema_decay_above_one",
        "train_jepa",
        lambda w, t: train(w, t, w.data, "--ema-decay", "1.5"),
        "--ema-decay",
    ),
    case(
        "inspect_zero_max_samples",
        "inspect",
        lambda w, t: inspect(w, t, "--max-samples", "0"),
        "--max-samples",
    ),
    case(
        "inspect_zero_batch_size",
        "inspect",
        lambda w, t: inspect(w, t, "--batch-size", "0"),
        "--batch-size",
    ),
]
# rows that also run as real subprocesses (each a fresh Python importing torch, ~2-3 s)
END_TO_END = ["truncated_npz", "pickled_code_checkpoint_inspect", "unknown_env_id", "image_size_mismatch_plan_graph_data"]
CASE_BY_ID = {p.id: p.values[0] for p in CASES}


def check_case(c: Case, w: World, tmp: Path, expect_error: Callable[[list], object]) -> None:
    argv = c.argv(w, tmp)
    kept = digest(tmp / "good") if (tmp / "good").exists() else {}
    expect_error(argv)
    if kept:
        assert digest(tmp / "good") == kept, "a bad input changed the good files it was pointed at"
    assert digest(w.root) == w.hashes, "a bad input changed good files it read"
    if c.marker:
        assert not (tmp / "MARKER").exists(), "loading the checkpoint ran code from its pickle"


@pytest.mark.parametrize("c", CASES)
def test_bad_input_is_one_line_error(c, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stage falling back to a relative default path writes here, not into the repo
    work = tmp_path / "case"
    work.mkdir()
    check_case(c, world, work, lambda argv: assert_one_line_error_in_process(c.script, argv, capsys, *c.fragments))


@pytest.mark.parametrize("case_id", END_TO_END)
def test_bad_input_end_to_end(case_id, world, tmp_path):
    c = CASE_BY_ID[case_id]
    check_case(c, world, tmp_path, lambda argv: assert_one_line_error(run(SCRIPTS[c.script][0], *argv), *c.fragments))


def test_the_pickled_checkpoint_would_run_code_without_weights_only(world, tmp_path):
    """The payload of the pickled_code_* rows is a real threat: an unsafe load runs it."""
    torch.load(pickled_code_checkpoint(world, tmp_path), map_location="cpu", weights_only=False)
    assert (tmp_path / "MARKER").exists()


def test_the_table_covers_the_issue_list():
    ids = [p.id for p in CASES]
    issue = {
        "truncated_npz",
        "random_bytes_npz",
        "empty_file_npz",
        "wrong_keys",
        "float_obs",
        "float_discrete_actions",
        "string_actions",
        "obs_3d",
        "action_rows_differ_from_obs_rows",
        "next_obs_index_out_of_range",
        "empty_dataset",
        "dataset_smaller_than_one_batch",
        "single_episode_no_val_split",
        "action_outside_recorded_action_space",
        "meta_not_json",
        "dir_truncated_npy",
        "empty_directory",
        "encdec_checkpoint_to_jepa_resume",
        "jepa_checkpoint_to_encdec_resume",
        "random_bytes_checkpoint",
        "truncated_checkpoint",
        "image_size_mismatch_inspect",
        "image_size_mismatch_plan_graph_data",
        "image_size_mismatch_jepa_resume",
        "unknown_env_id",
        "collect_out_under_a_file",
        "negative_epochs",
        "zero_batch_size",
        "val_fraction_above_one",
        "unknown_arch",
        "pickled_code_checkpoint_inspect",
    }
    assert issue <= set(ids), issue - set(ids)
    assert len(set(ids)) == len(ids), "duplicate ids"
    assert set(END_TO_END) <= set(ids)


# ----------------------------------------------------------------------------- property tests: the loader

PROPERTY = settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [
    np.uint8,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.complex64,
    np.dtype("<U3"),
    np.dtype("S3"),
    np.dtype(">i8"),
    np.dtype(">f4"),
    np.dtype(">u2"),
]
FIELD_DTYPES = {torch.uint8, torch.int64, torch.float32, torch.bool}
BAD_META = [
    "{not json",
    "[1, 2]",
    "null",
    '"a string"',
    "NaN",
    "[" * 50_000 + "]" * 50_000,
    '{"action_space": "discrete"}',
    '{"action_space": null}',
    '{"action_space": {"n": "7"}}',
    '{"action_space": {"n": 0}}',
    '{"action_space": {"n": true}}',
    '{"action_space": {"n": 1}}',
    '{"action_space": {"n": 100000000}}',
    '{"action_space": {"type": "box", "shape": [3], "low": [0, 0, 0], "high": [1, 1, 1]}}',
    '{"action_space": {"type": "box", "shape": 2}}',
    '{"action_space": {"low": "x", "high": [1]}}',
    '{"action_space": {"low": [[0]], "high": [1]}}',
    '{"action_space": {"low": 0.9, "high": 1.0}}',
    '{"action_space": {"type": "discrete", "n": 7}}',
    '{"config": "image_size=32"}',
    '{"env": 5, "obs_mode": ["rgb"]}',
]


@dataclasses.dataclass
class Spec:
    lengths: list[int]  # transitions per episode
    frame: tuple[int, int, int]  # H, W, C
    action_dim: int | None  # None: discrete
    n_actions: int
    layout: str  # "compact" (the collector's) or "legacy" (seed 003's: full next_obs, old key names, no episode ids)
    meta: bool
    seed: int


specs = st.builds(
    Spec,
    lengths=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    frame=st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from([1, 3])),
    action_dim=st.one_of(st.none(), st.integers(1, 2)),
    n_actions=st.integers(1, 7),
    layout=st.sampled_from(["compact", "legacy"]),
    meta=st.booleans(),
    seed=st.integers(0, 2**16),
)


def build(spec: Spec) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """A valid dataset for `spec`: (arrays as a file holds them, the true obs_t+1 of every
    transition, the true episode of every transition). Every frame is a different constant
    image, so a wrong next frame cannot pass for the right one."""
    rng = np.random.default_rng(spec.seed)
    episodes, frame_id = [], 0
    for t in spec.lengths:
        frames = np.stack([np.full(spec.frame, frame_id + k, np.uint8) for k in range(t + 1)])
        frame_id += t + 1
        if spec.action_dim is None:
            actions = rng.integers(0, spec.n_actions, t)
        else:
            actions = rng.uniform(-1, 1, (t, spec.action_dim)).astype(np.float32)
        episodes.append(episode_arrays(frames, actions, list(rng.random(t)), [bool(rng.random() < 0.5) for _ in range(t)]))
    if spec.action_dim is None:
        space = {"type": "discrete", "n": spec.n_actions}
    else:
        space = {"type": "box", "shape": [spec.action_dim], "low": [-1.0] * spec.action_dim, "high": [1.0] * spec.action_dim}
    arrays = assemble(episodes, {"env": "MiniGrid-Empty-8x8-v0", "action_space": space})
    truth = np.concatenate([np.concatenate([e["obs"][1:], e["terminal_obs"]]) for e in episodes])
    episode = arrays["episode"].copy()
    if spec.layout == "legacy":
        legacy = {
            "obs": arrays["obs"],
            "actions": arrays["action"],
            "rewards": arrays["reward"],
            "dones": arrays["done"],
            "next_obs": truth,
        }
        arrays = {**legacy, "meta": arrays["meta"]}
    if not spec.meta:
        arrays.pop("meta", None)
    return arrays, truth, episode


def write(arrays: dict[str, np.ndarray], where: Path, storage: str, meta_bytes: bytes | None = None, cut: float | None = None) -> Path:
    """Writes arrays as an .npz (np.savez: exactly these keys) or as the collector's directory
    layout; `meta_bytes` replaces meta.json raw, `cut` truncates the file (or one array file)."""
    if where.is_dir():
        shutil.rmtree(where)
    elif where.exists():
        where.unlink()
    if storage == "npz":
        with where.open("wb") as f:
            np.savez(f, **arrays)
        victim = where
    else:
        where.mkdir()
        for k, v in arrays.items():
            if k == "meta":
                (where / "meta.json").write_text(str(v))
            else:
                np.save(where / f"{k}.npy", v)
        if meta_bytes is not None:
            (where / "meta.json").write_bytes(meta_bytes)
        files = sorted(where.glob("*.npy"))
        victim = files[len(files) // 2] if files else None
    if cut is not None and victim is not None:
        raw = victim.read_bytes()
        victim.write_bytes(raw[: int(len(raw) * cut)])
    return where


def check_loaded(data: MiniGridTransitions) -> None:
    """A dataset the loader accepted serves batches of the documented shapes and dtypes."""
    n = len(data)
    assert n >= 1
    h, w, c = data.frame_shape
    assert min(h, w, c) >= 1
    b = data.__getitems__(list(range(n)))
    assert b["obs"].dtype == torch.uint8 and b["obs"].shape == (n, h, w, c)
    assert b["next_obs"].dtype == torch.uint8 and b["next_obs"].shape == (n, h, w, c)
    act = b["action"]
    assert 1 <= data.num_actions <= MAX_DISCRETE_ACTIONS
    if data.continuous_actions:
        assert act.dtype == torch.float32 and act.shape == (n, data.num_actions) and torch.isfinite(act).all()
    else:
        assert act.dtype == torch.int64 and act.shape == (n,) and 0 <= int(act.min()) and int(act.max()) < data.num_actions
    assert b["reward"].dtype == torch.float32 and b["reward"].shape == (n,)
    assert b["done"].dtype == torch.bool and b["done"].shape == (n,)
    assert b["episode"].dtype == torch.int64 and b["episode"].shape == (n,)
    for k, v in b.items():
        assert v.shape[0] == n and v.dtype in FIELD_DTYPES, (k, v.dtype, tuple(v.shape))
    one = data[n - 1]
    assert one["obs"].shape == (h, w, c)
    assert isinstance(summary(data), str)


def assert_one_line(e: UserError) -> None:
    msg = str(e)
    assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)


def load_or_refuse(path: Path) -> MiniGridTransitions | None:
    """The loader's contract: a dataset whose batches are right, or a one-line UserError.
    Warnings count as failures (each would be an extra stderr line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            data = MiniGridTransitions(path)
        except UserError as e:
            assert_one_line(e)
            event(f"refused: {str(e).replace(str(path), '<file>')[:48]}")
            return None
        event("accepted")
        check_loaded(data)
        try:
            train, _ = make_loaders(data, batch_size=1, val_fraction=0.5)
        except UserError as e:
            assert_one_line(e)
        else:
            next(iter(train))
    return data


@st.composite
def malformed(draw):
    """(arrays, storage, meta_bytes, cut): a valid dataset, then 1-3 random kinds of damage."""
    arrays, _, _ = build(draw(specs))
    storage = draw(st.sampled_from(["npz", "dir"]))
    meta_bytes, cut = None, None
    n = len(arrays["obs"])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "extra", "dtype", "rows", "ndim", "poke", "nonfinite", "meta", "byteorder", "cut"]))
        keys = sorted(k for k in arrays if k != "meta")
        key = draw(st.sampled_from(keys)) if keys else None
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            try:
                if kind == "drop" and key:
                    del arrays[key]
                elif kind == "extra":
                    name = draw(
                        st.sampled_from(["extra", "comment", "agent_pos", "agent_dir", "door_state", "terminated", "step", "next_obs"])
                    )
                    shape = draw(st.sampled_from([(), (0,), (n,), (n, 2), (n + 1,), (n, 1, 1, 1)]))
                    dtype = draw(st.sampled_from([*DTYPES, np.dtype(object)]))
                    arrays[name] = (
                        np.zeros(shape, np.int64).astype(dtype) if np.dtype(dtype).kind != "O" else np.full(shape, None, dtype=object)
                    )
                elif kind == "dtype" and key:
                    arrays[key] = arrays[key].astype(draw(st.sampled_from(DTYPES)))
                elif kind == "rows" and key:
                    a = arrays[key]
                    if a.ndim:
                        rows = draw(st.sampled_from([0, 1, max(len(a) - 1, 0), len(a) + 1]))
                        arrays[key] = np.concatenate([a, a[:1]])[:rows] if len(a) else a
                elif kind == "ndim" and key:
                    a = arrays[key]
                    arrays[key] = draw(st.sampled_from([a[..., None], a.reshape(-1), a.reshape(-1)[:1].reshape(()) if a.size else a]))
                elif kind == "poke" and key and arrays[key].size:
                    a = arrays[key].copy()
                    value = draw(st.sampled_from([-1, -(2**31), n, 2 * n + 5, 255, 7, 2**40]))
                    a.reshape(-1)[draw(st.integers(0, a.size - 1))] = value
                    arrays[key] = a
                elif kind == "nonfinite" and key and arrays[key].size and np.issubdtype(arrays[key].dtype, np.floating):
                    a = arrays[key].copy()
                    a.reshape(-1)[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
                    arrays[key] = a
                elif kind == "meta":
                    choice = draw(st.sampled_from([*BAD_META, "bytes", "array"]))
                    if choice == "bytes":
                        meta_bytes = b"\xff\xfe{\x00"
                        arrays["meta"] = np.array(b"\xff\xfe{")
                    else:
                        arrays["meta"] = np.array([1.5, 2.5]) if choice == "array" else np.array(choice)
                elif kind == "byteorder" and key and arrays[key].dtype.kind in "iuf" and arrays[key].dtype.itemsize > 1:
                    arrays[key] = arrays[key].astype(arrays[key].dtype.newbyteorder())
                elif kind == "cut":
                    cut = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
            except (ValueError, TypeError, OverflowError):
                pass  # a conversion numpy itself refuses: this damage does not apply
    return arrays, storage, meta_bytes, cut


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("property")


@PROPERTY
@given(malformed())
def test_loader_accepts_or_refuses_in_one_line_malformed_files(scratch, case_):
    arrays, storage, meta_bytes, cut = case_
    path = write(arrays, scratch / ("bad.npz" if storage == "npz" else "bad_dir"), storage, meta_bytes, cut)
    load_or_refuse(path)


@settings(PROPERTY, max_examples=100)
@given(specs, st.sampled_from(["npz", "dir"]))
def test_valid_datasets_round_trip(scratch, spec, storage):
    """Every transition's next_obs is the frame that followed it: obs[i+1] inside an episode,
    the episode's terminal frame at its end, in both layouts and both storages."""
    arrays, truth, episode = build(spec)
    path = write(arrays, scratch / ("good.npz" if storage == "npz" else "good_dir"), storage)
    data = load_or_refuse(path)
    assert data is not None, "a valid dataset was refused"
    n = len(truth)
    assert len(data) == n
    nxt = data.next_obs(torch.arange(n)).numpy()
    assert np.array_equal(nxt, truth)
    ends = np.cumsum(spec.lengths) - 1
    inside = np.setdiff1d(np.arange(n), ends)
    assert np.array_equal(nxt[inside], data.obs.numpy()[inside + 1]), "inside an episode, obs_t+1 is the next row"
    assert not np.isin(nxt[ends][:, 0, 0, 0], data.obs.numpy()[:, 0, 0, 0]).any(), "an episode's last next_obs is its terminal frame"
    assert np.array_equal(data.episode, episode), "episodes (stored, or recovered from done)"
    assert data.continuous_actions == (spec.action_dim is not None)
    if spec.action_dim is None and spec.meta:
        assert data.num_actions == spec.n_actions
    check_loaded(data)
