"""Multi-process training: `torchrun --nproc_per_node=2` on the CPU (gloo) trains exactly like
one process with the same global batch, writes one set of outputs in the same format, and the
sampler splits every global batch between the ranks without overlap."""

import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, THREADS, ok, run

from minigrid_dataset import EpochBatchSampler

TINY_RUN = ("--epochs", "2", "--batch-size", "32", "--log-every", "2", "--seed", "3")
VIT = ("--patch-size", "8", "--latent-dim", "32", "--num-encoder-layers", "1", "--mlp-dim", "64")


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir) -> list[tuple[str, str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [(r["step"], r["phase"], float(r["loss"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import collect

    return collect(tmp_path_factory.mktemp("ddp") / "d.npz", episodes=8)


def assert_same_training(one, two, arch: str, *, weights: bool = True) -> None:
    a, b = losses(one), losses(two)
    assert [r[:2] for r in a] == [r[:2] for r in b]  # same steps logged, same phases
    np.testing.assert_allclose([r[2] for r in a], [r[2] for r in b], rtol=1e-4)
    ca, cb = (torch.load(d / "model.pt", weights_only=True) for d in (one, two))
    assert ca.keys() == cb.keys() and (ca["arch"], ca["step"], ca["epoch"]) == (cb["arch"], cb["step"], cb["epoch"]) and cb["arch"] == arch
    for k in ca["model"] if weights else ():
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-3, atol=1e-4, msg=k)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, data, in_process):
    """The CNN JEPA with VICReg: its variance and covariance terms are batch statistics, so this
    only matches if the ranks gather each other's latents."""
    one, two = tmp_path / "one", tmp_path / "two"
    in_process("train_jepa.py", "--data", data, "--out-dir", one, *TINY_RUN)
    proc = ok(torchrun("train_jepa.py", "--data", data, "--out-dir", two, *TINY_RUN))
    assert "x 2 processes (DDP), global batch 32" in proc.stdout
    assert proc.stdout.count("Saved ") == 1  # rank 0 alone speaks and writes
    assert_same_training(one, two, "jepa_cnn")
    names = sorted(p.name for p in two.iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]
    assert len(events) == 1  # rank 0's TensorBoard file only
    assert [n for n in names if n not in events] == ["config.json", "loss.png", "metrics.csv", "model.pt"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,extra,arch",
    [
        ("train_jepa.py", ("--arch", "vit", *VIT), "jepa_vit"),
        ("train_encdec.py", (*VIT, "--decoder-dim", "32", "--num-decoder-layers", "1"), "encdec_vit"),
    ],
)
def test_vit_models_train_like_one_process(tmp_path, data, script, extra, arch):
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run(script, "--data", data, "--out-dir", one, *TINY_RUN, *extra))
    proc = ok(torchrun(script, "--data", data, "--out-dir", two, *TINY_RUN, *extra))
    assert proc.stdout.count("predictions.png") <= 1
    # Losses only: attention's key bias has an exactly-zero true gradient (softmax ignores a
    # shift), so its float noise differs between one and two processes and Adam's normalisation
    # turns that noise into full-size updates of a weight the loss does not depend on.
    assert_same_training(one, two, arch, weights=False)


def test_a_global_batch_that_does_not_divide_over_the_processes_is_an_error(data):
    from minigrid_dataset import MiniGridTransitions, make_loaders
    from wm_common import UserError

    with pytest.raises(UserError, match="--batch-size 33 is the global batch and must divide evenly over 2 processes"):
        make_loaders(MiniGridTransitions(data), batch_size=33, rank=1, world_size=2)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch_without_overlap(world):
    indices = np.arange(100, 197)
    single = EpochBatchSampler(indices, 12, shuffle=True, seed=5, drop_last=True)
    ranks = [EpochBatchSampler(indices, 12, shuffle=True, seed=5, drop_last=True, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        for i, batch in enumerate(single):
            assert sum((p[i] for p in per_rank), []) == batch
        assert all(len(p) == len(single) for p in per_rank)


def test_sampler_start_skips_the_batches_already_trained_on():
    s = EpochBatchSampler(np.arange(50), 8, shuffle=True, seed=1, drop_last=True)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=4)
    assert list(s) == full[4:] and len(s) == len(full)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_once_and_resume_matches_an_uninterrupted_ddp_run(tmp_path, data):
    """torchrun forwards SIGTERM to every rank; the ranks agree on the step to stop at (or one
    would wait forever in an all-reduce), rank 0 saves, and --resume under torchrun continues."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    flags = ("--data", data, "--epochs", "2", "--batch-size", "8", "--log-every", "4", "--seed", "1")
    ok(torchrun("train_jepa.py", *flags, "--out-dir", ref))
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_jepa.py", *map(str, flags)]
    proc = subprocess.Popen([*cmd, "--out-dir", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "Step 00008" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("interrupted at step") == 1, err
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert 8 <= ckpt["step"] < 70
    ok(torchrun("train_jepa.py", *flags, "--out-dir", out, "--resume"))
    assert_same_training(ref, out, "jepa_cnn")
