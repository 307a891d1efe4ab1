"""The model registry: every architecture a checkpoint can name (`arch`), with its config
dataclass and its class, so any stage rebuilds a trained model from `model.pt` alone."""

from typing import Any

import torch

from wm_common import fail
from world_model_jepa import JEPAConfig, JEPAWorldModel
from world_model_vit import EncDecConfig, ViTEncoderDecoder, ViTJEPA, ViTJEPAConfig

MODELS = {"jepa_cnn": (JEPAConfig, JEPAWorldModel), "jepa_vit": (ViTJEPAConfig, ViTJEPA), "encdec_vit": (EncDecConfig, ViTEncoderDecoder)}


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's model, its weights loaded, in eval mode."""
    if ckpt["arch"] not in MODELS:
        fail(f"checkpoint arch {ckpt['arch']!r} is not one this tool knows ({', '.join(MODELS)})")
    config_cls, model_cls = MODELS[ckpt["arch"]]
    model = model_cls(config=config_cls(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()
