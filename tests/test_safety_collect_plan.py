"""Safety of the collector and the planner: an existing dataset is replaced only with --overwrite
and only once the new one is complete; a full disk is one line and leaves no temp files; what a
killed run leaves is cleaned by the next run writing the same output, and nothing else is; FIFOs
and symlink loops are named as such; a model of other actions, a search beyond reach, a goal
image of NaNs are refused before anything is written; every numeric flag is a one-line error or
correct behaviour. Command lines run in-process through wm_common.run_cli (no torch import per
case); killed runs are forked children of the test process."""

import contextlib
import errno
import hashlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import collect_minigrid_data
import plan_with_world_model
import planners
from collect_minigrid_data import CollectConfig
from minigrid_dataset import MiniGridTransitions
from plan_with_world_model import PlanConfig
from wm_common import UserError, parse_config, run_cli, save_checkpoint
from world_model_jepa import JEPAConfig, JEPAWorldModel

ENV = "MiniGrid-Empty-8x8-v0"
SMALL = ["--episodes", "2", "--max-steps", "5", "--image-size", "16"]  # 16 px: tile 2, no resizing
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
SCRIPTS = {
    "collect": (
        collect_minigrid_data.main,
        CollectConfig,
        dict(aliases=collect_minigrid_data.CONFIG_ALIASES, ignored=collect_minigrid_data.TRAINER_KEYS),
    ),
    "plan": (plan_with_world_model.main, PlanConfig, {}),
}


def cli(script: str, argv: list, capsys) -> tuple[int, str, str]:
    """A stage's command line in-process: (exit code, stdout, stderr). Any exception but
    SystemExit propagates and fails the test: a user would see a traceback."""
    main, cfg_cls, kw = SCRIPTS[script]
    capsys.readouterr()
    code = 0
    try:
        run_cli(main, cfg_cls, argv=[str(a) for a in argv], **kw)
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(script: str, argv: list, capsys, *fragments: str) -> str:
    """Exit 2 with one `error: ` line naming each fragment (a progress bar may precede it when the
    error comes mid-collection), no traceback. Returns the line."""
    code, out, err = cli(script, argv, capsys)
    assert code == 2, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in out + err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])
    return errors[0]


def collect(out: Path, capsys, *extra) -> str:
    code, stdout, err = cli("collect", [*SMALL, "--out", out, *extra], capsys)
    assert code == 0 and "Traceback" not in err, err
    return stdout


