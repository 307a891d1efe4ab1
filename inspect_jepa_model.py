"""Step 6: look inside trained world models.

    python inspect_jepa_model.py --checkpoint checkpoints/jepa_cnn --data data/empty8.npz

For each checkpoint, on episodes the model never trained on (the trainer's own split, rebuilt
from the seed in the checkpoint): one-step prediction (normalised MSE, cosine of z_pred vs
z_target), collapse (per-dim std, RankMe, warning), linear probes of agent cell, direction and
goal cell against a random encoder and raw pixels, and open-loop rollouts against copying the
last latent. Writes `eval.json`, `inspection.png` and, for several checkpoints, `compare.md`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigrid_dataset import OPTIONAL_PROBE_KEYS, PROBE_KEYS, MiniGridTransitions, split_episodes
from models import model_from_checkpoint
from wm_common import (
    atomic_write,
    check_data_fits_model,
    check_seed,
    check_writable_dir,
    choose_device,
    fail,
    load_checkpoint,
    no_grad,
    run_cli,
    seed_everything,
    write_json,
)

if TYPE_CHECKING:
    import torch

# torch (a second of start-up) is imported in the functions that use it, so --help and a bad flag
# or path answer at once.

PIXEL_ROLLOUT_STARTS = 512
HORIZONS = list(range(1, 11))
# A probe whose baseline (random encoder, pixels or the majority class) already scores this much
# cannot tell a good representation from a bad one on this data: it is flagged as saturated.
SATURATED = 0.95
PROBE_MAX_ITER = 200
STRIP_STEPS = 8


@dataclass
class InspectConfig:
    checkpoint: list[str] = field(
        default_factory=list, metadata={"help": "run directory or model.pt; repeat to compare models", "repeat": True}
    )
    data: str = field(default="", metadata={"help": "transitions .npz (default: the one the first checkpoint trained on)"})
    out_dir: str = field(default="inspection", metadata={"help": "where eval.json, inspection.png (and compare.md) go"})
    max_samples: int = field(default=4000, metadata={"help": "cap on transitions used per split (probes, latents)"})
    batch_size: int = field(default=256, metadata={"help": "batch size for forward passes"})
    device: str = field(default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": ["auto", "cpu", "cuda", "mps"]})
    seed: int = field(default=0, metadata={"help": "seed for sub-sampling, the random-encoder baseline and probes"})
    probe_horizons: list[int] = field(
        default_factory=lambda: [1, 3, 5],
        metadata={"help": "probe the model's k-step open-loop predictions for the state k steps ahead", "repeat": True},
    )


@no_grad
def in_batches(fn, *tensors: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    import torch

    outs = [fn(*(t[i : i + batch_size].to(device) for t in tensors)).cpu() for i in range(0, len(tensors[0]), batch_size)]
    return torch.cat(outs)


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int) -> float:
    """Accuracy on held-out data of a multinomial logistic regression on standardised features.
    The solver stops at PROBE_MAX_ITER: on features that carry no signal it would iterate long
    for no gain in held-out accuracy, so the not-converged warning is silenced."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        return float(np.mean(y_test == y_train[0]))
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER, tol=1e-3, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def probe_keys(data: MiniGridTransitions) -> list[str]:
    """The probe targets this data has: agent cell, direction, goal cell, and door state / carried
    object when the layout has any (a column of -1s means the env has no door or objects)."""
    if any(k not in data.fields for k in PROBE_KEYS):
        return []
    keys = list(PROBE_KEYS)
    return keys + [k for k in OPTIONAL_PROBE_KEYS if k in data.fields and bool((data.fields[k] != -1).any())]


def probe_labels(data: MiniGridTransitions, idx: np.ndarray, keys: Sequence[str] = PROBE_KEYS) -> dict[str, np.ndarray]:
    """Class labels per probe target: a cell is one class (x*1000+y), a direction one of 4."""
    out = {}
    for key in keys:
        v = data.fields[key].numpy()[idx]
        out[key] = v[:, 0] * 1000 + v[:, 1] if v.ndim == 2 else v
    return out


def probe_suite(feats_train: np.ndarray, feats_test: np.ndarray, lab_train: dict, lab_test: dict, seed: int) -> dict[str, float]:
    return {f"{key}_acc": linear_probe(feats_train, lab_train[key], feats_test, lab_test[key], seed) for key in lab_train}


