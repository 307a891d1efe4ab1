"""Steps 3-4: train a JEPA world model on collected transitions.

    python train_jepa.py --arch cnn --data data/demo_empty8x8.npz --epochs 5
    python train_jepa.py --arch vit --config config.yaml --data data/demo_empty8x8.npz

`--arch cnn` is seed 003's small CNN JEPA (world_model_jepa.py); `--arch vit` is seed 000's ViT
JEPA with VICReg (world_model_vit.py). Writes the run directory (default
checkpoints/jepa_<arch>/): model.pt, config.json, metrics.csv (one row per logged step, one per
epoch on held-out episodes) and loss.png. Every epoch it also measures whether the latents have
collapsed (per-dim std, RankMe) and warns if they have: a near-zero JEPA loss means nothing on
its own.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model_configs import PRED_LOSSES, TARGETS, JEPAConfig, ViTJEPAConfig, feature_map_shape
from trainer_flags import SEED000_ALIASES, SEED000_COLLECTION_KEYS, RunConfig, ViTArgs, check_run_flags, vit_kwargs
from wm_common import MAX_WIDTH, check_sizes, fail, rank, run_cli

if TYPE_CHECKING:
    from torch import nn

# The models and the training loop (world_model_*.py, training.py) import torch, a second of
# start-up: they are imported where a model is built and trained, so --help and a bad flag answer
# at once.

# Loss weights when not given: the CNN's prediction loss is seed 003's normalised MSE (tiny
# values), the ViT's is seed 000's plain MSE with VICReg's usual 25/25/1.
DEFAULT_COEFFS = {"cnn": (1.0, 1.0, 0.04), "vit": (25.0, 25.0, 1.0)}


@dataclass
class TrainConfig(ViTArgs, RunConfig):
    arch: str = field(default="cnn", metadata={"help": "cnn: seed 003's CNN JEPA; vit: seed 000's ViT JEPA", "choices": ["cnn", "vit"]})
    reg: str = field(
        default="vicreg",
        metadata={
            "help": "cnn only. none: seed 003's method exactly (collapses); vicreg: add variance+covariance terms",
            "choices": ["none", "vicreg"],
        },
    )
    latent_dim: int = field(default=128, metadata={"help": "latent size"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the target encoder"})
    sim_coeff: float | None = field(default=None, metadata={"help": "weight of the prediction loss (default: cnn 1, vit 25)"})
    std_coeff: float | None = field(default=None, metadata={"help": "weight of the VICReg variance term (default: cnn 1, vit 25)"})
    cov_coeff: float | None = field(default=None, metadata={"help": "weight of the VICReg covariance term (default: cnn 0.04, vit 1)"})
    unroll: int = field(
        default=4, metadata={"help": "train on windows of K consecutive steps, the predictor fed its own output K times (1: one-step)"}
    )
    idm_coeff: float = field(default=1.0, metadata={"help": "weight of the inverse-dynamics loss ((z_t, z_t+1) -> a_t); 0 = off"})
    smooth_coeff: float = field(default=0.0, metadata={"help": "weight of temporal smoothness, mean ||z_t+1 - z_t||^2; 0 = off"})
    target: str | None = field(
        default=None,
        metadata={
            "help": "what the predictor aims at: online = the online encoder, stop-gradient; ema = the EMA target encoder "
            "(default: online for cnn; ema for vit, whose seed arrangement encodes s_t with the EMA encoder)",
            "choices": list(TARGETS),
        },
    )
    vc_all_steps: bool = field(
        default=False, metadata={"help": "cnn: VICReg terms on every frame of the window, not only obs_t (the ViT always uses all)"}
    )
    pred_loss: str = field(
        default="mse",
        metadata={
            "help": "cnn: mse of the raw latents (fixes their norm, so rollouts hold past the trained K); normalized = of unit vectors (seed 003)",
            "choices": list(PRED_LOSSES),
        },
    )
    spatial: bool = field(
        default=False,
        metadata={
            "help": "cnn: the latent is the encoder's feature map (one position per grid cell of 4 or 8 px, as the collector "
            "recorded it; else per 8 px) and the predictor convolutional, the action tiled over the map: generalises to unseen layouts (--latent-dim is then the map's size); "
            "vit: the latent is the patch tokens' map (--patch-size a grid cell; --latent-dim the token width) and the predictor a transformer over the tokens"
        },
    )
    idm_head: str = field(
        default="mlp",
        metadata={
            "help": "cnn --spatial: the inverse-dynamics head, an mlp on the flattened maps or conv, one detector slid over "
            "the map (on FourRooms' 19x19 map the mlp stayed at chance for 2,000 steps, conv learned the action in 1,200; on "
            "SimpleCrossing's 9x9 map at the default widths conv nearly collapsed the latent: see docs/planning.md)",
            "choices": ["mlp", "conv"],
        },
    )
    idm_hidden_dim: int = field(
        default=0,
        metadata={
            "help": "cnn: the inverse-dynamics head's width (0: the predictor's). On SimpleCrossing's 9x9 map, --idm-head conv "
            "at 64 (the --spatial predictor's) collapsed the latent after 2,200 steps, at 32 it held: see docs/planning.md"
        },
    )
    channels: list[int] = field(
        default_factory=list,
        metadata={
            "help": "cnn: the encoder's conv widths, one per layer (default 32 64 64; --spatial 32 64 16). A large map costs "
            "per position: FourRooms' 19x19 map trained in 17 min at 16 32 16 (see docs/planning.md)",
            "repeat": True,
        },
    )
    predictor_hidden_dim: int = field(
        default=0, metadata={"help": "cnn: the predictor's width (0: 256; --spatial 64); the ViT's is --jepa-predictor-hidden-dim"}
    )
    predictor_dilations: list[int] = field(
        default_factory=list,
        metadata={
            "help": "cnn --spatial: the dilations of the predictor's three convs (default 1 1 1: a cell sees 3 cells either way; "
            "1 2 4: 7, for large maps whose view highlight a step repaints farther out, see docs/planning.md)",
            "repeat": True,
        },
    )
    residual: bool = field(default=True, metadata={"help": "the predictor outputs z + delta (--no-residual: seed 003's predictor)"})
    jepa_predictor_hidden_dim: int = field(default=256, metadata={"help": "vit: predictor hidden size"})
    predictor: str = field(default="mlp", metadata={"help": "vit: predictor type", "choices": ["mlp", "transformer"]})
    arrangement: str = field(
        default="seed",
        metadata={
            "help": "vit: seed = EMA target encodes s_t, online encodes s_t+1 (seed 000); common = online s_t, EMA s_t+1",
            "choices": ["seed", "common"],
        },
    )


ENCDEC_KEYS = ("decoder_dim", "num_decoder_layers")  # config.yaml keys for train_encdec.py

# Settings that only one architecture reads. The shared config.yaml carries the ViT's, so a
# value for the other architecture is a note, not an error; it is never silently dropped.
ONLY_FOR = {
    "vit": (
        "image_size",
        "input_channels",
        "patch_size",
        "num_heads",
        "num_encoder_layers",
        "mlp_dim",
        "jepa_predictor_hidden_dim",
        "predictor",
        "arrangement",
        "patch_norm",
        "local_attention",
    ),
    "cnn": ("vc_all_steps", "pred_loss", "idm_head", "idm_hidden_dim", "channels", "predictor_hidden_dim", "predictor_dilations"),
}


def unused_settings(cfg: TrainConfig) -> list[str]:
    """Settings this run does not read that differ from their defaults (so were given): the other
    architecture's, and the EMA decay when the target is the online encoder."""
    other = "vit" if cfg.arch == "cnn" else "cnn"
    names = list(ONLY_FOR[other])
    if cfg.arch == "cnn" and (cfg.target or "online") == "online":
        names.append("ema_decay")  # the online target never reads the EMA encoder
    defaults = TrainConfig()
    return [name for name in names if getattr(cfg, name) != getattr(defaults, name)]


