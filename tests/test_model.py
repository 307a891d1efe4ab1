"""The CNN JEPA world model: shapes, the EMA target, the loss in both modes, and that it learns."""

import pytest
import torch
from conftest import one_step

from losses import normalized_mse, vicreg_cov_loss, vicreg_std_loss
from world_model_jepa import JEPAConfig, JEPAWorldModel


def make_model(obs_shape=(32, 32, 3), **kw) -> JEPAWorldModel:
    torch.manual_seed(0)
    return JEPAWorldModel(config=JEPAConfig(obs_shape=list(obs_shape), **kw))


def frames(b, shape, seed=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (b, *shape), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("shape", [(64, 64, 3), (32, 32, 3), (56, 56, 3), (7, 7, 3)])
def test_shapes(shape):
    model = make_model(shape, pixel_scale=10.0 if shape[0] == 7 else 255.0)
    b, t = 5, 4
    obs = frames(b, shape, high=11 if shape[0] == 7 else 256)
    z = model.encode(obs)
    assert z.shape == (b, 128) and z.dtype == torch.float32
    assert model.encode_target(obs).shape == (b, 128)
    action = torch.randint(0, 7, (b,))
    assert model.predict(z, action).shape == (b, 128)
    actions = torch.randint(0, 7, (b, t))
    traj = model.rollout(z, actions)
    assert traj.shape == (b, t, 128)
    # rollout step 1 is predict, step 2 is predict of step 1
    torch.testing.assert_close(traj[:, 0], model.predict(z, actions[:, 0]))
    torch.testing.assert_close(traj[:, 1], model.predict(traj[:, 0], actions[:, 1]))
    loss, terms = model.loss(*one_step(obs, action, frames(b, shape, seed=1, high=11 if shape[0] == 7 else 256)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(terms) == {"pred_loss", "std_loss", "cov_loss"}


def test_latent_dim_and_num_actions_are_configurable():
    model = make_model((32, 32, 3), latent_dim=16, num_actions=3)
    z = model.encode(frames(2, (32, 32, 3)))
    assert z.shape == (2, 16)
    assert model.predict(z, torch.tensor([0, 2])).shape == (2, 16)
    with pytest.raises(IndexError, match="index out of range"):
        model.predict(z, torch.tensor([0, 3]))


def test_target_encoder_gets_no_gradient():
    model = make_model()
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    obs, nxt = frames(8, (32, 32, 3)), frames(8, (32, 32, 3), seed=1)
    loss, _ = model.loss(*one_step(obs, torch.randint(0, 7, (8,)), nxt))
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    # the target starts as an exact copy of the online encoder
    for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        assert torch.equal(t, o)


def test_update_target_moves_by_the_decay():
    model = make_model(ema_decay=0.9)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target()
    for t, t0, o in zip(model.target_encoder.parameters(), before, model.encoder.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o, rtol=0, atol=1e-6)
        assert not torch.equal(t, t0)
    # online parameters are untouched by the update
    assert all(p.requires_grad for p in model.encoder.parameters())


def test_reg_none_loss_is_normalized_mse_exactly():
    model = make_model(reg="none")
    obs, nxt = frames(8, (32, 32, 3)), frames(8, (32, 32, 3), seed=1)
    action = torch.randint(0, 7, (8,))
    loss, terms = model.loss(*one_step(obs, action, nxt))
    expected = normalized_mse(model.predict(model.encode(obs), action), model.encode_target(nxt))
    assert torch.equal(loss, expected)
    assert torch.equal(terms["pred_loss"], expected.detach())


def test_reg_vicreg_adds_std_and_cov_with_coefficients():
    cfg = dict(sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5)
    model = make_model(reg="vicreg", **cfg)
    obs, nxt = frames(8, (32, 32, 3)), frames(8, (32, 32, 3), seed=1)
    action = torch.randint(0, 7, (8,))
    loss, terms = model.loss(*one_step(obs, action, nxt))
    z = model.encode(obs)
    pred = normalized_mse(model.predict(z, action), model.encode_target(nxt))
    std, cov = vicreg_std_loss(z), vicreg_cov_loss(z)
    torch.testing.assert_close(loss, 2.0 * pred + 3.0 * std + 0.5 * cov)
    torch.testing.assert_close(terms["pred_loss"], pred)
    torch.testing.assert_close(terms["std_loss"], std)
    torch.testing.assert_close(terms["cov_loss"], cov)
    assert std.item() > 0  # the terms are not trivially zero at init, so the check above means something


def test_bad_reg_is_rejected():
    with pytest.raises(ValueError, match="reg must be 'none' or 'vicreg', got 'bogus'"):
        JEPAConfig(reg="bogus")


def test_model_config_rebuilds_the_model():
    model = make_model((56, 56, 3), latent_dim=32, reg="none")
    rebuilt = JEPAWorldModel(config=JEPAConfig(**model.model_config()))
    rebuilt.load_state_dict(model.state_dict())
    obs = frames(3, (56, 56, 3))
    assert torch.equal(rebuilt.encode(obs), model.encode(obs))


@pytest.mark.parametrize("reg", ["none", "vicreg"])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(reg):
    model = make_model(reg=reg)
    obs, nxt = frames(32, (32, 32, 3)), frames(32, (32, 32, 3), seed=1)
    action = torch.randint(0, 7, (32,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, _ = model.loss(*one_step(obs, action, nxt))
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_target()
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- training in-process


def _train(data, out, **kw):
    from train_jepa import TrainConfig
    from train_jepa import main as train_main

    cfg = TrainConfig(data=str(data), out_dir=str(out), epochs=1, batch_size=16, log_every=5, device="cpu", seed=0, **kw)
    return train_main(cfg)


def test_training_on_symbolic_observations(tmp_path, capsys):
    from conftest import collect

    from wm_common import load_checkpoint

    data = collect(tmp_path / "sym.npz", episodes=4, max_steps=30, obs="symbolic")
    summary = _train(data, tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(v)) for v in summary.values())
    ckpt = load_checkpoint(tmp_path / "run", arch="jepa_cnn")
    assert ckpt["model_config"]["obs_shape"] == [7, 7, 3]
    assert ckpt["model_config"]["pixel_scale"] == 10.0  # symbolic codes are small integers, not 0..255
    assert "Epoch 01 finished" in capsys.readouterr().out


def test_training_on_a_legacy_file(tmp_path, capsys, tiny_npz, tiny_arrays):
    from conftest import write_npz

    from minigrid_dataset import MiniGridTransitions

    data = MiniGridTransitions(tiny_npz)
    legacy = write_npz(
        tmp_path / "legacy.npz",
        obs=tiny_arrays["obs"],
        actions=tiny_arrays["action"],
        next_obs=data.next_obs(torch.arange(len(data))).numpy(),
        rewards=tiny_arrays["reward"],
        dones=tiny_arrays["done"],
    )
    _train(legacy, tmp_path / "run")
    out = capsys.readouterr().out
    assert "note: no 'episode' key: episodes recovered from 'done'" in out
    assert "metadata for probes is missing" in out
    assert (tmp_path / "run" / "model.pt").is_file()


def test_inverse_dynamics_head_is_off_by_default_and_learns_the_action_when_on():
    """idm_coeff 0 leaves the model (and its checkpoints) as before; > 0 adds a head whose
    cross-entropy is a loss term and trains the encoder to tell actions apart."""
    plain = JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], num_actions=3, latent_dim=16))
    assert not any(k.startswith("inverse") for k in plain.state_dict())
    torch.manual_seed(0)
    model = JEPAWorldModel(config=JEPAConfig(obs_shape=[16, 16, 3], num_actions=3, latent_dim=16, idm_coeff=1.0))
    # a toy world: action a moves a bright pixel a+1 columns
    obs = torch.zeros(48, 16, 16, 3, dtype=torch.uint8)
    nxt = torch.zeros_like(obs)
    action = torch.arange(48) % 3
    for i in range(48):
        r, c = i % 16, i % 8
        obs[i, r, c] = 255
        nxt[i, r, c + int(action[i]) + 1] = 255
    loss, terms = model.loss(*one_step(obs, action, nxt))
    assert set(terms) == {"pred_loss", "std_loss", "cov_loss", "idm_loss"}
    first = float(terms["idm_loss"])
    assert first == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=0.3)  # chance at init
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, terms = model.loss(*one_step(obs, action, nxt))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(terms["idm_loss"]) < 0.2 * first


