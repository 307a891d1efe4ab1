"""A user's runs are never lost or mixed: one training per run directory, --resume refuses
another run's data or flags, --overwrite never deletes, a full disk is one line with the run's
files consistent, and the values that used to slip through (batch size 1, NaN weights, file
names that are not UTF-8, duplicate YAML keys) are caught. Each case failed before its fix."""

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import collect
from test_reliability import assert_one_line_error_in_process, call

import training
import wm_common
from minigrid_dataset import load_npz

# a run of a few steps on the tiny data
FAST = ["--epochs", "1", "--batch-size", "16", "--latent-dim", "16", "--device", "cpu", "--log-every", "100", "--unroll", "2"]


def train(data, out, *extra) -> list[str]:
    return ["--data", str(data), "--out-dir", str(out), *FAST, *extra]


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_npz) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert call("train_jepa", train(tiny_npz, out)) == 0
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ----------------------------------------------------------------------------- one run per directory


def _hold_lock(out: str, ready, release) -> None:
    with training.run_lock(Path(out)):
        ready.set()
        release.wait(30)


def test_a_second_training_into_a_busy_run_dir_is_refused_and_a_killed_one_frees_it(tmp_path, tiny_npz, capsys):
    out = tmp_path / "run"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(out), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert_one_line_error_in_process("train_jepa", train(tiny_npz, out), capsys, "another training is writing to", "right now")
        assert not out.exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a run killed while it holds the lock
        holder.join(30)
    assert call("train_jepa", train(tiny_npz, out)) == 0
    assert (out / "model.pt").is_file()


# ----------------------------------------------------------------------------- resume is the same run


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--lr", "0.01"], ["--lr 0.001 (now 0.01)"]),
        (["--unroll", "3"], ["--unroll 2 (now 3)"]),
        (["--seed", "5"], ["--seed 0 (now 5)"]),
    ],
)
def test_resume_refuses_changed_flags_and_writes_nothing(finished, tmp_path, tiny_npz, capsys, extra, fragments):
    out = copy_run(finished, tmp_path)
    before = digest(out)
    assert_one_line_error_in_process("train_jepa", [*train(tiny_npz, out, "--resume"), "--epochs", "2", *extra], capsys, *fragments)
    assert digest(out) == before


def test_resume_refuses_other_data_even_under_the_same_name(finished, tmp_path, tiny_npz, capsys):
    out = copy_run(finished, tmp_path)
    other = tmp_path / "other.npz"
    shutil.copy(tiny_npz, other)
    assert_one_line_error_in_process("train_jepa", [*train(other, out, "--resume"), "--epochs", "2"], capsys, "--data", "(now")
    # the same path, its content replaced by a smaller collection
    same = tmp_path / "same.npz"
    shutil.copy(tiny_npz, same)
    shutil.rmtree(out)
    assert call("train_jepa", train(same, out)) == 0
    before = digest(out)
    shutil.copy(collect(tmp_path / "small.npz", episodes=4), same)
    assert_one_line_error_in_process("train_jepa", [*train(same, out, "--resume"), "--epochs", "2"], capsys, "transitions", "now holds")
    assert digest(out) == before


def test_a_no_op_resume_of_a_finished_run_leaves_its_files_alone(finished, tmp_path, tiny_npz):
    out = copy_run(finished, tmp_path)
    before = digest(out)
    assert call("train_jepa", train(tiny_npz, out, "--resume")) == 0
    after = digest(out)
    assert after["model.pt"] == before["model.pt"] and after["metrics.csv"] == before["metrics.csv"]
    assert json.loads((out / "config.json").read_text())["train"]["data"] == str(tiny_npz)


# ----------------------------------------------------------------------------- --overwrite never deletes


def test_overwrite_keeps_every_earlier_run_and_the_users_own_prev_dir(finished, tmp_path, tiny_npz):
    out = copy_run(finished, tmp_path)
    mine = tmp_path / "run.prev"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    first = digest(out)
    assert call("train_jepa", train(tiny_npz, out, "--overwrite")) == 0
    assert (mine / "notes.txt").read_text() == "mine"
    assert digest(tmp_path / "run.prev2") == first
    assert call("train_jepa", train(tiny_npz, out, "--overwrite", "--seed", "1")) == 0
    assert (tmp_path / "run.prev3" / "model.pt").is_file() and (tmp_path / "run.prev2" / "model.pt").is_file()