def digest(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def temps(folder: Path) -> list[str]:
    """Everything under folder named like a temp (.tmp / .old)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or ".old" in p.name)


def shard_settings() -> dict:
    cfg = parse_config(CollectConfig, [*SMALL])
    return {k: getattr(cfg, k) for k in collect_minigrid_data.RESUME_KEYS}


def episode0() -> dict[str, np.ndarray]:
    cfg = parse_config(CollectConfig, [*SMALL])
    env, episode, _, _ = collect_minigrid_data.open_source(cfg, True)
    try:
        return episode(0)
    finally:
        env.close()


def resume_with(tmp_path: Path, damage) -> Path:
    """An interrupted collection into tmp/E.npz (its first of two episodes kept as a shard), then damage(parts)."""
    out = tmp_path / "E.npz"
    parts = tmp_path / ".E.npz.parts"
    parts.mkdir()
    progress = {"settings": shard_settings(), "shards": []}
    collect_minigrid_data.write_shard(parts, progress, [episode0()])
    damage(parts)
    return out


# ----------------------------------------------------------------------------- 1. --overwrite


@pytest.mark.parametrize("name", ["E.npz", "E_dir"])
def test_existing_dataset_is_replaced_only_with_overwrite(tmp_path, capsys, name):
    out = tmp_path / name
    collect(out, capsys, "--seed", "1")
    before = digest(out)
    refused("collect", [*SMALL, "--seed", "9", "--out", out], capsys, f"--out {out} already holds a dataset", "--overwrite")
    assert digest(out) == before
    collect(out, capsys, "--seed", "9", "--overwrite")
    assert digest(out) != before and sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert MiniGridTransitions(out).meta["seed"] == 9


def test_resume_into_an_existing_dataset_also_needs_overwrite(tmp_path, capsys):
    """An --overwrite run interrupted after its first shard: the kept dataset is still replaced
    only with --overwrite, which the same command and --resume carries."""
    out = resume_with(tmp_path, lambda parts: None)
    collect(out.with_name("old.npz"), capsys, "--seed", "1")
    out.with_name("old.npz").rename(out)
    before = digest(out)
    refused("collect", [*SMALL, "--out", out, "--resume"], capsys, "already holds a dataset", "--overwrite")
    assert digest(out) == before
    collect(out, capsys, "--resume", "--overwrite")
    assert not (tmp_path / ".E.npz.parts").exists() and MiniGridTransitions(out).meta["seed"] == 0


# ----------------------------------------------------------------------------- 2. a full disk


def fills_the_disk(calls_before: int = 0):
    """A writer that writes part of its file, then fails as a full disk does (after `calls_before`
    successful calls of the real writer)."""
    calls = []

    def install(monkeypatch, name: str) -> None:
        real = getattr(collect_minigrid_data, name)

        def write(path, *args):
            calls.append(path)
            if len(calls) <= calls_before:
                return real(path, *args)
            Path(path).write_bytes(b"half a file")
            raise ENOSPC

        monkeypatch.setattr(collect_minigrid_data, name, write)

    return install


@pytest.mark.parametrize(
    "name, writer, extra, fragments",
    [
        ("E.npz", "_savez", [], ["cannot write", "E.npz", "No space left on device", "run again"]),
        ("E_dir", "_save_npy", [], ["cannot write", "E_dir", "No space left on device", "run again"]),
        # each episode its own shard: the second shard's write fails, the first is kept for --resume
        ("E.npz", "_save_npy", ["--shard-mb", "1e-9"], ["shard_00001", "No space left on device", "the 1 episodes", "--resume"]),
        ("E_dir", "_reserve", ["--shard-mb", "1e-9"], ["cannot write", "E_dir", "No space left on device", "--resume"]),
    ],
    ids=["npz", "directory", "shard", "merge-into-directory"],
)
def test_full_disk_is_one_line_and_leaves_no_temp_files(tmp_path, capsys, monkeypatch, name, writer, extra, fragments):
    out = tmp_path / name
    collect(out, capsys, "--seed", "1")
    before = digest(out)
    calls_before = 13 if writer == "_save_npy" and extra else 0  # the first shard's 13 arrays get written
    fills_the_disk(calls_before)(monkeypatch, writer)
    refused("collect", [*SMALL, "--out", out, "--overwrite", *extra], capsys, *fragments)
    assert digest(out) == before, "the old data changed"
    assert temps(tmp_path) == []
    parts = tmp_path / f".{name}.parts"
    if "--resume" in fragments[-1]:
        monkeypatch.undo()  # space freed: the same command with --resume finishes
        collect(out, capsys, "--overwrite", "--resume", *extra)
        assert not parts.exists() and temps(tmp_path) == [] and MiniGridTransitions(out).meta["episodes"] == 2
    else:
        assert not parts.exists()


# ----------------------------------------------------------------------------- 3. what a SIGKILL leaves


def killed_child(argv: list, kill_when) -> int:
    """Forks a child that collects with `argv` and SIGKILLs itself where `kill_when(name, path)`
    says (called before each write of an array or a file and before each rename). Returns its
    pid, now dead."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            real_savez, real_save, real_rename = collect_minigrid_data._savez, collect_minigrid_data._save_npy, Path.rename

            def savez(path, arrays):
                if kill_when("savez", path):
                    path.write_bytes(b"half a file")
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_savez(path, arrays)

            def save(path, value):
                if kill_when("save", path):
                    path.write_bytes(b"half a file")
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_save(path, value)

            def rename(self, target):
                if kill_when("rename", self):
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_rename(self, target)

            collect_minigrid_data._savez, collect_minigrid_data._save_npy, Path.rename = savez, save, rename
            collect_minigrid_data.main(parse_config(CollectConfig, [str(a) for a in argv]))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    return pid


def nth_save(n: int):
    seen = []

    def when(kind, path):
        seen.append(kind)
        return kind == "save" and seen.count("save") == n

    return when


def decoys(folder: Path, name: str, dead: int) -> list[str]:
    """Look-alikes of the collector's temp names that are not clearly its own: each must survive."""
    live = os.getppid()  # the process that started pytest: running
    made = {
        f".{name}.tmp{live}.npz": "file",  # a collector still writing
        f".{name}.tmpX.npz": "file",
        f"{name}.tmp{dead}.npz": "file",
        f".{name}.tmp{dead}.txt": "file",
        f".other.npz.tmp{dead}.npz": "file",
        f".{name}.tmp{live}": "dir",
        f".{name}.old{dead}9": "dir with a note",
    }
    for entry, kind in made.items():
        p = folder / entry
        if kind == "file":
            p.write_bytes(b"keep me")
        else:
            p.mkdir()
            (p / ("notes.txt" if "note" in kind else "obs.npy")).write_bytes(b"keep me")
    (folder / f".{name}.old{dead}8").symlink_to(folder / f".{name}.tmp{live}")
    return sorted([*made, f".{name}.old{dead}8"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child to kill")
@pytest.mark.parametrize("name", ["E.npz", "E_dir"])
def test_temp_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path, capsys, name):
    out = tmp_path / name
    dead = killed_child([*SMALL, "--out", out], lambda kind, path: kind == "savez" or (kind == "save" and path.name == "action.npy"))
    left = [p.name for p in tmp_path.iterdir()]
    assert left == [f".{name}.tmp{dead}" + (".npz" if name.endswith(".npz") else "")], left
    kept = decoys(tmp_path, name, dead)
    note = collect(out, capsys)
    assert f"removed 1 temporary file(s) left in {tmp_path}" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, *kept])
    MiniGridTransitions(out)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child to kill")
