"""The small CNN JEPA world model of seed 003.

    z_t        = encode(obs_t)                    online CNN encoder, trained
    z_t+1^pred = predict(z_t, action_t)           MLP on [z_t, embed(action_t)]
    z_t+1^tgt  = encode_target(obs_t+1)           EMA copy of the encoder, no gradients
    loss       = MSE(normalize(z_pred), normalize(z_tgt))      (seed 003, `reg="none"`)
               + std_coeff * VICReg variance(z_t) + cov_coeff * VICReg covariance(z_t)  (`reg="vicreg"`)

With `reg="none"` nothing stops the encoder from mapping every frame to one point, where the
loss is ~0: seed 003's own log shows exactly that. The VICReg terms on the online latents keep
every dimension spread out and decorrelated.
"""

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from wm_common import (
    action_embedding,
    ema_update,
    frames_to_float,
    gather_batch,
    latent_rollout,
    normalized_mse,
    vicreg_cov_loss,
    vicreg_std_loss,
)


@dataclass
class JEPAConfig:
    obs_shape: list[int] = field(default_factory=lambda: [64, 64, 3])  # H, W, C of the uint8 frames
    num_actions: int = 7  # for continuous actions: the action vector's size
    continuous_actions: bool = False
    latent_dim: int = 128
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    action_emb_dim: int = 32
    predictor_hidden_dim: int = 256
    ema_decay: float = 0.99
    pixel_scale: float = 255.0  # 255 for RGB; MiniGrid's symbolic codes are small integers
    reg: str = "vicreg"  # "none" is seed 003's method exactly
    sim_coeff: float = 1.0
    std_coeff: float = 1.0
    cov_coeff: float = 0.04
    idm_coeff: float = 0.0  # > 0 adds an inverse-dynamics head: (z_t, z_t+1) -> a_t (discrete actions)

    def __post_init__(self):
        if self.reg not in ("none", "vicreg"):
            raise ValueError(f"reg must be 'none' or 'vicreg', got {self.reg!r}")
        if self.idm_coeff > 0 and self.continuous_actions:
            raise ValueError("the inverse-dynamics head classifies discrete actions; continuous actions need idm_coeff 0")


class CNNEncoder(nn.Module):
    """Frames -> latent vector. Stride-2 convs halve the image while it is 16 px or larger
    (64 -> 8 with three layers); small inputs such as 7x7 symbolic grids keep stride 1. The
    flatten + linear keeps where things are, which pooling would throw away."""

    def __init__(self, *, obs_shape: list[int], channels: list[int], latent_dim: int):
        super().__init__()
        h, w, c = obs_shape
        layers: list[nn.Module] = []
        for out_c in channels:
            if min(h, w) >= 16:
                layers += [nn.Conv2d(c, out_c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
                h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c, out_c, kernel_size=3, stride=1, padding=1), nn.ReLU()]
            c = out_c
        self.convs = nn.Sequential(*layers)
        self.to_latent = nn.Linear(c * h * w, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B,C,H,W] float -> convs [B,c,h,w] -> [B,latent_dim]
        return self.to_latent(self.convs(x).flatten(1))


class LatentPredictor(nn.Module):
    """(z_t, action) -> z_t+1: an MLP on the latent concatenated with the action embedding."""

    def __init__(self, *, latent_dim: int, num_actions: int, action_emb_dim: int, hidden_dim: int, continuous_actions: bool = False):
        super().__init__()
        self.action_emb = action_embedding(num_actions=num_actions, dim=action_emb_dim, continuous=continuous_actions)
        self.net = nn.Sequential(
            nn.Linear(latent_dim + action_emb_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
        )

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        # z: [B,D], action: [B] int64 -> [B,D]
        return self.net(torch.cat([z, self.action_emb(action)], dim=-1))


class JEPAWorldModel(nn.Module):
    can_collapse = True  # a joint-embedding loss has a trivial constant solution; fit() watches for it

    def __init__(self, *, config: JEPAConfig):
        super().__init__()
        self.config = config
        self.latent_dim = config.latent_dim
        self.encoder = CNNEncoder(obs_shape=config.obs_shape, channels=config.channels, latent_dim=config.latent_dim)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.predictor = LatentPredictor(
            latent_dim=config.latent_dim,
            num_actions=config.num_actions,
            action_emb_dim=config.action_emb_dim,
            continuous_actions=config.continuous_actions,
            hidden_dim=config.predictor_hidden_dim,
        )

        if config.idm_coeff > 0:
            # Which action led from z_t to z_t+1? Latents that answer it must encode what actions
            # change (the agent's cell and heading), which a plain JEPA loss does not force.
            self.inverse = nn.Sequential(
                nn.Linear(2 * config.latent_dim, config.predictor_hidden_dim),
                nn.ReLU(),
                nn.Linear(config.predictor_hidden_dim, config.num_actions),
            )

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B,H,W,C] -> online latents [B,D]."""
        return self.encoder(frames_to_float(obs, self.config.pixel_scale))

    @torch.no_grad()
    def encode_target(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B,H,W,C] -> EMA target latents [B,D] (the space predictions aim at)."""
        return self.target_encoder(frames_to_float(obs, self.config.pixel_scale))

    def predict(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.predictor(z, action)

    def rollout(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Open-loop: z [B,D], actions [B,T] -> predicted latents [B,T,D] for steps 1..T."""
        return latent_rollout(self.predict, z, actions)

    def loss(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        z = self.encode(obs)
        z_pred = self.predict(z, action)
        z_target = self.encode_target(next_obs)
        pred_loss = normalized_mse(z_pred, z_target)
        z_all = gather_batch(z)  # [B,D], or the global batch [B*N,D] across N DDP processes
        std_loss, cov_loss = vicreg_std_loss(z_all), vicreg_cov_loss(z_all)
        loss = cfg.sim_coeff * pred_loss
        if cfg.reg == "vicreg":
            loss = loss + cfg.std_coeff * std_loss + cfg.cov_coeff * cov_loss
        terms = {"pred_loss": pred_loss.detach(), "std_loss": std_loss.detach(), "cov_loss": cov_loss.detach()}
        if cfg.idm_coeff > 0:
            logits = self.inverse(torch.cat([z, self.encode(next_obs)], dim=-1))  # [B,A]
            idm_loss = F.cross_entropy(logits, action)
            loss = loss + cfg.idm_coeff * idm_loss
            terms["idm_loss"] = idm_loss.detach()
        # The VICReg terms are logged under reg="none" too: there they show the collapse.
        return loss, terms

    def update_target(self) -> None:
        ema_update(self.target_encoder, self.encoder, self.config.ema_decay)

    def model_config(self) -> dict:
        return asdict(self.config)


LOSS_TERMS = ["pred_loss", "std_loss", "cov_loss"]
