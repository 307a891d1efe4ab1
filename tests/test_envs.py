"""Any Gymnasium env from pixels: CartPole (discrete) and Pendulum (continuous) through every
stage's command line (run in-process but for CartPole's headless collection), continuous actions in
every model, grayscale and frame skip, bad inputs, the optional CarRacing / Atari extras, and
headless rendering."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, THREADS, assert_one_line_error, collect, load_npz, ok, one_step, run, write_npz
from torch import nn

from envs import to_frames
from losses import action_embedding
from minigrid_dataset import MiniGridTransitions
from models import model_from_checkpoint
from wm_common import load_checkpoint, run_cli, save_checkpoint
from world_model_jepa import JEPAConfig, JEPAWorldModel
from world_model_vit import EncDecConfig, ViTEncoderDecoder, ViTJEPA, ViTJEPAConfig

TRAIN = ["--epochs", "1", "--batch-size", "16", "--log-every", "5", "--device", "cpu", "--seed", "0"]
VIT = ["--patch-size", "8", "--latent-dim", "32", "--mlp-dim", "64", "--num-encoder-layers", "1"]
CARTPOLE = dict(env="CartPole-v1", episodes=4, max_steps=15, image_size=32, seed=0)
PENDULUM = dict(env="Pendulum-v1", episodes=4, max_steps=15, image_size=32, seed=0)
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601
PROBE_KEYS = ("agent_pos", "agent_dir", "goal_pos", "door_state", "carrying")
EXTRAS = "make setup-extras"


def flags(settings: dict) -> list[str]:
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def headless_env() -> dict[str, str]:
    """This environment without any display: no X11, no Wayland, SDL left to pick its own driver."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    return dict(env, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)


