"""The small CNN JEPA world model of seed 003, trained on windows of K steps.

    z_t          = encode(obs_t)                        online CNN encoder, trained
    z^_t+k       = predict(z^_t+k-1, action_t+k-1)      MLP on [z, embed(action)], z^_t = z_t,
                                                        fed its own output K times (K=1: seed 003)
    z_t+k^tgt    = encode_target(obs_t+k)               EMA copy of the encoder, no gradients
                                                        (target="online": the online encoder, detached)
    loss = sim_coeff * mean_k MSE(normalize(z^_t+k), normalize(z_t+k^tgt))        (seed 003: reg="none", K=1)
         + std_coeff * VICReg variance + cov_coeff * VICReg covariance          (reg="vicreg"; on z_t, or
                                                                                 on every step: vc_all_steps)
         + idm_coeff * inverse dynamics (z_t+k, z_t+k+1) -> action_t+k   (every step when the online
                                                                   latents of every frame are computed, else k=0)
         + smooth_coeff * mean ||z_t+k+1 - z_t+k||^2

With `reg="none"` nothing stops the encoder from mapping every frame to one point, where the
loss is ~0: seed 003's own log shows exactly that. The VICReg terms on the online latents keep
every dimension spread out and decorrelated. One-step training predicts one step well and
drifts past chance within a few open-loop steps; the K-step unroll trains the predictor on its
own outputs, and the inverse-dynamics term keeps in the latent what the actions change.

Its config, `JEPAConfig`, is in model_configs.py: its defaults are seed 003's model (and what
checkpoints saved before a field existed were trained with); train_jepa.py's flags carry the
recommended values.
"""

import copy
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import (
    action_embedding,
    add_dynamics_terms,
    ema_update,
    flat_steps,
    frames_to_float,
    gather_batch,
    inverse_dynamics_head,
    jepa_term_names,
    latent_rollout,
    normalized_mse,
    vicreg_cov_loss,
    vicreg_std_loss,
)
from model_configs import JEPAConfig, feature_map_shape, halvings


class CNNEncoder(nn.Module):
    """Frames -> latent vector. Stride-2 convs halve the image while it is 16 px or larger
    (64 -> 8 with three layers; see `halvings`); small inputs such as 7x7 symbolic grids keep stride 1. The
    flatten + linear keeps where things are, which pooling would throw away; `spatial` keeps
    the feature map itself (flattened), so that a MiniGrid cell of 8 px is one map position."""

    def __init__(self, *, obs_shape: list[int], channels: list[int], latent_dim: int, spatial: bool = False, cell_px: int = 0):
        super().__init__()
        h, w, c = obs_shape
        layers: list[nn.Module] = []
        for out_c, halve in zip(channels, halvings(obs_shape, channels, spatial, cell_px), strict=True):
            if halve:
                layers += [nn.Conv2d(c, out_c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
                h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(c, out_c, kernel_size=3, stride=1, padding=1), nn.ReLU()]
            c = out_c
        if spatial:
            layers.pop()  # the map is the latent: no ReLU clipping half its values to 0
        self.convs = nn.Sequential(*layers)
        self.to_latent = nn.Identity() if spatial else nn.Linear(c * h * w, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B,C,H,W] float -> convs [B,c,h,w] -> [B,latent_dim] (spatial: latent_dim = c*h*w)
        return self.to_latent(self.convs(x).flatten(1))


class SpatialPredictor(nn.Module):
    """(feature map, action) -> next feature map, convolutional with the action embedding tiled
    over every position (as PLDM's predictor): what an action does to a cell depends on its
    neighbours, the same everywhere, so it carries over to layouts never seen. `dilations` widen
    what a cell sees (1 1 1: 3 cells either way; 1 2 4: 7), for views whose highlight a step
    repaints farther from the agent than that."""

    def __init__(
        self,
        *,
        map_shape: tuple[int, int, int],
        num_actions: int,
        action_emb_dim: int,
        hidden_dim: int,
        continuous_actions: bool,
        dilations: tuple[int, int, int] = (1, 1, 1),
    ):
        super().__init__()
        self.map_shape = map_shape
        c = map_shape[0]
        d1, d2, d3 = dilations
        self.action_emb = action_embedding(num_actions=num_actions, dim=action_emb_dim, continuous=continuous_actions)
        self.net = nn.Sequential(
            nn.Conv2d(c + action_emb_dim, hidden_dim, 3, padding=d1, dilation=d1),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=d2, dilation=d2),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, c, 3, padding=d3, dilation=d3),
        )
        nn.init.zeros_(self.net[-1].weight)  # residual: starts as the copy baseline
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        # z: [B,c*h*w] -> map [B,c,h,w]; action embedding [B,E] tiled to [B,E,h,w]
        m = z.view(-1, *self.map_shape)
        a = self.action_emb(action)[:, :, None, None].expand(-1, -1, *self.map_shape[1:])
        return z + self.net(torch.cat([m, a], dim=1)).flatten(1)


