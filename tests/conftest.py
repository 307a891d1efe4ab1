"""Shared fixtures: a tiny collected dataset, a subprocess runner for the stage scripts, and a
writer for hand-made .npz files used by the bad-input tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from collect_minigrid_data import CollectConfig  # noqa: E402
from collect_minigrid_data import main as collect_main  # noqa: E402

# One intra-op thread, here and in the scripts the tests start. On a 2-core machine torch's
# default (one thread per core) spins badly as soon as anything else runs: a training step of
# these tiny models measured ~30x slower with two threads under load than with one. One thread
# also makes float results independent of the machine's core count.
THREADS = os.environ.get("WM_TEST_THREADS", "1")
torch.set_num_threads(int(THREADS))

# The tiny dataset every in-process data test shares: 6 random episodes of 40 steps on
# MiniGrid-Empty-8x8 at 32x32 (tile size 4, so the rendered frames need no resizing).
TINY = dict(env="MiniGrid-Empty-8x8-v0", episodes=6, max_steps=40, image_size=32, seed=0)


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `python script args...` from the repo root, like a user would."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The script exited 0 without a traceback."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """The contract for user errors: exit 2, one stderr line starting 'error: ' that names the
    problem (each fragment), no traceback anywhere."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def write_npz(path: str | Path, **arrays) -> Path:
    """Writes the given arrays to `path` as an .npz (uncompressed, exactly the given keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def majority_rate(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Accuracy on y_test of always guessing y_train's most frequent label."""
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == values[counts.argmax()]))


def collect(out: Path, **overrides) -> Path:
    """Collects in-process with the tiny settings, overridden by keyword."""
    cfg = CollectConfig(**{**TINY, "out": str(out), **overrides})
    return collect_main(cfg)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """Path of the shared tiny dataset (do not modify the file; copy it)."""
    return collect(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="session")
def tiny_arrays(tiny_npz) -> dict[str, np.ndarray]:
    """The raw arrays of the tiny dataset (shared: copy before mutating)."""
    return load_npz(tiny_npz)


@pytest.fixture
def valid_arrays(tiny_arrays) -> dict[str, np.ndarray]:
    """A fresh, mutable copy of the tiny dataset's arrays, for building bad files."""
    return {k: v.copy() for k, v in tiny_arrays.items()}


def one_step(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of transitions as the 1-step windows models train on: frames [B,2,...], actions [B,1,...]."""
    return torch.stack([obs, next_obs], dim=1), action[:, None]