def meta_of(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(str(arrays["meta"]))


def with_meta(arrays: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
    """A copy of the arrays whose `meta` JSON has the given action_space changes."""
    out = {k: v.copy() for k, v in arrays.items()}
    meta = meta_of(arrays)
    meta["action_space"] = {**meta["action_space"], **changes}
    out["meta"] = np.array(json.dumps(meta))
    return out


def episodes_of(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Row indices of each episode, in order."""
    return [np.flatnonzero(arrays["episode"] == e) for e in np.unique(arrays["episode"])]


def cli_in_process(main, cfg_cls, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """The script's CLI (run_cli) run in this process, as a CompletedProcess for assert_one_line_error."""
    capsys.readouterr()
    try:
        run_cli(main, cfg_cls, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def finite_or_null(values: list) -> bool:
    return all(v is None or (isinstance(v, float | int) and math.isfinite(v)) for v in values)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cartpole(work):
    """CartPole collected through the CLI with no display at all: (path, completed process)."""
    path = work / "cartpole.npz"
    proc = subprocess.run(
        [sys.executable, "collect_minigrid_data.py", *flags(CARTPOLE), "--out", str(path)],
        cwd=ROOT,
        env=headless_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return path, proc


@pytest.fixture(scope="module")
def cartpole_arrays(cartpole):
    ok(cartpole[1])
    return load_npz(cartpole[0])


@pytest.fixture(scope="module")
def cartpole_run(work, cartpole, in_process):
    ok(cartpole[1])
    out = work / "cartpole_cnn"
    in_process("train_jepa.py", "--latent-dim", "32", *TRAIN, "--data", cartpole[0], "--out-dir", out)
    return out


@pytest.fixture(scope="module")
def cartpole_eval(work, cartpole_run, in_process):
    out = work / "cartpole_inspect"
    in_process("inspect_jepa_model.py", "--checkpoint", cartpole_run, "--out-dir", out, "--device", "cpu")
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def pendulum(work):
    return collect(work / "pendulum.npz", **PENDULUM)


@pytest.fixture(scope="module")
def pendulum_arrays(pendulum):
    return load_npz(pendulum)


@pytest.fixture(scope="module")
def pendulum_runs(work, pendulum, in_process):
    """One tiny checkpoint per architecture trained on Pendulum: {arch: run dir}."""
    commands = {
        "jepa_cnn": ("train_jepa.py", "--latent-dim", "32"),
        "jepa_vit": ("train_jepa.py", "--arch", "vit", *VIT, "--jepa-predictor-hidden-dim", "32"),
        "encdec_vit": ("train_encdec.py", *VIT, "--decoder-dim", "32", "--num-decoder-layers", "1", "--num-examples", "2"),
    }
    runs = {}
    for arch, (script, *args) in commands.items():
        runs[arch] = work / f"pendulum_{arch}"
        in_process(script, *args, *TRAIN, "--data", pendulum, "--out-dir", runs[arch])
    return runs


@pytest.fixture(scope="module")
def pendulum_eval(work, pendulum_runs, pendulum, in_process):
    out = work / "pendulum_inspect"
    checkpoints = [a for path in pendulum_runs.values() for a in ("--checkpoint", path)]
    in_process("inspect_jepa_model.py", *checkpoints, "--data", pendulum, "--out-dir", out, "--device", "cpu")
    return json.loads((out / "eval.json").read_text())


# ----------------------------------------------------------------------------- 1. discrete: CartPole


def test_cartpole_collection_has_discrete_actions_and_pixel_frames(cartpole_arrays):
    a = cartpole_arrays
    n = len(a["action"])
    assert a["action"].dtype == np.int64 and a["action"].shape == (n,)
    assert set(np.unique(a["action"])) <= {0, 1} and len(np.unique(a["action"])) == 2
    assert a["obs"].dtype == np.uint8 and a["obs"].shape == (n, 32, 32, 3)
    assert a["terminal_obs"].shape == (4, 32, 32, 3)
    assert a["obs"].min() < a["obs"].max()  # a real picture, not a blank frame
    assert not any(k in a for k in PROBE_KEYS)  # no MiniGrid ground truth for other envs
    meta = meta_of(a)
    assert meta["action_space"] == {"type": "discrete", "n": 2}
    assert meta["env"] == "CartPole-v1" and meta["obs_mode"] == "pixels (render)" and meta["image_shape"] == [32, 32, 3]
    # CartPole pays 1 per step; each episode stops at its own end or at --max-steps 15
    assert np.all(a["reward"] == 1.0)
    eps = episodes_of(a)
    assert len(eps) == 4
    for rows in eps:
        assert 1 <= len(rows) <= 15
        assert a["done"][rows].tolist() == [False] * (len(rows) - 1) + [True]
        assert a["terminated"][rows[-1]] or len(rows) == 15


def test_cartpole_dataset_reports_discrete_actions(cartpole):
    ok(cartpole[1])
    data = MiniGridTransitions(cartpole[0])
    assert not data.continuous_actions and data.num_actions == 2
    assert data.frame_shape == (32, 32, 3)
    assert any("CartPole-v1" in note and "MiniGrid" in note for note in data.notes), data.notes


def test_cartpole_collection_is_deterministic_for_a_seed(cartpole_arrays, tmp_path):
    again = load_npz(collect(tmp_path / "again.npz", **CARTPOLE))  # in-process, same settings as the CLI run
    assert again.keys() == cartpole_arrays.keys()
    for k in again:
        if k != "meta":
            assert again[k].dtype == cartpole_arrays[k].dtype and np.array_equal(again[k], cartpole_arrays[k]), k
    m1, m2 = meta_of(cartpole_arrays), meta_of(again)
    assert {k: v for k, v in m1.items() if k not in ("date", "config")} == {k: v for k, v in m2.items() if k not in ("date", "config")}
    other = load_npz(collect(tmp_path / "other.npz", **{**CARTPOLE, "seed": 1}))
    assert not (len(other["action"]) == len(cartpole_arrays["action"]) and np.array_equal(other["obs"], cartpole_arrays["obs"]))


def test_collector_runs_headless(cartpole):
    """No DISPLAY, no WAYLAND_DISPLAY, no SDL_VIDEODRIVER: rgb_array rendering still works."""
    path, proc = cartpole
    ok(proc)
    assert f"to {path}" in proc.stdout and path.is_file()
    frames = load_npz(path)["obs"]
    assert frames.shape[1:] == (32, 32, 3) and frames.std() > 0


def test_cartpole_cnn_jepa_trains_and_inspects_without_probes(cartpole_run, cartpole_eval):
    ckpt = load_checkpoint(cartpole_run, arch="jepa_cnn")
    assert ckpt["model_config"]["continuous_actions"] is False and ckpt["model_config"]["num_actions"] == 2
    emb = model_from_checkpoint(ckpt).predictor.action_emb
    assert isinstance(emb, nn.Embedding) and emb.num_embeddings == 2
    assert ckpt["data_meta"]["env"] == "CartPole-v1"
    assert cartpole_eval["data"]["env"] == "CartPole-v1"
    (report,) = cartpole_eval["models"].values()
    assert report["probe"] is None
    assert "MiniGrid" in report["probe_note"]
    assert "probe_predicted" not in report and "baselines" not in report
    assert isinstance(report["effective_rank"], float) and math.isfinite(report["effective_rank"]) and report["effective_rank"] >= 1
    ro = report["rollout"]
    assert ro["horizons"] == list(range(1, 11))
    assert len(ro["error"]) == len(ro["copy_baseline_error"]) == 10
    assert finite_or_null(ro["error"]) and finite_or_null(ro["copy_baseline_error"])
    assert ro["error"][0] is not None and ro["num_starts"][0] > 0


# ----------------------------------------------------------------------------- 2. continuous: Pendulum


def test_pendulum_collection_has_continuous_actions_within_bounds(pendulum_arrays):
    a = pendulum_arrays
    n = len(a["obs"])
    assert n == 4 * 15  # Pendulum never terminates: every episode runs to --max-steps
    assert a["action"].dtype == np.float32 and a["action"].shape == (n, 1)
    space = meta_of(a)["action_space"]
    assert space["type"] == "box" and space["shape"] == [1]
    assert space["low"] == [-2.0] and space["high"] == [2.0]
    assert np.all(a["action"] >= np.float32(space["low"])) and np.all(a["action"] <= np.float32(space["high"]))
    assert a["action"].std() > 0.5  # drawn over the whole range, not a constant
    assert a["obs"].shape == (n, 32, 32, 3) and a["obs"].dtype == np.uint8


def test_pendulum_dataset_reports_continuous_actions(pendulum):
    data = MiniGridTransitions(pendulum)
    assert data.continuous_actions and data.num_actions == 1
    batch = data.__getitems__([0, 1, 2])
    assert batch["action"].dtype == torch.float32 and batch["action"].shape == (3, 1)


@pytest.mark.parametrize("arch", ["jepa_cnn", "jepa_vit", "encdec_vit"])
def test_continuous_checkpoints_embed_actions_linearly(pendulum_runs, arch):
    ckpt = load_checkpoint(pendulum_runs[arch], arch=arch)
    assert ckpt["model_config"]["continuous_actions"] is True
    assert ckpt["model_config"]["num_actions"] == 1
    model = model_from_checkpoint(ckpt)
    emb = model.predictor.action_emb if arch == "jepa_cnn" else model.action_emb
    assert isinstance(emb, nn.Linear) and emb.in_features == 1


def test_inspector_on_continuous_models_has_rollouts_and_no_probes(pendulum_eval):
    assert pendulum_eval["data"]["env"] == "Pendulum-v1"
    models = pendulum_eval["models"]
    assert sorted(r["arch"] for r in models.values()) == ["encdec_vit", "jepa_cnn", "jepa_vit"]
    for name, r in models.items():
        assert r["probe"] is None and "MiniGrid" in r["probe_note"], name
        ro = r["rollout"]
        assert ro["horizons"] == list(range(1, 11)), name
        assert finite_or_null(ro["error"]) and finite_or_null(ro["copy_baseline_error"]), (name, ro)
        assert ro["error"][0] is not None, name
        assert math.isfinite(r["pred_loss"]) and math.isfinite(r["effective_rank"]), name
    encdec = next(r for r in models.values() if r["arch"] == "encdec_vit")
    assert encdec["rollout"]["space"] == "pixels"


# ----------------------------------------------------------------------------- 3. models with action vectors


def test_action_embedding_kind_follows_the_action_space():
    discrete = action_embedding(num_actions=5, dim=8, continuous=False)
    assert isinstance(discrete, nn.Embedding) and (discrete.num_embeddings, discrete.embedding_dim) == (5, 8)
    continuous = action_embedding(num_actions=3, dim=8, continuous=True)
    assert isinstance(continuous, nn.Linear) and (continuous.in_features, continuous.out_features) == (3, 8)
    assert continuous(torch.rand(4, 3)).shape == (4, 8)
    assert discrete(torch.tensor([0, 4])).shape == (2, 8)


def _continuous_model(kind: str) -> nn.Module:
    common = dict(num_actions=3, continuous_actions=True, action_emb_dim=8)
    vit = dict(image_size=16, patch_size=8, input_channels=3, latent_dim=16, num_heads=2, num_encoder_layers=1, mlp_dim=16, **common)
    if kind == "jepa_cnn":
        return JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], channels=[4, 8], latent_dim=16, predictor_hidden_dim=16, **common))
    if kind == "jepa_vit":
        return ViTJEPA(config=ViTJEPAConfig(jepa_predictor_hidden_dim=16, **vit))
    return ViTEncoderDecoder(config=EncDecConfig(decoder_dim=16, num_decoder_layers=1, **vit))


@pytest.mark.parametrize("kind", ["jepa_cnn", "jepa_vit", "encdec_vit"])
def test_continuous_models_take_action_vectors_and_depend_on_them(kind):
    torch.manual_seed(0)
    model = _continuous_model(kind).eval()
    g = torch.Generator().manual_seed(1)
    obs = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    nxt = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    a1 = torch.rand(4, 3, generator=g) * 2 - 1
    a2 = torch.rand(4, 3, generator=g) * 2 - 1
    with torch.no_grad():
        if kind == "encdec_vit":
            tokens = model.encoder(obs.permute(0, 3, 1, 2).float() / 255)[1]
            out1, out1_again, out2 = model.decode(tokens, a1), model.decode(tokens, a1), model.decode(tokens, a2)
            assert out1.shape == (4, 3, 16, 16)
            assert model.rollout_frames(obs, torch.stack([a1, a2], dim=1)).shape == (4, 2, 3, 16, 16)
        else:
            z = model.encode(obs)
            out1, out1_again, out2 = model.predict(z, a1), model.predict(z, a1), model.predict(z, a2)
            assert out1.shape == (4, 16)
            assert model.rollout(z, torch.stack([a1, a2], dim=1)).shape == (4, 2, 16)
    assert torch.equal(out1, out1_again)
    assert not torch.allclose(out1, out2)
    assert (out1 - out2).abs().flatten(1).amax(1).min() > 0  # every sample's output moves with its action
    model.train()
    loss, _ = model.loss(*one_step(obs, a1, nxt))
    assert torch.isfinite(loss)
    loss.backward()
    emb = model.predictor.action_emb if kind == "jepa_cnn" else model.action_emb
    assert isinstance(emb, nn.Linear) and emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- 4. grayscale and frame skip


def test_to_frames_grayscale_is_rounded_luma():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    gray = to_frames(rgb, 1, 8)  # no resize at the native size: exactly the rounded luma
    assert gray.shape == (2, 8, 8, 1) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], np.round(rgb @ LUMA).astype(np.uint8))
    back = to_frames(gray, 3, 8)  # grayscale frames asked for in RGB: the value in every channel
    assert back.shape == (2, 8, 8, 3) and np.array_equal(back, np.repeat(gray, 3, axis=-1))


