"""The trainers' flags: `RunConfig` (the settings every trainer shares), `ViTArgs` (the ViT's),
seed 000's config.yaml names for them, and `check_run_flags`. Kept apart from training.py, which
imports torch (a second of start-up): a trainer builds its --help from these and checks them
before it imports training.py, so a mistake is told at once."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigrid_dataset import check_data_path
from wm_common import MAX_WIDTH, check_seed, fail

# seed 000's config.yaml names for settings the trainers call otherwise
SEED000_ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "vicreg_sim_coeff": "sim_coeff",
    "vicreg_std_coeff": "std_coeff",
    "vicreg_cov_coeff": "cov_coeff",
}
# seed 000 keys that configure data collection: the trainers accept and skip them
SEED000_COLLECTION_KEYS = ("environment_name", "num_episodes_data_collection", "max_steps_per_episode_data_collection")

MAX_SKIPPED_IN_A_ROW = 10
# Fewer optimizer steps than this left the CNN JEPA short of what its data can teach (measured
# on four MiniGrid layouts: at 84-243 steps the predicted-cell probe was 0.17-0.75 one step
# ahead, at 648-2,000 steps 0.999-1.0); such runs are told so. The default budget is above it.
MIN_STEPS = 500
DEFAULT_STEPS = 2000


@dataclass
class RunConfig:
    """Settings every trainer shares; each trainer's config adds its model's fields."""

    data: str = field(default="data/demo_empty8x8.npz", metadata={"help": "transitions .npz from collect_minigrid_data.py"})
    epochs: int | None = field(
        default=None,
        metadata={"help": "total epochs (with --resume: train until this many; default: enough for --steps)", "replaces": "steps"},
    )
    batch_size: int = field(default=64, metadata={"help": "transitions per batch"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    lr_schedule: str = field(
        default="constant",
        metadata={
            "help": "cosine: the learning rate falls from --lr to 0 at the run's last step (a resume with more --epochs stretches it)",
            "choices": ["constant", "cosine"],
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    seed: int = field(default=0, metadata={"help": "one seed for init, data split and data order"})
    out_dir: str = field(default="", metadata={"help": "run directory (default: checkpoints/<arch>)"})
    device: str = field(default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": ["auto", "cpu", "cuda", "mps"]})
    config: str = field(default="", metadata={"help": "YAML file of these keys (seed 000 names accepted); flags override it"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out-dir from its checkpoint up to --epochs"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an existing run in --out-dir (the old one is moved to <out-dir>.prev, or .prev2, ...: never deleted)"},
    )
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of episodes held out for validation"})
    log_every: int = field(default=100, metadata={"help": "print and log every this many batches"})
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the training loss (about 2x for the CNN JEPA on a CPU; the first steps compile)"}
    )
    amp: bool = field(default=False, metadata={"help": "bfloat16 autocast for the training forward pass (for GPUs)"})
    num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes (0: load in the main process; batches are one gather)"}
    )
    save_every: int = field(default=0, metadata={"help": "also checkpoint every this many steps within an epoch (0: at epoch ends only)"})
    skip_nonfinite: bool = field(
        default=False,
        metadata={
            "help": f"skip an update whose loss or gradient is NaN/inf instead of stopping ({MAX_SKIPPED_IN_A_ROW} in a row still stop)"
        },
    )
    steps: int | None = field(
        default=None,
        metadata={
            "help": f"budget in optimizer steps: the fewest whole epochs that reach it (default without --epochs: {DEFAULT_STEPS})",
            "replaces": "epochs",
        },
    )
    unroll: int = field(
        default=1,
        metadata={"help": "train on windows of K consecutive steps, the predictor fed its own output K times (1: one-step)"},
    )
    repeat_unchanged: int = field(
        default=1,
        metadata={
            "help": "draw each training window that holds a step whose frame does not change (a step into a wall) this many "
            "times per epoch (1: once, as every window); rare in walks, such steps are the least precise predictions otherwise"
        },
    )


@dataclass
class ViTArgs:
    """The ViT hyperparameters as trainer flags / config.yaml keys (seed 000's names)."""

    image_size: int | None = field(default=None, metadata={"help": "ViT: frame size; must match the data (default: the data's)"})
    input_channels: int | None = field(default=None, metadata={"help": "ViT: frame channels; must match the data (default: the data's)"})
    patch_size: int = field(default=16, metadata={"help": "ViT: patch size (image_size must be divisible by it)"})
    num_heads: int = field(default=4, metadata={"help": "ViT: attention heads"})
    num_encoder_layers: int = field(default=2, metadata={"help": "ViT: encoder transformer blocks"})
    mlp_dim: int = field(default=256, metadata={"help": "ViT: hidden size of each block's MLP"})
    action_emb_dim: int = field(default=32, metadata={"help": "action embedding size"})
    patch_norm: bool = field(
        default=True,
        metadata={
            "help": "ViT: LayerNorm over each patch's pixels (seed 000); it erases a uniform patch's brightness, --no-patch-norm keeps it"
        },
    )
    local_attention: int = field(
        default=0,
        metadata={"help": "ViT: each patch attends only to patches at most this many rows/columns away (0: all patches)"},
    )


def vit_kwargs(args: ViTArgs, data: Any, latent_dim: int) -> dict[str, Any]:
    """ViTConfig keyword arguments from the flags, checked against the data's frames."""
    h, w, c = data.frame_shape
    if h != w:
        fail(f"the ViT needs square frames, the data's are {h}x{w}")
    if args.image_size not in (None, h):
        fail(
            f"image_size {args.image_size} does not match the data's {h}x{w} frames; collect with --image-size {args.image_size} or set image_size: {h}"
        )
    if args.input_channels not in (None, c):
        fail(f"input_channels {args.input_channels} does not match the data's {c} channels")
    if args.patch_size < 1:
        fail(f"--patch-size must be at least 1, got {args.patch_size}")
    if h % args.patch_size:
        fail(f"image_size {h} is not divisible by patch_size {args.patch_size}; pick a divisor of {h}")
    if not 0 <= args.local_attention <= MAX_WIDTH:
        fail(f"--local-attention must be between 0 (all patches) and {MAX_WIDTH}, got {args.local_attention}")
    if latent_dim % args.num_heads:
        fail(f"latent_dim {latent_dim} is not divisible by num_heads {args.num_heads}")
    symbolic = data.meta.get("obs_mode") == "symbolic"
    return dict(
        image_size=h,
        input_channels=c,
        patch_size=args.patch_size,
        num_actions=data.num_actions,
        continuous_actions=data.continuous_actions,
        latent_dim=latent_dim,
        num_heads=args.num_heads,
        num_encoder_layers=args.num_encoder_layers,
        mlp_dim=args.mlp_dim,
        action_emb_dim=args.action_emb_dim,
        pixel_scale=10.0 if symbolic else 255.0,
        patch_norm=args.patch_norm,
        local_attention=args.local_attention,
    )


def check_run_flags(cfg: RunConfig) -> None:
    """The flags every trainer shares, each bad value one line; the data and a checkpoint to
    resume are checked for being there, their contents once they are loaded."""
    if cfg.epochs is not None and cfg.steps is not None:
        fail("give the budget as --epochs or as --steps, not both")
    if cfg.epochs is not None and cfg.epochs < 1:
        fail(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.steps is not None and cfg.steps < 1:
        fail(f"--steps must be at least 1, got {cfg.steps}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        fail(f"--lr must be positive and finite, got {cfg.lr}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        fail(f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    if cfg.lr * cfg.weight_decay >= 1:
        # AdamW multiplies every weight by 1 - lr * weight_decay each step: 0 or below zeroes or flips them all
        fail(
            f"--weight-decay {cfg.weight_decay} x --lr {cfg.lr} is 1 or more: every step would zero or flip all weights; lower --weight-decay"
        )
    if not (cfg.grad_clip >= 0 and math.isfinite(cfg.grad_clip)):
        fail(f"--grad-clip must be 0 (off) or a positive norm, got {cfg.grad_clip}")
    check_seed(cfg.seed)
    if cfg.log_every < 1:
        fail(f"--log-every must be at least 1, got {cfg.log_every}")
    if cfg.save_every < 0:
        fail(f"--save-every must be 0 (epoch ends only) or a number of steps, got {cfg.save_every}")
    ckpt_path = Path(cfg.out_dir) / "model.pt"
    if cfg.resume and not ckpt_path.is_file():
        fail(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
    if not cfg.resume and ckpt_path.exists() and not cfg.overwrite:
        fail(f"{Path(cfg.out_dir)} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --out-dir")
    check_data_path(cfg.data)
