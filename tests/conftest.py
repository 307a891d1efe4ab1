"""Shared fixtures: a tiny collected dataset and tiny runs trained on it (each built once per
session, whatever the number of xdist workers), runners for the stage scripts (a subprocess like a
user's, or in this process), and a writer for hand-made .npz files used by the bad-input tests."""

import contextlib
import io
import os
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

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


def run_in_process(script: str, *args: str) -> str:
    """Runs `script`'s __main__ block in this process with `args` as its command line, and
    returns what it printed on stdout. What a subprocess would add is the interpreter and the
    torch import (~2 s a run), so fixtures that only need a stage's result call this; a user
    error (exit 2) or any exception fails the caller."""
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (None, 0), f"{script} exited {e.code}\nstdout:\n{out.getvalue()}\nstderr:\n{err.getvalue()}"
    finally:
        sys.argv = argv
    return out.getvalue()


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


def shared_dir(tmp_path_factory) -> Path:
    """A directory all xdist workers of this session share (their base directories' parent), or
    the session's own base directory when the tests run in one process."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def build_once(root: Path, key: str, build: Callable[[], object]) -> None:
    """Calls `build()` unless some process of this session already has: the first worker to get
    here builds, the others wait on the lock and reuse what it built. A build that raised leaves no
    mark, so the next caller starts it again (and must clear what the failed one left)."""
    state = root / ".once"  # not `.<run>.lock` beside a run: that name is the trainer's own lock
    state.mkdir(exist_ok=True)
    done = state / f"{key}.done"
    with FileLock(state / f"{key}.lock", timeout=900):
        if not done.exists():
            build()
            done.touch()


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """Path of the shared tiny dataset (do not modify the file; copy it)."""
    path = shared_dir(tmp_path_factory) / "tiny.npz"
    build_once(path.parent, "tiny", lambda: collect(path))
    return path


@pytest.fixture(scope="session")
def tiny_arrays(tiny_npz) -> dict[str, np.ndarray]:
    """The raw arrays of the tiny dataset (shared: copy before mutating)."""
    return load_npz(tiny_npz)


@pytest.fixture(scope="module")
def work(request, tmp_path_factory) -> Path:
    """A scratch directory for one module's shared fixtures, named after the module."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="session")
def in_process() -> Callable[..., str]:
    """run_in_process, for modules that need it."""
    return run_in_process


# The tiny runs the modules share, trained on the tiny dataset with TINY_TRAIN: name -> (script,
# flags). The inspector names a model after its run directory, so the names show in its reports.
TINY_TRAIN = ("--batch-size", "16", "--log-every", "5", "--device", "cpu", "--seed", "0")
TINY_VIT = ("--patch-size", "8", "--latent-dim", "32", "--mlp-dim", "64")
# one-step windows and seed 003's unit-vector loss: the trainer's validation rows then measure what
# the inspector measures (the same frames, the same prediction loss)
INSPECTABLE = ("--epochs", "1", "--unroll", "1", "--pred-loss", "normalized")
TINY_RUNS = {
    # one epoch, one run per architecture
    "cnn": ("train_jepa.py", "--epochs", "1", "--latent-dim", "32"),
    "vit": ("train_jepa.py", "--epochs", "1", "--arch", "vit", *TINY_VIT, "--jepa-predictor-hidden-dim", "64"),
    "encdec": ("train_encdec.py", "--epochs", "1", *TINY_VIT, "--decoder-dim", "32"),
    # the CNN with and without VICReg
    "vicreg": ("train_jepa.py", *INSPECTABLE, "--reg", "vicreg"),
    "none": ("train_jepa.py", *INSPECTABLE, "--reg", "none"),
}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_npz) -> Callable[[str], tuple[Path, str]]:
    """tiny_run(name) -> (run directory, what its trainer printed) of the TINY_RUNS entry, trained
    on first use. Shared: copy a run before anything may write into it."""
    root = shared_dir(tmp_path_factory) / "runs"
    root.mkdir(exist_ok=True)

    def train(name: str) -> None:
        out, log = root / name, root / f"{name}.stdout"
        shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
        script, *flags = TINY_RUNS[name]
        log.write_text(run_in_process(script, *flags, *TINY_TRAIN, "--data", tiny_npz, "--out-dir", out))

    def get(name: str) -> tuple[Path, str]:
        build_once(root, name, lambda: train(name))
        return root / name, (root / f"{name}.stdout").read_text()

    return get


def one_step(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of transitions as the 1-step windows models train on: frames [B,2,...], actions [B,1,...]."""
    return torch.stack([obs, next_obs], dim=1), action[:, None]