def test_grayscale_frames_are_the_luma_of_the_rgb_frames(tmp_path):
    settings = dict(env="CartPole-v1", episodes=3, max_steps=15, image_size=32, seed=3)
    rgb = load_npz(collect(tmp_path / "rgb.npz", channels=3, **settings))
    gray = load_npz(collect(tmp_path / "gray.npz", channels=1, **settings))
    assert np.array_equal(gray["action"], rgb["action"])  # same seed, same episodes
    assert meta_of(gray)["image_shape"] == [32, 32, 1]
    for key in ("obs", "terminal_obs"):
        assert gray[key].dtype == np.uint8 and gray[key].shape == rgb[key].shape[:-1] + (1,)
        luma = rgb[key].astype(np.float64) @ LUMA
        assert np.abs(gray[key][..., 0] - luma).max() <= 1.0, key
        # the check can tell: an unweighted channel mean is further off than the tolerance
        assert np.abs(gray[key][..., 0] - rgb[key].mean(-1)).max() > 1.0
    assert len(np.unique(gray["obs"])) > 10
    assert MiniGridTransitions(tmp_path / "gray.npz").frame_shape == (32, 32, 1)


def test_frame_skip_sums_rewards_and_halves_transitions(tmp_path):
    every = load_npz(collect(tmp_path / "fs1.npz", env="CartPole-v1", episodes=5, max_steps=20, image_size=32, seed=0))
    skip = load_npz(collect(tmp_path / "fs2.npz", env="CartPole-v1", episodes=5, max_steps=10, image_size=32, seed=0, frame_skip=2))
    assert meta_of(skip)["frame_skip"] == 2 and meta_of(every)["frame_skip"] == 1
    # CartPole pays 1 per env step, so a transition's reward is the number of env steps it took
    assert np.all(every["reward"] == 1.0)
    env_steps = {"every": 0, "skip": 0}
    for rows in episodes_of(skip):
        r, term = skip["reward"][rows], skip["terminated"][rows]
        assert np.all(r[:-1] == 2.0), r
        assert r[-1] == 2.0 or (r[-1] == 1.0 and term[-1]), (r, term)
        steps = int(r.sum())
        assert len(rows) == math.ceil(steps / 2)
        assert term[-1] or (len(rows) == 10 and steps == 20)  # up to 10 transitions = 20 env steps
        env_steps["skip"] += steps
    for rows in episodes_of(every):
        assert every["terminated"][rows][-1] or len(rows) == 20
        env_steps["every"] += len(rows)
    ratio_skip = len(skip["action"]) / env_steps["skip"]
    ratio_every = len(every["action"]) / env_steps["every"]
    assert ratio_every == 1.0
    assert 0.5 <= ratio_skip <= 0.6, ratio_skip  # about half as many transitions per env step


