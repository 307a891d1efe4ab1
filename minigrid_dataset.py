"""Step 2: the collected .npz as a PyTorch Dataset, with episode-level train/val splits and
fast batched loading.

    python minigrid_dataset.py data/empty8.npz        # prints a summary

Frames stay uint8 in memory (a float copy of a MiniGrid dataset would be 4x larger); batches
are uint8 [B,H,W,C] and the model converts them to float on its device. Files from seed 003's
original collector (`actions`, `rewards`, `dones`, separate `next_obs`, no episode ids) load too:
episodes are recovered from `done`.
"""

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wm_common import fail, run_cli

LEGACY_NAMES = {"actions": "action", "rewards": "reward", "dones": "done"}
PROBE_KEYS = ("agent_pos", "agent_dir", "goal_pos")
# probed only when the layout has them (a door, objects to pick up); -1 means none
OPTIONAL_PROBE_KEYS = ("door_state", "carrying")


def load_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        fail(f"{p} is not a readable .npz ({type(e).__name__}: {str(e)[:80]}); re-run collect_minigrid_data.py")
    except Exception as e:  # zlib and format errors from truncated or random bytes have many types
        fail(f"{p} is corrupt ({type(e).__name__}); re-run collect_minigrid_data.py")


def load_array_dir(p: Path) -> dict[str, np.ndarray]:
    """A directory written by the collector (`--out DIR`): each key's .npy memory-mapped
    copy-on-write, so frames are read from disk as batches need them instead of held in RAM."""
    files = sorted(p.glob("*.npy"))
    if not files:
        fail(f"{p} is a directory without .npy arrays; point --data at a .npz or a directory written by collect_minigrid_data.py --out DIR")
    try:
        arrays = {f.stem: np.load(f, mmap_mode="c", allow_pickle=False) for f in files}
    except (ValueError, OSError) as e:
        fail(f"{p}: an array file is damaged ({type(e).__name__}: {str(e)[:80]}); re-collect it")
    if (p / "meta.json").is_file():
        arrays["meta"] = np.array((p / "meta.json").read_text())
    return arrays


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """Reads and validates a transitions file. Returns (arrays, meta, notes); every problem a
    user can cause is a one-line UserError naming the file and the fix."""
    p = Path(path)
    if p.is_dir():
        arrays = load_array_dir(p)
    elif not p.is_file():
        fail(f"data file {path} not found; run collect_minigrid_data.py first or fix --data")
    else:
        arrays = load_npz(p)
    notes: list[str] = []
    for old, new in LEGACY_NAMES.items():
        if old in arrays and new not in arrays:
            arrays[new] = arrays.pop(old)
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except json.JSONDecodeError:
            fail(f"{path} has a 'meta' entry that is not JSON; re-run collect_minigrid_data.py")
    if not isinstance(meta, dict):
        fail(f"{path} has a 'meta' entry that is not a JSON object; re-run collect_minigrid_data.py")
    missing = [k for k in ("obs", "action", "reward", "done") if k not in arrays]
    if "next_obs" not in arrays and not {"next_obs_index", "terminal_obs"} <= arrays.keys():
        missing.append("next_obs (or next_obs_index + terminal_obs)")
    if missing:
        fail(
            f"{path} lacks keys {', '.join(missing)} (has {', '.join(sorted(arrays))}); is it a transitions file from collect_minigrid_data.py?"
        )
    obs = arrays["obs"]
    if obs.dtype != np.uint8 or obs.ndim != 4:
        fail(f"{path}: 'obs' must be uint8 frames [N,H,W,C], got {obs.dtype} {list(obs.shape)}")
    n = len(obs)
    if n == 0:
        fail(f"{path} holds no transitions; collect at least one episode")
    if "next_obs" in arrays:
        # Seed 003's layout: next_obs stored in full. Index it like the compact layout.
        nxt = arrays.pop("next_obs")
        if nxt.shape != obs.shape or nxt.dtype != np.uint8:
            fail(f"{path}: 'next_obs' must match 'obs' ({obs.dtype} {list(obs.shape)}), got {nxt.dtype} {list(nxt.shape)}")
        arrays["terminal_obs"] = nxt
        arrays["next_obs_index"] = np.arange(n, 2 * n, dtype=np.int64)
    term = arrays["terminal_obs"]
    if term.dtype != np.uint8 or term.shape[1:] != obs.shape[1:]:
        fail(f"{path}: 'terminal_obs' must be uint8 frames like 'obs', got {term.dtype} {list(term.shape)}")
    nxt_idx = arrays["next_obs_index"]
    if nxt_idx.shape != (n,) or not np.issubdtype(nxt_idx.dtype, np.integer):
        fail(f"{path}: 'next_obs_index' must be integers [N={n}], got {nxt_idx.dtype} {list(nxt_idx.shape)}")
    if n and (nxt_idx.min() < 0 or nxt_idx.max() >= n + len(term)):
        fail(f"{path}: 'next_obs_index' points outside the stored frames; the file is damaged, re-collect it")
    action = arrays["action"]
    if len(action) != n:
        fail(f"{path}: 'action' has {len(action)} rows but 'obs' has {n}")
    if action.ndim == 1:
        if not np.issubdtype(action.dtype, np.integer):
            fail(f"{path}: discrete 'action' must be integers [N], got {action.dtype}")
        arrays["action"] = action.astype(np.int64, copy=False)
        n_act = meta.get("action_space", {}).get("n")
        if action.min() < 0 or (n_act is not None and action.max() >= n_act):
            fail(f"{path}: actions range {action.min()}..{action.max()}, outside the recorded action space of {n_act}")
    elif action.ndim == 2:
        if not np.issubdtype(action.dtype, np.floating) or not np.isfinite(action).all():
            fail(
                f"{path}: continuous 'action' must be finite floats [N,A], got {action.dtype}{' with NaN/inf' if np.issubdtype(action.dtype, np.floating) else ''}"
            )
        space = meta.get("action_space", {})
        if space.get("type") == "discrete":
            fail(f"{path}: actions are vectors [N,{action.shape[1]}] but meta records a discrete action space")
        if "shape" in space and list(space["shape"]) != [action.shape[1]]:
            fail(f"{path}: actions have {action.shape[1]} dims but the recorded action space has shape {space['shape']}")
        if "low" in space and "high" in space:
            low, high = np.asarray(space["low"], np.float32), np.asarray(space["high"], np.float32)
            if (action < low - 1e-6).any() or (action > high + 1e-6).any():
                fail(
                    f"{path}: actions range {action.min():.3g}..{action.max():.3g}, outside the recorded bounds {space['low']}..{space['high']}"
                )
        arrays["action"] = action.astype(np.float32, copy=False)
    else:
        fail(f"{path}: 'action' must be [N] (discrete) or [N,A] (continuous), got {list(action.shape)}")
    for key, dtype in (("reward", np.float32), ("done", bool)):
        if arrays[key].shape != (n,):
            fail(f"{path}: '{key}' must have shape [{n}], got {list(arrays[key].shape)}")
        arrays[key] = arrays[key].astype(dtype, copy=False)
    if "episode" not in arrays:
        # Seed 003's files have no episode ids: an episode ends at each `done`.
        arrays["episode"] = np.concatenate([[0], np.cumsum(arrays["done"][:-1])]).astype(np.int64)
        notes.append("no 'episode' key: episodes recovered from 'done'")
    elif arrays["episode"].shape != (n,) or not np.issubdtype(arrays["episode"].dtype, np.integer):
        fail(f"{path}: 'episode' must be integers [{n}], got {arrays['episode'].dtype} {list(arrays['episode'].shape)}")
    shapes = {"agent_pos": (n, 2), "agent_dir": (n,), "goal_pos": (n, 2), "step": (n,), "door_state": (n,), "carrying": (n,)}
    for key, shape in shapes.items():
        if key in arrays and arrays[key].shape != shape:
            fail(f"{path}: '{key}' must have shape {list(shape)}, got {list(arrays[key].shape)}")
    if any(k not in arrays for k in PROBE_KEYS):
        env = str(meta.get("env", ""))
        if not env or env.startswith("MiniGrid"):
            notes.append("no agent_pos/agent_dir/goal_pos: metadata for probes is missing (re-collect to get it)")
        else:
            notes.append(f"{env} is not a MiniGrid env: no ground truth for probes (collapse and rollout metrics still apply)")
    if not meta:
        notes.append("no 'meta': env id and collection settings unknown")
    return arrays, meta, notes


