"""Step 5: train the ViT encoder-decoder of seed 000, the pixel-reconstruction baseline: it
predicts the next frame s_t+1 from s_t and a_t in pixels.

    python train_encdec.py --config config.yaml --data data/demo_empty8x8.npz

Writes the run directory (default checkpoints/encdec_vit/) like train_jepa.py (model.pt,
config.json, metrics.csv, loss.png) and predictions.png: held-out s_t, predicted s_t+1, true
s_t+1 and their difference, so you can see what the decoder learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from envs import action_label
from minigrid_dataset import MiniGridTransitions, split_episodes
from model_configs import DECODERS, EncDecConfig
from trainer_flags import SEED000_ALIASES, SEED000_COLLECTION_KEYS, RunConfig, ViTArgs, check_run_flags, vit_kwargs
from wm_common import atomic_write, check_sizes, choose_device, fail, load_checkpoint, no_grad, rank, run_cli

if TYPE_CHECKING:
    import torch

    from world_model_vit import ViTEncoderDecoder

# torch, and the model and training loop that import it (a second of start-up), are imported
# where a model is built and trained, so --help and a bad flag answer at once.

MAX_EXAMPLES = 64  # rows of predictions.png: more would pass matplotlib's 2**16-pixel figure limit

# config.yaml keys that configure the JEPA, not this model
JEPA_KEYS = ("jepa_predictor_hidden_dim", "ema_decay", "vicreg_sim_coeff", "vicreg_std_coeff", "vicreg_cov_coeff")


@dataclass
class EncDecTrainConfig(ViTArgs, RunConfig):
    latent_dim: int = field(default=128, metadata={"help": "encoder width (pooled latent size)"})
    decoder_dim: int = field(default=128, metadata={"help": "decoder width"})
    num_decoder_layers: int = field(default=2, metadata={"help": "decoder transformer blocks"})
    num_examples: int = field(default=8, metadata={"help": "held-out examples drawn in predictions.png"})
    # Seed 000's encoder-decoder (--decoder cross --no-residual --patch-norm --patch-size 16) predicts a
    # blurred board without the agent; these defaults draw it on its next cell (measured in docs/training.md).
    patch_size: int = field(default=8, metadata={"help": "ViT: patch size; 8 makes a MiniGrid cell of 8 px one token"})
    patch_norm: bool = field(
        default=False, metadata={"help": "LayerNorm over each patch's pixels (seed 000); it erases a uniform patch's brightness"}
    )
    residual: bool = field(default=True, metadata={"help": "decode the change from s_t, not the whole frame (--no-residual: seed 000)"})
    change_weight: float = field(
        default=0.0, metadata={"help": "pixels that change from s_t to s_t+1 weigh 1 + this in the loss (0: plain MSE, seed 000)"}
    )
    decoder: str = field(
        default="tokens",
        metadata={
            "help": "cross: learned queries cross-attend to the patch tokens (seed 000); tokens: self-attention over them",
            "choices": DECODERS,
        },
    )
    unroll: int = field(default=1, metadata={"help": "train on K-step windows, each predicted frame fed back (1: one-step)"})


def build_model(saved: dict[str, Any] | None, data: Any, cfg: EncDecTrainConfig) -> ViTEncoderDecoder:
    from world_model_vit import ViTEncoderDecoder

    if saved is not None:
        config = EncDecConfig(**saved)
        if list(data.frame_shape) != [config.image_size, config.image_size, config.input_channels]:
            fail(
                f"the data's frames are {list(data.frame_shape)} but the checkpoint's model takes {config.image_size}px x {config.input_channels}"
            )
    else:
        config = EncDecConfig(
            **vit_kwargs(cfg, data, cfg.latent_dim),
            decoder_dim=cfg.decoder_dim,
            num_decoder_layers=cfg.num_decoder_layers,
            residual=cfg.residual,
            change_weight=cfg.change_weight,
            decoder=cfg.decoder,
        )
    if config.decoder_dim % config.num_heads:
        fail(f"decoder_dim {config.decoder_dim} is not divisible by num_heads {config.num_heads}")
    return ViTEncoderDecoder(config=config)


@no_grad
def draw_predictions(run_dir: Path, data: MiniGridTransitions, n: int, device: torch.device) -> Path:
    """predictions.png: rows of held-out s_t | predicted s_t+1 | true s_t+1 | |difference|."""
    import matplotlib
    import torch

    from world_model_vit import ViTEncoderDecoder

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ckpt = load_checkpoint(run_dir, arch="encdec_vit")
    model = ViTEncoderDecoder(config=EncDecConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    tc = ckpt["train_config"]
    _, val_idx = split_episodes(data.episode, tc["val_fraction"], tc["seed"])
    # prefer transitions where the frame changes, so the picture shows motion, not copies
    moved = val_idx[(data.obs[val_idx] != data.next_obs(torch.from_numpy(val_idx))).flatten(1).any(1).numpy()]
    pool = moved if len(moved) >= n else val_idx
    idx = torch.from_numpy(np.random.default_rng(0).choice(pool, size=min(n, len(pool)), replace=False))
    obs, nxt, act = data.obs[idx], data.next_obs(idx), data.fields["action"][idx]
    pred = model.predict_frame(obs.to(device), act.to(device)).cpu().permute(0, 2, 3, 1).numpy()
    scale = model.config.pixel_scale
    true = nxt.numpy() / scale
    fig, axes = plt.subplots(len(idx), 4, figsize=(8, 2.1 * len(idx)), squeeze=False)
    for r in range(len(idx)):
        images = (obs[r].numpy() / scale, pred[r], true[r], np.abs(pred[r] - true[r]).mean(-1))
        action = action_label(str(data.meta.get("env", "")), act[r].numpy())
        titles = (f"s_t, then {action}", "predicted s_t+1", "true s_t+1", f"|difference|, mean {np.abs(pred[r] - true[r]).mean():.3f}")
        for c, (img, title) in enumerate(zip(images, titles, strict=True)):
            ax = axes[r, c]
            ax.imshow(np.clip(img.squeeze(), 0, 1), cmap="gray" if img.ndim == 2 or img.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"encoder-decoder, step {ckpt['step']}: held-out transitions", fontsize=9)
    fig.tight_layout()
    out = run_dir / "predictions.png"
    atomic_write(out, lambda p: fig.savefig(p, dpi=80, format="png"))
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(run_dir)) as board:  # the same picture beside the run's scalars
        board.add_figure("predictions", fig, int(ckpt["step"]))
    plt.close(fig)
    return out


def main(cfg: EncDecTrainConfig) -> dict[str, Any]:
    cfg.out_dir = cfg.out_dir or "checkpoints/encdec_vit"
    if not (cfg.change_weight >= 0 and math.isfinite(cfg.change_weight)):
        fail(f"--change-weight must be a finite weight >= 0 (0: plain MSE), got {cfg.change_weight}")
    if not 1 <= cfg.num_examples <= MAX_EXAMPLES:
        fail(f"--num-examples must be from 1 to {MAX_EXAMPLES} (rows of predictions.png), got {cfg.num_examples}")
    check_sizes(cfg, ("latent_dim", "action_emb_dim", "decoder_dim", "num_decoder_layers", "mlp_dim", "num_heads", "num_encoder_layers"))
    check_run_flags(cfg)
    from training import run_training

    summary = run_training(cfg, arch="encdec_vit", build_model=lambda saved, data: build_model(saved, data, cfg))
    if rank() == 0:
        out = draw_predictions(Path(cfg.out_dir), MiniGridTransitions(cfg.data), cfg.num_examples, choose_device(cfg.device))
        print(f"Saved {out}")
    return summary


if __name__ == "__main__":
    run_cli(
        main,
        EncDecTrainConfig,
        description=__doc__.split("\n\n")[0],
        aliases=SEED000_ALIASES,
        ignored=SEED000_COLLECTION_KEYS + JEPA_KEYS,
    )