def test_frame_skip_stores_every_kth_frame(tmp_path):
    """Replaying an episode's actions, each twice, renders exactly the stored frames."""
    import gymnasium as gym

    arrays = load_npz(collect(tmp_path / "fs2.npz", env="CartPole-v1", episodes=1, max_steps=10, image_size=32, seed=5, frame_skip=2))
    env = gym.make("CartPole-v1", render_mode="rgb_array")
    env.reset(seed=5)
    frames, done = [env.render()], False
    for a in arrays["action"]:
        assert not done
        for _ in range(2):
            _, _, terminated, truncated, _ = env.step(int(a))
            done = terminated or truncated
            if done:
                break
        frames.append(env.render())
    env.close()
    expected = to_frames(np.stack(frames), 3, 32)
    stored = np.concatenate([arrays["obs"], arrays["terminal_obs"]])
    assert np.array_equal(stored, expected)


# ----------------------------------------------------------------------------- 5. bad inputs


def test_unknown_env_id_is_a_one_line_error(tmp_path):
    out = tmp_path / "x.npz"
    assert_one_line_error(run("collect_minigrid_data.py", "--env", "NoSuchEnv-v9", "--episodes", "1", "--out", out), "NoSuchEnv-v9")
    assert not out.exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", [("--obs", "rgb_partial"), ("--actions", "nav")])
