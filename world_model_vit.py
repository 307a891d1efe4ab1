"""The ViT world models of seed 000: a ViT encoder, a ViT JEPA regularised with VICReg, and a
ViT encoder-decoder that predicts the next frame in pixels (the reconstruction baseline).

ViT JEPA, two arrangements (`arrangement`):
    "seed"   (seed 000 as written): z_t = EMA_target(s_t), no gradients; the predictor maps
             (z_t, a_t) to the *online* encoding of s_t+1, which gets gradients.
    "common" (I-JEPA / BYOL style): z_t = online(s_t); the predictor maps (z_t, a_t) to the
             EMA target's encoding of s_t+1 (no gradients).
    loss = sim_coeff * MSE(pred, target)
         + std_coeff * VICReg variance + cov_coeff * VICReg covariance,
           both on the online embeddings of s_t and s_t+1.
    On windows of K steps the predictor is fed its own output K times with the MSE on every
    step, and the VICReg terms cover every frame of the window. Optional, as for the CNN JEPA:
    inverse dynamics, temporal smoothness, the online encoder (stop-gradient) as the target of
    the "common" arrangement, a residual predictor. `spatial`: the latent is the token map
    [D,side,side] instead of the tokens' mean, the predictor a transformer over the tokens, each
    told its neighbours (`TokenPredictor`), and VICReg counts every token as a sample of the D
    channels: a mean of the tokens keeps what the frame shows but not where, which a planner on
    unseen layouts needs.

Encoder-decoder: ViT encoder of s_t -> patch tokens; a transformer decoder whose per-patch
queries carry the embedded action cross-attends to them and outputs each patch of s_t+1
(`decoder="tokens"`: each patch's own token plus its query and the action go through
self-attention instead, so a patch starts from what it showed and attention only has to move
what changes)
(`residual`: the change from s_t, so the static board is free and the capacity goes to what
moves); loss = MSE in pixels, on K steps each fed the previous predicted frame.

Their configs (`ViTConfig`, `ViTJEPAConfig`, `EncDecConfig`) are in model_configs.py: their
defaults are seed 000's models (and what older checkpoints were trained with); the trainers'
flags carry the recommended values.
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
    vicreg_cov_loss,
    vicreg_std_loss,
)
from model_configs import EncDecConfig, ViTConfig, ViTJEPAConfig


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,H,W] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B,C,H,W], the inverse of patchify for a square image."""
    b, n, _ = x.shape
    g = int(round(n**0.5))
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