def coeffs(cfg: TrainConfig) -> dict[str, float]:
    sim, std, cov = DEFAULT_COEFFS[cfg.arch]
    return {
        "sim": sim if cfg.sim_coeff is None else cfg.sim_coeff,
        "std": std if cfg.std_coeff is None else cfg.std_coeff,
        "cov": cov if cfg.cov_coeff is None else cfg.cov_coeff,
    }


def build_model(saved: dict[str, Any] | None, data: Any, cfg: TrainConfig) -> nn.Module:
    from world_model_jepa import JEPAWorldModel
    from world_model_vit import ViTJEPA

    if cfg.arch == "cnn":
        config = JEPAConfig(**saved) if saved is not None else cnn_config(data, cfg)
        shape = config.obs_shape
        model = JEPAWorldModel(config=config)
    else:
        config = ViTJEPAConfig(**saved) if saved is not None else vit_config(data, cfg)
        shape = [config.image_size, config.image_size, config.input_channels]
        model = ViTJEPA(config=config)
    if list(data.frame_shape) != list(shape):
        fail(f"the data's frames are {list(data.frame_shape)} but the checkpoint's model takes {shape}; use the data it was trained on")
    return model


# the spatial model's map is small per position; its conv predictor's width, measured cheap enough
SPATIAL_CHANNELS, SPATIAL_HIDDEN = [32, 64, 16], 64