def test_minigrid_only_flags_on_another_env_are_one_line_errors(tmp_path, flag):
    out = tmp_path / "x.npz"
    proc = run("collect_minigrid_data.py", "--env", "CartPole-v1", *flag, "--episodes", "1", "--max-steps", "3", "--out", out)
    assert_one_line_error(proc, "CartPole-v1", "MiniGrid", flag[0])
    assert not out.exists() and not any(tmp_path.iterdir())


def _bad_file(case: str, cartpole_arrays, pendulum_arrays) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """(arrays of a damaged file, fragments its error must name)."""
    if case == "outside_bounds":  # the actions were drawn in [-2, 2]; meta now says [-0.5, 0.5]
        return with_meta(pendulum_arrays, low=[-0.5], high=[0.5]), ("outside the recorded bounds",)
    if case == "action_above_high":
        arrays = {k: v.copy() for k, v in pendulum_arrays.items()}
        arrays["action"][7, 0] = 2.5
        return arrays, ("outside the recorded bounds", "2.5")
    if case == "dims_mismatch":  # actions [N,1], meta says 2-D
        return with_meta(pendulum_arrays, shape=[2], low=[-2.0, -2.0], high=[2.0, 2.0]), ("1 dims", "[2]")
    if case == "vectors_but_discrete":  # CartPole's actions as [N,1] floats; meta still says discrete n=2
        arrays = {k: v.copy() for k, v in cartpole_arrays.items()}
        arrays["action"] = arrays["action"][:, None].astype(np.float32)
        return arrays, ("vectors", "discrete")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["outside_bounds", "action_above_high", "dims_mismatch", "vectors_but_discrete"])
