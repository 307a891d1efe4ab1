"""Unit tests of wm_common: losses, diagnostics, config parsing, atomic files, checkpoints,
device choice."""

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from losses import (
    collapse_warning,
    effective_rank,
    ema_update,
    embedding_std,
    normalized_mse,
    off_diagonal,
    vicreg_cov_loss,
    vicreg_std_loss,
)
from train_jepa import TrainConfig
from training import SEED000_ALIASES as ALIASES
from wm_common import UserError, atomic_write, choose_device, load_checkpoint, parse_config, save_checkpoint

# ----------------------------------------------------------------------------- losses


def test_normalized_mse_same_direction_is_zero():
    target = torch.randn(5, 16)
    assert normalized_mse(3.0 * target, target).item() == pytest.approx(0.0, abs=1e-7)


def test_normalized_mse_opposite_unit_vectors_is_4_over_d():
    d = 8
    u = torch.nn.functional.normalize(torch.randn(4, d), dim=-1)
    assert normalized_mse(u, -u).item() == pytest.approx(4.0 / d, rel=1e-6)
    # scale does not matter, only direction
    assert normalized_mse(2.5 * u, -0.1 * u).item() == pytest.approx(4.0 / d, rel=1e-6)


def test_normalized_mse_hand_computed():
    # pred [1,0], target [1,1]: cos = 1/sqrt(2); (2 - 2cos)/D = (2 - sqrt 2)/2
    pred = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[1.0, 1.0]])
    expected = (2 - math.sqrt(2)) / 2
    assert normalized_mse(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_normalized_mse_matches_cosine_formula_on_a_batch():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(32, 12, generator=g), torch.randn(32, 12, generator=g)
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    expected = ((2 - 2 * cos) / 12).mean()
    assert normalized_mse(pred, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_off_diagonal_3x3():
    m = torch.arange(9.0).view(3, 3)
    assert off_diagonal(m).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_vicreg_std_loss_identical_embeddings_is_about_gamma():
    z = torch.ones(16, 8) * 0.3
    # std = sqrt(0 + eps) = 0.01 per dim -> relu(1 - 0.01) = 0.99
    assert vicreg_std_loss(z).item() == pytest.approx(0.99, abs=1e-6)
    assert vicreg_std_loss(z, gamma=2.0).item() == pytest.approx(1.99, abs=1e-6)


def test_vicreg_std_loss_large_variance_is_zero():
    z = torch.randn(256, 8, generator=torch.Generator().manual_seed(0)) * 10
    assert vicreg_std_loss(z).item() == 0.0


def test_vicreg_cov_loss_orthogonal_design_is_zero():
    # 2^3 full factorial with all interactions: 7 zero-mean, mutually orthogonal +-1 columns
    rows = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))
    a, b, c = rows.T
    z = torch.stack([a, b, c, a * b, a * c, b * c, a * b * c], dim=1)
    assert vicreg_cov_loss(z).item() == pytest.approx(0.0, abs=1e-10)


def test_vicreg_cov_loss_large_standard_normal_sample_is_small():
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    # off-diagonal covariances ~ N(0, 1/n): sum of 240 squares / 16 ~ 0.00075
    assert vicreg_cov_loss(z).item() < 0.005


def test_vicreg_cov_loss_perfectly_correlated_exact_value():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0])
    var = 5.0 / 3.0  # unbiased variance of x
    # D=2, both dims equal: off-diagonals [var, var] -> 2 var^2 / 2
    assert vicreg_cov_loss(torch.stack([x, x], 1)).item() == pytest.approx(var**2, rel=1e-6)
    # D=3 with dims x, x, -x: off-diagonals +-var (6 of them) -> 6 var^2 / 3
    assert vicreg_cov_loss(torch.stack([x, x, -x], 1)).item() == pytest.approx(2 * var**2, rel=1e-6)


def test_ema_update_moves_target_by_exactly_the_decay():
    torch.manual_seed(0)
    target, online = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    decay = 0.9
    ema_update(target, online, decay)
    for t, t0, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, decay * t0 + (1 - decay) * o, rtol=0, atol=1e-7)