# ----------------------------------------------------------------------------- the spatial variant


@pytest.mark.parametrize("shape, grid", [((64, 64, 3), 8), ((72, 72, 3), 9), ((48, 48, 3), 6), ((7, 7, 3), 7)])
def test_spatial_latent_is_the_feature_map_one_position_per_8_pixels(shape, grid):
    from world_model_jepa import feature_map_shape

    c, h, w = feature_map_shape(list(shape), [8, 8, 4])
    assert (c, h, w) == (4, grid, grid)
    kw = dict(spatial=True, channels=[8, 8, 4], latent_dim=c * h * w, predictor_hidden_dim=8, pixel_scale=10.0 if grid == 7 else 255.0)
    model = make_model(shape, **kw)
    obs = frames(3, shape, high=11 if grid == 7 else 256)
    z = model.encode(obs)
    assert z.shape == (3, c * h * w)
    # the conv predictor starts as the copy baseline, for every action
    for a in range(7):
        torch.testing.assert_close(model.predict(z, torch.full((3,), a)), z)
    loss, terms = model.loss(*one_step(obs, torch.zeros(3, dtype=torch.long), frames(3, shape, seed=1, high=11 if grid == 7 else 256)))
    loss.backward()
    assert torch.isfinite(loss) and model.predictor.net[-1].weight.grad is not None
    with pytest.raises(ValueError, match="latent_dim must be"):
        make_model(shape, **{**kw, "latent_dim": 128})


