"""The ViT models of seed 000 (world_model_vit.py) and their trainers, unit and end to end."""

import csv
import json
import math

import pytest
import torch
import yaml
from conftest import collect, one_step, run

from wm_common import UserError
from world_model_vit import EncDecConfig, ViTEncoderDecoder, ViTJEPA, ViTJEPAConfig, patchify, unpatchify


def frames(b: int, size: int, c: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (b, size, size, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize(("size", "patch", "channels"), [(64, 8, 3), (64, 16, 3), (56, 8, 3), (32, 4, 1), (48, 16, 3)])
def test_vit_jepa_shapes(size, patch, channels):
    model = ViTJEPA(config=ViTJEPAConfig(image_size=size, patch_size=patch, input_channels=channels, latent_dim=64, mlp_dim=64))
    obs, act = frames(5, size, channels), torch.randint(0, 7, (5,))
    z = model.encode(obs)
    assert z.shape == (5, 64)
    assert model.encode_target(obs).shape == (5, 64)
    assert model.predict(z, act).shape == (5, 64)
    assert model.rollout(z, torch.zeros(5, 3, dtype=torch.long)).shape == (5, 3, 64)
    pooled, tokens = model.encoder(obs.permute(0, 3, 1, 2).float() / 255)
    assert tokens.shape == (5, (size // patch) ** 2, 64)


def test_patchify_round_trip_and_order():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3), x)
    # patch 1 (row 0, column 1) holds pixels [0:4, 4:8]
    assert torch.equal(patchify(x, 4)[:, 1].reshape(2, 4, 4, 3), x[:, :, 0:4, 4:8].permute(0, 2, 3, 1))


def test_bad_patch_size_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ViTJEPAConfig(image_size=64, patch_size=12)


@pytest.mark.parametrize("arrangement", ["seed", "common"])
@pytest.mark.parametrize("predictor", ["mlp", "transformer"])
def test_ema_target_gets_no_gradient_and_loss_terms(arrangement, predictor):
    model = ViTJEPA(
        config=ViTJEPAConfig(image_size=32, patch_size=8, latent_dim=32, mlp_dim=32, arrangement=arrangement, predictor=predictor)
    )
    obs, nxt, act = frames(8, 32), frames(8, 32).flip(0), torch.randint(0, 7, (8,))
    loss, terms = model.loss(*one_step(obs, act, nxt))
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    c = model.config
    expected = c.vicreg_sim_coeff * terms["pred_loss"] + c.vicreg_std_coeff * terms["std_loss"] + c.vicreg_cov_coeff * terms["cov_loss"]
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)


def test_arrangements_encode_with_the_documented_encoders():
    model = ViTJEPA(config=ViTJEPAConfig(image_size=32, patch_size=8, latent_dim=32, mlp_dim=32, arrangement="seed"))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1)  # make online and EMA encoders differ
    obs = frames(4, 32)
    online = model.encoder(obs.permute(0, 3, 1, 2).float() / 255)[0]
    ema = model.target_encoder(obs.permute(0, 3, 1, 2).float() / 255)[0]
    assert torch.allclose(model.encode(obs), ema) and torch.allclose(model.encode_target(obs), online)
    model.config.arrangement = "common"
    assert torch.allclose(model.encode(obs), online) and torch.allclose(model.encode_target(obs), ema)


def test_update_target_moves_by_decay():
    model = ViTJEPA(config=ViTJEPAConfig(image_size=32, patch_size=8, latent_dim=32, mlp_dim=32, ema_decay=0.9))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target()
    for t0, t1, o in zip(before, model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * o, atol=1e-6)