def shuffled(labels: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The control: training labels permuted, so the probe can only learn label frequencies.
    A probe that scores well above this reads the state from the features, not from chance."""
    rng = np.random.default_rng(seed)
    return {k: rng.permutation(v) for k, v in labels.items()}


def saturation(baselines: dict[str, dict[str, float]]) -> dict[str, bool]:
    """Per probe key: does a baseline that knows nothing learned (random encoder, raw pixels, the
    majority class) already reach SATURATED? Then that probe cannot rank models on this data."""
    keys = baselines["random_encoder"]
    return {k: max(baselines[b][k] for b in ("random_encoder", "pixels", "majority_class")) >= SATURATED for k in keys}


def pixels(obs: torch.Tensor, size: int = 16) -> np.ndarray:
    """Raw-pixel baseline features: frames area-downsampled to size x size."""
    import torch.nn.functional as F

    x = obs.permute(0, 3, 1, 2).float() / 255
    if min(x.shape[-2:]) > size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x.flatten(1).numpy()


def frame_shape_of(model_config: dict) -> list[int]:
    if "obs_shape" in model_config:
        return list(model_config["obs_shape"])
    return [model_config["image_size"], model_config["image_size"], model_config["input_channels"]]


def first_layer(model: torch.nn.Module) -> torch.Tensor:
    """The encoder's first layer as filters [out, C, k, k]: conv kernels for the CNN, the patch
    embedding's rows folded back into patches for a ViT."""
    if hasattr(model.encoder, "convs"):
        return model.encoder.convs[0].weight.detach().cpu()
    w = model.encoder.to_patch_embedding[1].weight.detach().cpu()  # [D, p*p*C]
    p, c = model.config.patch_size, model.config.input_channels
    return w.view(-1, p, p, c).permute(0, 3, 1, 2)


@no_grad
def pixel_rollout_errors(
    model, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor, episode: np.ndarray, device: torch.device, batch_size: int
) -> dict[str, Any]:
    """The encoder-decoder's open-loop rollouts in pixels: each predicted frame is fed back.
    Pixel MSE at horizon h, divided by the MSE of the mean frame (1 = chance),
    next to copying the last true frame."""
    import torch

    scale = model.config.pixel_scale
    n = len(obs)
    truth = next_obs.permute(0, 3, 1, 2).float() / scale  # [n,C,H,W]; row i is frame t+1 of start i
    chance = (truth - truth.mean(0)).pow(2).mean()  # MSE of the best constant frame, the mean one
    if chance < 1e-12:
        chance = torch.tensor(float("nan"))
    starts = np.arange(0, n, max(1, n // PIXEL_ROLLOUT_STARTS))

    def step(x: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return in_batches(model.step_frames, x, actions[j], batch_size=batch_size, device=device)

    def score(x: torch.Tensor, kept: np.ndarray, j: torch.Tensor) -> tuple[float, float]:
        first = obs[torch.from_numpy(kept)].permute(0, 3, 1, 2).float() / scale
        return float((x - truth[j]).pow(2).mean() / chance), float((first - truth[j]).pow(2).mean() / chance)

    x = obs[torch.from_numpy(starts)].permute(0, 3, 1, 2).float() / scale
    return {
        **open_loop(starts, x, step, score, episode),
        "space": "pixels",
        "normalisation": "pixel MSE / that of the mean frame (1 = chance)",
    }


def grid_size(meta: dict[str, Any]) -> tuple[int, int] | None:
    """(width, height) in cells of a full-grid MiniGrid rendering, or None (another view or env)."""
    env_id = str(meta.get("env", ""))
    if meta.get("obs_mode") != "rgb" or not env_id.startswith("MiniGrid"):
        return None
    try:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the MiniGrid envs)

        env = gym.make(env_id).unwrapped
        return int(env.width), int(env.height)
    except Exception:  # an env this install cannot build: the measure is skipped, not the inspection
        return None


def agent_pixels(frames: torch.Tensor) -> torch.Tensor:
    """MiniGrid draws the agent as a red triangle: the pixels that are red, by how far red stands
    above the other two channels (so not the orange of lava, the yellow of keys or the green of
    goals), frames [..,3,H,W] in [0,1] -> bool [..,H,W]. Contrast, not absolute levels: the
    agent on a highlighted cell is (1, .3, .3), and a predicted triangle of the right shape whose
    green and blue sit a little above the true ones is still the agent drawn there."""
    import torch

    r, g, b = frames.unbind(-3)
    return (r > 0.5) & (r - torch.maximum(g, b) > 0.4)


def agent_cell_prediction(pred: torch.Tensor, current: torch.Tensor, true: torch.Tensor, cell: np.ndarray, grid: tuple[int, int]) -> dict:
    """Does the predicted frame draw the agent where it is at t+1, facing the right way? On the
    agent's cell at t+1 (`cell` [n,2], x and y), the red pixels of the prediction against those
    of the true s_t+1: right when their intersection over union is at least 0.5. A board drawn
    without the agent, the agent left where it was, or turned the wrong way, scores 0 on that
    transition; copying s_t scores the transitions where the agent neither moves nor turns.
    Frames [n,3,H,W] in [0,1]."""
    (w, h), (ph, pw) = grid, pred.shape[-2:]
    iou, copy_iou = [], []
    for i, (x, y) in enumerate(cell):
        rows = slice(round(y * ph / h), round((y + 1) * ph / h))
        cols = slice(round(x * pw / w), round((x + 1) * pw / w))
        t = agent_pixels(true[i, :, rows, cols])
        if t.any():
            for out, frame in ((iou, pred), (copy_iou, current)):
                p = agent_pixels(frame[i, :, rows, cols])
                out.append(float((p & t).sum() / (p | t).sum()))
    return {
        "acc": float(np.mean(np.array(iou) >= 0.5)) if iou else float("nan"),
        "copy_baseline_acc": float(np.mean(np.array(copy_iou) >= 0.5)) if iou else float("nan"),
        "mean_iou": float(np.mean(iou)) if iou else float("nan"),
        "num_transitions": len(iou),
        "note": "share of held-out transitions whose predicted frame draws the agent (its red pixels) on its cell at t+1 "
        "with intersection over union >= 0.5 against the true frame",
    }


def open_loop(starts: np.ndarray, state: torch.Tensor, step, score, episode: np.ndarray) -> dict[str, Any]:
    """Rolls `state` (one row per start) forward for each horizon in HORIZONS, feeding every
    prediction back: step(state, j) advances it with the logged transitions j, score(state,
    starts, j) -> (error, copy-baseline error). Starts whose episode ends first drop out."""
    import torch

    errors, copies, counts = [], [], []
    for h in HORIZONS:
        keep = same_episode(starts, h, episode)
        starts, state = starts[keep], state[torch.from_numpy(keep).to(state.device)]
        counts.append(len(starts))
        if len(starts) == 0:
            errors.append(float("nan"))
            copies.append(float("nan"))
            continue
        j = torch.from_numpy(starts + h - 1)
        state = step(state, j)
        error, copy = score(state, starts, j)
        errors.append(error)
        copies.append(copy)
    return {"horizons": HORIZONS, "error": errors, "copy_baseline_error": copies, "num_starts": counts}


def same_episode(starts: np.ndarray, h: int, episode: np.ndarray) -> np.ndarray:
    """Mask of the starts whose transition h-1 steps later is still in the same episode (rows
    are whole episodes in order), i.e. the starts that have an h-step rollout target."""
    j = starts + h - 1
    keep = j < len(episode)
    keep[keep] &= episode[j[keep]] == episode[starts[keep]]
    return keep


def unit_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the L2-normalised rows of a and b."""
    import torch.nn.functional as F

    return (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1).mean()


@no_grad
def rollout_errors(
    model,
    z0: torch.Tensor,
    z_next_tgt: torch.Tensor,
    z_cur_tgt: torch.Tensor,
    actions: torch.Tensor,
    episode: np.ndarray,
    device: torch.device,
) -> dict[str, Any]:
    """Open-loop error at each horizon h: roll the predictor h steps from encode(obs_t) with the
    logged actions and compare with encode_target(obs_t+h). Inputs are aligned on a run of
    whole episodes (row i+1 follows row i inside an episode). Errors are squared distances
    between unit latents divided by that of the best constant guess (the targets' mean
    direction): 1 is chance, and all-identical targets give NaN (undefined), never 0. Copy baseline: encode_target(obs_t) for every h."""
    import torch
    import torch.nn.functional as F

    n = len(z0)
    # chance = the error of the best constant guess, the targets' mean direction. All targets
    # identical (full collapse) leaves nothing to predict: the error is undefined (NaN), not 0.
    unit = F.normalize(z_next_tgt, dim=-1)
    chance = unit_sq_dist(unit, F.normalize(unit.mean(0), dim=0).expand_as(unit))
    if chance < 1e-6:
        chance = torch.tensor(float("nan"))

    def step(z: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return model.predict(z, actions[j].to(device))

    def score(z: torch.Tensor, kept: np.ndarray, j: torch.Tensor) -> tuple[float, float]:
        target = z_next_tgt[j]
        return float(unit_sq_dist(z.cpu(), target) / chance), float(unit_sq_dist(z_cur_tgt[torch.from_numpy(kept)], target) / chance)

    return {
        **open_loop(np.arange(n), z0.to(device), step, score, episode),
        "normalisation": "squared distance of unit latents / that of the best constant guess, the mean direction (1 = chance)",
    }


@no_grad
def predicted_features(
    model, pixel_model: bool, data: MiniGridTransitions, idx: np.ndarray, horizons: list[int], batch_size: int, device: torch.device
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The model's open-loop predictions from obs at rows `idx`, fed its own output with the
    logged actions. For each h in horizons: (features of the h-step prediction, rows whose obs
    is the state it predicts), only for starts whose episode lasts past t+h. A JEPA's feature is
    its predicted latent; the encoder-decoder's is the encoding of its predicted frame."""
    import torch

    n, episode = len(data), data.episode
    actions = data.fields["action"]
    if pixel_model:
        scale = model.config.pixel_scale
        state = data.obs[torch.from_numpy(idx)].permute(0, 3, 1, 2).float() / scale  # [B,C,H,W] frames

        step = model.step_frames

        def features(x):
            return in_batches(lambda f: model.encoder(f)[0], x, batch_size=batch_size, device=device)
    else:
        state = in_batches(model.encode, data.obs[torch.from_numpy(idx)], batch_size=batch_size, device=device)  # [B,D]
        step = model.predict

        def features(z):
            return z

    out = {}
    for h in range(1, max(horizons) + 1):
        a = actions[torch.from_numpy(np.minimum(idx + h - 1, n - 1))]
        state = in_batches(step, state, a, batch_size=batch_size, device=device)
        if h in horizons:
            target = idx + h
            valid = target < n
            valid[valid] &= episode[target[valid]] == episode[idx[valid]]
            out[h] = (features(state[torch.from_numpy(valid)]).numpy(), target[valid])
    return out


def predicted_probes(
    model, pixel_model: bool, data, train_idx, test_idx, z_train, z_test, keys, cfg: InspectConfig, device
) -> dict[str, Any]:
    """Does the prediction know where the agent will be? Probes fitted on the training episodes'
    h-step predictions, scored on held-out ones, for the state at t+h; next to the same probe on
    the latent of obs_t (what is known without predicting)."""
    keys = [k for k in keys if k != "goal_pos"]  # the goal does not move: nothing to predict
    horizons = sorted(set(cfg.probe_horizons))
    pred_tr = predicted_features(model, pixel_model, data, train_idx, horizons, cfg.batch_size, device)
    pred_te = predicted_features(model, pixel_model, data, test_idx, horizons, cfg.batch_size, device)
    res: dict[str, Any] = {"horizons": horizons, **{f"{k}_acc": [] for k in keys}, "from_current_latent": {f"{k}_acc": [] for k in keys}}
    res["num_test"] = []
    for h in horizons:
        (f_tr, rows_tr), (f_te, rows_te) = pred_tr[h], pred_te[h]
        res["num_test"].append(len(rows_te))
        if len(rows_tr) == 0 or len(rows_te) == 0:
            for k in keys:
                res[f"{k}_acc"].append(float("nan"))
                res["from_current_latent"][f"{k}_acc"].append(float("nan"))
            continue
        lab_tr, lab_te = probe_labels(data, rows_tr, keys), probe_labels(data, rows_te, keys)
        for k, acc in probe_suite(f_tr, f_te, lab_tr, lab_te, cfg.seed).items():
            res[k].append(acc)
        cur_tr, cur_te = z_train[np.isin(train_idx, rows_tr - h)], z_test[np.isin(test_idx, rows_te - h)]
        for k, acc in probe_suite(cur_tr, cur_te, lab_tr, lab_te, cfg.seed).items():
            res["from_current_latent"][k].append(acc)
    res["note"] = "labels are the state at t+h; from_current_latent probes the latent of obs_t for the same labels"
    return res


@no_grad
def frame_strip(model, data: MiniGridTransitions, test_idx: np.ndarray, device: torch.device) -> dict[str, np.ndarray] | None:
    """The encoder-decoder's open-loop rollout from the first held-out start with STRIP_STEPS
    steps left in its episode: true frames t+1..t+k over the predicted ones, uint8 [k,H,W,C]."""
    import torch

    episode = data.episode
    for i in test_idx:
        last = i + STRIP_STEPS - 1
        if last < len(data) and episode[last] == episode[i]:
            rows = torch.arange(i, last + 1)
            obs, actions = data.obs[rows[:1]].to(device), data.fields["action"][rows][None].to(device)
            pred = model.rollout_frames(obs, actions)[0]  # [k,C,H,W] in [0,1]
            pred = (pred.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            return {"true": data.next_obs(rows).numpy(), "pred": pred}
    return None


def whole_episodes(idx: np.ndarray, episode: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Whole episodes from idx, in random order, until about k transitions: rollouts need every
    step of an episode, so the held-out set is cut at episode boundaries."""
    ids = rng.permutation(np.unique(episode[idx]))
    sizes = np.array([np.sum(episode[idx] == e) for e in ids])
    take = ids[: max(1, int(np.searchsorted(np.cumsum(sizes), k, side="right")))]
    return idx[np.isin(episode[idx], take)]


def subsample(idx: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, size=k, replace=False)) if len(idx) > k else idx


@no_grad
def inspect_model(
    name: str, ckpt: dict, data: MiniGridTransitions, same_data: bool, cfg: InspectConfig, device: torch.device
) -> tuple[dict, dict]:
    """Returns (report for eval.json, arrays for the figure)."""
    import torch

    from losses import collapse_warning, effective_rank, embedding_std

    model = model_from_checkpoint(ckpt).to(device)
    obs_shape = frame_shape_of(ckpt["model_config"])
    if list(data.frame_shape) != obs_shape:
        fail(f"{name} takes frames {obs_shape} but {data.path} has {list(data.frame_shape)}; inspect it with data of that size")
    check_data_fits_model(ckpt["model_config"], data, name)
    tc = ckpt["train_config"]
    train_idx, test_idx = split_episodes(data.episode, tc.get("val_fraction", 0.1), tc.get("seed", 0))
    rng = np.random.default_rng(cfg.seed)
    train_idx, test_idx = subsample(train_idx, cfg.max_samples, rng), whole_episodes(test_idx, data.episode, cfg.max_samples, rng)
    te = torch.from_numpy(test_idx)
    obs_te = data.obs[te]
    z_te = in_batches(model.encode, obs_te, batch_size=cfg.batch_size, device=device)
    dim = z_te.shape[1]
    pixel_model = ckpt["arch"] == "encdec_vit"
    score = pixel_scores if pixel_model else latent_scores
    scores, cos = score(model, data, test_idx, z_te, cfg.batch_size, device)
    std, rank = embedding_std(z_te), effective_rank(z_te)
    conv = first_layer(model)
    report: dict[str, Any] = {
        "arch": ckpt["arch"],
        "checkpoint_step": int(ckpt["step"]),
        "checkpoint_epoch": int(ckpt["epoch"]),
        "reg": ckpt["model_config"].get("reg"),
        "latent_dim": dim,
        "trained_on": {k: ckpt["data_meta"].get(k) for k in ("path", "env", "obs_mode", "seed", "episodes", "start")},
        "evaluated_on": "held-out episodes of the training data" if same_data else evaluated_elsewhere(ckpt["data_meta"], data.meta),
        "num_eval_transitions": len(test_idx),
        "pred_loss": scores.pop("pred_loss"),
        "pred_space": "pixels (MSE of the next frame in [0,1])" if pixel_model else "latent (MSE of unit vectors)",
        "pred_cosine": float(cos.mean()),
        "embedding_std": std,
        "embedding_std_uniform": 1 / math.sqrt(dim),
        "effective_rank": rank,
        "collapse_warning": collapse_warning(std, rank, dim),
        **({"agent_cell_prediction": scores.pop("agent_cell_prediction")} if pixel_model else {}),
        "first_conv": {"shape": list(conv.shape), **{k: float(getattr(conv, k)()) for k in ("mean", "std", "min", "max")}},
    }
    figure = {"z": z_te.numpy(), "cos": cos.numpy(), "conv": conv.numpy(), "spectrum": torch.linalg.svdvals(z_te).numpy()}
    report.update(probe_report(model, pixel_model, data, train_idx, test_idx, z_te, cfg, device))
    if report["probe"] is not None:
        figure["agent_pos"] = data.fields["agent_pos"][te].numpy()
    if pixel_model:
        figure["strip"] = frame_strip(model, data, test_idx, device)
    report["rollout"] = scores.pop("rollout")
    return report, figure


def latent_scores(model, data: MiniGridTransitions, test_idx: np.ndarray, z_te: torch.Tensor, bs: int, device) -> tuple[dict, torch.Tensor]:
    """A JEPA's one-step prediction (normalised MSE of unit latents) and its open-loop rollouts;
    returns them and the per-transition cosines."""
    import torch
    import torch.nn.functional as F

    te = torch.from_numpy(test_idx)
    act_te, next_te = data.fields["action"][te], data.next_obs(te)
    z_pred = in_batches(lambda z, a: model.predict(z, a), z_te, act_te, batch_size=bs, device=device)
    z_tgt = in_batches(model.encode_target, next_te, batch_size=bs, device=device)
    z_cur_tgt = in_batches(model.encode_target, data.obs[te], batch_size=bs, device=device)
    scores = {
        "pred_loss": float(unit_sq_dist(z_pred, z_tgt) / z_te.shape[1]),
        "rollout": rollout_errors(model, z_te, z_tgt, z_cur_tgt, act_te, data.episode[test_idx], device),
    }
    return scores, F.cosine_similarity(z_pred, z_tgt, dim=-1)


def pixel_scores(model, data: MiniGridTransitions, test_idx: np.ndarray, z_te: torch.Tensor, bs: int, device) -> tuple[dict, torch.Tensor]:
    """The reconstruction baseline predicts frames: its scores are in pixels, plus whether its
    predicted frame draws the agent on its next cell (full-grid RGB MiniGrid views)."""
    import torch
    import torch.nn.functional as F

    te = torch.from_numpy(test_idx)
    obs_te, act_te, next_te = data.obs[te], data.fields["action"][te], data.next_obs(te)
    pred = in_batches(model.predict_frame, obs_te, act_te, batch_size=bs, device=device)
    true = next_te.permute(0, 3, 1, 2).float() / model.config.pixel_scale
    grid = grid_size(data.meta)
    agent_cell = None
    if grid is not None and "agent_pos" in data.fields and data.frame_shape[-1] == 3:
        cells = data.fields["agent_pos"][data.next_index[te].clamp(max=len(data) - 1)].numpy()
        at_end = (data.next_index[te] >= len(data)).numpy()  # the last frame of an episode has no label row: skipped
        keep = torch.from_numpy(~at_end)
        current = obs_te.permute(0, 3, 1, 2).float() / model.config.pixel_scale
        agent_cell = agent_cell_prediction(pred[keep], current[keep], true[keep], cells[~at_end], grid)
    scores = {
        "pred_loss": float((pred - true).pow(2).mean()),
        "agent_cell_prediction": agent_cell,
        "rollout": pixel_rollout_errors(model, obs_te, act_te, next_te, data.episode[test_idx], device, bs),
    }
    return scores, F.cosine_similarity(pred.flatten(1), true.flatten(1), dim=-1)


def probe_report(model, pixel_model: bool, data, train_idx, test_idx, z_te: torch.Tensor, cfg: InspectConfig, device) -> dict[str, Any]:
    """Linear probes of the latents against their baselines (random encoder, pixels, majority
    class, shuffled labels), the saturation flags, and the probes of predictions; or a note why
    there are none."""
    import torch

    keys = probe_keys(data)
    if not keys:
        return {
            "probe": None,
            "probe_note": "probes skipped: they need MiniGrid ground truth (agent_pos, agent_dir, goal_pos), which this data "
            f"({data.meta.get('env', 'unknown env')}) does not have; collapse and rollout metrics still apply",
        }
    bs, tr, te = cfg.batch_size, torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    obs_te = data.obs[te]
    lab_tr, lab_te = probe_labels(data, train_idx, keys), probe_labels(data, test_idx, keys)
    z_tr = in_batches(model.encode, data.obs[tr], batch_size=bs, device=device)
    report: dict[str, Any] = {"probe": probe_suite(z_tr.numpy(), z_te.numpy(), lab_tr, lab_te, cfg.seed)}
    seed_everything(cfg.seed)
    random_model = type(model)(config=model.config).to(device).eval()
    r_tr = in_batches(random_model.encode, data.obs[tr], batch_size=bs, device=device)
    r_te = in_batches(random_model.encode, obs_te, batch_size=bs, device=device)
    report["baselines"] = {
        "random_encoder": probe_suite(r_tr.numpy(), r_te.numpy(), lab_tr, lab_te, cfg.seed),
        "pixels": probe_suite(pixels(data.obs[tr]), pixels(obs_te), lab_tr, lab_te, cfg.seed),
        "majority_class": {f"{k}_acc": _majority(lab_tr[k], lab_te[k]) for k in keys},
        "shuffled_labels": probe_suite(z_tr.numpy(), z_te.numpy(), shuffled(lab_tr, cfg.seed), lab_te, cfg.seed),
    }
    report["probe_saturated"] = saturation(report["baselines"])
    flagged = [k.removesuffix("_acc") for k, v in report["probe_saturated"].items() if v]
    if flagged:
        report["probe_note"] = (
            f"saturated: a baseline already scores >= {SATURATED} on {', '.join(flagged)}, so these probes cannot separate "
            "models on this data (try --obs rgb_partial data, the predicted-latent probes, or another layout)"
        )
    if cfg.probe_horizons:
        report["probe_predicted"] = predicted_probes(
            model, pixel_model, data, train_idx, test_idx, z_tr.numpy(), z_te.numpy(), keys, cfg, device
        )
    return report


def evaluated_elsewhere(trained: dict, evaluated: dict) -> str:
    """What a dataset other than the training one tests: the same env with other seeds (unseen
    layouts where the env randomises them), or another env altogether; plus any difference in
    observation mode or start-state distribution."""
    env, other = trained.get("env"), evaluated.get("env")
    differences = [
        f"{what} {evaluated[key]} (trained on {trained[key]})"
        for key, what in (("obs_mode", "observations"), ("start", "starts"))
        if evaluated.get(key) and trained.get(key) and evaluated[key] != trained[key]
    ]
    extra = "; " + ", ".join(differences) if differences else ""
    if env and other and env != other:
        return f"another env: {other} (trained on {env}); probes fitted and scored on its episodes{extra}"
    seeds = [trained.get("seed"), trained.get("episodes"), evaluated.get("seed"), evaluated.get("episodes")]
    if all(isinstance(v, int) for v in seeds):
        a0, na, b0, nb = seeds
        if max(a0, b0) < min(a0 + na, b0 + nb):
            return f"another dataset of {other}: reset seeds {b0}..{b0 + nb - 1} overlap training's {a0}..{a0 + na - 1}{extra}"
        return f"another dataset of {other}: reset seeds {b0}..{b0 + nb - 1}, none used in training ({a0}..{a0 + na - 1}){extra}"
    return f"another dataset (its provenance is not recorded){extra}"


def json_safe(obj: Any) -> Any:
    """NaN (an undefined score, e.g. no rollout of that horizon) becomes null: valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _majority(y_train: np.ndarray, y_test: np.ndarray) -> float:
    values, counts = np.unique(y_train, return_counts=True)
    return float(np.mean(y_test == values[counts.argmax()]))


PROBE_NAMES = {
    "agent_pos_acc": "cell",
    "agent_dir_acc": "heading",
    "goal_pos_acc": "goal",
    "door_state_acc": "door",
    "carrying_acc": "carried",
}
PANELS = 7  # per model row: filters, latents, cosines, probes, probes of predictions, rollouts, spectrum


def draw(reports: dict[str, dict], figures: dict[str, dict], out_png: Path) -> None:
    """inspection.png: one row per model, seven panels (below an encoder-decoder's row its
    open-loop rollout as an image strip). Legends sit under their axes, never on the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strips = [name for name in reports if figures[name].get("strip") is not None]
    heights = [h for name in reports for h in ([1.0, 0.45] if name in strips else [1.0])]
    with plt.rc_context({"font.size": 10, "axes.titlesize": 10, "legend.fontsize": 8}):
        fig = plt.figure(figsize=(3.4 * PANELS, 5.2 * sum(heights)))
        layout = fig.add_gridspec(len(heights), PANELS, height_ratios=heights, hspace=1.3, wspace=0.4)
        row = 0
        for name, rep in reports.items():
            fg = figures[name]
            ax = [fig.add_subplot(layout[row, c]) for c in range(PANELS)]
            _panel_filters(ax[0], fg["conv"], rep["arch"], name)
            _panel_latents(ax[1], fg["z"], fg.get("agent_pos"))
            _panel_cosines(ax[2], fg["cos"], rep)
            _panel_probes(ax[3], rep)
            _draw_predicted_probes(ax[4], rep.get("probe_predicted"))
            _panel_rollout(ax[5], rep["rollout"])
            _panel_spectrum(ax[6], fg["spectrum"], rep)
            if name in strips:
                _draw_strip(fig.add_subplot(layout[row + 1, :]), fg["strip"], name)
            row += 1 + (name in strips)
        atomic_write(out_png, lambda p: fig.savefig(p, dpi=80, format="png", bbox_inches="tight"))
        plt.close(fig)


def _legend_below(ax, ncol: int = 1) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False)


def _panel_filters(ax, conv: np.ndarray, arch: str, name: str) -> None:
    k = conv.shape[-1]  # conv: [out, in, k, k]
    n_show, cols = min(32, conv.shape[0]), 8
    grid = np.ones(((k + 1) * math.ceil(n_show / cols), (k + 1) * cols, 3))
    for i in range(n_show):
        w = conv[i, :3] if conv.shape[1] >= 3 else np.repeat(conv[i, :1], 3, axis=0)
        w = (w - w.min()) / (w.max() - w.min() + 1e-8)
        y0, x0 = (i // cols) * (k + 1), (i % cols) * (k + 1)
        grid[y0 : y0 + k, x0 : x0 + k] = w.transpose(1, 2, 0)
    ax.imshow(grid, interpolation="nearest")
    layer = "first conv filters" if arch == "jepa_cnn" else "patch embedding rows"
    ax.set(title=f"{name}\n{layer}", xticks=[], yticks=[])


def cell_colours(pos: np.ndarray) -> np.ndarray:
    """Agent cells [N,2] -> RGB [N,3]: x sets red, y sets green, so neighbouring cells get
    neighbouring colours and every cell its own (a key of the grid is drawn beside the plot)."""
    span = np.maximum(pos.max(0) - pos.min(0), 1)
    xy = (pos - pos.min(0)) / span
    return np.stack([0.15 + 0.8 * xy[:, 0], 0.15 + 0.8 * xy[:, 1], np.full(len(pos), 0.55)], 1)


def _panel_latents(ax, z: np.ndarray, agent_pos: np.ndarray | None) -> None:
    z = z - z.mean(0)
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    p2 = z @ vt[:2].T
    share = sv[:2] ** 2 / max(float((sv**2).sum()), 1e-12)
    if agent_pos is None:
        ax.scatter(p2[:, 0], p2[:, 1], s=6)
        ax.set_title("latents, first two PCs")
    else:
        ax.scatter(p2[:, 0], p2[:, 1], c=cell_colours(agent_pos), s=6)
        ax.set_title("latents, first two PCs\n(colour: the agent's cell, key below)")
        cells = np.unique(agent_pos, axis=0)
        key = ax.inset_axes([0.36, -0.62, 0.28, 0.28])
        key.scatter(cells[:, 0], cells[:, 1], c=cell_colours(np.concatenate([cells, agent_pos]))[: len(cells)], s=8, marker="s")
        key.invert_yaxis()
        key.set(xticks=[], yticks=[], aspect="equal")
        key.set_xlabel("the grid's cells", fontsize=8)
    ax.set(xlabel=f"PC1 ({share[0]:.0%} of variance)", ylabel=f"PC2 ({share[1]:.0%})")


def _panel_cosines(ax, cos: np.ndarray, rep: dict) -> None:
    low = float(np.quantile(cos, 0.01)) if len(cos) else -1.0
    low = max(-1.0, low - 0.05 * (1 - low))  # zoom on where the mass is
    ax.hist(np.clip(cos, low, 1), bins=40, range=(low, 1), color="tab:blue")
    what = "predicted vs true next frame" if rep["rollout"].get("space") == "pixels" else "z_pred vs z_target"
    ax.set(title=f"cosine, {what}\nmean {rep['pred_cosine']:.3f}", xlabel="cosine (1st percentile and up)", ylabel="transitions")


def _panel_probes(ax, rep: dict) -> None:
    if not rep.get("probe"):
        ax.text(0.5, 0.5, "no probe labels in the data", ha="center", va="center")
        ax.set_axis_off()
        return
    keys = list(rep["probe"])
    groups = {
        "model": rep["probe"],
        "random encoder": rep["baselines"]["random_encoder"],
        "pixels 16x16": rep["baselines"]["pixels"],
        "majority class": rep["baselines"]["majority_class"],
        "shuffled labels": rep["baselines"]["shuffled_labels"],
    }
    width = 0.8 / len(groups)
    for j, (label, vals) in enumerate(groups.items()):
        ax.bar(np.arange(len(keys)) + j * width, [vals[k] for k in keys], width, label=label, color=f"C{j}")
    saturated = rep.get("probe_saturated") or {}
    names = [PROBE_NAMES.get(k, k.removesuffix("_acc")) + ("*" if saturated.get(k) else "") for k in keys]
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, names)
    ax.axhline(SATURATED, color="grey", ls=":", lw=1)
    title = "linear probes, held-out episodes"
    if any(saturated.values()):
        title += f"\n* saturated: a baseline >= {SATURATED}"
    ax.set(title=title, ylim=(0, 1.05), ylabel="accuracy")
    _legend_below(ax)


def _panel_rollout(ax, ro: dict) -> None:
    pixels_space = ro.get("space") == "pixels"
    ax.plot(ro["horizons"], ro["error"], "o-", label="model rollout")
    ax.plot(ro["horizons"], ro["copy_baseline_error"], "s--", label="copy last frame" if pixels_space else "copy last latent")
    ax.axhline(1.0, color="grey", ls=":", label="chance")
    ax.set(
        title=f"open-loop {'pixel' if pixels_space else 'latent'} error",
        xlabel="horizon (steps)",
        ylabel="error (1 = chance)",
        ylim=(0, None),
    )
    _legend_below(ax)


def _panel_spectrum(ax, s: np.ndarray, rep: dict) -> None:
    ax.semilogy(np.arange(1, len(s) + 1), s / s.max(), ".-")
    warn = "\nCOLLAPSED" if rep["collapse_warning"] else ""
    ax.set(
        title=f"singular values of the latents\nRankMe {rep['effective_rank']:.1f} of {rep['latent_dim']}{warn}",
        xlabel="index",
        ylabel="value / largest",
    )


def _draw_predicted_probes(ax, pp: dict | None) -> None:
    if not pp:
        ax.text(0.5, 0.5, "no predicted-latent probes", ha="center", va="center")
        ax.set_axis_off()
        return
    for j, key in enumerate(k for k in pp if k.endswith("_acc")):
        colour = f"C{j}"
        label = PROBE_NAMES.get(key, key.removesuffix("_acc"))
        ax.plot(pp["horizons"], pp[key], "o-", color=colour, label=f"{label}: prediction")
        ax.plot(pp["horizons"], pp["from_current_latent"][key], "s:", color=colour, label=f"{label}: latent of obs_t")
    ax.set(title="probe of the state at t+h", xlabel="horizon h (steps)", ylabel="held-out accuracy", ylim=(0, 1.05))
    ax.set_xticks(pp["horizons"])
    _legend_below(ax)


def _draw_strip(ax, strip: dict[str, np.ndarray], name: str) -> None:
    def side_by_side(frames: np.ndarray) -> np.ndarray:  # [k,H,W,C] -> [H, k*(W+2), C], white gaps
        return (
            np.pad(frames, ((0, 0), (0, 0), (0, 2), (0, 0)), constant_values=255)
            .transpose(1, 0, 2, 3)
            .reshape(frames.shape[1], -1, frames.shape[3])
        )

    top, bottom = side_by_side(strip["true"]), side_by_side(strip["pred"])
    image = np.concatenate([top, np.full((4, *top.shape[1:]), 255, np.uint8), bottom])
    ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", interpolation="nearest")
    ax.set(title=f"{name}: true frames t+1..t+{len(strip['true'])} (top) and the open-loop rollout (bottom)", xticks=[], yticks=[])


def table(reports: dict[str, dict]) -> str:
    """Markdown comparison. A probe cell reads `model (random encoder, pixels)`; `*` marks a
    saturated probe (a baseline already >= SATURATED)."""
    head = (
        "| model | arch | pred loss | pred cos | latent std | RankMe | collapsed | agent cell (rand, px) | dir (rand, px) "
        "| goal (rand, px) | shuffled-label cell | predicted cell @h (obs_t) | rollout@1 | @5 | @10 | copy@5 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    saturated_any = False
    for name, r in reports.items():
        p = r.get("probe") or {}
        ro = dict(zip(r["rollout"]["horizons"], r["rollout"]["error"], strict=True))
        cp = dict(zip(r["rollout"]["horizons"], r["rollout"]["copy_baseline_error"], strict=True))
        probes = []
        for k in ("agent_pos_acc", "agent_dir_acc", "goal_pos_acc"):
            if k not in p:
                probes.append("-")
                continue
            b = r["baselines"]
            star = "*" if r["probe_saturated"][k] else ""
            saturated_any |= bool(star)
            probes.append(f"{p[k]:.2f}{star} ({b['random_encoder'][k]:.2f}, {b['pixels'][k]:.2f})")
        shuffled_cell = f"{r['baselines']['shuffled_labels']['agent_pos_acc']:.2f}" if p else "-"
        pp = r.get("probe_predicted")
        if pp and "agent_pos_acc" in pp:
            ends = sorted({0, len(pp["horizons"]) - 1})
            acc, cur = pp["agent_pos_acc"], pp["from_current_latent"]["agent_pos_acc"]
            predicted = " / ".join(f"{_fmt(acc[i])} @{pp['horizons'][i]}" for i in ends)
            predicted += " (" + " / ".join(_fmt(cur[i]) for i in ends) + ")"
        else:
            predicted = "-"
        cells = [
            name,
            r["arch"],
            f"{r['pred_loss']:.2e}",
            f"{r['pred_cosine']:.3f}",
            f"{r['embedding_std']:.4f}",
            f"{r['effective_rank']:.1f}",
            "yes" if r["collapse_warning"] else "no",
            *probes,
            shuffled_cell,
            predicted,
            *(_fmt(v, 3) for v in (ro[1], ro[5], ro[10], cp[5])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if saturated_any:
        lines.append(
            f"\n`*` saturated: a random encoder, raw pixels or the majority class already scores >= {SATURATED}; that probe cannot rank models on this data."
        )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def check_inspect_flags(cfg: InspectConfig) -> None:
    if not cfg.checkpoint:
        fail("give at least one --checkpoint (a run directory such as checkpoints/jepa_cnn, or its model.pt)")
    if any(h < 1 for h in cfg.probe_horizons):
        fail(f"--probe-horizons must be steps ahead >= 1, got {cfg.probe_horizons}")
    if cfg.max_samples < 1:
        fail(f"--max-samples must be at least 1, got {cfg.max_samples}")
    if cfg.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {cfg.batch_size}")
    check_seed(cfg.seed)


def load_checkpoints(paths: list[str]) -> dict[str, dict]:
    """Each checkpoint under its run directory's name (primed when two share one)."""
    ckpts: dict[str, dict] = {}
    for path in paths:
        ckpt = load_checkpoint(path)
        name = Path(path).name if Path(path).is_dir() else Path(path).parent.name
        while name in ckpts:
            name += "'"
        ckpts[name] = ckpt
    return ckpts


def print_report(r: dict[str, Any]) -> None:
    """One model's numbers, as the run goes."""
    print(f"  latent size {r['latent_dim']} | z_pred vs z_target: MSE {r['pred_loss']:.2e}, cosine {r['pred_cosine']:.4f}")
    if r.get("agent_cell_prediction"):
        ac = r["agent_cell_prediction"]
        print(
            f"  predicted frames that draw the agent on its cell at t+1 (red pixels, IoU >= 0.5): {_fmt(ac['acc'])} of "
            f"{ac['num_transitions']} held-out transitions (mean IoU {_fmt(ac['mean_iou'])}; copying s_t: {_fmt(ac['copy_baseline_acc'])})"
        )
    c = r["first_conv"]
    print(f"  first conv {c['shape']}: mean {c['mean']:+.4f} std {c['std']:.4f} min {c['min']:+.3f} max {c['max']:+.3f}")
    print(f"  latents: per-dim std {r['embedding_std']:.4f} (uniform {r['embedding_std_uniform']:.4f}), RankMe {r['effective_rank']:.1f}")
    if r.get("probe"):
        b = r["baselines"]
        for k, acc in r["probe"].items():
            flag = "  (saturated)" if r["probe_saturated"][k] else ""
            print(
                f"  probe {k.removesuffix('_acc'):10s} {acc:.2f} | random encoder {b['random_encoder'][k]:.2f}, pixels "
                f"{b['pixels'][k]:.2f}, majority {b['majority_class'][k]:.2f}, shuffled labels {b['shuffled_labels'][k]:.2f}{flag}"
            )
    if r.get("probe_predicted"):
        pp = r["probe_predicted"]
        for k in (k for k in pp if k.endswith("_acc")):
            row = ", ".join(
                f"@{h} {_fmt(a)} ({_fmt(c)})" for h, a, c in zip(pp["horizons"], pp[k], pp["from_current_latent"][k], strict=True)
            )
            print(f"  predicted {k.removesuffix('_acc'):9s} {row}   (in brackets: the latent of obs_t)")
    if r["collapse_warning"]:
        if r["arch"] == "encdec_vit":
            # its loss is in pixels, so a narrow latent does not fake a good score; still worth knowing for probes
            print("  WARNING: collapsed latents: the encoder's pooled latents barely vary (the pixel loss is unaffected)")
        else:
            print("  WARNING: collapsed latents: the low prediction loss is meaningless (train with --reg vicreg)")


def write_outputs(out: Path, data_path: str, data: MiniGridTransitions, reports: dict, figures: dict) -> dict[str, Any]:
    """eval.json, inspection.png and (for several models) compare.md; the table is printed."""
    result = {
        "data": {
            "path": str(data_path),
            "env": data.meta.get("env"),
            "obs_mode": data.meta.get("obs_mode"),
            "seed": data.meta.get("seed"),
            "episodes": data.meta.get("episodes"),
            "transitions": len(data),
            "notes": data.notes,
        },
        "models": reports,
    }
    write_json(out / "eval.json", json_safe(result))
    draw(reports, figures, out / "inspection.png")
    text = table(reports)
    print(text)
    written = [out / "eval.json", out / "inspection.png"]
    if len(reports) > 1:
        atomic_write(out / "compare.md", lambda p: p.write_text(f"# Comparison on {data_path}\n\n{text}\n"))
        written.append(out / "compare.md")
    print("Saved " + ", ".join(map(str, written)))
    return result


def main(cfg: InspectConfig) -> dict[str, Any]:
    check_inspect_flags(cfg)
    ckpts = load_checkpoints(cfg.checkpoint)
    data_path = cfg.data or next(iter(ckpts.values()))["data_meta"].get("path", "")
    if not data_path:
        fail("the checkpoint does not record its data; pass --data")
    data = MiniGridTransitions(data_path)
    longest = int(np.unique(data.episode, return_counts=True)[1].max())
    if max(cfg.probe_horizons, default=0) >= longest:  # no state lies that far ahead in any episode: every probe NaN
        fail(
            f"--probe-horizons {max(cfg.probe_horizons)} is not shorter than the longest episode ({longest} transitions); use at most {longest - 1}"
        )
    device = choose_device(cfg.device)
    out = check_writable_dir(cfg.out_dir, "--out-dir")
    reports, figures = {}, {}
    for name, ckpt in ckpts.items():
        trained_on = ckpt["data_meta"].get("path", "")
        same = trained_on and Path(trained_on).resolve() == Path(data_path).resolve()
        print(f"Inspecting {name} ({ckpt['arch']}, step {ckpt['step']}) on {data_path}")
        reports[name], figures[name] = inspect_model(name, ckpt, data, bool(same), cfg, device)
        print_report(reports[name])
    return write_outputs(out, data_path, data, reports, figures)


if __name__ == "__main__":
    run_cli(main, InspectConfig, description=__doc__.split("\n\n")[0])