def test_bad_action_files_are_rejected_by_loader_and_trainer(tmp_path, capsys, cartpole_arrays, pendulum_arrays, case):
    import minigrid_dataset
    import train_jepa

    arrays, fragments = _bad_file(case, cartpole_arrays, pendulum_arrays)
    path = write_npz(tmp_path / f"{case}.npz", **arrays)
    if case == "action_above_high":  # a variant of outside_bounds: the loader's CLI in this process saves a subprocess
        loader = cli_in_process(minigrid_dataset.main, minigrid_dataset.SummaryConfig, [path], capsys)
    else:
        loader = run("minigrid_dataset.py", path)
    assert_one_line_error(loader, str(path), *fragments)
    out = tmp_path / "run"
    proc = cli_in_process(train_jepa.main, train_jepa.TrainConfig, ["--data", path, "--out-dir", out, *TRAIN], capsys)
    assert_one_line_error(proc, str(path), *fragments)
    assert not out.exists()


def test_the_unchanged_arrays_load(cartpole_arrays, pendulum_arrays, tmp_path):
    """The control for the bad-file test: the same arrays rewritten without edits load fine."""
    for name, arrays in (("cp", cartpole_arrays), ("pd", pendulum_arrays)):
        data = MiniGridTransitions(write_npz(tmp_path / f"{name}.npz", **arrays))
        assert len(data) == len(arrays["action"])


def test_planning_with_a_cartpole_checkpoint_is_a_one_line_error(tmp_path, cartpole_run):
    out = tmp_path / "plan"
    proc = run("plan_with_world_model.py", "--checkpoint", cartpole_run, "--episodes", "1", "--out-dir", out, "--device", "cpu")
    assert_one_line_error(proc, "CartPole-v1", "MiniGrid")
    assert not out.exists()


# ----------------------------------------------------------------------------- 6. optional extras


def test_carracing_gives_continuous_three_dim_actions(tmp_path):
    pytest.importorskip("Box2D", reason=f"CarRacing-v3 needs Box2D: run `{EXTRAS}`")
    arrays = load_npz(collect(tmp_path / "car.npz", env="CarRacing-v3", episodes=1, max_steps=10, image_size=32))
    n = len(arrays["action"])
    assert n == 10
    assert arrays["obs"].shape == (10, 32, 32, 3) and arrays["obs"].dtype == np.uint8 and arrays["obs"].std() > 0
    assert arrays["action"].shape == (10, 3) and arrays["action"].dtype == np.float32
    meta = meta_of(arrays)
    space = meta["action_space"]
    assert space == {"type": "box", "shape": [3], "low": [-1.0, 0.0, 0.0], "high": [1.0, 1.0, 1.0]}
    assert np.all(arrays["action"] >= np.float32(space["low"])) and np.all(arrays["action"] <= np.float32(space["high"]))
    assert meta["obs_mode"] == "pixels (observation)"  # its observations are pictures already
    data = MiniGridTransitions(tmp_path / "car.npz")
    assert data.continuous_actions and data.num_actions == 3