def test_encdec_output_shape_range_and_learning(vit_data):
    from minigrid_dataset import MiniGridTransitions

    torch.manual_seed(0)
    model = ViTEncoderDecoder(config=EncDecConfig(image_size=32, patch_size=8, latent_dim=32, mlp_dim=64, decoder_dim=32))
    obs, act = frames(8, 32), torch.randint(0, 7, (8,))
    pred = model.predict_frame(obs, act)
    assert pred.shape == (8, 3, 32, 32)
    assert pred.min() >= 0 and pred.max() <= 1
    assert model.rollout_frames(obs, torch.zeros(8, 4, dtype=torch.long)).shape == (8, 4, 3, 32, 32)
    batch = MiniGridTransitions(vit_data).__getitems__(list(range(8)))
    obs, act, nxt = batch["obs"], batch["action"], batch["next_obs"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss, terms = model.loss(*one_step(obs, act, nxt))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert terms["recon_loss"] == loss.detach()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("patch", [8, 16])
def test_tokens_decoder_starts_as_copying_and_moves_what_crosses_a_patch_border(patch):
    """decoder="tokens" with residual starts as the copy baseline; its 3x3 convolution over the
    patch grid makes a patch's output depend on its neighbours (an agent stepping in)."""
    torch.manual_seed(0)
    c = EncDecConfig(image_size=32, patch_size=patch, latent_dim=32, mlp_dim=64, decoder_dim=32, decoder="tokens", residual=True)
    model = ViTEncoderDecoder(config=c)
    obs = frames(2, 32)
    torch.testing.assert_close(model.predict_frame(obs, torch.tensor([0, 2])), obs.permute(0, 3, 1, 2).float() / 255)
    torch.nn.init.normal_(model.to_pixels.weight, std=0.1)
    grid = torch.zeros(1, 32, 32 // patch, 32 // patch, requires_grad=True)
    out = model.neighbours(grid)
    out[0, :, 0, 0].sum().backward()
    assert grid.grad[0, :, 1, 1].abs().sum() > 0 and grid.grad[0, :, 0, 1].abs().sum() > 0
    with pytest.raises(ValueError, match="decoder must be one of"):
        EncDecConfig(image_size=32, patch_size=8, decoder="conv")


# ----------------------------------------------------------------------------- trainers, end to end


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory):
    return collect(tmp_path_factory.mktemp("vit") / "d.npz", episodes=6, max_steps=40, image_size=32, actions="nav")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    cfg = yaml.safe_load(open(__import__("pathlib").Path(__file__).parents[1] / "config.yaml"))
    cfg.update(
        image_size=32,
        patch_size=8,
        latent_dim=32,
        decoder_dim=32,
        mlp_dim=64,
        jepa_predictor_hidden_dim=64,
        batch_size=16,
        num_epochs=2,
        learning_rate=3e-4,
    )
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(run_dir, phase):
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["phase"] == phase]


