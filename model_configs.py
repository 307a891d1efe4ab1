"""The world models' configs: what a checkpoint's `model_config` holds, what the trainers fill
in from their flags and what `models.py` rebuilds a model from. They live apart from the models
(world_model_jepa.py, world_model_vit.py) because those import torch, a second of start-up that
a stage's --help and its checks of flags should not wait for.
"""

from dataclasses import dataclass, field

TARGETS = ("ema", "online")
PRED_LOSSES = ("normalized", "mse")


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
    idm_coeff: float = 0.0  # > 0 adds an inverse-dynamics head: (z_t, z_t+1) -> a_t
    smooth_coeff: float = 0.0  # temporal smoothness of consecutive online latents
    target: str = "ema"  # "ema": EMA target encoder (seed 003); "online": the online encoder, stop-gradient
    vc_all_steps: bool = False  # VICReg terms on the latents of every frame of the window, not only obs_t
    residual: bool = False  # the predictor outputs z + delta (copying is where it starts)
    pred_loss: str = "normalized"  # seed 003's MSE of unit vectors, or "mse" of the raw latents (norm included)
    spatial: bool = False  # the latent is the encoder's feature map (latent_dim = its size), the predictor convolutional
    cell_px: int = 0  # spatial: pixels per grid cell of the frames (0: unknown); see `halvings`
    idm_head: str = "mlp"  # the inverse-dynamics head: "mlp" on the flattened latents, or "conv" over a spatial map
    idm_hidden_dim: int = 0  # the inverse-dynamics head's width (0: predictor_hidden_dim's)
    predictor_dilations: list[int] = field(default_factory=lambda: [1, 1, 1])  # spatial: the predictor's three convs

    def __post_init__(self):
        if self.reg not in ("none", "vicreg"):
            raise ValueError(f"reg must be 'none' or 'vicreg', got {self.reg!r}")
        if self.pred_loss not in PRED_LOSSES:
            raise ValueError(f"pred_loss must be one of {PRED_LOSSES}, got {self.pred_loss!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if len(self.predictor_dilations) != 3 or min(self.predictor_dilations) < 1:
            raise ValueError(f"predictor_dilations must be three dilations of at least 1, got {self.predictor_dilations}")
        if self.idm_head not in ("mlp", "conv") or (self.idm_head == "conv" and not self.spatial):
            raise ValueError(f"idm_head must be 'mlp', or 'conv' for a spatial latent, got {self.idm_head!r} (spatial={self.spatial})")


def halvings(obs_shape: list[int], channels: list[int], spatial: bool = False, cell_px: int = 0) -> list[bool]:
    """Which of CNNEncoder's convs halve the frame. The global latent's encoder halves sides of
    16 px or more (seed 003); the spatial one down to 8, so that three convs make a MiniGrid cell
    of 8 px one position (48 -> 6, 64 -> 8, 72 -> 9) while a 7x7 symbolic grid keeps stride 1.
    Told a cell's size in pixels (a power of two), the spatial one halves until a cell is one
    position whatever the frame's size: FourRooms at 4 px per cell, 76 -> 19, where the side
    rule would give 9 positions for 19 cells, a cell's place within a position varying."""
    side, out = min(obs_shape[:2]), []
    for _ in channels:
        if spatial and cell_px > 0 and cell_px & (cell_px - 1) == 0:
            halve = 2 ** sum(out) < cell_px
        else:
            halve = side >= (8 if spatial else 16)
        out.append(halve)
        side = side // 2 if halve else side
    return out


def feature_map_shape(obs_shape: list[int], channels: list[int], spatial: bool = True, cell_px: int = 0) -> tuple[int, int, int]:
    """(c, h, w) of CNNEncoder's feature map."""
    h, w, _ = obs_shape
    for halve in halvings(obs_shape, channels, spatial, cell_px):
        h, w = (h // 2, w // 2) if halve else (h, w)
    return channels[-1], h, w


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    input_channels: int = 3
    num_actions: int = 7  # for continuous actions: the action vector's size
    continuous_actions: bool = False
    latent_dim: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 2
    mlp_dim: int = 256
    action_emb_dim: int = 32
    pixel_scale: float = 255.0
    # seed 000: a LayerNorm over each patch's pixels before the embedding. It erases a uniform
    # patch's brightness: at patch 8, MiniGrid's black floor, grey wall and lit floor are one token.
    patch_norm: bool = True
    # each patch attends only to the patches at most this many rows and columns away (0: to all):
    # local attention keeps what a token holds about its own place, as a CNN's map does
    local_attention: int = 0

    def __post_init__(self):
        if self.local_attention < 0:
            raise ValueError(f"local_attention must be >= 0, got {self.local_attention}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.latent_dim % self.num_heads:
            raise ValueError(f"latent_dim {self.latent_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ViTJEPAConfig(ViTConfig):
    jepa_predictor_hidden_dim: int = 256
    predictor: str = "mlp"  # "mlp" or "transformer"
    arrangement: str = "seed"  # "seed" or "common", see world_model_vit.py
    ema_decay: float = 0.99
    vicreg_sim_coeff: float = 25.0
    vicreg_std_coeff: float = 25.0
    vicreg_cov_coeff: float = 1.0
    idm_coeff: float = 0.0
    smooth_coeff: float = 0.0
    target: str = "ema"  # "common" arrangement: "ema" target encoder or "online" (stop-gradient)
    residual: bool = False  # the predictor outputs z + delta
    # the latent is the patch tokens' map [latent_dim, side, side] (flattened channel first, as the
    # spatial CNN's feature map) instead of their mean, and the predictor a transformer over the
    # tokens, each told its 3x3 neighbours and the action (`predictor` is then unused)
    spatial: bool = False

    @property
    def map_shape(self) -> tuple[int, int, int] | None:
        """A spatial latent's map [C,h,w]; None for the pooled one."""
        side = self.image_size // self.patch_size
        return (self.latent_dim, side, side) if self.spatial else None

    def __post_init__(self):
        super().__post_init__()
        if self.predictor not in ("mlp", "transformer"):
            raise ValueError(f"predictor must be 'mlp' or 'transformer', got {self.predictor!r}")
        if self.arrangement not in ("seed", "common"):
            raise ValueError(f"arrangement must be 'seed' or 'common', got {self.arrangement!r}")
        if self.target not in ("ema", "online"):
            raise ValueError(f"target must be 'ema' or 'online', got {self.target!r}")
        if self.target == "online" and self.arrangement == "seed":
            raise ValueError("target 'online' is for arrangement 'common' (in 'seed' the EMA encoder encodes s_t)")


DECODERS = ("cross", "tokens")


@dataclass
class EncDecConfig(ViTConfig):
    decoder_dim: int = 128
    num_decoder_layers: int = 2
    residual: bool = False  # decode the change from s_t instead of the whole frame
    change_weight: float = 0.0  # pixels that change from s_t to s_t+1 weigh 1 + this in the loss
    decoder: str = "cross"  # "cross": learned queries cross-attend (seed 000); "tokens": see world_model_vit.py

    def __post_init__(self):
        super().__post_init__()
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
