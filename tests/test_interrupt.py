"""No lost work: a training run stopped by SIGTERM/Ctrl-C saves a checkpoint where it stopped, a
run killed outright keeps its last periodic checkpoint (`--save-every`), and `--resume` from
either reaches the same step count with the same losses and weights as a run never stopped.
Non-finite updates stop with the step named, or are skipped with `--skip-nonfinite`."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, THREADS, ok, run

from training import FitSettings, fit, lr_at
from wm_common import UserError

# 8 episodes of 40 steps, batch 8, one-step windows: 35 steps per epoch
RUN = ("--epochs", "2", "--batch-size", "8", "--seed", "4", "--unroll", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import collect

    return collect(tmp_path_factory.mktemp("interrupt") / "d.npz", episodes=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, in_process):
    """The same run, never stopped (in this process: only a run that is stopped needs a process of its own)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    in_process("train_jepa.py", "--data", data, "--out-dir", out, *RUN, "--log-every", "4")
    return out


def start(data, out, *extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    cmd = [sys.executable, "train_jepa.py", "--data", str(data), "--out-dir", str(out), *RUN, *map(str, extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_after(proc: subprocess.Popen, marker: str, sig: int) -> tuple[int, str, str]:
    """Sends `sig` once the run prints `marker`; returns (exit code, stdout, stderr)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + out, err


def rows(run_dir) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock columns."""
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k not in ("samples_per_s", "time_s")} for r in csv.DictReader(f)]


def assert_same_as(reference, out) -> None:
    assert rows(out) == rows(reference)
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (reference, out))
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"]) == (70, 2, 0)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_mid_epoch_saves_and_resume_matches_an_uninterrupted_run(tmp_path, data, reference, sig, in_process):
    out = tmp_path / "run"
    code, stdout, stderr = signal_after(start(data, out, "--log-every", "4"), "Step 00008", sig)
    assert code == 128 + sig, (code, stdout, stderr)
    assert "Traceback" not in stderr and "interrupted at step" in stderr and "--resume" in stderr
    ckpt = torch.load(out / "model.pt", weights_only=True)
    # stopped within a step or two of the signal: mid-epoch, unless a loaded machine let it reach the epoch's end
    assert 8 <= ckpt["step"] < 70 and ckpt["batch_in_epoch"] == ckpt["step"] - 35 * ckpt["epoch"]
    in_process("train_jepa.py", "--data", data, "--out-dir", out, *RUN, "--log-every", "4", "--resume")
    assert_same_as(reference, out)


def test_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, data, reference, in_process):
    """SIGKILL cannot be caught: what survives is the last --save-every checkpoint, taken
    mid-window (steps 9-10 of a 4-step log window), and the resumed run still logs every row the
    uninterrupted one did."""
    out = tmp_path / "run"
    code, _, _ = signal_after(start(data, out, "--log-every", "4", "--save-every", "10"), "Step 00012", signal.SIGKILL)
    assert code == -signal.SIGKILL
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["step"] < 70 and (ckpt["step"] % 10 == 0 or ckpt["batch_in_epoch"] == 0)  # periodic or epoch end
    in_process("train_jepa.py", "--data", data, "--out-dir", out, *RUN, "--log-every", "4", "--resume")
    assert_same_as(reference, out)


# ----------------------------------------------------------------------------- non-finite steps


class FlakyModel(torch.nn.Module):
    """A linear next-frame regressor whose loss is NaN on chosen calls."""

    def __init__(self, bad_calls: set[int]):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.bad_calls, self.calls = bad_calls, 0

    def loss(self, frames, actions):
        self.calls += 1
        x = frames[:, 0].float().flatten(1)[:, :4] / 255
        loss = torch.nn.functional.mse_loss(self.lin(x), frames[:, 1].float().flatten(1)[:, :4] / 255)
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        return loss, {}

    def term_names(self) -> list[str]:
        return []


def fit_flaky(tiny_npz, tmp_path, bad_calls, skip: bool, lr_schedule: str = "constant"):
    from minigrid_dataset import MiniGridTransitions, make_loaders

    model = FlakyModel(bad_calls)
    train, val = make_loaders(MiniGridTransitions(tiny_npz), batch_size=16)
    settings = FitSettings(
        epochs=2,
        lr=1e-2,
        weight_decay=0,
        grad_clip=1.0,
        log_every=2,
        out_dir=tmp_path,
        resume=False,
        title="t",
        skip_nonfinite=skip,
        lr_schedule=lr_schedule,
    )
    info = {"arch": "flaky", "model_config": {}, "train_config": {}, "data_meta": {}}
    summary = fit(model=model, train_loader=train, val_loader=val, device=torch.device("cpu"), settings=settings, checkpoint_info=info)
    return model, summary