@pytest.mark.parametrize("size, cell, grid", [(76, 4, 19), (64, 4, 16), (72, 8, 9), (56, 8, 7), (76, 0, 9), (66, 11, 8)])
def test_told_the_cell_size_the_spatial_map_has_one_position_per_cell(size, cell, grid):
    """FourRooms at 4 px per cell (76 px) is 19 positions, not the side rule's 9; 8 px cells keep
    the side rule's maps; a cell size unknown (0) or not a power of two falls back to it."""
    from model_configs import feature_map_shape

    shape, channels = (size, size, 3), [8, 8, 4]
    c, h, w = feature_map_shape(list(shape), channels, cell_px=cell)
    assert (c, h, w) == (4, grid, grid)
    model = make_model(shape, spatial=True, channels=channels, latent_dim=c * h * w, predictor_hidden_dim=8, cell_px=cell)
    assert model.encode(frames(2, shape)).shape == (2, c * h * w)


def test_spatial_predictor_is_translation_equivariant():
    """One rule for every cell: shifting the map shifts the prediction (away from the border,
    which the three 3x3 convolutions see 3 positions in), which is why it carries over to
    layouts never seen."""
    model = make_model((128, 128, 3), spatial=True, channels=[8, 8, 8, 4], latent_dim=4 * 8 * 8, predictor_hidden_dim=8)
    torch.nn.init.normal_(model.predictor.net[-1].weight, std=0.1)
    m = torch.zeros(1, 4, 8, 8)
    m[0, :, 3, 3] = torch.randn(4)
    shifted = torch.roll(m, shifts=(1, 1), dims=(2, 3))
    a = torch.tensor([2])
    out = model.predict(m.flatten(1), a).view(1, 4, 8, 8)
    out_shifted = model.predict(shifted.flatten(1), a).view(1, 4, 8, 8)
    # positions 4..4 of the shifted map are 3 away from every border
    torch.testing.assert_close(out[..., 3, 3], out_shifted[..., 4, 4])
    assert not torch.allclose(out[..., 3, 3], out_shifted[..., 3, 3])