def cnn_config(data: Any, cfg: TrainConfig) -> JEPAConfig:
    c = coeffs(cfg)
    shape = list(data.frame_shape)
    if cfg.spatial:
        # data from before the collector recorded the cell size (0) keep the side rule
        cell = int(data.meta.get("cell_px", 0))
        channels = cfg.channels or SPATIAL_CHANNELS
        m = feature_map_shape(shape, channels, cell_px=cell)
        if cell and m[1] * cell != shape[0]:
            fail(
                f"--channels {' '.join(map(str, channels))}: {len(channels)} convs leave a {m[1]}x{m[2]} map, not one position per {cell} px cell; give more"
            )
        sizes = dict(
            spatial=True,
            channels=channels,
            predictor_hidden_dim=cfg.predictor_hidden_dim or SPATIAL_HIDDEN,
            latent_dim=m[0] * m[1] * m[2],
            cell_px=cell,
            idm_head=cfg.idm_head,
            **({"predictor_dilations": cfg.predictor_dilations} if cfg.predictor_dilations else {}),
        )
    else:
        sizes = dict(latent_dim=cfg.latent_dim, **({"channels": cfg.channels} if cfg.channels else {}))
        if cfg.predictor_hidden_dim:
            sizes["predictor_hidden_dim"] = cfg.predictor_hidden_dim
    return JEPAConfig(
        obs_shape=shape,
        num_actions=data.num_actions,
        continuous_actions=data.continuous_actions,
        action_emb_dim=cfg.action_emb_dim,
        ema_decay=cfg.ema_decay,
        pixel_scale=10.0 if data.meta.get("obs_mode") == "symbolic" else 255.0,
        reg=cfg.reg,
        sim_coeff=c["sim"],
        std_coeff=c["std"],
        cov_coeff=c["cov"],
        vc_all_steps=cfg.vc_all_steps,
        pred_loss=cfg.pred_loss,
        idm_hidden_dim=cfg.idm_hidden_dim,
        **sizes,
        **objective(cfg),
    )


def objective(cfg: TrainConfig) -> dict[str, Any]:
    """The multi-step objective's model-config fields, the same for both architectures."""
    target = cfg.target or ("online" if cfg.arch == "cnn" else "ema")
    return dict(idm_coeff=cfg.idm_coeff, smooth_coeff=cfg.smooth_coeff, target=target, residual=cfg.residual)


