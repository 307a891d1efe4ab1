"""End to end through the real command lines, on tiny budgets: collect -> summarise -> train,
resume, determinism, refusing to clobber a run, --help, and one-line errors for bad inputs."""

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, ok, run, write_npz

LOG_LINE = re.compile(r"^Epoch \d\d \| Batch \d{4} \| Step \d{5} \| Avg Loss \d+\.\d{4}$", re.M)
LOSS_COLUMNS = ["step", "epoch", "phase", "loss", "pred_loss", "std_loss", "cov_loss", "embedding_std", "effective_rank"]
EPISODES, MAX_STEPS = 8, 40
TRAIN = ["--batch-size", "16", "--log-every", "5", "--device", "cpu", "--seed", "0"]


def train_args(data, out_dir, *extra, epochs=2):
    return ("--data", data, "--out-dir", out_dir, "--epochs", str(epochs), *TRAIN, *extra)


def train(data, out_dir, *extra, epochs=2):
    return run("train_jepa.py", *train_args(data, out_dir, *extra, epochs=epochs))


def read_rows(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def loss_table(run_dir):
    return [[r[c] for c in LOSS_COLUMNS] for r in read_rows(run_dir)]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def collected(work):
    out = work / "data" / "empty8.npz"
    proc = run(
        "collect_minigrid_data.py",
        *("--env", "MiniGrid-Empty-8x8-v0", "--episodes", EPISODES, "--max-steps", MAX_STEPS),
        *("--image-size", "32", "--seed", "0", "--out", out),
    )
    return out, proc


@pytest.fixture(scope="module")
def data(collected):
    out, proc = collected
    ok(proc)
    return out


@pytest.fixture(scope="module")
def run_a(work, data):
    """The reference run: vicreg, seed 0, 2 epochs."""
    out = work / "run_a"
    return out, train(data, out)


# ----------------------------------------------------------------------------- collect, summary


def test_collect_cli(collected):
    out, proc = collected
    ok(proc)
    n = EPISODES * MAX_STEPS  # Empty-8x8 is not solved by 40 random steps from (1,1) with this seed
    assert f"Saved {n} transitions from {EPISODES} episodes (32x32x3 rgb)" in proc.stdout
    with np.load(out) as z:
        assert z["obs"].shape == (n, 32, 32, 3)
        assert json.loads(str(z["meta"]))["env"] == "MiniGrid-Empty-8x8-v0"
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]