def test_out_dir_overlapping_the_data_is_refused(tmp_path, tiny_npz, capsys):
    from collect_minigrid_data import write_array_dir

    data_dir = tmp_path / "data_dir"
    write_array_dir(data_dir, load_npz(tiny_npz))
    before = digest(data_dir)
    for out in (data_dir, data_dir / "run", tmp_path):
        assert_one_line_error_in_process("train_jepa", train(data_dir, out, "--overwrite"), capsys, "overlap")
    assert digest(data_dir) == before


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(finished, tmp_path, tiny_npz, capsys, monkeypatch):
    out = copy_run(finished, tmp_path)
    before = digest(out)

    def no_space(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", no_space)
    err = assert_one_line_error_in_process(
        "train_jepa", [*train(tiny_npz, out, "--resume"), "--epochs", "2"], capsys, "cannot write", "model.pt", "unchanged"
    )
    assert "Traceback" not in err
    assert digest(out)["model.pt"] == before["model.pt"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    monkeypatch.undo()

    def enospc(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", enospc)
    assert_one_line_error_in_process("train_jepa", train(tiny_npz, tmp_path / "new"), capsys, "No space left on device")


# ----------------------------------------------------------------------------- values that slipped through


def test_batch_size_1_is_refused_for_a_jepa_with_the_reason(tmp_path, tiny_npz, capsys):
    assert_one_line_error_in_process("train_jepa", [*train(tiny_npz, tmp_path / "r"), "--batch-size", "1"], capsys, "at least 2 samples")


@pytest.mark.parametrize(
    "flag, value", [("--std-coeff", "-1"), ("--std-coeff", "nan"), ("--cov-coeff", "nan"), ("--sim-coeff", "inf"), ("--sim-coeff", "0")]
)
def test_loss_weights_are_checked_before_training(tmp_path, tiny_npz, capsys, flag, value):
    assert_one_line_error_in_process("train_jepa", [*train(tiny_npz, tmp_path / "r"), flag, value], capsys, flag)
    assert not (tmp_path / "r").exists()


def test_a_data_file_name_that_is_not_utf8_trains_and_plots(tmp_path, tiny_npz):
    name = os.fsdecode(b"d\xff.npz")
    shutil.copy(tiny_npz, tmp_path / name)
    out = tmp_path / "run"
    assert call("train_jepa", train(tmp_path / name, out)) == 0
    assert (out / "loss.png").stat().st_size > 0
    assert call("train_jepa", [*train(tmp_path / name, out, "--resume"), "--epochs", "2"]) == 0


def test_duplicate_yaml_keys_are_an_error(tmp_path, tiny_npz, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.001\nbatch_size: 16\nlearning_rate: 0.1\n")
    assert_one_line_error_in_process("train_jepa", [*train(tiny_npz, tmp_path / "r"), "--config", cfg], capsys, "given twice")


def test_a_fifo_is_named_as_one_wherever_a_file_is_read(tmp_path, tiny_npz, finished, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_one_line_error_in_process("train_jepa", train(fifo, tmp_path / "r"), capsys, "is a FIFO")
    assert_one_line_error_in_process("train_jepa", [*train(tiny_npz, tmp_path / "r"), "--config", fifo], capsys, "is a FIFO")
    assert_one_line_error_in_process(
        "inspect", ["--checkpoint", fifo, "--data", tiny_npz, "--out-dir", tmp_path / "i"], capsys, "is a FIFO"
    )
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert_one_line_error_in_process("train_jepa", train(loop, tmp_path / "r"), capsys, "symlink loop")


def test_a_model_too_large_for_memory_is_one_line(tmp_path, tiny_npz, capsys):
    # each size within its cap (wm_common.MAX_WIDTH), the whole far beyond any machine: ~17e9 weights per layer
    argv = [*train(tiny_npz, tmp_path / "r"), "--arch", "vit", "--latent-dim", "65536", "--mlp-dim", "65536"]
    assert_one_line_error_in_process("train_jepa", argv, capsys, "does not fit in memory")
    assert not (tmp_path / "r").exists()


def test_temp_files_a_killed_run_left_are_removed_by_the_next_run(finished, tmp_path, tiny_npz):
    out = copy_run(finished, tmp_path)
    left = [out / ".model.pt.tmp99999999.pt", out / ".metrics.csv.tmp123.csv"]
    for p in left:
        p.write_bytes(b"half a file")
    mine = out / "notes.tmp1.txt"  # not the trainer's naming: left alone
    mine.write_text("mine")
    assert call("train_jepa", [*train(tiny_npz, out, "--resume"), "--epochs", "2"]) == 0
    assert not any(p.exists() for p in left) and mine.read_text() == "mine"


@pytest.mark.parametrize(
    "arch, argv, named",
    [
        ("cnn", ["--patch-size", "8", "--predictor", "transformer"], ["patch_size", "predictor"]),
        ("cnn", ["--arrangement", "common", "--num-heads", "2"], ["num_heads", "arrangement"]),
        ("vit", ["--pred-loss", "normalized", "--vc-all-steps"], ["vc_all_steps", "pred_loss"]),
        ("cnn", ["--latent-dim", "32", "--unroll", "2"], []),
        ("vit", ["--patch-size", "8"], []),
        ("cnn", ["--ema-decay", "0.5"], ["ema_decay"]),  # the online target never reads the EMA encoder
        ("cnn", ["--ema-decay", "0.5", "--target", "ema"], []),
    ],
)
def test_the_other_architectures_settings_are_named_as_ignored(arch, argv, named):
    import train_jepa

    cfg = wm_common.parse_config(train_jepa.TrainConfig, ["--arch", arch, "--data", "d.npz", *argv])
    assert train_jepa.unused_settings(cfg) == named


def test_a_vit_flag_on_the_cnn_is_a_note_on_stderr(tmp_path, capsys):
    # the note comes before the data is read, so a missing file keeps this test free of training
    assert call("train_jepa", ["--data", tmp_path / "none.npz", "--out-dir", tmp_path / "r", "--patch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert "note: --patch-size is not used by --arch cnn --target online (ignored)" in err and "none.npz" in err