def vit_config(data: Any, cfg: TrainConfig) -> ViTJEPAConfig:
    if cfg.reg != "vicreg":
        fail("--reg none is seed 003's CNN method; the ViT JEPA is always regularised with VICReg (set std/cov coeffs to 0 to drop it)")
    c = coeffs(cfg)
    cell = int(data.meta.get("cell_px", 0))
    if cfg.spatial and cell and cfg.patch_size != cell:
        fail(f"--spatial makes a token per grid cell: the data's cells are {cell} px, give --patch-size {cell}")
    return ViTJEPAConfig(
        spatial=cfg.spatial,
        **vit_kwargs(cfg, data, cfg.latent_dim),
        jepa_predictor_hidden_dim=cfg.jepa_predictor_hidden_dim,
        predictor=cfg.predictor,
        arrangement=cfg.arrangement,
        ema_decay=cfg.ema_decay,
        vicreg_sim_coeff=c["sim"],
        vicreg_std_coeff=c["std"],
        vicreg_cov_coeff=c["cov"],
        **objective(cfg),
    )


def main(cfg: TrainConfig) -> dict[str, Any]:
    cfg.out_dir = cfg.out_dir or f"checkpoints/jepa_{cfg.arch}"
    check_sizes(cfg, ("latent_dim", "action_emb_dim", "jepa_predictor_hidden_dim", "mlp_dim", "num_heads", "num_encoder_layers"))
    if not 0 <= cfg.ema_decay <= 1:
        fail(f"--ema-decay must be between 0 and 1 (the target keeps this share of itself each step), got {cfg.ema_decay}")
    for flag, value in (("idm_coeff", cfg.idm_coeff), ("smooth_coeff", cfg.smooth_coeff), *coeffs(cfg).items()):
        name = f"--{flag.replace('_', '-')}" if flag.endswith("coeff") else f"--{flag}-coeff"
        if not (value >= 0 and math.isfinite(value)):
            fail(f"{name} must be a finite weight >= 0 (0: off), got {value}")
    if coeffs(cfg)["sim"] == 0:
        fail("--sim-coeff 0 leaves the predictor untrained; the prediction loss needs a positive weight")
    if not 0 <= cfg.predictor_hidden_dim <= MAX_WIDTH:
        fail(f"--predictor-hidden-dim must be from 1 to {MAX_WIDTH}, or 0 for the default, got {cfg.predictor_hidden_dim}")
    if any(not 1 <= c <= MAX_WIDTH for c in cfg.channels):
        fail(f"--channels must each be from 1 to {MAX_WIDTH}, got {' '.join(map(str, cfg.channels))}")
    if not 0 <= cfg.idm_hidden_dim <= MAX_WIDTH:
        fail(f"--idm-hidden-dim must be from 1 to {MAX_WIDTH}, or 0 for the predictor's width, got {cfg.idm_hidden_dim}")
    if cfg.predictor_dilations and not (cfg.arch == "cnn" and cfg.spatial):
        fail("--predictor-dilations widen the convolutional predictor of --arch cnn --spatial; other latents have none")
    if cfg.predictor_dilations and (len(cfg.predictor_dilations) != 3 or not all(1 <= d <= 64 for d in cfg.predictor_dilations)):
        fail(f"--predictor-dilations takes three dilations from 1 to 64 (one per conv), got {' '.join(map(str, cfg.predictor_dilations))}")
    if cfg.idm_head == "conv" and not (cfg.arch == "cnn" and cfg.spatial):
        fail("--idm-head conv slides over the feature map of --arch cnn --spatial; other latents have no map (use mlp)")
    if cfg.arch == "vit" and cfg.target == "online" and cfg.arrangement == "seed":
        fail("--target online needs --arrangement common (in seed 000's arrangement the EMA encoder encodes s_t)")
    unused = unused_settings(cfg)
    if unused and rank() == 0:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        target = cfg.target or ("online" if cfg.arch == "cnn" else "ema")
        verb = "is" if len(unused) == 1 else "are"
        print(f"note: {flags} {verb} not used by --arch {cfg.arch} --target {target} (ignored)", file=sys.stderr)
    check_run_flags(cfg)
    from training import run_training

    return run_training(cfg, arch=f"jepa_{cfg.arch}", build_model=lambda saved, data: build_model(saved, data, cfg))


if __name__ == "__main__":
    run_cli(
        main,
        TrainConfig,
        description=__doc__.split("\n\n")[0],
        aliases=SEED000_ALIASES,
        ignored=SEED000_COLLECTION_KEYS + ENCDEC_KEYS,
    )