def transformer_layers(*, dim: int, heads: int, mlp_dim: int, depth: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ViTEncoder(nn.Module):
    """Frames -> (pooled latent [B,D], patch tokens [B,N,D]): patch embedding, learned
    positions, pre-norm transformer blocks, final LayerNorm, mean pooling."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        input_channels: int,
        dim: int,
        heads: int,
        depth: int,
        mlp_dim: int,
        patch_norm: bool = True,
        local_attention: int = 0,
    ):
        super().__init__()
        self.patch_size = patch_size
        side = image_size // patch_size
        n = side * side
        # [N,N], True where attention is not allowed: patches more than `local_attention` rows or
        # columns apart (None: all attend to all); not saved, it follows from the config
        row, col = torch.arange(n) // side, torch.arange(n) % side
        far = torch.maximum((row[:, None] - row).abs(), (col[:, None] - col).abs()) > local_attention
        self.register_buffer("mask", far if local_attention else None, persistent=False)
        pixels = patch_size * patch_size * input_channels
        self.to_patch_embedding = nn.Sequential(nn.LayerNorm(pixels) if patch_norm else nn.Identity(), nn.Linear(pixels, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.transformer = transformer_layers(dim=dim, heads=heads, mlp_dim=mlp_dim, depth=depth)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.to_patch_embedding(patchify(x, self.patch_size)) + self.pos_embedding  # [B,N,D]
        tokens = self.norm(self.transformer(tokens, mask=self.mask, is_causal=False))
        return tokens.mean(dim=1), tokens


def build_encoder(c: ViTConfig) -> ViTEncoder:
    return ViTEncoder(
        image_size=c.image_size,
        patch_size=c.patch_size,
        input_channels=c.input_channels,
        dim=c.latent_dim,
        heads=c.num_heads,
        depth=c.num_encoder_layers,
        mlp_dim=c.mlp_dim,
        patch_norm=c.patch_norm,
        local_attention=c.local_attention,
    )


class MLPPredictor(nn.Module):
    def __init__(self, *, latent_dim: int, action_emb_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim + action_emb_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, latent_dim),
        )

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, a], dim=-1))  # [B,D]


class TransformerPredictor(nn.Module):
    """Two tokens, the latent and the projected action, through a small transformer; the
    latent token's output is the prediction."""

    def __init__(self, *, latent_dim: int, action_emb_dim: int, hidden_dim: int, heads: int):
        super().__init__()
        self.action_proj = nn.Linear(action_emb_dim, latent_dim)
        self.pos = nn.Parameter(torch.randn(1, 2, latent_dim) * 0.02)
        self.transformer = transformer_layers(dim=latent_dim, heads=heads, mlp_dim=hidden_dim, depth=2)
        self.out = nn.Linear(latent_dim, latent_dim)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack([z, self.action_proj(a)], dim=1) + self.pos  # [B,2,D]
        return self.out(self.transformer(tokens)[:, 0])


class TokenPredictor(nn.Module):
    """A spatial ViT JEPA's predictor: (token map, action) -> the map's change. Each token gets
    its 3x3 neighbourhood (a depthwise convolution over the map, a conditional positional
    encoding) and the projected action, then a small transformer runs over the tokens. The
    convolution tells a token what is next to it, which a move needs (attention alone treats the
    tokens as a set: measured, that model turned the agent in imagination but never moved it),
    and keeps the rule the same wherever on the map a move happens."""

    def __init__(self, *, map_shape: tuple[int, int, int], action_emb_dim: int, hidden_dim: int, heads: int):
        super().__init__()
        self.map_shape = map_shape
        dim = map_shape[0]
        self.neighbours = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.action_proj = nn.Linear(action_emb_dim, dim)
        self.transformer = transformer_layers(dim=dim, heads=heads, mlp_dim=hidden_dim, depth=2)
        self.out = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # z [B,D*N] channel first -> map [B,D,h,w] -> tokens [B,N,D]; a [B,E] -> [B,1,D] on every token
        m = z.view(len(z), *self.map_shape)
        tokens = (m + self.neighbours(m)).flatten(2).transpose(1, 2)
        delta = self.out(self.transformer(tokens + self.action_proj(a)[:, None]))  # [B,N,D]
        return delta.transpose(1, 2).flatten(1)  # [B,D*N]


class ViTJEPA(nn.Module):
    can_collapse = True  # a joint-embedding loss has a trivial constant solution; fit() watches for it

    def __init__(self, *, config: ViTJEPAConfig):
        super().__init__()
        c = self.config = config
        self.map_shape = c.map_shape  # [C,h,w] of a spatial latent, else None
        self.latent_dim = c.latent_dim * c.num_patches if c.spatial else c.latent_dim
        self.encoder = build_encoder(c)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.action_emb = action_embedding(num_actions=c.num_actions, dim=c.action_emb_dim, continuous=c.continuous_actions)
        if c.spatial:
            self.predictor = TokenPredictor(
                map_shape=c.map_shape, action_emb_dim=c.action_emb_dim, hidden_dim=c.jepa_predictor_hidden_dim, heads=c.num_heads
            )
        elif c.predictor == "mlp":
            self.predictor = MLPPredictor(latent_dim=c.latent_dim, action_emb_dim=c.action_emb_dim, hidden_dim=c.jepa_predictor_hidden_dim)
        else:
            self.predictor = TransformerPredictor(
                latent_dim=c.latent_dim, action_emb_dim=c.action_emb_dim, hidden_dim=c.jepa_predictor_hidden_dim, heads=c.num_heads
            )
        if c.residual:
            last = self.predictor.net[-1] if c.predictor == "mlp" and not c.spatial else self.predictor.out
            nn.init.zeros_(last.weight)  # start as the copy baseline
            nn.init.zeros_(last.bias)
        if c.idm_coeff > 0:
            self.inverse = inverse_dynamics_head(
                latent_dim=self.latent_dim, hidden_dim=c.jepa_predictor_hidden_dim, num_actions=c.num_actions
            )

    def _latent(self, encoder: ViTEncoder, obs: torch.Tensor) -> torch.Tensor:
        pooled, tokens = encoder(frames_to_float(obs, self.config.pixel_scale))  # [B,D], [B,N,D]
        return tokens.transpose(1, 2).flatten(1) if self.config.spatial else pooled  # [B,D*N] or [B,D]

    def _online(self, obs: torch.Tensor) -> torch.Tensor:
        return self._latent(self.encoder, obs)

    @torch.no_grad()
    def _ema(self, obs: torch.Tensor) -> torch.Tensor:
        return self._latent(self.target_encoder, obs)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,C] -> the latents the predictor starts from [B,D]."""
        return self._ema(obs) if self.config.arrangement == "seed" else self._online(obs)

    def encode_target(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,C] -> the latents the predictor aims at [B,D]."""
        if self.config.arrangement == "seed":
            return self._online(obs)
        if self.config.target == "online":
            return self._online(obs).detach()
        return self._ema(obs)

    def predict(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        out = self.predictor(z, self.action_emb(action))
        return z + out if self.config.residual else out

    def rollout(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z [B,D], actions [B,T] -> predicted latents [B,T,D]."""
        return latent_rollout(self.predict, z, actions)

    def loss(self, frames: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """frames uint8 [B,K+1,H,W,C], actions [B,K] (or [B,K,A]) -> (loss, terms)."""
        c = self.config
        online = flat_steps(self._online, frames)  # [B,K+1,D]
        if c.arrangement == "seed":
            start, target = self._ema(frames[:, 0]), online[:, 1:]
        else:
            start = online[:, 0]
            target = flat_steps(self._ema, frames[:, 1:]) if c.target == "ema" else online[:, 1:].detach()
        pred_loss = F.mse_loss(self.rollout(start, actions), target)  # mean over the K steps
        per_frame = [gather_batch(online[:, t]) for t in range(online.shape[1])]  # global batch under DDP
        if c.spatial:
            # every token a sample of the D channels, [B*N,D], as the spatial CNN's map positions
            per_frame = [z.view(len(z), c.latent_dim, -1).transpose(1, 2).reshape(-1, c.latent_dim) for z in per_frame]
        std_loss = torch.stack([vicreg_std_loss(z) for z in per_frame]).mean()
        # seed 000 sums the covariance over its two frames: twice the mean over the window's frames
        cov_loss = 2 * torch.stack([vicreg_cov_loss(z) for z in per_frame]).mean()
        loss = c.vicreg_sim_coeff * pred_loss + c.vicreg_std_coeff * std_loss + c.vicreg_cov_coeff * cov_loss
        terms = {"pred_loss": pred_loss.detach(), "std_loss": std_loss.detach(), "cov_loss": cov_loss.detach()}
        return add_dynamics_terms(loss, terms, z=online, actions=actions, model=self, config=c), terms

    def term_names(self) -> list[str]:
        return jepa_term_names(self.config)

    def update_target(self) -> None:
        ema_update(self.target_encoder, self.encoder, self.config.ema_decay)

    def model_config(self) -> dict:
        return asdict(self.config)


class ViTEncoderDecoder(nn.Module):
    """s_t, a_t -> s_t+1 in pixels."""

    def __init__(self, *, config: EncDecConfig):
        super().__init__()
        c = self.config = config
        self.latent_dim = c.latent_dim
        self.encoder = build_encoder(c)
        self.action_emb = action_embedding(num_actions=c.num_actions, dim=c.action_emb_dim, continuous=c.continuous_actions)
        self.action_to_decoder = nn.Linear(c.action_emb_dim, c.decoder_dim)
        self.memory_proj = nn.Linear(c.latent_dim, c.decoder_dim)
        self.queries = nn.Parameter(torch.randn(1, c.num_patches, c.decoder_dim) * 0.02)
        if c.decoder == "cross":
            layer = nn.TransformerDecoderLayer(
                c.decoder_dim,
                c.num_heads,
                dim_feedforward=2 * c.decoder_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.decoder = nn.TransformerDecoder(layer, c.num_decoder_layers)
        else:
            self.decoder = transformer_layers(dim=c.decoder_dim, heads=c.num_heads, mlp_dim=2 * c.decoder_dim, depth=c.num_decoder_layers)
            # what crosses a patch border (the agent stepping into the next patch) comes from a
            # neighbour: a 3x3 convolution over the patch grid hands it over, the same rule everywhere
            self.neighbours = nn.Conv2d(c.decoder_dim, c.decoder_dim, 3, padding=1)
        self.norm = nn.LayerNorm(c.decoder_dim)
        self.to_pixels = nn.Linear(c.decoder_dim, c.patch_size * c.patch_size * c.input_channels)
        if c.residual:
            nn.init.zeros_(self.to_pixels.weight)  # start as copying s_t
            nn.init.zeros_(self.to_pixels.bias)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,C] -> pooled latent [B,D] (for probes and collapse checks)."""
        return self.encoder(frames_to_float(obs, self.config.pixel_scale))[0]

    def decode(self, tokens: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B,N,D] and actions [B] -> the decoder's output [B,C,H,W]: the next frame
        in [0,1], or with `residual` the change from the current one."""
        c = self.config
        queries = self.queries + self.action_to_decoder(self.action_emb(action))[:, None]  # [B,N,Dd]
        if c.decoder == "cross":
            hidden = self.decoder(queries, self.memory_proj(tokens))
        else:
            hidden = self.decoder(queries + self.memory_proj(tokens))  # [B,N,Dd]
            g = c.image_size // c.patch_size
            grid = hidden.transpose(1, 2).reshape(len(hidden), -1, g, g)  # [B,Dd,g,g]
            hidden = hidden + self.neighbours(grid).flatten(2).transpose(1, 2)
        out = unpatchify(self.to_pixels(self.norm(hidden)), c.patch_size, c.input_channels)  # [B,C,H,W]
        return out if c.residual else torch.sigmoid(out)

    def step_frames(self, frames: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """float frames [B,C,H,W] in [0,1] and actions -> predicted next frames, the same format
        (so a prediction can be fed back)."""
        out = self.decode(self.encoder(frames)[1], action)
        if not self.config.residual:
            return out
        x = frames + out
        # clamped to [0,1] with a straight-through gradient, so pixels pushed past the range still learn
        return x + (x.clamp(0, 1) - x).detach()

    def predict_frame(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,C] frames and actions [B] -> predicted next frames, float [B,C,H,W] in [0,1]."""
        return self.step_frames(frames_to_float(obs, self.config.pixel_scale), action)

    def rollout_frames(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Open-loop in pixels: each predicted frame is fed back. -> [B,T,C,H,W] in [0,1]."""
        x = frames_to_float(obs, self.config.pixel_scale)
        out = []
        for t in range(actions.shape[1]):
            x = self.step_frames(x, actions[:, t])
            out.append(x)
        return torch.stack(out, dim=1)

    def loss(self, frames: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """frames uint8 [B,K+1,H,W,C], actions [B,K] -> pixel MSE over the K open-loop steps."""
        pred = self.rollout_frames(frames[:, 0], actions)  # [B,K,C,H,W]
        true = flat_steps(lambda f: frames_to_float(f, self.config.pixel_scale), frames)  # [B,K+1,C,H,W]
        if self.config.change_weight == 0:
            recon = F.mse_loss(pred, true[:, 1:])
        else:
            # The agent is a few pixels of a static board: plain MSE is nearly all board, and a
            # decoder that leaves the agent out scores well. Weighting what changes counters that.
            changed = (true[:, 1:] != true[:, :-1]).any(dim=2, keepdim=True)  # [B,K,1,H,W]
            weight = 1 + self.config.change_weight * changed.float()
            recon = (weight * (pred - true[:, 1:]).pow(2)).mean() / weight.mean()
        return recon, {"recon_loss": recon.detach()}

    def term_names(self) -> list[str]:
        return ["recon_loss"]

    def model_config(self) -> dict:
        return asdict(self.config)