def test_nonfinite_loss_stops_naming_the_step_and_keeps_no_bad_checkpoint(tiny_npz, tmp_path):
    with pytest.raises(UserError, match=r"loss became nan .* at step 3 \(epoch 1, batch 3\).*--skip-nonfinite"):
        fit_flaky(tiny_npz, tmp_path, {3}, skip=False)
    assert not (tmp_path / "model.pt").exists()


def test_skip_nonfinite_skips_the_update_and_trains_on(tiny_npz, tmp_path, capsys):
    model, summary = fit_flaky(tiny_npz, tmp_path, {3, 20}, skip=True)
    assert summary["skipped_steps"] == 2 and summary["epoch"] == 2
    assert "warning: loss became nan" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    with (tmp_path / "metrics.csv").open() as f:
        assert all(float(r["loss"]) == float(r["loss"]) for r in csv.DictReader(f))  # no NaN rows


def test_skip_nonfinite_still_stops_a_model_that_stays_broken(tiny_npz, tmp_path):
    with pytest.raises(UserError, match="10 non-finite steps in a row"):
        fit_flaky(tiny_npz, tmp_path, set(range(5, 40)), skip=True)


def test_lr_at_constant_and_cosine():
    assert [lr_at(s, 10, 0.5, "constant") for s in (0, 5, 10)] == [0.5, 0.5, 0.5]
    cosine = [lr_at(s, 10, 0.5, "cosine") for s in range(11)]
    assert cosine[0] == 0.5 and cosine[5] == pytest.approx(0.25) and cosine[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fit_follows_the_lr_schedule_step_by_step(tiny_npz, tmp_path, monkeypatch, schedule):
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    _, summary = fit_flaky(tiny_npz, tmp_path, set(), skip=False, lr_schedule=schedule)
    total = summary["step"]
    assert len(seen) == total > 4
    assert seen == pytest.approx([lr_at(s, total, 1e-2, schedule) for s in range(total)])
    if schedule == "cosine":
        assert seen[0] == 1e-2 and seen[-1] < 1e-2 * 0.01


# ----------------------------------------------------------------------------- collection

COLLECT = ("--env", "MiniGrid-Empty-8x8-v0", "--episodes", "60", "--max-steps", "40", "--image-size", "32", "--seed", "2")


def arrays_of(path) -> dict:
    from minigrid_dataset import load_arrays

    return load_arrays(path)[0]


def collect_in_process(out, *extra) -> None:
    from collect_minigrid_data import CollectConfig, main
    from wm_common import parse_config

    main(parse_config(CollectConfig, [*COLLECT, "--out", str(out), *map(str, extra)]))


@pytest.mark.parametrize("out_name", ["d.npz", pytest.param("d_dir", marks=pytest.mark.slow)])
def test_interrupted_collection_keeps_its_shards_and_resume_gives_the_same_data(tmp_path, out_name):
    ref = tmp_path / f"ref_{out_name}"
    collect_in_process(ref)
    out = tmp_path / out_name
    parts = tmp_path / f".{out_name}.parts"
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    # every 2 episodes make a shard (123 kB of frames each)
    cmd = [sys.executable, "collect_minigrid_data.py", *COLLECT, "--out", str(out), "--shard-mb", "0.2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and len(list(parts.glob("shard_*"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    progress = json.loads((parts / "progress.json").read_text())
    kept = sum(s["episodes"] for s in progress["shards"])
    assert 2 <= kept < 60 and not out.exists()
    # a fresh run into the same --out refuses to drop the kept shards; a resume with other flags too
    with pytest.raises(UserError, match="continue it with --resume"):
        collect_in_process(out)
    with pytest.raises(UserError, match="--seed differ"):
        collect_in_process(out, "--resume", "--seed", "3")
    collect_in_process(out, "--resume", "--shard-mb", "0.2")
    assert not parts.exists()
    a, b = arrays_of(ref), arrays_of(out)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_sharded_collection_bounds_the_buffer_and_matches_one_pass(tmp_path):
    """Shards are an implementation detail: many small ones give the file of none, and with
    --num-envs 2 too."""
    collect_in_process(tmp_path / "a.npz", "--episodes", "12")
    ok(run("collect_minigrid_data.py", *COLLECT, "--episodes", "12", "--out", tmp_path / "b", "--shard-mb", "0.1", "--num-envs", "2"))
    a, b = arrays_of(tmp_path / "a.npz"), arrays_of(tmp_path / "b")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