@pytest.mark.parametrize("dilations, reach", [((1, 1, 1), 3), ((1, 2, 4), 7)])
def test_spatial_predictor_dilations_set_how_far_a_cell_sees(dilations, reach):
    """A change `reach` positions away moves a cell's prediction, one further does not: the
    highlighted view a step repaints reaches 6 cells from the agent, past the plain predictor's 3."""
    model = make_model(
        (128, 128, 3),
        spatial=True,
        channels=[8, 8, 8, 4],
        latent_dim=4 * 16 * 16,
        predictor_hidden_dim=8,
        cell_px=8,
        predictor_dilations=list(dilations),
    )
    torch.nn.init.normal_(model.predictor.net[-1].weight, std=0.1)
    a = torch.tensor([1])
    base = torch.zeros(1, 4, 16, 16)
    out = model.predict(base.flatten(1), a).view(4, 16, 16)
    for offset, moves in ((reach, True), (reach + 1, False)):
        poked = base.clone()
        poked[0, :, 0, offset] = 1.0
        changed = model.predict(poked.flatten(1), a).view(4, 16, 16)
        assert bool((changed[:, 0, 0] - out[:, 0, 0]).abs().max() > 1e-6) == moves, offset
    with pytest.raises(ValueError, match="predictor_dilations"):
        make_model((64, 64, 3), spatial=True, channels=[8, 8, 4], latent_dim=4 * 8 * 8, predictor_dilations=[1, 2])


def test_spatial_vicreg_counts_every_position_as_a_sample_of_the_channels():
    """A map whose channels vary across positions is not collapsed, even if a position's own
    value never changes across the batch."""
    model = make_model((64, 64, 3), spatial=True, channels=[8, 8, 4], latent_dim=4 * 8 * 8, predictor_hidden_dim=8)
    obs = frames(4, (64, 64, 3))
    _, terms = model.loss(*one_step(obs, torch.zeros(4, dtype=torch.long), obs))
    z = model.encode(obs).view(4, 4, 64).transpose(1, 2).reshape(-1, 4)
    torch.testing.assert_close(terms["std_loss"], vicreg_std_loss(z))
    torch.testing.assert_close(terms["cov_loss"], vicreg_cov_loss(z))


def test_spatial_inverse_head_reads_the_action_wherever_it_happens():
    """idm_head="conv": the same change anywhere on the map gives the same logits (one detector
    slid over the map, then the largest response), [B,T,A] from [B,T,2D]; it learns the toy
    world's action where the bright pixel starts; a latent without a map cannot have it."""
    from world_model_jepa import SpatialInverse

    kw = dict(spatial=True, channels=[8, 8, 4], latent_dim=4 * 4 * 4, predictor_hidden_dim=8, num_actions=3, idm_coeff=1.0)
    model = make_model((32, 32, 3), **kw, idm_head="conv")
    assert isinstance(model.inverse, SpatialInverse) and model.inverse.out.in_features == 8  # the predictor's width
    assert make_model((32, 32, 3), **kw, idm_head="conv", idm_hidden_dim=5).inverse.out.in_features == 5
    head = SpatialInverse(map_shape=(4, 8, 8), hidden_dim=8, num_actions=3)
    before, after = torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    after[0, :, 3, 3] = after[1, :, 4, 4] = torch.randn(4)  # one change, at two places away from the border
    logits = head(torch.cat([before.flatten(1), after.flatten(1)], -1)[None])
    assert logits.shape == (1, 2, 3)
    torch.testing.assert_close(logits[0, 0], logits[0, 1])
    torch.manual_seed(0)
    obs, nxt, action = torch.zeros(48, 32, 32, 3, dtype=torch.uint8), torch.zeros(48, 32, 32, 3, dtype=torch.uint8), torch.arange(48) % 3
    for i in range(48):
        r, c = 8 * (i % 4), 4 * (i % 5)
        obs[i, r : r + 8, c : c + 8] = 255
        nxt[i, r : r + 8, c + 4 * int(action[i]) : c + 4 * int(action[i]) + 8] = 255
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss, terms = model.loss(*one_step(obs, action, nxt))
        first = first if first is not None else float(terms["idm_loss"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(terms["idm_loss"]) < 0.2 * first
    with pytest.raises(ValueError, match="idm_head"):
        make_model((32, 32, 3), latent_dim=16, idm_coeff=1.0, idm_head="conv")
