"""The world models' shared neural pieces: action embeddings, inverse dynamics, the JEPA and
VICReg losses (with the batch gathered across processes), EMA updates, latent rollouts, and the
collapse diagnostics (latent std, RankMe)."""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wm_common import rank, world_size

# ----------------------------------------------------------------------------- losses


def frames_to_float(obs: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 frames [B,H,W,C] -> float [B,C,H,W] in [0,1]. Done per batch on the device, so the
    dataset never holds a float copy."""
    return obs.permute(0, 3, 1, 2).float().div_(scale)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed 003's JEPA loss: MSE between L2-normalised vectors, i.e. (2 - 2 cos) / D."""
    return F.mse_loss(F.normalize(pred, dim=-1), F.normalize(target, dim=-1))


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vicreg_std_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Hinge on each dimension's std: 0 once every dim has std >= gamma, gamma when all
    embeddings are identical (full collapse)."""
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(gamma - std).mean()


def vicreg_cov_loss(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances over D: 0 for decorrelated dimensions."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = (z.T @ z) / (n - 1)
    return off_diagonal(cov).pow(2).sum() / d


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own share, summed over the
    ranks (every rank computes the same global-batch loss; DDP's gradient averaging then gives
    exactly the one-process gradient)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(z) for _ in range(world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather_batch(z: torch.Tensor) -> torch.Tensor:
    """z of this rank's share of the batch [b,D] -> z of the global batch [b*N,D], with gradients
    flowing back to every rank's share. VICReg's variance and covariance are statistics of the
    whole batch, so under DDP they must see all of it for N processes to train exactly like one.
    A no-op in one process and under no_grad (evaluation runs the full val set on every rank)."""
    if world_size() == 1 or not torch.is_grad_enabled():
        return z
    return _AllGather.apply(z)


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, for parameters and float buffers."""
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - decay)
    for tb, ob in zip(target.buffers(), online.buffers(), strict=True):
        tb.copy_(ob)


def action_embedding(*, num_actions: int, dim: int, continuous: bool) -> nn.Module:
    """Discrete actions [B] int64 -> a learned vector per action; continuous actions [B,A]
    float -> a linear map of the action vector (num_actions is then A)."""
    return nn.Linear(num_actions, dim) if continuous else nn.Embedding(num_actions, dim)


def flat_steps(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Applies a per-frame function to every step at once: x [B,T,...] -> fn(x) [B,T,D]."""
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def inverse_dynamics_head(*, latent_dim: int, hidden_dim: int, num_actions: int) -> nn.Module:
    """(z_t, z_t+1) concatenated [.., 2D] -> action logits (or the action vector) [.., A]."""
    return nn.Sequential(nn.Linear(2 * latent_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_actions))


def inverse_dynamics_loss(head: nn.Module, z: torch.Tensor, actions: torch.Tensor, continuous: bool) -> torch.Tensor:
    """Which action led from z_t to z_t+1, for every step of a window? z [B,T+1,D], actions
    [B,T] (cross-entropy) or [B,T,A] (MSE). Latents that answer it must encode what the actions
    change (the agent's cell and heading), which a prediction loss alone does not force."""
    out = head(torch.cat([z[:, :-1], z[:, 1:]], dim=-1))  # [B,T,A]
    if continuous:
        return F.mse_loss(out, actions)
    return F.cross_entropy(out.flatten(0, 1), actions.flatten())


def smoothness_loss(z: torch.Tensor) -> torch.Tensor:
    """Temporal smoothness: mean squared change of the latent per step, z [B,T+1,D]."""
    return (z[:, 1:] - z[:, :-1]).pow(2).mean()


def add_dynamics_terms(
    loss: torch.Tensor, terms: dict, *, z: torch.Tensor, actions: torch.Tensor, model: nn.Module, config: Any
) -> torch.Tensor:
    """The JEPAs' optional terms on their online latents z [B,T+1,D] (T >= 1): inverse dynamics
    over the T steps z holds and temporal smoothness, each weighted, added to `loss` and logged
    in `terms` (whose names `jepa_term_names` lists)."""
    if config.idm_coeff > 0:
        idm = inverse_dynamics_loss(model.inverse, z, actions[:, : z.shape[1] - 1], config.continuous_actions)
        loss = loss + config.idm_coeff * idm
        terms["idm_loss"] = idm.detach()
    if config.smooth_coeff > 0:
        smooth = smoothness_loss(z)
        loss = loss + config.smooth_coeff * smooth
        terms["smooth_loss"] = smooth.detach()
    return loss


def jepa_term_names(config: Any) -> list[str]:
    """The loss terms a JEPA's `loss` reports, in the order metrics.csv logs them."""
    return ["pred_loss", "std_loss", "cov_loss"] + ["idm_loss"] * (config.idm_coeff > 0) + ["smooth_loss"] * (config.smooth_coeff > 0)


def latent_rollout(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Open loop: z [B,D], actions [B,T] -> predicted latents [B,T,D] for steps 1..T, each
    prediction fed back as the next input."""
    out = []
    for t in range(actions.shape[1]):
        z = predict(z, actions[:, t])
        out.append(z)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- diagnostics


def embedding_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised latents: ~1/sqrt(D) when spread over the
    sphere, ~0 when every input maps to one point."""
    return F.normalize(z.float(), dim=-1).std(dim=0).mean().item()


def effective_rank(z: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of
    the (uncentred) embedding matrix. 1 for a single direction, D for a flat spectrum."""
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    return math.exp(-(p * p.log()).sum().item())


def collapse_warning(std: float, rank: float, dim: int) -> bool:
    """Collapse rule used everywhere: the normalised latents' per-dim std is below a tenth of a
    uniform spread (0.1/sqrt(D)) or RankMe is below 2% of D (and below 3). Measured on
    MiniGrid: a collapsed model sits at std ~0.001 and RankMe ~1.3; healthy ones at ~0.09 and
    >20 for D=128."""
    return std < 0.1 / math.sqrt(dim) or rank < max(1.5, min(3.0, 0.02 * dim))