@pytest.mark.parametrize("script", ["train_jepa.py", "train_encdec.py"])
def test_vit_trainers_end_to_end(tmp_path, vit_data, tiny_config, script):
    out = tmp_path / "run"
    extra = ["--arch", "vit"] if script == "train_jepa.py" else []
    proc = run(script, *extra, "--config", tiny_config, "--data", vit_data, "--out-dir", out, "--log-every", "3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "Using device: cpu" in proc.stdout and "keys for other stages skipped" in proc.stdout
    files = ["model.pt", "config.json", "metrics.csv", "loss.png"] + (["predictions.png"] if script == "train_encdec.py" else [])
    for name in files:
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["arch"] == ("jepa_vit" if extra else "encdec_vit")
    # the yaml's keys reach the model
    mc = ckpt["model_config"]
    assert (mc["patch_size"], mc["latent_dim"], mc["mlp_dim"], mc["image_size"]) == (8, 32, 64, 32)
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == pytest.approx(3e-4)
    losses = [float(r["loss"]) for r in rows(out, "train")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    if extra:
        assert {"pred_loss", "std_loss", "cov_loss"} <= rows(out, "train")[0].keys()
        assert mc["vicreg_sim_coeff"] == 25.0 and mc["arrangement"] == "seed"
    else:
        assert mc["decoder_dim"] == 32 and "WARNING" not in proc.stdout
        # the predictions figure also goes to TensorBoard, beside the run's scalars
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        board = EventAccumulator(str(out))
        board.Reload()
        image = board.Images("predictions")[-1]
        assert image.width > 100 and image.height > 100 and image.encoded_image_string.startswith(b"\x89PNG")


def test_vit_frame_mismatch_is_one_line_error(tmp_path, vit_data, tiny_config):
    proc = run(
        "train_jepa.py", "--arch", "vit", "--config", tiny_config, "--image-size", "64", "--data", vit_data, "--out-dir", tmp_path / "r"
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:") and "image_size 64" in proc.stderr
    proc = run("train_encdec.py", "--config", tiny_config, "--patch-size", "5", "--data", vit_data, "--out-dir", tmp_path / "r")
    assert proc.returncode == 2 and "patch_size 5" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_yaml_key_is_an_error(tmp_path, vit_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("patch_sise: 8\n")
    proc = run("train_encdec.py", "--config", bad, "--data", vit_data, "--out-dir", tmp_path / "r")
    assert proc.returncode == 2 and "patch_sise" in proc.stderr


def test_inspect_rejects_checkpoint_for_wrong_trainer(tmp_path, vit_data, tiny_config, in_process):
    """--resume with a checkpoint of another architecture names the problem."""
    out = tmp_path / "run"
    in_process("train_encdec.py", "--config", tiny_config, "--data", vit_data, "--out-dir", out, "--epochs", "1")
    proc = run("train_jepa.py", "--arch", "vit", "--config", tiny_config, "--data", vit_data, "--out-dir", out, "--resume")
    assert proc.returncode == 2 and "encdec_vit" in proc.stderr


def test_config_keys_are_checked_in_process(vit_data, tmp_path):
    from minigrid_dataset import MiniGridTransitions
    from train_jepa import TrainConfig, vit_config

    data = MiniGridTransitions(vit_data)
    with pytest.raises(UserError, match="divisible"):
        vit_config(data, TrainConfig(arch="vit", patch_size=6))
    with pytest.raises(UserError, match="reg none"):
        vit_config(data, TrainConfig(arch="vit", reg="none"))


def spatial_vit(**kw) -> ViTJEPA:
    config = dict(image_size=32, patch_size=8, latent_dim=8, num_heads=2, mlp_dim=16, jepa_predictor_hidden_dim=16, num_actions=3)
    return ViTJEPA(config=ViTJEPAConfig(**{**config, "spatial": True, **kw}))


def test_spatial_vit_latent_is_the_token_map_channel_first():
    """spatial=True: the latent is the patch tokens [N,D] laid out as a map [D,side,side] and
    flattened (as the spatial CNN's feature map, so the planner compares it cell by cell); a
    residual predictor starts as the copy."""
    model = spatial_vit(residual=True, idm_coeff=1.0)
    assert model.map_shape == (8, 4, 4) and model.latent_dim == 8 * 16
    obs = frames(3, 32)
    _, tokens = model.encoder(obs.permute(0, 3, 1, 2).float() / 255)  # [3,16,8]
    z = model.encode(obs)
    assert z.shape == (3, 128)
    torch.testing.assert_close(z.view(3, 8, 16).transpose(1, 2), tokens)
    torch.testing.assert_close(model.predict(z, torch.tensor([0, 1, 2])), z)
    loss, terms = model.loss(torch.stack([obs, obs], 1), torch.zeros(3, 1, dtype=torch.long))
    assert math.isfinite(loss.item()) and {"pred_loss", "std_loss", "cov_loss", "idm_loss"} <= terms.keys()
    assert spatial_vit(spatial=False).map_shape is None


def test_spatial_vit_predictor_moves_with_the_change_and_sees_its_neighbours():
    """One rule wherever a change happens: shifting a lone change on an empty map shifts the
    prediction; and a token knows its neighbours (the depthwise 3x3 convolution), so the tokens
    next to the change are predicted otherwise than tokens far from it, which a move needs."""
    model = spatial_vit(residual=True)
    torch.nn.init.normal_(model.predictor.out.weight, std=0.1)
    m = torch.zeros(1, 8, 4, 4)
    m[0, :, 1, 1] = torch.randn(8, generator=torch.Generator().manual_seed(0))
    shifted = torch.roll(m, shifts=(1, 1), dims=(2, 3))
    a = torch.tensor([1])
    out = model.predict(m.flatten(1), a).view(1, 8, 4, 4)
    out_shifted = model.predict(shifted.flatten(1), a).view(1, 8, 4, 4)
    torch.testing.assert_close(out_shifted, torch.roll(out, shifts=(1, 1), dims=(2, 3)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[0, :, 1, 2], out[0, :, 3, 3], atol=1e-4)  # next to the change vs far from it


def test_spatial_vit_vicreg_counts_every_token_as_a_sample():
    model = spatial_vit()
    obs = frames(4, 32)
    _, terms = model.loss(torch.stack([obs, obs], 1), torch.zeros(4, 1, dtype=torch.long))
    from losses import vicreg_cov_loss, vicreg_std_loss

    z = model.encode_target(obs) if model.config.arrangement == "seed" else model.encode(obs)
    tokens = z.view(4, 8, 16).transpose(1, 2).reshape(-1, 8)
    torch.testing.assert_close(terms["std_loss"], vicreg_std_loss(tokens))
    torch.testing.assert_close(terms["cov_loss"], 2 * vicreg_cov_loss(tokens))


@pytest.mark.parametrize("local", [0, 1])
def test_local_attention_bounds_what_a_token_sees(local):
    """local_attention r: a patch attends only to patches at most r rows and columns away, so
    after L blocks a token depends on the patches within r*L of it and on nothing farther (0:
    every token on every patch). The mask follows from the config and is not saved."""
    from world_model_vit import ViTEncoder

    torch.manual_seed(0)
    encoder = ViTEncoder(image_size=48, patch_size=8, input_channels=3, dim=8, heads=2, depth=2, mlp_dim=16, local_attention=local)
    x = torch.rand(1, 3, 48, 48)
    changed = x.clone()
    changed[:, :, :8, :8] = 0  # the top-left patch
    _, before = encoder(x)
    _, after = encoder(changed)
    moved = ((before - after).abs().amax(-1) > 1e-6).view(6, 6)  # [rows, columns] of the 6x6 token map
    if local:
        expected = torch.zeros(6, 6, dtype=torch.bool)
        expected[:3, :3] = True  # within 1 x 2 blocks of patch (0, 0)
        assert torch.equal(moved, expected)
    else:
        assert moved.all()
    assert "mask" not in encoder.state_dict()


def test_spatial_vit_trains_from_the_cli_and_the_planner_sees_its_map(tmp_path, vit_data, tiny_config):
    """`train_jepa.py --arch vit --spatial`: the checkpoint rebuilds the token-map model and the
    planner compares its states cell by cell; a patch that is not the data's cell is one line."""
    out = tmp_path / "run"
    flags = ("train_jepa.py", "--arch", "vit", "--spatial", "--config", tiny_config, "--data", vit_data, "--device", "cpu")
    proc = run(*flags, "--patch-size", "4", "--out-dir", out)  # the data's cells: 4 px
    assert proc.returncode == 0, proc.stderr
    from models import model_from_checkpoint
    from planners import Imagination
    from wm_common import load_checkpoint

    model = model_from_checkpoint(load_checkpoint(out, arch="jepa_vit"))
    assert model.config.spatial and Imagination(model, "jepa_vit", torch.device("cpu")).cells == (32, 8, 8)
    assert model.config.local_attention == 0 and model.encoder.mask is None
    local = run(*flags, "--patch-size", "4", "--local-attention", "1", "--epochs", "1", "--out-dir", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    model = model_from_checkpoint(load_checkpoint(tmp_path / "local", arch="jepa_vit"))
    assert model.config.local_attention == 1 and model.encoder.mask.shape == (64, 64) and model.target_encoder.mask is not None
    bad = run(*flags, "--patch-size", "8", "--out-dir", tmp_path / "b")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--patch-size 4" in bad.stderr and not (tmp_path / "b").exists()