def test_summary_cli(data):
    proc = ok(run("minigrid_dataset.py", data))
    n = EPISODES * MAX_STEPS
    assert re.search(rf"^transitions\s+{n}$", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^episodes\s+{EPISODES} \(", proc.stdout, re.M), proc.stdout
    m = re.search(r"^actions\s+(.*)$", proc.stdout, re.M)
    assert m, proc.stdout
    counts = dict(tok.split(":") for tok in m.group(1).split())
    assert sorted(int(a) for a in counts) == list(range(7))
    assert sum(int(c) for c in counts.values()) == n


# ----------------------------------------------------------------------------- train


def test_train_cli(run_a):
    out, proc = run_a
    ok(proc)
    assert "Using device: cpu" in proc.stdout
    logs = LOG_LINE.findall(proc.stdout)
    assert len(logs) >= 4, proc.stdout
    assert re.search(r"^Epoch 01 finished \| Mean Loss \d+\.\d{4}", proc.stdout, re.M)
    assert re.search(r"^Epoch 02 finished \| Mean Loss \d+\.\d{4}", proc.stdout, re.M)
    steps = [int(re.search(r"Step (\d{5})", line).group(1)) for line in logs]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert all(int(re.search(r"Batch (\d{4})", line).group(1)) % 5 == 0 for line in logs)

    for name in ("model.pt", "config.json", "metrics.csv", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

    rows = read_rows(out)
    train_rows = [r for r in rows if r["phase"] == "train"]
    val_rows = [r for r in rows if r["phase"] == "val"]
    assert len(val_rows) == 2 and [r["epoch"] for r in val_rows] == ["1", "2"]
    for r in rows:
        for k in ("loss", "pred_loss", "std_loss", "cov_loss"):
            assert math.isfinite(float(r[k])), (k, r)
    for r in val_rows:
        assert float(r["embedding_std"]) > 0 and float(r["effective_rank"]) >= 1
    assert float(train_rows[-1]["loss"]) < float(train_rows[0]["loss"])
    # every printed log line is a train row of metrics.csv
    logged_steps = {int(r["step"]) for r in train_rows}
    assert set(steps) <= logged_steps

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "jepa_cnn"
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["seed"] == 0
    assert cfg["model"]["obs_shape"] == [32, 32, 3] and cfg["model"]["reg"] == "vicreg"

    ckpt = weights(out)
    for k in ("model", "model_config", "train_config", "step", "epoch", "optimizer", "data_meta", "arch"):
        assert k in ckpt, k
    assert ckpt["epoch"] == 2 and ckpt["step"] == int(val_rows[-1]["step"]) == int(train_rows[-1]["step"])
    assert ckpt["step"] >= steps[-1]
    assert ckpt["data_meta"]["frame_shape"] == [32, 32, 3]


def test_reg_none_prints_collapse_warning(work, data, in_process):
    out = work / "run_none"
    stdout = in_process("train_jepa.py", *train_args(data, out, "--reg", "none"))
    assert "WARNING: the latents look collapsed" in stdout
    last_val = [r for r in read_rows(out) if r["phase"] == "val"][-1]
    assert float(last_val["effective_rank"]) < 2.56 or float(last_val["embedding_std"]) < 0.1 / math.sqrt(128)


def test_resume_matches_uninterrupted_run(work, data, run_a, in_process):
    ok(run_a[1])
    out = work / "run_resumed"
    # the first epoch in this process: what is resumed in a new one is what the files hold
    first = in_process("train_jepa.py", *train_args(data, out, epochs=1))
    assert "Epoch 02" not in first
    assert weights(out)["epoch"] == 1
    second = ok(train(data, out, "--resume", epochs=2))
    assert "Epoch 01 |" not in second.stdout and "Epoch 02 finished" in second.stdout
    assert loss_table(out) == loss_table(run_a[0])
    a, r = weights(run_a[0]), weights(out)
    assert (r["epoch"], r["step"]) == (a["epoch"], a["step"])
    assert_same_weights(a["model"], r["model"])


def test_same_seed_twice_is_identical(work, data, run_a, in_process):
    ok(run_a[1])
    out = work / "run_b"
    in_process("train_jepa.py", *train_args(data, out))  # run_a ran in a process of its own
    assert loss_table(out) == loss_table(run_a[0])
    assert_same_weights(weights(out)["model"], weights(run_a[0])["model"])


def test_second_run_into_same_out_dir_is_refused(data, run_a):
    out = run_a[0]
    ok(run_a[1])
    model = out / "model.pt"
    before = (model.read_bytes(), model.stat().st_mtime_ns, (out / "metrics.csv").read_bytes())
    proc = train(data, out)
    assert_one_line_error(proc, "already holds a run", "--resume", "--overwrite")
    assert (model.read_bytes(), model.stat().st_mtime_ns, (out / "metrics.csv").read_bytes()) == before


# ----------------------------------------------------------------------------- help and bad inputs


@pytest.mark.parametrize(
    "script, flags",
    [
        ("collect_minigrid_data.py", ["--env", "--episodes", "--max-steps", "--seed", "--out", "--image-size", "--obs"]),
        ("minigrid_dataset.py", ["file"]),
        (
            "train_jepa.py",
            ["--data", "--epochs", "--batch-size", "--lr", "--seed", "--out-dir", "--device", "--config", "--resume", "--arch"],
        ),
    ],
)
def test_help(script, flags):
    proc = ok(run(script, "--help"))
    assert proc.stdout.startswith("usage:")
    for flag in flags:
        assert flag in proc.stdout, flag


@pytest.fixture
def garbage_npz(tmp_path):
    p = tmp_path / "corrupt.npz"
    p.write_bytes(np.random.default_rng(0).bytes(3000))
    return p


def test_train_missing_data_file(tmp_path):
    proc = run("train_jepa.py", "--data", tmp_path / "nope.npz", "--out-dir", tmp_path / "run", *TRAIN)
    assert_one_line_error(proc, "nope.npz", "not found")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_train_corrupt_data_file(tmp_path, garbage_npz):
    proc = run("train_jepa.py", "--data", garbage_npz, "--out-dir", tmp_path / "run", *TRAIN)
    assert_one_line_error(proc, "corrupt.npz")
    assert not (tmp_path / "run" / "model.pt").exists()


def test_summary_corrupt_and_missing_file(tmp_path, garbage_npz):
    assert_one_line_error(run("minigrid_dataset.py", garbage_npz), "corrupt.npz")
    assert_one_line_error(run("minigrid_dataset.py", tmp_path / "nope.npz"), "not found")


def test_summary_not_a_transitions_file(tmp_path):
    p = write_npz(tmp_path / "other.npz", weights=np.zeros(3))
    assert_one_line_error(run("minigrid_dataset.py", p), "lacks keys")


@pytest.mark.parametrize(
    "env_id, extra, fragment",
    [
        ("MiniGrid-DoesNotExist-v0", (), "unknown env id"),
        ("CartPole-v1", ("--obs", "symbolic"), "not a MiniGrid env"),  # CartPole itself is fine: any pixel env is
    ],
)
def test_collect_bad_env(tmp_path, env_id, extra, fragment):
    out = tmp_path / "x.npz"
    proc = run("collect_minigrid_data.py", "--env", env_id, "--episodes", "1", "--out", out, *extra)
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_resume_with_nothing_to_resume(tmp_path, data):
    out = tmp_path / "empty_run"
    proc = train(data, out, "--resume")
    assert_one_line_error(proc, "--resume", "no checkpoint")
    assert not (out / "model.pt").exists()


def test_resume_from_garbage_model_pt(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    garbage = np.random.default_rng(1).bytes(4096)
    (out / "model.pt").write_bytes(garbage)
    proc = train(data, out, "--resume")
    assert_one_line_error(proc, "model.pt", "not a readable checkpoint")
    assert (out / "model.pt").read_bytes() == garbage


def test_yaml_bad_choice_is_one_line_error(tmp_path, data):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("reg: bogus\n")
    proc = train(data, tmp_path / "run", "--config", cfg)
    assert_one_line_error(proc, "reg")


def test_nan_loss_is_one_line_error_and_writes_no_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    proc = train(data, out, "--lr", "1e30", epochs=1)
    assert_one_line_error(proc, "loss became nan", "--lr")
    assert not (out / "model.pt").exists()


def test_resume_with_other_data_is_one_line_error(tmp_path, data, run_a):
    from conftest import collect

    ok(run_a[1])
    out = tmp_path / "run"
    shutil.copytree(run_a[0], out)
    before = (out / "model.pt").read_bytes()
    symbolic = collect(tmp_path / "sym.npz", episodes=3, max_steps=10, obs="symbolic")
    proc = train(symbolic, out, "--resume", epochs=3)
    assert_one_line_error(proc, "--resume", f"--data {data}", "(now")
    assert (out / "model.pt").read_bytes() == before


def test_resume_records_the_lr_it_actually_used(tmp_path, data, run_a):
    ok(run_a[1])
    out = tmp_path / "run"
    shutil.copytree(run_a[0], out)
    proc = train(data, out, "--resume", "--lr", "0.0002", epochs=3)
    if proc.returncode != 0:  # refusing to change the lr on resume would be fine too
        assert_one_line_error(proc, "--lr")
        return
    ckpt = weights(out)
    used = ckpt["optimizer"]["param_groups"][0]["lr"]
    recorded = json.loads((out / "config.json").read_text())["train"]["lr"]
    assert used == recorded == ckpt["train_config"]["lr"], (used, recorded, ckpt["train_config"]["lr"])


def test_failed_overwrite_keeps_the_earlier_run_whole(tmp_path, data, run_a):
    """--overwrite moves the earlier run to <out>.prev before training, so a new run that fails
    (here a NaN loss at step 2) leaves the earlier run byte-for-byte intact and no mix of old
    and new files in --out-dir."""
    ok(run_a[1])
    out = tmp_path / "run"
    shutil.copytree(run_a[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = train(data, out, "--overwrite", "--lr", "1e30", epochs=1)
    assert_one_line_error(proc, "loss became nan")
    backup = tmp_path / "run.prev"
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before
    assert not (out / "model.pt").exists()


@pytest.mark.slow
def test_vicreg_keeps_latents_spread_where_seed003_collapses(tmp_path):
    """The project's main claim at a modest budget (~70 s): on full 64 px episodes, reg=none
    collapses and is flagged every epoch; vicreg is not flagged and keeps a much higher rank."""
    data = tmp_path / "d.npz"
    ok(run("collect_minigrid_data.py", "--episodes", "30", "--actions", "nav", "--seed", "0", "--out", data))
    common = ["--data", data, "--epochs", "2", "--device", "cpu", "--seed", "0"]
    vic = ok(run("train_jepa.py", *common, "--out-dir", tmp_path / "vicreg"))
    none = ok(run("train_jepa.py", *common, "--out-dir", tmp_path / "none", "--reg", "none"))
    assert "WARNING" not in vic.stdout
    assert none.stdout.count("WARNING: the latents look collapsed") == 2
    v = [r for r in read_rows(tmp_path / "vicreg") if r["phase"] == "val"][-1]
    n = [r for r in read_rows(tmp_path / "none") if r["phase"] == "val"][-1]
    assert float(v["effective_rank"]) > 3 * float(n["effective_rank"])
    assert float(v["embedding_std"]) > 10 * float(n["embedding_std"])


def test_amp_trains_with_finite_falling_loss(data, tmp_path, in_process):
    """--amp (bfloat16 autocast) runs on the CPU too; the model and checkpoint stay float32."""
    out = tmp_path / "amp"
    in_process("train_jepa.py", *train_args(data, out, "--amp"))
    rows = [r for r in read_rows(out) if r["phase"] == "train"]
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(t.dtype == torch.float32 for t in weights(out)["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_compile_matches_eager_losses(data, tmp_path, run_a):
    """--compile changes speed, not the run: same rows and checkpoint keys, losses within float noise."""
    out = tmp_path / "compiled"
    ok(train(data, out, "--compile"))
    eager, compiled = loss_table(run_a[0]), loss_table(out)
    assert len(eager) == len(compiled)
    for row_e, row_c in zip(eager, compiled, strict=True):
        for e, c in zip(row_e, row_c, strict=True):
            if e == c:
                continue
            assert float(c) == pytest.approx(float(e), rel=1e-3, abs=1e-5), (row_e, row_c)
    assert weights(out)["model"].keys() == weights(run_a[0])["model"].keys()


def test_idm_coeff_trains_and_logs_its_term(data, tmp_path, in_process):
    out = tmp_path / "idm"
    in_process("train_jepa.py", *train_args(data, out, "--idm-coeff", "1"))
    rows = [r for r in read_rows(out) if r["phase"] == "train"]
    assert all(math.isfinite(float(r["idm_loss"])) for r in rows)
    assert json.loads((out / "config.json").read_text())["train"]["idm_coeff"] == 1.0
    assert any(k.startswith("inverse") for k in weights(out)["model"])
    proc = train(data, out, "--resume", "--idm-coeff", "0", epochs=3)
    assert_one_line_error(proc, "--idm-coeff 1.0 (now 0.0)")