class MiniGridTransitions(Dataset):
    """Map-style dataset of transitions. Item i is a dict of tensors: `obs` and `next_obs`
    uint8 [H,W,C], `action`, `reward`, `done`, `episode`, and the probe labels when present.
    `__getitems__` gathers a whole batch with one indexing op per array (DataLoader uses it),
    so loading costs about one memcpy per batch."""

    def __init__(self, path: str | Path):
        arrays, self.meta, self.notes = load_arrays(path)
        self.path = str(path)
        self.memory_mapped = Path(path).is_dir()
        # torch.from_numpy shares memory with the arrays: no copy of the frames.
        self.obs = torch.from_numpy(arrays.pop("obs"))
        self.terminal_obs = torch.from_numpy(arrays.pop("terminal_obs"))
        self.next_index = torch.from_numpy(arrays.pop("next_obs_index").astype(np.int64, copy=False))
        self.episode = arrays["episode"]
        self.fields = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return tuple(self.obs.shape[1:])

    @property
    def continuous_actions(self) -> bool:
        return self.fields["action"].ndim == 2

    @property
    def num_actions(self) -> int:
        """Discrete: how many actions; continuous: the action vector's size."""
        if self.continuous_actions:
            return int(self.fields["action"].shape[1])
        space = self.meta.get("action_space", {})
        if "n" in space:
            return int(space["n"])
        return int(self.fields["action"].max()) + 1

    @property
    def frame_bytes(self) -> int:
        return self.obs.nbytes + self.terminal_obs.nbytes

    def next_obs(self, idx: torch.Tensor) -> torch.Tensor:
        """obs_t+1 for transitions idx: rows of `obs`, or of `terminal_obs` at episode ends."""
        j = self.next_index[idx]
        n = len(self.obs)
        out = self.obs[j.clamp(max=n - 1)]
        at_end = j >= n
        if at_end.any():
            out[at_end] = self.terminal_obs[j[at_end] - n]
        return out

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        batch = {k: v[idx] for k, v in self.fields.items()}
        batch["obs"] = self.obs[idx]
        batch["next_obs"] = self.next_obs(idx)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def split_episodes(episode: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Transition indices of (train, val), split by whole episodes so no episode is on both
    sides. At least one episode goes to each side."""
    ids = np.unique(episode)
    if not 0 < val_fraction < 1:
        fail(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(ids) < 2:
        fail(f"the data has {len(ids)} episode; a train/val split by episode needs at least 2, collect more episodes")
    perm = np.random.default_rng(seed).permutation(ids)
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    val_mask = np.isin(episode, perm[:n_val])
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


class EpochBatchSampler:
    """Batches of dataset indices, reshuffled each epoch by a generator seeded with
    (seed, epoch): the order depends only on the seed and epoch, so a resumed run sees the
    same batches as one that never stopped."""

    def __init__(self, indices: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        self.indices, self.batch_size = np.asarray(indices), batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def _as_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def make_loaders(
    data: "MiniGridTransitions",
    *,
    batch_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """(train, val) DataLoaders over an episode-level split. Train batches are shuffled per
    epoch and full-sized; val keeps every transition in order."""
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    train_idx, val_idx = split_episodes(data.episode, val_fraction, seed)
    if len(train_idx) < batch_size:
        fail(
            f"the training split has {len(train_idx)} transitions, fewer than --batch-size {batch_size}; "
            "collect more episodes or lower --batch-size"
        )
    kw = dict(collate_fn=_as_batch, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    train = DataLoader(data, batch_sampler=EpochBatchSampler(train_idx, batch_size, shuffle=True, seed=seed, drop_last=True), **kw)
    val = DataLoader(data, batch_sampler=EpochBatchSampler(val_idx, batch_size, shuffle=False, seed=seed, drop_last=False), **kw)
    return train, val


def summary(data: MiniGridTransitions) -> str:
    n = len(data)
    eps = np.unique(data.episode)
    lengths = np.bincount(np.searchsorted(eps, data.episode))
    act = data.fields["action"]
    lines = [
        f"file          {data.path}",
        f"env           {data.meta.get('env', 'unknown')} ({data.meta.get('obs_mode', 'unknown')} observations)",
        f"transitions   {n}",
        f"episodes      {len(eps)} (length min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()})",
        f"frames        {list(data.frame_shape)} uint8, {len(data.obs) + len(data.terminal_obs)} stored "
        f"({data.frame_bytes / 1e6:.1f} MB {'memory-mapped from disk' if data.memory_mapped else 'in RAM'}, "
        f"{data.frame_bytes / n / 1e3:.1f} kB per transition; "
        f"storing obs and next_obs separately would take {2 * data.obs.nbytes / 1e6:.1f} MB)",
        f"reward        sum {float(data.fields['reward'].sum()):.2f}, "
        f"{int((data.fields['reward'] > 0).sum())} rewarded steps, {int(data.fields['done'].sum())} episode ends",
    ]
    if act.ndim == 1:
        counts = np.bincount(act.numpy(), minlength=data.num_actions)
        lines.append("actions       " + "  ".join(f"{a}:{c}" for a, c in enumerate(counts)))
    else:
        lines.append(f"actions       continuous, dim {act.shape[1]}, range {float(act.min()):.2f}..{float(act.max()):.2f}")
    if "agent_pos" in data.fields:
        pos = data.fields["agent_pos"].numpy()
        cells = len(np.unique(pos[:, 0] * 1000 + pos[:, 1]))
        lines.append(f"agent cells   {cells} distinct positions visited")
    total = sum(t.nbytes for t in (data.obs, data.terminal_obs, data.next_index, *data.fields.values()))
    lines.append(f"memory        {total / 1e6:.1f} MB {'mapped' if data.memory_mapped else 'held'} in total")
    lines += [f"note          {note}" for note in data.notes]
    return "\n".join(lines)


@dataclass
class SummaryConfig:
    file: str = field(default="", metadata={"help": "a .npz written by collect_minigrid_data.py", "positional": True})


def main(cfg: SummaryConfig) -> MiniGridTransitions:
    if not cfg.file:
        fail("give a data file: python minigrid_dataset.py data/<name>.npz")
    data = MiniGridTransitions(cfg.file)
    print(summary(data))
    return data


if __name__ == "__main__":
    run_cli(main, SummaryConfig, description="Print a summary of a transitions .npz file.")