def test_ema_update_decay_one_keeps_target_and_zero_copies_online():
    torch.manual_seed(0)
    target, online = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 1.0)
    for t, t0 in zip(target.parameters(), before, strict=True):
        assert torch.equal(t, t0)
    ema_update(target, online, 0.0)
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        assert torch.equal(t, o)


def test_ema_update_copies_buffers():
    target, online = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    online.train()
    online(torch.randn(10, 3) * 5 + 2)
    ema_update(target, online, 0.99)
    assert torch.equal(target.running_mean, online.running_mean)
    assert torch.equal(target.running_var, online.running_var)


# ----------------------------------------------------------------------------- diagnostics


def test_effective_rank_rank_one_is_about_one():
    u, v = torch.randn(64, 1), torch.randn(1, 32)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_effective_rank_k_equal_singular_values_is_k(k):
    z = torch.zeros(k, 32)
    z[:, :k] = torch.eye(k) * 3.0
    assert effective_rank(z) == pytest.approx(k, rel=1e-3)


def test_embedding_std_one_repeated_vector_is_zero():
    z = torch.randn(1, 64).repeat(100, 1)
    assert embedding_std(z) == pytest.approx(0.0, abs=1e-6)


def test_embedding_std_isotropic_is_one_over_sqrt_d():
    d = 64
    z = torch.randn(8192, d, generator=torch.Generator().manual_seed(0)) * 7.0
    assert embedding_std(z) == pytest.approx(1 / math.sqrt(d), rel=0.03)


@pytest.mark.parametrize(
    "std, rank, dim, expected",
    [
        (0.09, 40.0, 128, False),  # healthy
        (0.001, 1.3, 128, True),  # collapsed (both)
        (0.0088, 40.0, 128, True),  # std just under 0.1/sqrt(128) = 0.00884
        (0.0089, 40.0, 128, False),  # std just over
        (0.09, 2.5, 128, True),  # rank under 0.02 * 128 = 2.56
        (0.09, 2.6, 128, False),
        (0.09, 2.9, 1024, True),  # 0.02 * D capped at 3
        (0.09, 3.1, 1024, False),
        (0.5, 1.4, 16, True),  # floor of 1.5 for small D
        (0.5, 1.6, 16, False),
    ],
)
def test_collapse_warning_thresholds(std, rank, dim, expected):
    assert collapse_warning(std, rank, dim) is expected


# ----------------------------------------------------------------------------- parse_config


@dataclass
class _Cfg:
    name: str = field(default="x", metadata={"help": "a string"})
    count: int = field(default=3, metadata={"help": "an int"})
    rate: float = field(default=0.5)
    limit: int | None = field(default=None)
    flag: bool = field(default=False)
    on: bool = field(default=True)
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})
    config: str = field(default="")


def test_parse_config_defaults():
    cfg = parse_config(_Cfg, [])
    assert cfg == _Cfg()


def test_parse_config_flags_map_to_fields():
    cfg = parse_config(
        _Cfg,
        ["--name", "y", "--count", "7", "--rate", "1e-3", "--limit", "12", "--flag", "--no-on", "--sizes", "4,5 6", "--mode", "b"],
    )
    assert cfg == _Cfg(name="y", count=7, rate=1e-3, limit=12, flag=True, on=False, sizes=[4, 5, 6], mode="b")
    assert isinstance(cfg.count, int) and isinstance(cfg.rate, float)


def test_parse_config_optional_int_none():
    assert parse_config(_Cfg, ["--limit", "none"]).limit is None
    assert parse_config(_Cfg, ["--limit", "None"]).limit is None
    assert parse_config(_Cfg, ["--limit", "5"]).limit == 5


