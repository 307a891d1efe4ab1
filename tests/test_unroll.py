"""Multi-step training: K-step windows inside episodes, the K-step objectives of the three
models (each term against a hand computation), K=1 as seed 003's one-step loss, the budget
and overfitting warnings, and the trainers' new flags end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, load_npz, ok, one_step, run, write_npz

from losses import normalized_mse, smoothness_loss, vicreg_cov_loss, vicreg_std_loss
from minigrid_dataset import MiniGridTransitions, make_loaders, split_episodes, window_starts
from training import overfitting
from wm_common import load_checkpoint
from world_model_jepa import JEPAConfig, JEPAWorldModel
from world_model_vit import EncDecConfig, ViTEncoderDecoder, ViTJEPA, ViTJEPAConfig


def frames(*shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def cnn(**kw) -> JEPAWorldModel:
    torch.manual_seed(0)
    return JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], latent_dim=16, num_actions=3, **kw))


# ----------------------------------------------------------------------------- windows


def test_window_starts_never_cross_an_episode_end():
    episode = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    done = np.array([0, 0, 1, 0, 1, 0, 0, 0, 1], bool)
    assert window_starts(episode, done, None, 1).tolist() == list(range(9))
    assert window_starts(episode, done, None, 2).tolist() == [0, 1, 3, 5, 6, 7]
    assert window_starts(episode, done, None, 3).tolist() == [0, 5, 6]
    assert window_starts(episode, done, None, 4).tolist() == [5]
    assert window_starts(episode, done, None, 5).tolist() == []
    # a gap in the step numbers (e.g. rows dropped) also ends a window
    step = np.array([0, 1, 2, 0, 1, 0, 1, 3, 4])
    assert window_starts(episode, done, step, 2).tolist() == [0, 1, 3, 5, 7]


def test_windows_are_consecutive_frames_and_actions_of_one_episode(tiny_npz):
    data = MiniGridTransitions(tiny_npz)
    k = 3
    starts = data.window_starts(k)
    assert len(starts) > 0
    assert all(data.episode[s] == data.episode[s + k - 1] for s in starts)
    batch = data.windows(torch.from_numpy(starts[:20]), k)
    assert batch["frames"].shape == (20, k + 1, *data.frame_shape) and batch["frames"].dtype == torch.uint8
    assert batch["actions"].shape == (20, k)
    for row, s in enumerate(starts[:20]):
        rows = torch.arange(s, s + k)
        assert torch.equal(batch["frames"][row, 0], data.obs[s])
        assert torch.equal(batch["frames"][row, 1:], data.next_obs(rows))
        assert torch.equal(batch["actions"][row], data.fields["action"][rows])
    # the window's frame t+1 is the next row's obs inside the episode
    assert torch.equal(batch["frames"][:, 1], data.obs[torch.from_numpy(starts[:20] + 1)])


def test_unroll_1_loaders_serve_the_transitions_in_the_old_order(tiny_npz):
    data = MiniGridTransitions(tiny_npz)
    train, val = make_loaders(data, batch_size=16, val_fraction=0.2, seed=0, unroll=1)
    train_idx, val_idx = split_episodes(data.episode, 0.2, 0)
    assert np.array_equal(train.batch_sampler.indices, train_idx) and np.array_equal(val.batch_sampler.indices, val_idx)
    batch = next(iter(train))
    first = train.batch_sampler.indices[np.random.default_rng([0, 0]).permutation(len(train_idx))[:16]]
    old = data.__getitems__(first.tolist())
    assert torch.equal(batch["frames"][:, 0], old["obs"]) and torch.equal(batch["frames"][:, 1], old["next_obs"])
    assert torch.equal(batch["actions"][:, 0], old["action"])


def test_unroll_windows_stay_in_their_split(tiny_npz):
    data = MiniGridTransitions(tiny_npz)
    train, val = make_loaders(data, batch_size=8, val_fraction=0.2, seed=0, unroll=4)
    train_idx, val_idx = split_episodes(data.episode, 0.2, 0)
    for sampler, side in ((train.batch_sampler, train_idx), (val.batch_sampler, val_idx)):
        ends = sampler.indices + 3
        assert np.isin(sampler.indices, side).all() and np.isin(ends, side).all()
        assert (data.episode[ends] == data.episode[sampler.indices]).all()


def test_windows_with_an_unchanged_frame_are_drawn_repeat_unchanged_times(tiny_npz):
    """A step whose frame does not change (into a wall) is found pixel for pixel; the training
    windows holding one are drawn N times per epoch, the others once, validation untouched."""
    data = MiniGridTransitions(tiny_npz)
    unchanged = data.unchanged(chunk=7)  # chunks of any size give the same answer
    rows = torch.arange(len(data))
    assert np.array_equal(unchanged, (data.obs[rows].flatten(1) == data.next_obs(rows).flatten(1)).all(1).numpy())
    assert 0 < unchanged.sum() < len(data)
    once, val_once = make_loaders(data, batch_size=8, val_fraction=0.2, seed=0, unroll=3)
    thrice, val = make_loaders(data, batch_size=8, val_fraction=0.2, seed=0, unroll=3, repeat_unchanged=3)
    base = once.batch_sampler.indices
    holds = unchanged[base] | unchanged[base + 1] | unchanged[base + 2]
    counts = {int(i): int(n) for i, n in zip(*np.unique(thrice.batch_sampler.indices, return_counts=True), strict=True)}
    assert sorted(counts) == sorted(base.tolist())
    assert all(counts[int(i)] == (3 if h else 1) for i, h in zip(base, holds, strict=True))
    assert thrice.batch_sampler.repeated == holds.sum() > 0 and once.batch_sampler.repeated == 0
    assert np.array_equal(val.batch_sampler.indices, val_once.batch_sampler.indices)
    for bad in (0, 101):
        with pytest.raises(Exception, match="--repeat-unchanged must be from 1 .* to 100"):
            make_loaders(data, batch_size=8, repeat_unchanged=bad)


def test_bad_unroll_is_a_user_error(tiny_npz):
    from wm_common import UserError

    data = MiniGridTransitions(tiny_npz)
    with pytest.raises(UserError, match="--unroll must be at least 1"):
        make_loaders(data, batch_size=8, unroll=0)
    with pytest.raises(UserError, match="--unroll 500 is longer than the longest episode"):
        make_loaders(data, batch_size=8, unroll=500)
    # episodes long enough, but too few windows for one batch
    with pytest.raises(UserError, match="windows of 30 consecutive steps, fewer than --batch-size 64"):
        make_loaders(data, batch_size=64, unroll=30)


# ----------------------------------------------------------------------------- CNN JEPA objective


def test_k1_legacy_config_is_seed_003_loss_exactly():
    """--unroll 1 with seed 003's flags computes today's one-step loss on the same batch."""
    model = cnn(reg="vicreg", sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    obs, nxt, action = frames(8, 16, 16, 3), frames(8, 16, 16, 3, seed=1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss, terms = model.loss(*one_step(obs, action, nxt))
    z = model.encode(obs)
    pred = normalized_mse(model.predict(z, action), model.encode_target(nxt))
    torch.testing.assert_close(loss, 2.0 * pred + 3.0 * vicreg_std_loss(z) + 0.5 * vicreg_cov_loss(z))
    assert set(terms) == {"pred_loss", "std_loss", "cov_loss"} == set(model.term_names())


def test_k_step_loss_rolls_the_predictor_on_its_own_outputs():
    model = cnn(reg="vicreg", vc_all_steps=True, idm_coeff=0.5, smooth_coeff=0.25, residual=True)
    k = 3
    seq, actions = frames(6, k + 1, 16, 16, 3), torch.randint(0, 3, (6, k), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.add_(0.05)  # a residual predictor starts as copying; move it off that
    loss, terms = model.loss(seq, actions)
    z = torch.stack([model.encode(seq[:, t]) for t in range(k + 1)], dim=1)  # [B,K+1,D]
    zs, preds = z[:, 0], []
    for t in range(k):
        zs = model.predict(zs, actions[:, t])
        preds.append(zs)
    target = torch.stack([model.encode_target(seq[:, t]) for t in range(1, k + 1)], dim=1)
    pred = torch.stack([normalized_mse(preds[t], target[:, t]) for t in range(k)]).mean()
    flat = z.flatten(0, 1)
    logits = model.inverse(torch.cat([z[:, :-1], z[:, 1:]], -1))
    idm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), actions.flatten())
    smooth = (z[:, 1:] - z[:, :-1]).pow(2).mean()
    expected = pred + vicreg_std_loss(flat) + 0.04 * vicreg_cov_loss(flat) + 0.5 * idm + 0.25 * smooth
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, value in (("pred_loss", pred), ("idm_loss", idm), ("smooth_loss", smooth), ("std_loss", vicreg_std_loss(flat))):
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-6)
    assert model.term_names() == ["pred_loss", "std_loss", "cov_loss", "idm_loss", "smooth_loss"]


def test_mse_prediction_loss_compares_the_raw_latents_norm_included():
    model = cnn(pred_loss="mse", reg="none", idm_coeff=1.0)
    seq, actions = frames(5, 4, 16, 16, 3), torch.randint(0, 3, (5, 3))
    loss, terms = model.loss(seq, actions)
    preds = model.rollout(model.encode(seq[:, 0]), actions)
    target = torch.stack([model.encode_target(seq[:, t]) for t in (1, 2, 3)], 1)
    torch.testing.assert_close(terms["pred_loss"], torch.nn.functional.mse_loss(preds, target).detach(), rtol=1e-5, atol=1e-7)
    # a prediction twice as long as its target is a loss here, not under the unit-vector loss
    z = torch.randn(4, 16)
    assert normalized_mse(2 * z, z) < 1e-12 < torch.nn.functional.mse_loss(2 * z, z)
    # without a term that needs every frame, inverse dynamics reads the first step only
    z01 = torch.stack([model.encode(seq[:, 0]), model.encode(seq[:, 1])], 1)
    idm = torch.nn.functional.cross_entropy(model.inverse(torch.cat([z01[:, 0], z01[:, 1]], -1)), actions[:, 0])
    torch.testing.assert_close(terms["idm_loss"], idm.detach(), rtol=1e-5, atol=1e-6)


def test_residual_predictor_starts_as_the_copy_baseline():
    model = cnn(residual=True)
    z = torch.randn(5, 16)
    assert torch.equal(model.predict(z, torch.tensor([0, 1, 2, 0, 1])), z)
    assert not torch.equal(cnn(residual=False).predict(z, torch.tensor([0, 1, 2, 0, 1])), z)


def test_online_target_is_the_detached_online_encoder():
    model = cnn(target="online", reg="none", residual=False)
    obs = frames(4, 16, 16, 3)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1)  # online and EMA encoders differ
    torch.testing.assert_close(model.encode_target(obs), model.encode(obs))
    seq, actions = frames(4, 3, 16, 16, 3), torch.zeros(4, 2, dtype=torch.long)
    loss, _ = model.loss(seq, actions)
    loss.backward()
    got = [p.grad.clone() for p in model.encoder.parameters()]
    # the same loss with the target computed apart and detached: gradients flow only through z_t
    model.zero_grad()
    target = torch.stack([model.encode(seq[:, t]) for t in (1, 2)], 1).detach()
    normalized_mse(model.rollout(model.encode(seq[:, 0]), actions), target).backward()
    for g, p in zip(got, model.encoder.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_inverse_dynamics_on_continuous_actions_is_mse():
    torch.manual_seed(0)
    model = JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], latent_dim=16, num_actions=2, continuous_actions=True, idm_coeff=1.0))
    seq, actions = frames(4, 3, 16, 16, 3), torch.rand(4, 2, 2)
    _, terms = model.loss(seq, actions)
    z = torch.stack([model.encode(seq[:, t]) for t in range(2)], 1)  # the first step: no term needs every frame
    expected = torch.nn.functional.mse_loss(model.inverse(torch.cat([z[:, :-1], z[:, 1:]], -1)), actions[:, :1])
    torch.testing.assert_close(terms["idm_loss"], expected.detach(), rtol=1e-5, atol=1e-6)


def test_smoothness_of_a_constant_sequence_is_zero():
    z = torch.randn(3, 1, 8).expand(3, 5, 8)
    assert smoothness_loss(z).item() == 0
    assert smoothness_loss(torch.arange(3.0).view(1, 3, 1)).item() == 1.0


def test_old_checkpoint_configs_keep_seed_003_behaviour():
    """A model_config saved before these fields existed rebuilds the one-step model it was."""
    old = {
        k: v
        for k, v in JEPAConfig(obs_shape=[16, 16, 3]).__dict__.items()
        if k not in ("target", "vc_all_steps", "residual", "smooth_coeff")
    }
    cfg = JEPAConfig(**old)
    assert (cfg.target, cfg.vc_all_steps, cfg.residual, cfg.smooth_coeff) == ("ema", False, False, 0.0)


# ----------------------------------------------------------------------------- ViT models


def test_vit_jepa_k1_matches_seed_000_and_k_steps_average_every_step():
    torch.manual_seed(0)
    model = ViTJEPA(config=ViTJEPAConfig(image_size=16, patch_size=8, latent_dim=16, mlp_dim=16, num_actions=3, arrangement="common"))
    obs, nxt, act = frames(6, 16, 16, 3), frames(6, 16, 16, 3, seed=1), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, terms = model.loss(*one_step(obs, act, nxt))
    z0, z1 = model.encode(obs), model._online(nxt)
    c = model.config
    pred = torch.nn.functional.mse_loss(model.predict(z0, act), model._ema(nxt))
    std = (vicreg_std_loss(z0) + vicreg_std_loss(z1)) / 2
    cov = vicreg_cov_loss(z0) + vicreg_cov_loss(z1)
    torch.testing.assert_close(loss, c.vicreg_sim_coeff * pred + c.vicreg_std_coeff * std + c.vicreg_cov_coeff * cov)
    seq, actions = frames(6, 4, 16, 16, 3, seed=2), torch.randint(0, 3, (6, 3))
    _, terms = model.loss(seq, actions)
    preds = model.rollout(model.encode(seq[:, 0]), actions)
    target = torch.stack([model._ema(seq[:, t]) for t in (1, 2, 3)], 1)
    torch.testing.assert_close(terms["pred_loss"], torch.nn.functional.mse_loss(preds, target).detach())


def test_vit_jepa_takes_inverse_dynamics_and_online_target():
    torch.manual_seed(0)
    cfg = ViTJEPAConfig(
        image_size=16,
        patch_size=8,
        latent_dim=16,
        mlp_dim=16,
        num_actions=3,
        arrangement="common",
        target="online",
        idm_coeff=1.0,
        residual=True,
    )
    model = ViTJEPA(config=cfg)
    loss, terms = model.loss(frames(4, 3, 16, 16, 3), torch.randint(0, 3, (4, 2)))
    assert set(terms) == set(model.term_names()) == {"pred_loss", "std_loss", "cov_loss", "idm_loss"}
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    with pytest.raises(ValueError, match="arrangement 'common'"):
        ViTJEPAConfig(arrangement="seed", target="online")


def test_encdec_k_steps_feed_back_predicted_frames_and_residual_starts_as_copy():
    torch.manual_seed(0)
    model = ViTEncoderDecoder(config=EncDecConfig(image_size=16, patch_size=8, latent_dim=16, mlp_dim=16, decoder_dim=16, residual=True))
    obs = frames(3, 16, 16, 3)
    torch.testing.assert_close(model.predict_frame(obs, torch.tensor([0, 1, 2])), obs.permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        model.to_pixels.bias.add_(0.3)  # push past 1 somewhere: the fed-back frame is clamped
    seq, actions = frames(3, 3, 16, 16, 3), torch.randint(0, 7, (3, 2))
    loss, terms = model.loss(seq, actions)
    x1 = model.predict_frame(seq[:, 0], actions[:, 0])
    assert x1.max() <= 1 and x1.min() >= 0
    x2 = model.step_frames(x1, actions[:, 1])
    truth = seq[:, 1:].permute(0, 1, 4, 2, 3).float() / 255
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(torch.stack([x1, x2], 1), truth))
    loss.backward()
    assert model.to_pixels.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- training loop and CLI


def test_overfitting_needs_a_clear_rise_over_epochs_while_train_falls():
    falling = [(3.0 - 0.1 * i, 1.0) for i in range(4)]
    assert overfitting([(3.0, 1.0), (2.9, 1.1), (2.8, 1.2), (2.7, 1.3)]) == 0
    assert overfitting([(3.0, 1.0), (2.9, 1.1), (2.8, 1.2)]) is None  # too soon to tell
    assert overfitting(falling) is None  # flat validation loss
    # noise around a level: up and down by a few percent is not a trend
    assert overfitting([(3.0, 1.0), (2.9, 1.04), (2.8, 0.99), (2.7, 1.03), (2.6, 1.02)]) is None
    assert overfitting([(3.0, 1.0), (3.1, 1.1), (3.2, 1.2), (3.3, 1.3)]) is None  # training loss rising too: not this


def test_unroll_training_end_to_end_logs_every_term(tmp_path, tiny_npz, in_process):
    out = tmp_path / "run"
    stdout = in_process(
        "train_jepa.py", "--data", str(tiny_npz), "--epochs", "2", "--batch-size", "8", "--unroll", "3", "--smooth-coeff", "0.1",
        "--log-every", "5", "--device", "cpu", "--out-dir", str(out),
    )  # fmt: skip
    assert "windows of 3 steps" in stdout
    assert "too few for this data" in stdout  # a tiny budget is said to be one
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for key in ("pred_loss", "std_loss", "cov_loss", "idm_loss", "smooth_loss"):
        assert all(np.isfinite(float(r[key])) for r in rows), key
    train = [float(r["loss"]) for r in rows if r["phase"] == "train"]
    assert train[-1] < train[0]
    assert (out / "loss.png").stat().st_size > 0
    from wm_common import load_checkpoint

    ckpt = load_checkpoint(out, arch="jepa_cnn")
    assert ckpt["train_config"]["unroll"] == 3 and ckpt["model_config"]["smooth_coeff"] == 0.1


def test_steps_budget_sets_the_epochs(tmp_path, tiny_npz):
    from train_jepa import TrainConfig, main

    data = MiniGridTransitions(tiny_npz)
    train, _ = make_loaders(data, batch_size=8, val_fraction=0.1, seed=0, unroll=1)
    per_epoch = len(train.batch_sampler)
    summary = main(
        TrainConfig(
            data=str(tiny_npz), out_dir=str(tmp_path / "r"), steps=per_epoch + 1, unroll=1, batch_size=8, device="cpu", log_every=50
        )
    )
    assert summary["epoch"] == 2 and summary["step"] == 2 * per_epoch


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--unroll", "0"], "--unroll must be at least 1"),
        (["--idm-coeff", "nan"], "--idm-coeff must be a finite weight"),
        (["--smooth-coeff", "-1"], "--smooth-coeff must be a finite weight"),
        (["--steps", "-5"], "--steps must be at least 1"),
        (["--steps", "100", "--epochs", "2"], "not both"),
        (["--unroll", "1000000000000"], "longer than the longest episode"),
        (["--num-workers", "1000000000000"], "more than 4 per CPU core"),
        (["--action-emb-dim", "-1"], "--action-emb-dim must be from 1 to 65536"),
        (["--jepa-predictor-hidden-dim", "0"], "--jepa-predictor-hidden-dim must be from 1 to 65536"),
        (["--arch", "vit", "--target", "online", "--arrangement", "seed"], "--target online needs --arrangement common"),
        (["--idm-head", "conv"], "--idm-head conv slides over the feature map of --arch cnn --spatial"),
        (["--idm-hidden-dim", "-3"], "--idm-hidden-dim must be from 1 to 65536, or 0"),
        (["--predictor-hidden-dim", "-1"], "--predictor-hidden-dim must be from 1 to 65536, or 0"),
        (["--channels", "16", "0"], "--channels must each be from 1 to 65536, got 16 0"),
        (["--spatial", "--channels", "16"], "--channels 16: 1 convs leave a 16x16 map, not one position per 4 px cell"),
        (["--repeat-unchanged", "0"], "--repeat-unchanged must be from 1 (each window once per epoch) to 100, got 0"),
        (["--predictor-dilations", "1", "2", "4"], "--predictor-dilations widen the convolutional predictor of --arch cnn --spatial"),
        (
            ["--spatial", "--predictor-dilations", "1", "2"],
            "--predictor-dilations takes three dilations from 1 to 64 (one per conv), got 1 2",
        ),
        (["--spatial", "--predictor-dilations", "1", "0", "4"], "--predictor-dilations takes three dilations from 1 to 64"),
    ],
)
def test_bad_objective_flags_are_one_line_errors(tmp_path, tiny_npz, flags, message):
    proc = run("train_jepa.py", "--data", str(tiny_npz), "--out-dir", str(tmp_path / "r"), "--device", "cpu", *flags)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "r").exists()


def test_steps_on_the_command_line_replaces_the_config_files_epochs(tmp_path):
    from train_jepa import TrainConfig
    from training import SEED000_ALIASES
    from wm_common import parse_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("num_epochs: 3\nbatch_size: 16\n")
    cfg = parse_config(TrainConfig, ["--config", str(cfg_file), "--steps", "100"], aliases=SEED000_ALIASES)
    assert (cfg.epochs, cfg.steps, cfg.batch_size) == (None, 100, 16)
    assert parse_config(TrainConfig, ["--config", str(cfg_file)], aliases=SEED000_ALIASES).epochs == 3


def test_encdec_change_weight_weighs_the_pixels_that_change():
    torch.manual_seed(0)
    model = ViTEncoderDecoder(
        config=EncDecConfig(image_size=16, patch_size=8, latent_dim=16, mlp_dim=16, decoder_dim=16, change_weight=9.0)
    )
    seq = frames(2, 2, 16, 16, 3)
    seq[:, 1, :8] = seq[:, 0, :8]  # the top half does not change
    actions = torch.zeros(2, 1, dtype=torch.long)
    loss, _ = model.loss(seq, actions)
    pred = model.predict_frame(seq[:, 0], actions[:, 0])
    true = seq[:, 1].permute(0, 3, 1, 2).float() / 255
    weight = torch.ones(2, 1, 16, 16)
    weight[..., 8:, :] = 10.0
    weight[..., 8:, :][(seq[:, 1, 8:] == seq[:, 0, 8:]).all(-1)[:, None]] = 1.0
    torch.testing.assert_close(loss, (weight * (pred - true).pow(2)).mean() / weight.mean())


def test_agent_cell_prediction_reads_the_red_agent_on_its_next_cell():
    from inspect_jepa_model import agent_cell_prediction

    def board(cell=None, shape=((2, 2), (3, 2))):  # a 2x2 grid of 8 px cells; the agent a red block in one
        f = torch.full((3, 16, 16), 0.2)
        if cell is not None:
            x, y = cell
            f[0, y * 8 + 2 : y * 8 + 6, x * 8 + 2 : x * 8 + 6] = 1.0
            f[1:, y * 8 + 2 : y * 8 + 6, x * 8 + 2 : x * 8 + 6] = 0.0
        return f

    true = torch.stack([board((1, 0)), board((1, 1))])
    current = torch.stack([board((0, 0)), board((1, 1))])  # moved right; stayed (a bump into a wall)
    cells = np.array([[1, 0], [1, 1]])
    exact = agent_cell_prediction(true, current, true, cells, (2, 2))
    assert exact["acc"] == 1.0 and exact["copy_baseline_acc"] == 0.5 and exact["num_transitions"] == 2
    no_agent = agent_cell_prediction(torch.stack([board(), board()]), current, true, cells, (2, 2))
    assert no_agent["acc"] == 0.0 and no_agent["mean_iou"] == 0.0
    lava = torch.stack([board(), board()])
    lava[:, 0], lava[:, 1] = 1.0, 0.5  # orange everywhere is not the agent
    assert agent_cell_prediction(lava, current, true, cells, (2, 2))["acc"] == 0.0
    # the agent drawn on the right cell with green and blue a third up (as a residual decoder
    # paints it over a grey floor) is still the agent; a faded one (red barely above) is not
    pink, faded = true.clone(), true.clone()
    for frames, level in ((pink, 0.33), (faded, 0.7)):
        agent = frames[:, 0] == 1.0
        frames[:, 1][agent] = frames[:, 2][agent] = level
    assert agent_cell_prediction(pink, current, true, cells, (2, 2))["acc"] == 1.0
    assert agent_cell_prediction(faded, current, true, cells, (2, 2))["acc"] == 0.0


def test_ablation_trains_each_variant_once_and_writes_the_table(tmp_path, tiny_npz):
    import ablation

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{ablation.MARKERS[0]}\nold table\n{ablation.MARKERS[1]}\nend\n")
    cfg = ablation.AblationConfig(
        data=str(tiny_npz),
        out_dir=str(tmp_path / "abl"),
        steps=4,
        variants=["default", "one-step (--unroll 1)"],
        device="cpu",
        readme=str(readme),
        config=str(tmp_path / "small.yaml"),
    )
    (tmp_path / "small.yaml").write_text("latent_dim: 16\nbatch_size: 16\n")
    first = ablation.main(cfg)
    runs = first["variants"]
    assert set(runs) == {"default", "one-step (--unroll 1)"}
    assert runs["one-step (--unroll 1)"][0]["flags"]["unroll"] == 1
    for (r,) in runs.values():
        assert set(r["rollout_error"]) == {1, 5, 10} and np.isfinite(r["copy_baseline_error"][1])
    text = readme.read_text()
    assert "old table" not in text and "| one-step (--unroll 1) |" in text and text.endswith("end\n")
    # a second call reads the finished runs back instead of training them again
    stamp = (tmp_path / "abl" / "default" / "seed0" / "model" / "model.pt").stat().st_mtime_ns
    assert ablation.main(cfg)["variants"] == runs
    assert (tmp_path / "abl" / "default" / "seed0" / "model" / "model.pt").stat().st_mtime_ns == stamp


def test_the_spatial_model_makes_one_cell_one_map_position_from_the_datas_cell_size(tmp_path, tiny_npz):
    """The tiny data is Empty-8x8 at 32 px, cells of 4 px (the collector records it): the spatial
    encoder halves twice, an 8x8 map, one position per cell, where the side rule alone (data
    without `cell_px`) halves three times to 4x4."""

    def trained_config(data, out, *flags):
        ok(run("train_jepa.py", "--data", str(data), "--out-dir", str(out), "--device", "cpu", "--spatial", "--steps", "2", *flags))
        return load_checkpoint(out, arch="jepa_cnn")["model_config"]

    config = trained_config(tiny_npz, tmp_path / "r")
    assert config["cell_px"] == 4 and config["latent_dim"] == 16 * 8 * 8 and config["idm_head"] == "mlp"
    arrays = load_npz(tiny_npz)
    meta = json.loads(str(arrays["meta"]))
    del meta["cell_px"]
    write_npz(tmp_path / "old.npz", **{**arrays, "meta": np.array(json.dumps(meta))})
    # (with the convolutional inverse-dynamics head: saved with the model and rebuilt from it)
    config = trained_config(tmp_path / "old.npz", tmp_path / "o", "--idm-head", "conv", "--idm-hidden-dim", "8")
    assert config["cell_px"] == 0 and config["latent_dim"] == 16 * 4 * 4 and config["idm_head"] == "conv"
    from models import model_from_checkpoint
    from world_model_jepa import SpatialInverse

    inverse = model_from_checkpoint(load_checkpoint(tmp_path / "o", arch="jepa_cnn")).inverse
    assert isinstance(inverse, SpatialInverse) and inverse.out.in_features == 8
    # narrower layers for a large map: the widths given are the model's, saved and rebuilt
    config = trained_config(tiny_npz, tmp_path / "n", "--channels", "8", "12", "6", "--predictor-hidden-dim", "10")
    assert config["channels"] == [8, 12, 6] and config["predictor_hidden_dim"] == 10 and config["latent_dim"] == 6 * 8 * 8
    model = model_from_checkpoint(load_checkpoint(tmp_path / "n", arch="jepa_cnn"))
    assert model.map_shape == (6, 8, 8)
    assert [conv.dilation[0] for conv in model.predictor.net[::2]] == [1, 1, 1]
    # a wider-seeing predictor: its dilations saved and rebuilt; steps into walls drawn 3 times
    config = trained_config(tiny_npz, tmp_path / "d", "--predictor-dilations", "1", "2", "4", "--repeat-unchanged", "3")
    assert config["predictor_dilations"] == [1, 2, 4]
    assert json.loads((tmp_path / "d" / "config.json").read_text())["train"]["repeat_unchanged"] == 3
    resumed = run("train_jepa.py", "--data", str(tiny_npz), "--out-dir", str(tmp_path / "d"), "--device", "cpu", "--spatial", "--resume")
    assert_one_line_error(resumed, "--repeat-unchanged 3 (now 1)")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "d", arch="jepa_cnn"))
    assert [conv.dilation[0] for conv in model.predictor.net[::2]] == [1, 2, 4]