def test_pong_gives_discrete_six_actions(tmp_path):
    pytest.importorskip("ale_py", reason=f"ALE/Pong-v5 needs ale-py: run `{EXTRAS}`")
    arrays = load_npz(collect(tmp_path / "pong.npz", env="ALE/Pong-v5", episodes=1, max_steps=10, image_size=32))
    assert len(arrays["action"]) == 10
    assert arrays["obs"].shape == (10, 32, 32, 3) and arrays["obs"].dtype == np.uint8 and arrays["obs"].std() > 0
    assert arrays["action"].dtype == np.int64 and arrays["action"].shape == (10,)
    assert arrays["action"].min() >= 0 and arrays["action"].max() < 6
    meta = meta_of(arrays)
    assert meta["action_space"] == {"type": "discrete", "n": 6}
    assert meta["obs_mode"] == "pixels (observation)"
    data = MiniGridTransitions(tmp_path / "pong.npz")
    assert not data.continuous_actions and data.num_actions == 6


# Runs the collector's real __main__ with the extra's module made unimportable (a None entry in
# sys.modules makes `import X` raise ImportError, whether or not X is installed).
MISSING_EXTRA = """
import runpy, sys
sys.modules[{module!r}] = None
sys.argv = ["collect_minigrid_data.py", "--env", {env!r}, "--episodes", "1", "--max-steps", "3", "--out", {out!r}]
runpy.run_path("collect_minigrid_data.py", run_name="__main__")
"""


@pytest.mark.parametrize(("module", "env_id"), [("ale_py", "ALE/Pong-v5"), ("Box2D", "CarRacing-v3")])
def test_missing_extra_is_a_one_line_error_naming_the_install_step(tmp_path, module, env_id):
    out = tmp_path / "x.npz"
    proc = subprocess.run(
        [sys.executable, "-c", MISSING_EXTRA.format(module=module, env=env_id, out=str(out))],
        cwd=ROOT,
        env=headless_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc, env_id, EXTRAS, "not installed")
    assert not out.exists() and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- predictions.png with action vectors


def test_encdec_predictions_png_with_multi_dim_continuous_actions(tmp_path):
    from train_encdec import draw_predictions

    rng = np.random.default_rng(0)
    n, episodes = 20, 4
    meta = {"env": "synthetic", "action_space": {"type": "box", "shape": [3], "low": [-1.0] * 3, "high": [1.0] * 3}}
    path = write_npz(
        tmp_path / "vec.npz",
        obs=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
        terminal_obs=rng.integers(0, 256, (episodes, 16, 16, 3), dtype=np.uint8),
        next_obs_index=np.concatenate([np.r_[e * 5 + 1 : e * 5 + 5, n + e] for e in range(episodes)]).astype(np.int64),
        action=rng.uniform(-1, 1, (n, 3)).astype(np.float32),
        reward=np.zeros(n, np.float32),
        done=np.tile([False] * 4 + [True], episodes),
        episode=np.repeat(np.arange(episodes), 5),
        meta=np.array(json.dumps(meta)),
    )
    torch.manual_seed(0)
    model = _continuous_model("encdec_vit")
    run_dir = tmp_path / "run"
    payload = {
        "model": model.state_dict(),
        "model_config": model.model_config(),
        "train_config": {"val_fraction": 0.25, "seed": 0},
        "step": 0,
        "epoch": 0,
        "optimizer": {},
        "data_meta": meta,
        "arch": "encdec_vit",
    }
    run_dir.mkdir()
    save_checkpoint(run_dir / "model.pt", payload)
    out = draw_predictions(run_dir, MiniGridTransitions(path), 2, torch.device("cpu"))
    assert out.is_file()


@pytest.mark.parametrize(
    "env_id, mode, size, cell",
    [
        ("MiniGrid-FourRooms-v0", "rgb", 76, 4),
        ("MiniGrid-FourRooms-v0", "rgb", 64, 0),  # rendered at 5 px per cell (95 px) and resized: no whole cell
        ("MiniGrid-SimpleCrossingS9N1-v0", "rgb", 72, 8),
        ("MiniGrid-Empty-8x8-v0", "rgb_partial", 56, 8),
        ("MiniGrid-Empty-8x8-v0", "symbolic", 64, 0),
    ],
)
def test_cell_pixels_are_whole_only_when_the_render_was_not_resized(env_id, mode, size, cell):
    from envs import cell_pixels, make_env

    env, tile = make_env(env_id, mode, size)
    assert cell_pixels(env, mode, size, tile) == cell