def test_killed_between_the_renames_keeps_the_earlier_data(tmp_path, capsys):
    """--overwrite of a directory moves the old one aside, then renames the new one in: killed in
    between, the moved-aside copy is the only one left. The next run must keep it."""
    out = tmp_path / "E_dir"
    collect(out, capsys, "--seed", "1")
    before = digest(out)
    dead = killed_child([*SMALL, "--out", out, "--overwrite"], lambda kind, path: kind == "rename" and path.name.startswith(".E_dir.tmp"))
    old = tmp_path / f".E_dir.old{dead}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old.name, f".E_dir.tmp{dead}"])
    note = collect(out, capsys, "--seed", "2")
    assert f"{old} holds the earlier E_dir" in note and "removed 1 temporary" in note
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old.name, "E_dir"])
    assert {k.replace(old.name, "E_dir"): v for k, v in digest(old).items()} == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child to kill")
def test_temp_shard_of_a_killed_run_is_removed_on_resume(tmp_path, capsys):
    out = tmp_path / "E.npz"
    parts = tmp_path / ".E.npz.parts"
    dead = killed_child([*SMALL, "--out", out, "--shard-mb", "1e-9"], nth_save(15))  # the first shard has 13 arrays
    assert sorted(p.name for p in parts.iterdir()) == [f".shard_00001.tmp{dead}", "progress.json", "shard_00000"]
    note = collect(out, capsys, "--shard-mb", "1e-9", "--resume")
    assert f".shard_00001.tmp{dead}" in note and not parts.exists() and temps(tmp_path) == []
    MiniGridTransitions(out)


# ----------------------------------------------------------------------------- 4. FIFOs and loops


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def loop(path: Path) -> Path:
    path.symlink_to(path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize(
    "make, resume, fragment",
    [
        (lambda t: fifo(t / "E.npz"), False, "E.npz is a FIFO"),
        (lambda t: fifo(t / "E_dir"), False, "E_dir is a FIFO"),
        (lambda t: loop(t / "E.npz"), False, "E.npz is a symlink loop"),
        (lambda t: fifo(t / ".E.npz.parts").with_name("E.npz"), False, ".E.npz.parts, where a collection into"),
        (lambda t: loop(t / ".E.npz.parts").with_name("E.npz"), True, "is a symlink loop"),
        (lambda t: resume_with(t, lambda p: ((p / "progress.json").unlink(), fifo(p / "progress.json"))), True, "progress.json is a FIFO"),
        (
            lambda t: resume_with(t, lambda p: ((p / "shard_00000" / "obs.npy").unlink(), fifo(p / "shard_00000" / "obs.npy"))),
            True,
            "obs.npy is a FIFO",
        ),
        (lambda t: resume_with(t, lambda p: shutil.rmtree(p / "shard_00000")), True, "shard_00000"),
    ],
    ids=["npz-fifo", "dir-fifo", "npz-loop", "parts-fifo", "parts-loop", "progress-fifo", "shard-array-fifo", "shard-missing"],
)
def test_fifos_and_symlink_loops_are_named(tmp_path, capsys, make, resume, fragment):
    out = make(tmp_path)
    with deadline(30):  # reading a FIFO blocks forever: fail instead of hanging
        refused("collect", [*SMALL, "--out", out, *(["--resume"] if resume else [])], capsys, fragment)
    assert "not found" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- the planner


def tiny_checkpoint(path: Path, data: Path, **config) -> Path:
    """An untrained CNN JEPA (planning refusals and notes do not need a trained one) with the
    data_meta a trainer records for `data`."""
    model = JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], latent_dim=8, channels=[4, 4], action_emb_dim=4, **config))
    meta = dict(MiniGridTransitions(data).meta, path=str(data), frame_shape=[16, 16, 3])
    payload = dict(model=model.state_dict(), model_config=model.model_config(), train_config={}, step=0, epoch=0, optimizer={})
    save_checkpoint(path, dict(payload, data_meta=meta, arch="jepa_cnn"))
    return path


