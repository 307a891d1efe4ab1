"""Steps 3-4: train a JEPA world model on collected transitions.

    python train_jepa.py --arch cnn --data data/empty8.npz --epochs 5

Writes the run directory (default checkpoints/jepa_<arch>/): model.pt, config.json,
metrics.csv (one row per logged step, one per epoch on the held-out episodes) and loss.png.
Every epoch it also measures whether the latents have collapsed (per-dim std, RankMe) and
warns if they have: a near-zero JEPA loss means nothing on its own.
"""

from dataclasses import dataclass, field
from typing import Any

from wm_common import fail, run_cli, run_training
from world_model_jepa import LOSS_TERMS, JEPAConfig, JEPAWorldModel


@dataclass
class TrainConfig:
    data: str = field(default="data/MiniGrid-Empty-8x8-v0_rgb.npz", metadata={"help": "transitions .npz from collect_minigrid_data.py"})
    arch: str = field(default="cnn", metadata={"help": "encoder architecture", "choices": ["cnn"]})
    epochs: int = field(default=5, metadata={"help": "total epochs (with --resume: train until this many)"})
    batch_size: int = field(default=64, metadata={"help": "transitions per batch"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    seed: int = field(default=0, metadata={"help": "one seed for init, data split and data order"})
    out_dir: str = field(default="", metadata={"help": "run directory (default: checkpoints/jepa_<arch>)"})
    device: str = field(default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": ["auto", "cpu", "cuda", "mps"]})
    config: str = field(default="", metadata={"help": "YAML file of these keys (seed 000 names accepted); flags override it"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out-dir from its checkpoint up to --epochs"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run in --out-dir"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of episodes held out for validation"})
    log_every: int = field(default=100, metadata={"help": "print and log every this many batches"})
    num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes (0: load in the main process; batches are one gather)"}
    )
    reg: str = field(
        default="vicreg",
        metadata={
            "help": "none: seed 003's method exactly (collapses); vicreg: add variance+covariance terms",
            "choices": ["none", "vicreg"],
        },
    )
    latent_dim: int = field(default=128, metadata={"help": "latent size"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the target encoder"})
    sim_coeff: float = field(default=1.0, metadata={"help": "weight of the prediction loss"})
    std_coeff: float = field(default=1.0, metadata={"help": "weight of the VICReg variance term"})
    cov_coeff: float = field(default=0.04, metadata={"help": "weight of the VICReg covariance term"})


# seed 000's config.yaml names for the same settings
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "vicreg_sim_coeff": "sim_coeff",
    "vicreg_std_coeff": "std_coeff",
    "vicreg_cov_coeff": "cov_coeff",
}


def build_cnn(saved: dict[str, Any] | None, data: Any, cfg: TrainConfig) -> JEPAWorldModel:
    if data.fields["action"].ndim != 1:
        fail(f"{data.path} has continuous actions; the CNN JEPA embeds discrete actions only")
    if saved is not None:
        config = JEPAConfig(**saved)
        if list(data.frame_shape) != list(config.obs_shape):
            fail(
                f"the data's frames are {list(data.frame_shape)} but the checkpoint's model takes {config.obs_shape}; use the data it was trained on"
            )
        return JEPAWorldModel(config=config)
    symbolic = data.meta.get("obs_mode") == "symbolic"
    config = JEPAConfig(
        obs_shape=list(data.frame_shape),
        num_actions=data.num_actions,
        latent_dim=cfg.latent_dim,
        ema_decay=cfg.ema_decay,
        pixel_scale=10.0 if symbolic else 255.0,
        reg=cfg.reg,
        sim_coeff=cfg.sim_coeff,
        std_coeff=cfg.std_coeff,
        cov_coeff=cfg.cov_coeff,
    )
    return JEPAWorldModel(config=config)


def main(cfg: TrainConfig) -> dict[str, Any]:
    cfg.out_dir = cfg.out_dir or f"checkpoints/jepa_{cfg.arch}"
    return run_training(cfg, arch=f"jepa_{cfg.arch}", build_model=lambda saved, data: build_cnn(saved, data, cfg), term_names=LOSS_TERMS)


if __name__ == "__main__":
    run_cli(main, TrainConfig, description=__doc__.split("\n\n")[0], aliases=ALIASES)