class SpatialInverse(nn.Module):
    """(map_t, map_t+1) -> action logits, convolutional, then the largest response over the map:
    an action shows where the agent is, which can be any cell, so one detector slid over the map
    learns it once where a linear layer on the flattened maps learns it cell by cell. (Measured
    on FourRooms' 19x19 map: the linear head stayed at chance, cross-entropy 1.07-1.10 for 3
    actions, for the first 2,000 steps.)"""

    def __init__(self, *, map_shape: tuple[int, int, int], hidden_dim: int, num_actions: int):
        super().__init__()
        self.map_shape = map_shape
        c = map_shape[0]
        self.net = nn.Sequential(
            nn.Conv2d(2 * c, hidden_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.ReLU(),
        )
        self.out = nn.Linear(hidden_dim, num_actions)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        # pair: [..., 2*c*h*w] (z_t then z_t+1, flattened) -> maps [N,2c,h,w] -> [N,hidden] -> [..., A]
        lead = pair.shape[:-1]
        maps = pair.reshape(-1, 2 * self.map_shape[0], *self.map_shape[1:])
        return self.out(self.net(maps).amax(dim=(2, 3))).view(*lead, -1)


class LatentPredictor(nn.Module):
    """(z_t, action) -> z_t+1: an MLP on the latent concatenated with the action embedding."""

    def __init__(
        self,
        *,
        latent_dim: int,
        num_actions: int,
        action_emb_dim: int,
        hidden_dim: int,
        continuous_actions: bool = False,
        residual: bool = False,
    ):
        super().__init__()
        self.residual = residual
        self.action_emb = action_embedding(num_actions=num_actions, dim=action_emb_dim, continuous=continuous_actions)
        self.net = nn.Sequential(
            nn.Linear(latent_dim + action_emb_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
        )
        if residual:
            # start as the copy baseline: the net learns only what an action changes
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        # z: [B,D], action: [B] int64 -> [B,D]
        delta = self.net(torch.cat([z, self.action_emb(action)], dim=-1))
        return z + delta if self.residual else delta


class JEPAWorldModel(nn.Module):
    can_collapse = True  # a joint-embedding loss has a trivial constant solution; fit() watches for it

    def __init__(self, *, config: JEPAConfig):
        super().__init__()
        self.config = config
        self.latent_dim = config.latent_dim
        self.encoder = CNNEncoder(
            obs_shape=config.obs_shape,
            channels=config.channels,
            latent_dim=config.latent_dim,
            spatial=config.spatial,
            cell_px=config.cell_px,
        )
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        # [C,h,w] of a spatial latent, else None
        self.map_shape = feature_map_shape(config.obs_shape, config.channels, cell_px=config.cell_px) if config.spatial else None
        if config.spatial:
            shape = self.map_shape
            if config.latent_dim != shape[0] * shape[1] * shape[2]:
                raise ValueError(f"a spatial latent is the {shape} feature map: latent_dim must be {shape[0] * shape[1] * shape[2]}")
            self.predictor = SpatialPredictor(
                map_shape=shape,
                num_actions=config.num_actions,
                action_emb_dim=config.action_emb_dim,
                hidden_dim=config.predictor_hidden_dim,
                continuous_actions=config.continuous_actions,
                dilations=tuple(config.predictor_dilations),
            )
        else:
            self.predictor = LatentPredictor(
                latent_dim=config.latent_dim,
                num_actions=config.num_actions,
                action_emb_dim=config.action_emb_dim,
                continuous_actions=config.continuous_actions,
                hidden_dim=config.predictor_hidden_dim,
                residual=config.residual,
            )
        idm_hidden = config.idm_hidden_dim or config.predictor_hidden_dim
        if config.idm_coeff > 0 and config.idm_head == "conv":
            self.inverse = SpatialInverse(map_shape=shape, hidden_dim=idm_hidden, num_actions=config.num_actions)
        elif config.idm_coeff > 0:
            self.inverse = inverse_dynamics_head(latent_dim=config.latent_dim, hidden_dim=idm_hidden, num_actions=config.num_actions)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B,H,W,C] -> online latents [B,D]."""
        return self.encoder(frames_to_float(obs, self.config.pixel_scale))

    @torch.no_grad()
    def encode_target(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 frames [B,H,W,C] -> target latents [B,D] (the space predictions aim at): the EMA
        encoder's, or with target="online" the online encoder's."""
        encoder = self.encoder if self.config.target == "online" else self.target_encoder
        return encoder(frames_to_float(obs, self.config.pixel_scale))

    def predict(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.predictor(z, action)

    def rollout(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Open-loop: z [B,D], actions [B,T] -> predicted latents [B,T,D] for steps 1..T."""
        return latent_rollout(self.predict, z, actions)

    def loss(self, frames: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """frames uint8 [B,K+1,H,W,C] (obs_t..obs_t+K), actions [B,K] (or [B,K,A]) -> (loss, terms)."""
        cfg = self.config
        every_frame = cfg.smooth_coeff > 0 or cfg.vc_all_steps
        # Online latents (with gradients, the costly part): [B,K+1,D] of every frame when a term
        # needs them; else of obs_t and, for inverse dynamics, obs_t+1 ([B,2,D] or [B,1,D]).
        # The targets need no backward pass, so a long unroll costs little beyond them.
        z = flat_steps(self.encode, frames if every_frame else frames[:, : 2 if cfg.idm_coeff > 0 else 1])
        z_target = flat_steps(self.encode_target, frames[:, 1:])  # [B,K,D], EMA or online, no gradients
        z_pred = self.rollout(z[:, 0], actions)  # [B,K,D], each step from the previous prediction
        # the mean over the K steps; "mse" also fixes the norm, which a fed-back prediction carries
        pred_loss = normalized_mse(z_pred, z_target) if cfg.pred_loss == "normalized" else F.mse_loss(z_pred, z_target)
        # [B(K+1),D] or [B,D], or the global batch across DDP processes
        z_all = gather_batch((z if cfg.vc_all_steps else z[:, :1]).flatten(0, 1))
        if cfg.spatial:
            # every map position is a sample of the c channels, [B*h*w, c]: a wall cell that never
            # changes could never reach VICReg's unit std as a dimension of its own
            c = self.predictor.map_shape[0]
            z_all = z_all.view(len(z_all), c, -1).transpose(1, 2).reshape(-1, c)
        std_loss, cov_loss = vicreg_std_loss(z_all), vicreg_cov_loss(z_all)
        loss = cfg.sim_coeff * pred_loss
        if cfg.reg == "vicreg":
            loss = loss + cfg.std_coeff * std_loss + cfg.cov_coeff * cov_loss
        # The VICReg terms are logged under reg="none" too: there they show the collapse.
        terms = {"pred_loss": pred_loss.detach(), "std_loss": std_loss.detach(), "cov_loss": cov_loss.detach()}
        return add_dynamics_terms(loss, terms, z=z, actions=actions, model=self, config=cfg), terms

    def term_names(self) -> list[str]:
        return jepa_term_names(self.config)

    def update_target(self) -> None:
        ema_update(self.target_encoder, self.encoder, self.config.ema_decay)

    def model_config(self) -> dict:
        return asdict(self.config)