@pytest.fixture(scope="module")
def plan_world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_safety")
    data = root / "d.npz"
    collect_minigrid_data.main(parse_config(CollectConfig, [*SMALL, "--out", str(data)]))
    return {
        "root": root,
        "data": data,
        "discrete": tiny_checkpoint(root / "discrete" / "model.pt", data, num_actions=7),
        "continuous": tiny_checkpoint(root / "continuous" / "model.pt", data, num_actions=2, continuous_actions=True),
    }


def plan_argv(w: dict, out: Path, *extra, checkpoint: str = "discrete") -> list:
    fast = ["--episodes", "1", "--max-steps", "2", "--horizon", "1", "--cost", "latent", "--device", "cpu"]
    return ["--checkpoint", w[checkpoint], "--out-dir", out, *fast, *extra]


def test_plan_refuses_a_model_of_continuous_actions(plan_world, tmp_path, capsys):
    out = tmp_path / "p"
    refused("plan", plan_argv(plan_world, out, "--cost", "graph", checkpoint="continuous"), capsys, "continuous actions", "discrete")
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--horizon", "20"], ["7^20 sequences", "1,000,000", "--planner cem", "--horizon 6 at most"]),
        (["--horizon", str(10**30)], ["--planner cem"]),
        (["--planner", "cem", "--samples", "100000", "--horizon", "20"], ["--samples 100000 x --horizon 20 x --iterations 4", "1,000,000"]),
    ],
    ids=["exhaustive-20", "exhaustive-1e30", "cem-huge"],
)
def test_plan_refuses_a_search_beyond_reach_before_writing(plan_world, tmp_path, capsys, extra, fragments):
    out = tmp_path / "p"
    refused("plan", plan_argv(plan_world, out, *extra), capsys, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_plan_refuses_a_non_finite_goal_image(plan_world, tmp_path, capsys, value):
    goal = tmp_path / "goal.npy"
    img = np.full((16, 16, 3), 0.5, np.float32)
    img[3, 4, 1] = value
    np.save(goal, img if value == np.inf else np.full_like(img, np.nan))
    out = tmp_path / "p"
    refused("plan", plan_argv(plan_world, out, "--goal-obs", goal), capsys, "goal.npy", "non-finite")
    assert not out.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_plan_names_a_fifo_goal_image(plan_world, tmp_path, capsys):
    refused("plan", plan_argv(plan_world, tmp_path / "p", "--goal-obs", fifo(tmp_path / "goal.npy")), capsys, "goal.npy is a FIFO")


def test_plan_on_another_env_than_the_data_notes_both(plan_world, tmp_path, capsys):
    code, out, err = cli("plan", plan_argv(plan_world, tmp_path / "p", "--env", "MiniGrid-Empty-6x6-v0"), capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "MiniGrid-Empty-6x6-v0" in notes[0] and ENV in notes[0], out
    code, out, err = cli("plan", plan_argv(plan_world, tmp_path / "q", "--env", ENV), capsys)
    assert code == 0 and "note:" not in out, out


# ----------------------------------------------------------------------------- numeric flags

BIG = str(10**12)
COLLECT_FLAGS = [
    (["--episodes", "0"], "--episodes"),
    (["--episodes", "-3"], "--episodes"),
    (["--episodes", "nan"], "invalid int value"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--max-steps", BIG], "above the 256 transitions"),
    (["--max-steps", "inf"], "argument --max-steps"),  # (wm_common words it "invalid <lambda> value")
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--image-size", "0"], "--image-size"),
    (["--image-size", BIG], "--image-size"),
    (["--frame-skip", "0"], "--frame-skip"),
    (["--env", "CartPole-v1", "--frame-skip", BIG], "--frame-skip"),
    (["--env", "CartPole-v1", "--max-steps", "501"], "above the 500 transitions"),
    (["--num-envs", "-1"], "--num-envs"),
    (["--num-envs", BIG], "--num-envs"),
    (["--shard-mb", "nan"], "--shard-mb"),
    (["--shard-mb", "inf"], "--shard-mb"),
    (["--shard-mb", "-1"], "--shard-mb"),
    (["--shard-mb", "0"], "--shard-mb"),
    (["--shard-mb", "1e-9"], None),  # correct: a shard per episode, merged at the end
    (["--shard-mb", "1e300"], None),  # correct: a cap never reached
]


@pytest.mark.parametrize("extra, fragment", COLLECT_FLAGS, ids=[" ".join(e) for e, _ in COLLECT_FLAGS])
def test_collect_numeric_flags(tmp_path, capsys, extra, fragment):
    out = tmp_path / "E.npz"
    if fragment is None:
        collect(out, capsys, *extra)
        assert len(MiniGridTransitions(out)) == 10 and temps(tmp_path) == []
        return
    refused("collect", [*SMALL, "--out", out, *extra], capsys, fragment)
    assert list(tmp_path.iterdir()) == []


def test_an_episode_too_big_for_ram_is_refused():
    """Envs with no episode limit of their own (none installed here has one): --max-steps is then
    bounded by the RAM one episode's frames take."""
    no_limit = SimpleNamespace(spec=SimpleNamespace(max_episode_steps=None))
    with pytest.raises(UserError, match="GB of frames in RAM"):
        collect_minigrid_data.check_against_env(CollectConfig(env="NoLimit-v0", max_steps=10**7), no_limit, False)
    collect_minigrid_data.check_against_env(CollectConfig(env="NoLimit-v0", max_steps=10**4), no_limit, False)  # 123 MB


PLAN_FLAGS = [
    (["--episodes", "0"], "--episodes"),
    (["--episodes", "-1"], "--episodes"),
    (["--episodes", "inf"], "invalid int value"),
    (["--horizon", "0"], "--horizon"),
    (["--horizon", "-2"], "--horizon"),
    (["--horizon", "nan"], "invalid int value"),
    (["--planner", "cem", "--samples", "0"], "--samples"),
    (["--planner", "cem", "--samples", BIG, "--elites", "1"], "--samples"),
    (["--planner", "cem", "--iterations", "-1"], "--iterations"),
    (["--planner", "cem", "--iterations", BIG], "--iterations"),
    (["--planner", "cem", "--elites", "0"], "--elites"),
    (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", BIG], "above MiniGrid-Empty-8x8-v0's own limit of 256"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--planner", "cem", "--samples", "1", "--elites", "1", "--iterations", "1"], None),
    (["--max-steps", "256", "--episodes", "1", "--horizon", "2"], None),
]


@pytest.mark.parametrize("extra, fragment", PLAN_FLAGS, ids=[" ".join(e) for e, _ in PLAN_FLAGS])
def test_plan_numeric_flags(plan_world, tmp_path, capsys, extra, fragment):
    out = tmp_path / "p"
    if fragment is None:
        code, _, err = cli("plan", plan_argv(plan_world, out, *extra), capsys)
        assert code == 0 and "Traceback" not in err, err
        assert (out / "plan.json").is_file()
        return
    refused("plan", plan_argv(plan_world, out, *extra), capsys, fragment)
    assert not out.exists()


def test_chunked_scoring_matches_one_batch(monkeypatch):
    """Latent-cost candidates go through the model PLAN_BATCH at a time: the same costs as one batch."""
    torch.manual_seed(0)
    model = JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], latent_dim=8, channels=[4, 4], action_emb_dim=4)).eval()
    imagination = planners.Imagination(model, "jepa_cnn", torch.device("cpu"))
    cfg = PlanConfig(horizon=3, cost="latent", aggregate="sum")
    planner = planners.make_planner(cfg, imagination, list(range(7)), None, 0)
    frame = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8)
    planner.start_episode(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8).numpy())
    whole = planner.scores(frame, planner.search.sequences)
    monkeypatch.setattr(planners, "PLAN_BATCH", 50)
    assert torch.allclose(planner.scores(frame, planner.search.sequences), whole, atol=1e-5)