def test_parse_config_bad_choice_and_bad_int_exit_2(capsys):
    with pytest.raises(SystemExit, match="^2$"):
        parse_config(_Cfg, ["--mode", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        parse_config(_Cfg, ["--count", "abc"])
    assert "'abc'" in capsys.readouterr().err


def test_parse_config_train_and_collect_flags():
    from collect_minigrid_data import CollectConfig

    cfg = parse_config(TrainConfig, ["--data", "d.npz", "--epochs", "3", "--batch-size", "8", "--resume", "--reg", "none"])
    assert (cfg.data, cfg.epochs, cfg.batch_size, cfg.resume, cfg.reg) == ("d.npz", 3, 8, True, "none")
    assert cfg.overwrite is False
    c = parse_config(CollectConfig, ["--max-steps", "none", "--obs", "symbolic", "--image-size", "32"])
    assert (c.max_steps, c.obs, c.image_size) == (None, "symbolic", 32)
    assert parse_config(CollectConfig, ["--max-steps", "40"]).max_steps == 40


def test_parse_config_yaml_with_seed000_aliases(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(
        "learning_rate: 0.0003\nnum_epochs: 7\nbatch_size: 32\n"
        "vicreg_sim_coeff: 25.0\nvicreg_std_coeff: 25\nvicreg_cov_coeff: 1.0\nlatent_dim: 64\n"
    )
    cfg = parse_config(TrainConfig, ["--config", str(p)], aliases=ALIASES)
    assert cfg.lr == pytest.approx(3e-4)
    assert cfg.epochs == 7 and cfg.batch_size == 32 and cfg.latent_dim == 64
    assert (cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff) == (25.0, 25.0, 1.0)
    assert isinstance(cfg.std_coeff, float)


def test_parse_config_cli_overrides_yaml(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("learning_rate: 0.01\nnum_epochs: 7\nreg: none\n")
    cfg = parse_config(TrainConfig, ["--config", str(p), "--epochs", "2", "--lr", "0.5"], aliases=ALIASES)
    assert cfg.epochs == 2 and cfg.lr == 0.5
    assert cfg.reg == "none"  # not given on the CLI: the file's value stays


def test_parse_config_yaml_unknown_key_is_error(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("learning_rate: 0.01\nlearnin_rate: 0.02\n")
    with pytest.raises(UserError, match="unknown keys learnin_rate"):
        parse_config(TrainConfig, ["--config", str(p)], aliases=ALIASES)


@pytest.mark.parametrize(
    "text, match",
    [
        ("epochs: abc\n", "must be a number"),
        ("epochs: 1.5\n", "whole number"),
        ("epochs: true\n", "must be a number"),
        ("resume: 3\n", "true or false"),
        ("batch_size:\n", "cannot be empty"),
        ("config: other.yaml\n", "unknown keys"),
    ],
)
def test_parse_config_yaml_wrong_type_is_error(tmp_path, text, match):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        parse_config(TrainConfig, ["--config", str(p)], aliases=ALIASES)


def test_parse_config_yaml_whole_float_for_int_and_int_for_float(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("epochs: 4.0\nlr: 1\n")
    cfg = parse_config(TrainConfig, ["--config", str(p)])
    assert cfg.epochs == 4 and isinstance(cfg.epochs, int)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_parse_config_yaml_missing_invalid_or_not_mapping(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_config(TrainConfig, ["--config", str(bad)])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        parse_config(TrainConfig, ["--config", str(lst)])


def test_parse_config_yaml_exponent_without_dot(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("learning_rate: 3e-4\n")
    cfg = parse_config(TrainConfig, ["--config", str(p)], aliases=ALIASES)
    assert cfg.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            "reg: bogus\n",
            id="reg-bogus",
        ),
        pytest.param(
            "arch: resnet\n",
            id="arch-resnet",
        ),
    ],
)
def test_parse_config_yaml_respects_choices(tmp_path, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=r"config key '(reg|arch)' must be one of"):
        parse_config(TrainConfig, ["--config", str(p)], aliases=ALIASES)


# ----------------------------------------------------------------------------- atomic_write


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name)


def test_atomic_write_writes_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write(target, lambda p: p.write_text("hello"))
    assert target.read_text() == "hello"
    assert _leftovers(target.parent) == []


def test_atomic_write_failure_keeps_old_file_intact(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"good old contents")

    def half_then_crash(p):
        p.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(UserError, match=r"cannot write .*out.bin \(disk full\); the previous out.bin, if any, is unchanged"):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"good old contents"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_without_old_file_leaves_nothing(tmp_path):
    target = tmp_path / "new.bin"

    def crash(p):
        p.write_bytes(b"partial")
        raise KeyboardInterrupt("stopped while writing")

    with pytest.raises(KeyboardInterrupt, match="stopped while writing"):
        atomic_write(target, crash)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checkpoints


def _payload(model: nn.Module, arch: str = "jepa_cnn") -> dict:
    return {
        "model": model.state_dict(),
        "model_config": {"in": 4, "out": 3, "sizes": [1, 2]},
        "train_config": {"lr": 0.001, "data": "x.npz", "resume": False},
        "step": 12,
        "epoch": 2,
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "data_meta": {"env": "MiniGrid-Empty-8x8-v0", "max_steps": None},
        "arch": arch,
    }


def test_checkpoint_round_trip(tmp_path):
    model = nn.Linear(4, 3)
    path = save_checkpoint(tmp_path / "run" / "model.pt", _payload(model))
    ckpt = load_checkpoint(path, arch="jepa_cnn")
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)
    assert ckpt["model_config"] == {"in": 4, "out": 3, "sizes": [1, 2]}
    assert (ckpt["step"], ckpt["epoch"], ckpt["arch"]) == (12, 2, "jepa_cnn")
    # loadable by anyone with weights_only=True (design.md)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["data_meta"]["env"] == "MiniGrid-Empty-8x8-v0"
    assert _leftovers(path.parent) == []


def test_checkpoint_run_directory_and_arch_tuple(tmp_path):
    save_checkpoint(tmp_path / "model.pt", _payload(nn.Linear(4, 3)))
    assert load_checkpoint(tmp_path)["epoch"] == 2
    assert load_checkpoint(tmp_path, arch=("jepa_vit", "jepa_cnn"))["arch"] == "jepa_cnn"


def test_checkpoint_wrong_arch_is_user_error(tmp_path):
    save_checkpoint(tmp_path / "model.pt", _payload(nn.Linear(4, 3), arch="encdec_vit"))
    with pytest.raises(UserError, match="encdec_vit"):
        load_checkpoint(tmp_path / "model.pt", arch="jepa_cnn")


def test_checkpoint_not_a_checkpoint_is_user_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    other = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other)  # a plain state_dict, not a project checkpoint
    with pytest.raises(UserError, match="missing keys"):
        load_checkpoint(other)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "empty_run_dir_that_does_not_exist")


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    p = tmp_path / "model.pt"
    payload = _payload(nn.Linear(4, 3))
    payload["model_config"] = _Cfg()  # an arbitrary class: weights_only must refuse it
    torch.save(payload, p)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(p)


def test_save_checkpoint_requires_all_keys(tmp_path):
    payload = _payload(nn.Linear(4, 3))
    del payload["optimizer"]
    with pytest.raises(ValueError, match="optimizer"):
        save_checkpoint(tmp_path / "model.pt", payload)
    assert not (tmp_path / "model.pt").exists()


# ----------------------------------------------------------------------------- devices


def test_choose_device_cpu():
    assert choose_device("cpu") == torch.device("cpu")


def test_choose_device_auto_returns_an_available_device():
    dev = choose_device("auto")
    assert dev.type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        assert dev.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_choose_device_cuda_without_cuda_is_user_error():
    with pytest.raises(UserError, match="CUDA"):
        choose_device("cuda")


def test_choose_device_unknown_is_user_error():
    with pytest.raises(UserError, match="unknown --device"):
        choose_device("tpu")


def test_to_jsonable_config_is_plain():
    from wm_common import to_jsonable

    d = to_jsonable(TrainConfig())
    assert d == dataclasses.asdict(TrainConfig())


@pytest.mark.parametrize(
    "module, cls",
    [
        ("collect_minigrid_data", "CollectConfig"),
        ("train_jepa", "TrainConfig"),
        ("train_encdec", "EncDecTrainConfig"),
        ("inspect_jepa_model", "InspectConfig"),
        ("plan_with_world_model", "PlanConfig"),
    ],
)
def test_help_lists_every_choice(module, cls, capsys):
    import importlib

    cfg_cls = getattr(importlib.import_module(module), cls)
    with pytest.raises(SystemExit, match="^0$"):
        parse_config(cfg_cls, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    fields = [f for f in dataclasses.fields(cfg_cls) if "choices" in f.metadata]
    assert fields
    for f in fields:
        shown = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        assert f"--{f.name.replace('_', '-')} {shown}" in text, (f.name, shown)
