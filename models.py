"""The model registry: every architecture a checkpoint can name (`arch`), with its config
dataclass and its class, so any stage rebuilds a trained model from `model.pt` alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_configs import EncDecConfig, JEPAConfig, ViTJEPAConfig
from wm_common import fail

if TYPE_CHECKING:
    import torch


def model_classes() -> dict[str, tuple[type, type]]:
    """arch -> (config class, model class). The model files import torch, so they are imported
    when a model is built, not with this module (which the stage scripts import at start-up)."""
    from world_model_jepa import JEPAWorldModel
    from world_model_vit import ViTEncoderDecoder, ViTJEPA

    return {"jepa_cnn": (JEPAConfig, JEPAWorldModel), "jepa_vit": (ViTJEPAConfig, ViTJEPA), "encdec_vit": (EncDecConfig, ViTEncoderDecoder)}


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's model, its weights loaded, in eval mode."""
    models = model_classes()
    if ckpt["arch"] not in models:
        fail(f"checkpoint arch {ckpt['arch']!r} is not one this tool knows ({', '.join(models)})")
    config_cls, model_cls = models[ckpt["arch"]]
    model = model_cls(config=config_cls(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
