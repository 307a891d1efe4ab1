"""Step 2: the collected .npz as a PyTorch Dataset, with episode-level train/val splits and
fast batched loading.

    python minigrid_dataset.py data/empty8.npz        # prints a summary

Frames stay uint8 in memory (a float copy of a MiniGrid dataset would be 4x larger); batches
are uint8 [B,H,W,C] and the model converts them to float on its device. Files from seed 003's
original collector (`actions`, `rewards`, `dones`, separate `next_obs`, no episode ids) load too:
episodes are recovered from `done`.

The stage scripts import this module before they parse their flags, so it does not import torch
(a second of start-up) until data is loaded; for the same reason the datasets are plain classes
with `__len__` and `__getitems__`, all a DataLoader asks of a map-style dataset, not subclasses of
torch's `Dataset`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import dataset_formats
from wm_common import cpu_cores, fail, odd_path, run_cli

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

LEGACY_NAMES = {"actions": "action", "rewards": "reward", "dones": "done"}
PROBE_KEYS = ("agent_pos", "agent_dir", "goal_pos")
# probed only when the layout has them (a door, objects to pick up); -1 means none
OPTIONAL_PROBE_KEYS = ("door_state", "carrying")
# per-transition integer labels the collector writes, with their shape after the leading N
LABEL_SHAPES = {"agent_pos": (2,), "agent_dir": (), "goal_pos": (2,), "step": (), "door_state": (), "carrying": ()}
# every key a transitions file may hold; any other key is ignored with a note
KNOWN_KEYS = {"obs", "next_obs", "next_obs_index", "terminal_obs", "action", "reward", "done", "terminated", "episode", *LABEL_SHAPES}
# a discrete action space larger than this is a damaged file, not an env (its embedding table would not fit in memory)
MAX_DISCRETE_ACTIONS = 1 << 16


def _why(e: BaseException) -> str:
    """An exception as one short line, for error messages that must stay on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:80]}" if text else type(e).__name__


def load_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        fail(f"{p} is not readable ({_why(e)})")
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip with members, an empty zip
        what = "empty" if not magic else "a single .npy array" if magic.startswith(b"\x93NUM") else "not a zip archive"
        fail(
            f"{p} is not an .npz ({what}); point --data at a file or directory written by collect_minigrid_data.py, or re-run collect_minigrid_data.py"
        )
    try:
        # the file is opened here, not by np.load, so it is closed even when np.load fails on it
        with p.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
        fail(f"{p} is not a readable .npz ({_why(e)}); re-run collect_minigrid_data.py")
    except Exception as e:  # zlib and format errors from truncated or random bytes have many types
        fail(f"{p} is corrupt ({type(e).__name__}); re-run collect_minigrid_data.py")


def load_array_dir(p: Path) -> dict[str, np.ndarray]:
    """A directory written by the collector (`--out DIR`): each key's .npy memory-mapped
    copy-on-write, so frames are read from disk as batches need them instead of held in RAM."""
    files = sorted(p.glob("*.npy"))
    if not files:
        fail(f"{p} is a directory without .npy arrays; point --data at a .npz or a directory written by collect_minigrid_data.py --out DIR")
    arrays = {}
    for f in files:
        try:
            arrays[f.stem] = np.load(f, mmap_mode="c", allow_pickle=False)
        except Exception as e:  # empty (EOFError), truncated (ValueError), a directory (OSError), ...
            fail(f"{p}: the array file {f.name} is damaged ({_why(e)}); re-collect it")
    if (p / "meta.json").is_file():
        try:
            arrays["meta"] = np.array((p / "meta.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{p}: meta.json is not readable text ({_why(e)}); re-collect it")
    return arrays


def _check_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """The parts of 'meta' the stages read: a malformed entry is a damaged file, said so here
    instead of as a crash in whichever stage reads it."""
    if "config" in meta and not isinstance(meta["config"], dict):
        fail(f"{path}: meta 'config' must be a JSON object, got {type(meta['config']).__name__}; re-run collect_minigrid_data.py")
    space = meta.get("action_space")
    if space is None:
        return
    if not isinstance(space, dict):
        fail(f"{path}: meta 'action_space' must be a JSON object, got {type(space).__name__}; re-run collect_minigrid_data.py")
    n = space.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DISCRETE_ACTIONS):
        fail(f"{path}: meta action_space 'n' must be a whole number from 1 to {MAX_DISCRETE_ACTIONS}, got {n!r}")
    shape = space.get("shape")
    if shape is not None and (not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in shape)):
        fail(f"{path}: meta action_space 'shape' must be a list of whole numbers, got {shape!r}")
    for key in ("low", "high"):
        if key in space:
            try:
                np.asarray(space[key], np.float32)
            except (TypeError, ValueError):
                fail(f"{path}: meta action_space '{key}' must be numbers, got {str(space[key])[:40]}")


def _is_real(a: np.ndarray) -> bool:
    """bool, integer or float: a dtype that converts to float or bool without loss of meaning."""
    return a.dtype == bool or np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)


def _as_int64(path: str | Path, key: str, a: np.ndarray) -> np.ndarray:
    """An integer array as int64, refusing uint64 values int64 cannot hold (they would wrap)."""
    if a.size and a.dtype == np.uint64 and a.max() > np.iinfo(np.int64).max:
        fail(f"{path}: '{key}' holds values up to {a.max()}, too large for int64; the file is damaged")
    return a.astype(np.int64, copy=False)


def _as_flags(path: str | Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """A per-transition flag: bool, or numbers that are all 0 or 1 (seed 003 stored float dones)."""
    if a.shape != (n,):
        fail(f"{path}: '{key}' must have shape [{n}], got {list(a.shape)}")
    if a.dtype != bool:
        if not _is_real(a) or not np.isin(a, (0, 1)).all():
            fail(f"{path}: '{key}' must be bool (or 0/1 numbers) [N], got {a.dtype}")
    return a.astype(bool, copy=False)


def load_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """Reads and validates a transitions file. Returns (arrays, meta, notes); every problem a
    user can cause is a one-line UserError naming the file and the fix. The arrays returned have
    the dtypes the dataset serves: uint8 frames, int64 (discrete) or float32 actions, float32
    reward, bool done, int64 indices, episodes and labels."""
    arrays = _read(path)
    notes: list[str] = []
    meta = _meta(path, arrays)
    _check_keys(path, arrays, notes)
    n = _check_frames(path, arrays)
    _check_actions(path, arrays, meta.get("action_space") or {}, n)
    _check_per_step(path, arrays, n, notes)
    notes += _missing_notes(arrays, meta)
    return arrays, meta, notes


def check_data_path(path: str | Path) -> None:
    """`path` names data to read: a file, a directory or a local Minari dataset (what is in it is
    checked when it is read)."""
    p = Path(path)
    odd = odd_path(p)
    if odd:
        fail(f"data {path} is {odd}, not a file or directory written by collect_minigrid_data.py; fix --data")
    if dataset_formats.dataset_dir(p) is None and not p.is_dir() and not p.is_file():
        fail(
            f"data file {path} not found (nor a local Minari dataset of that id under {dataset_formats.datasets_root()}); "
            "run collect_minigrid_data.py first or fix --data"
        )


def _read(path: str | Path) -> dict[str, np.ndarray]:
    """The raw arrays of a .npz, an array directory or a Minari dataset, legacy names renamed."""
    p = Path(path)
    check_data_path(path)
    if dataset_formats.dataset_dir(p) is not None:
        arrays = dataset_formats.read(p)
    elif p.is_dir():
        arrays = load_array_dir(p)
    else:
        arrays = load_npz(p)
    for old, new in LEGACY_NAMES.items():
        if old in arrays and new not in arrays:
            arrays[new] = arrays.pop(old)
    return arrays


def _meta(path: str | Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The 'meta' entry, parsed and checked (and taken out of the arrays)."""
    meta: dict[str, Any] = {}
    if "meta" in arrays:
        try:
            meta = json.loads(str(arrays.pop("meta")))
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            fail(f"{path} has a 'meta' entry that is not JSON; re-run collect_minigrid_data.py")
    if not isinstance(meta, dict):
        fail(f"{path} has a 'meta' entry that is not a JSON object; re-run collect_minigrid_data.py")
    _check_meta(path, meta)
    return meta


def _check_keys(path: str | Path, arrays: dict[str, np.ndarray], notes: list[str]) -> None:
    """The keys every transitions file needs; unknown ones are dropped with a note."""
    missing = [k for k in ("obs", "action", "reward", "done") if k not in arrays]
    if "next_obs" not in arrays and not {"next_obs_index", "terminal_obs"} <= arrays.keys():
        missing.append("next_obs (or next_obs_index + terminal_obs)")
    if missing:
        fail(
            f"{path} lacks keys {', '.join(missing)} (has {', '.join(sorted(arrays))}); is it a transitions file from collect_minigrid_data.py?"
        )
    unknown = sorted(k for k in arrays if k not in KNOWN_KEYS)
    if unknown:
        notes.append(f"ignored keys this loader does not know: {', '.join(unknown)}")
        for k in unknown:
            del arrays[k]


def _check_frames(path: str | Path, arrays: dict[str, np.ndarray]) -> int:
    """obs, terminal_obs and next_obs_index (a full next_obs array is turned into them); returns
    the number of transitions."""
    obs = arrays["obs"]
    if obs.dtype != np.uint8 or obs.ndim != 4:
        fail(f"{path}: 'obs' must be uint8 frames [N,H,W,C], got {obs.dtype} {list(obs.shape)}")
    n = len(obs)
    if n == 0:
        fail(f"{path} holds no transitions; collect at least one episode")
    if 0 in obs.shape[1:]:
        fail(f"{path}: 'obs' frames are {list(obs.shape[1:])}; a frame needs at least one pixel and one channel")
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
    if nxt_idx.min() < 0 or nxt_idx.max() >= n + len(term):
        fail(f"{path}: 'next_obs_index' points outside the stored frames; the file is damaged, re-collect it")
    arrays["next_obs_index"] = nxt_idx.astype(np.int64, copy=False)
    return n


def _check_actions(path: str | Path, arrays: dict[str, np.ndarray], space: dict[str, Any], n: int) -> None:
    """Discrete actions [N] as int64, continuous [N,A] as float32, checked against the recorded
    action space."""
    action = arrays["action"]
    if action.ndim not in (1, 2):
        fail(f"{path}: 'action' must be [N] (discrete) or [N,A] (continuous), got {list(action.shape)}")
    if len(action) != n:
        fail(f"{path}: 'action' has {len(action)} rows but 'obs' has {n}")
    if action.ndim == 1:
        if not np.issubdtype(action.dtype, np.integer):
            fail(f"{path}: discrete 'action' must be integers [N], got {action.dtype}")
        if space.get("type") == "box":
            fail(f"{path}: actions are integers [N] but meta records a continuous (box) action space")
        n_act = space.get("n")
        if action.min() < 0 or (n_act is not None and action.max() >= n_act):
            fail(f"{path}: actions range {action.min()}..{action.max()}, outside the recorded action space of {n_act}")
        if n_act is None and action.max() >= MAX_DISCRETE_ACTIONS:
            fail(
                f"{path}: discrete actions go up to {action.max()} and meta records no action space; "
                f"more than {MAX_DISCRETE_ACTIONS} actions means a damaged file"
            )
        arrays["action"] = action.astype(np.int64, copy=False)
    else:
        if not np.issubdtype(action.dtype, np.floating) or not np.isfinite(action).all():
            fail(
                f"{path}: continuous 'action' must be finite floats [N,A], got {action.dtype}{' with NaN/inf' if np.issubdtype(action.dtype, np.floating) else ''}"
            )
        if action.shape[1] == 0:
            fail(f"{path}: continuous 'action' has 0 dimensions [N,0]; an action vector needs at least one")
        if space.get("type") == "discrete":
            fail(f"{path}: actions are vectors [N,{action.shape[1]}] but meta records a discrete action space")
        if "shape" in space and list(space["shape"]) != [action.shape[1]]:
            fail(f"{path}: actions have {action.shape[1]} dims but the recorded action space has shape {space['shape']}")
        if "low" in space and "high" in space:
            low, high = np.asarray(space["low"], np.float32), np.asarray(space["high"], np.float32)
            if low.shape not in ((), (action.shape[1],)) or high.shape not in ((), (action.shape[1],)):
                fail(
                    f"{path}: the recorded action bounds have shapes {list(low.shape)}/{list(high.shape)}, the actions {action.shape[1]} dims"
                )
            if (action < low - 1e-6).any() or (action > high + 1e-6).any():
                fail(
                    f"{path}: actions range {action.min():.3g}..{action.max():.3g}, outside the recorded bounds {space['low']}..{space['high']}"
                )
        arrays["action"] = action.astype(np.float32, copy=False)


def _check_per_step(path: str | Path, arrays: dict[str, np.ndarray], n: int, notes: list[str]) -> None:
    """reward, done, terminated, episode ids and the integer labels, one per transition."""
    reward = arrays["reward"]
    if reward.shape != (n,):
        fail(f"{path}: 'reward' must have shape [{n}], got {list(reward.shape)}")
    if not _is_real(reward):
        fail(f"{path}: 'reward' must be numbers [N], got {reward.dtype}")
    arrays["reward"] = reward.astype(np.float32, copy=False)
    arrays["done"] = _as_flags(path, "done", arrays["done"], n)
    if "terminated" in arrays:
        arrays["terminated"] = _as_flags(path, "terminated", arrays["terminated"], n)
    if "episode" not in arrays:
        # Seed 003's files have no episode ids: an episode ends at each `done`.
        arrays["episode"] = np.concatenate([[0], np.cumsum(arrays["done"][:-1])]).astype(np.int64)
        notes.append("no 'episode' key: episodes recovered from 'done'")
    elif arrays["episode"].shape != (n,) or not np.issubdtype(arrays["episode"].dtype, np.integer):
        fail(f"{path}: 'episode' must be integers [{n}], got {arrays['episode'].dtype} {list(arrays['episode'].shape)}")
    arrays["episode"] = _as_int64(path, "episode", arrays["episode"])
    for key, shape in LABEL_SHAPES.items():
        if key in arrays:
            if arrays[key].shape != (n, *shape):
                fail(f"{path}: '{key}' must have shape {[n, *shape]}, got {list(arrays[key].shape)}")
            if not np.issubdtype(arrays[key].dtype, np.integer):
                fail(f"{path}: '{key}' must be integers, got {arrays[key].dtype}")
            arrays[key] = _as_int64(path, key, arrays[key])


def _missing_notes(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> list[str]:
    """What the stages will have to do without."""
    notes = []
    if any(k not in arrays for k in PROBE_KEYS):
        env = str(meta.get("env", ""))
        if not env or env.startswith("MiniGrid"):
            notes.append("no agent_pos/agent_dir/goal_pos: metadata for probes is missing (re-collect to get it)")
        else:
            notes.append(f"{env} is not a MiniGrid env: no ground truth for probes (collapse and rollout metrics still apply)")
    if not meta:
        notes.append("no 'meta': env id and collection settings unknown")
    return notes


def dataset_shards(path: str | Path) -> list[Path]:
    """The datasets a --data path names: itself, or, for a directory of datasets (each a
    collector `--out DIR` directory, e.g. collected on several machines), every one of them in
    name order."""
    p = Path(path)
    if not p.is_dir() or any(p.glob("*.npy")):
        return [p]
    shards = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.npy")))
    return shards or [p]


class ShardedFrames:
    """The frames of several memory-mapped shards as one [N,H,W,C] uint8 array: indexing gathers
    from each shard in turn, so nothing is concatenated in RAM."""

    def __init__(self, parts: list[np.ndarray]):
        import torch

        self.parts = parts
        self.offsets = np.cumsum([0, *map(len, parts)])
        self.shape = torch.Size((int(self.offsets[-1]), *parts[0].shape[1:]))
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        import torch

        flat = np.asarray(idx, dtype=np.int64).reshape(-1)
        flat = np.where(flat < 0, flat + len(self), flat)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty((len(flat), *self.shape[1:]), np.uint8)
        for s in np.unique(shard):
            rows = shard == s
            out[rows] = self.parts[s][flat[rows] - self.offsets[s]]
        return torch.from_numpy(out.reshape(*np.shape(idx), *self.shape[1:]))

    def numpy(self) -> np.ndarray:
        return np.concatenate(self.parts)


def combine_shards(paths: list[Path], loaded: list[tuple[dict, dict, list]]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Several validated datasets -> one: episode ids made distinct, next_obs_index re-pointed
    into concat(all obs, all terminal_obs); frames stay in their shards (`ShardedFrames`)."""
    first_arrays, first_meta, _ = loaded[0]
    shape, kind = first_arrays["obs"].shape[1:], first_arrays["action"].shape[1:]
    for p, (a, _, _) in zip(paths, loaded, strict=True):
        if a["obs"].shape[1:] != shape:
            fail(f"shard {p} has frames {list(a['obs'].shape[1:])} but {paths[0]} has {list(shape)}; a dataset's shards must match")
        if a["action"].shape[1:] != kind:
            fail(f"shard {p} has actions of shape {list(a['action'].shape[1:])} but {paths[0]} has {list(kind)}")
    seen: dict[str, Path] = {}
    for p, (a, _, _) in zip(paths, loaded, strict=True):
        # a copied shard would put the same episodes in training and validation
        key = hashlib.sha256(np.ascontiguousarray(a["action"]).tobytes() + a["obs"][0].tobytes() + a["obs"][-1].tobytes()).hexdigest()
        if key in seen and len(a["obs"]) == len(loaded[paths.index(seen[key])][0]["obs"]):
            fail(f"shards {seen[key]} and {p} hold the same episodes (a copy?); remove one")
        seen[key] = p
    n_obs = [len(a["obs"]) for a, _, _ in loaded]
    n_term = [len(a["terminal_obs"]) for a, _, _ in loaded]
    total = sum(n_obs)
    obs_at, term_at = np.cumsum([0, *n_obs]), np.cumsum([0, *n_term])
    nxt, episodes, ep_at = [], [], 0
    for i, (a, _, _) in enumerate(loaded):
        j = a["next_obs_index"]
        nxt.append(np.where(j < n_obs[i], j + obs_at[i], j - n_obs[i] + total + term_at[i]))
        _, ep = np.unique(a["episode"], return_inverse=True)
        episodes.append(ep.astype(np.int64) + ep_at)
        ep_at += int(ep.max()) + 1
    linked = {"obs", "terminal_obs", "next_obs_index", "episode"}  # rebuilt below, not concatenated
    common = set.intersection(*(set(a) for a, _, _ in loaded)) - linked
    arrays: dict[str, Any] = {k: np.concatenate([a[k] for a, _, _ in loaded]) for k in sorted(common)}
    arrays.update(
        obs=ShardedFrames([a["obs"] for a, _, _ in loaded]),
        terminal_obs=ShardedFrames([a["terminal_obs"] for a, _, _ in loaded]),
        next_obs_index=np.concatenate(nxt),
        episode=np.concatenate(episodes),
    )
    notes = sorted({n for _, _, ns in loaded for n in ns})
    envs = sorted({str(m.get("env", "?")) for _, m, _ in loaded})
    if len(envs) > 1:
        notes.append(f"the shards come from different envs: {', '.join(envs)}")
    dropped = sorted(set.union(*(set(a) for a, _, _ in loaded)) - common - linked)
    if dropped:
        notes.append(f"keys not in every shard are left out: {', '.join(dropped)}")
    if (first_meta.get("action_space") or {}).get("n") is not None:
        first_meta["action_space"]["n"] = max(int((m.get("action_space") or {}).get("n", 0)) for _, m, _ in loaded)
    meta = dict(first_meta, shards=len(paths), episodes=ep_at)
    return arrays, meta, notes


class MiniGridTransitions:
    """Map-style dataset of transitions. Item i is a dict of tensors: `obs` and `next_obs`
    uint8 [H,W,C], `action`, `reward`, `done`, `episode`, and the probe labels when present.
    `__getitems__` gathers a whole batch with one indexing op per array (DataLoader uses it),
    so loading costs about one memcpy per batch."""

    def __init__(self, path: str | Path):
        shards = dataset_shards(path)
        if len(shards) == 1:
            arrays, self.meta, self.notes = load_arrays(shards[0])
        else:
            arrays, self.meta, self.notes = combine_shards(shards, [load_arrays(s) for s in shards])
        import torch

        self.path = str(path)
        self.memory_mapped = Path(path).is_dir()
        # torch.from_numpy shares memory with the arrays: no copy of the frames.
        obs, term = arrays.pop("obs"), arrays.pop("terminal_obs")
        self.obs = obs if isinstance(obs, ShardedFrames) else torch.from_numpy(obs)
        self.terminal_obs = term if isinstance(term, ShardedFrames) else torch.from_numpy(term)
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
        space = self.meta.get("action_space") or {}
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

    def unchanged(self, chunk: int = 4096) -> np.ndarray:
        """[N] bool: transitions whose next frame is the frame itself, pixel for pixel (an action
        with no visible effect, such as a step into a wall). Read a chunk at a time, so a
        memory-mapped dataset is never loaded whole."""
        import torch

        out = np.zeros(len(self), dtype=bool)
        for start in range(0, len(self), chunk):
            idx = torch.arange(start, min(start + chunk, len(self)))
            out[idx.numpy()] = (self.obs[idx].flatten(1) == self.next_obs(idx).flatten(1)).all(1).numpy()
        return out

    def window_starts(self, k: int) -> np.ndarray:
        """Rows i whose transitions i..i+k-1 are k consecutive steps of one episode (k=1: every row)."""
        step = self.fields["step"].numpy() if "step" in self.fields else None
        return window_starts(self.episode, self.fields["done"].numpy(), step, k)

    def windows(self, starts: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
        """The k-step windows from rows `starts`: `frames` uint8 [B,k+1,H,W,C] (obs_t..obs_t+k) and
        `actions` [B,k] ([B,k,A] continuous). Rows must come from `window_starts(k)`."""
        import torch

        rows = starts[:, None] + torch.arange(k)  # [B,k]
        nxt = self.next_obs(rows.flatten()).view(len(starts), k, *self.frame_shape)  # obs_t+1..obs_t+k
        frames = torch.cat([self.obs[starts][:, None], nxt], dim=1)  # [B,k+1,H,W,C]
        return {"frames": frames, "actions": self.fields["action"][rows]}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch

        idx = torch.as_tensor(indices, dtype=torch.int64)
        batch = {k: v[idx] for k, v in self.fields.items()}
        batch["obs"] = self.obs[idx]
        batch["next_obs"] = self.next_obs(idx)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def window_starts(episode: np.ndarray, done: np.ndarray, step: np.ndarray | None, k: int) -> np.ndarray:
    """Rows i such that rows i..i+k-1 are consecutive steps of one episode: same episode id, no
    episode end before the last, and (when recorded) step numbers counting up by one. A window
    never crosses an episode end."""
    n = len(episode)
    ok = np.ones(max(n - k + 1, 0), dtype=bool)
    for j in range(1, k):
        prev, cur = slice(j - 1, n - k + j), slice(j, n - k + j + 1)
        ok &= (episode[cur] == episode[prev]) & ~done[prev]
        if step is not None:
            ok &= step[cur] == step[prev] + 1
    return np.flatnonzero(ok)


class TransitionWindows:
    """The dataset seen as k-step windows: item i is the window starting at row i (see
    `MiniGridTransitions.windows`); the sampler only draws rows from `window_starts(k)`."""

    def __init__(self, data: MiniGridTransitions, k: int):
        self.data, self.k = data, k

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        import torch

        return self.data.windows(torch.as_tensor(indices, dtype=torch.int64), self.k)


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
    same batches as one that never stopped. `start` skips the batches a checkpoint taken
    mid-epoch already trained on. With `world_size` > 1 (DDP) every rank walks the same global
    batches and takes its own contiguous slice of each, so N ranks together see exactly the
    batches of one process with the same --batch-size."""

    def __init__(
        self, indices: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool, rank: int = 0, world_size: int = 1
    ):
        self.indices, self.batch_size = np.asarray(indices), batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self.repeated = 0  # windows drawn more than once per epoch (make_loaders: repeat_unchanged)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        for i in range(self.start, len(self)):
            # without drop_last the last batch takes the remainder (one transition alone would
            # give NaN batch statistics such as VICReg's variance)
            end = len(order) if i == len(self) - 1 and not self.drop_last else (i + 1) * self.batch_size
            batch = order[i * self.batch_size : end]
            if self.world_size > 1:
                share = len(batch) // self.world_size
                batch = batch[self.rank * share : (self.rank + 1) * share]
            yield batch.tolist()

    def __len__(self) -> int:
        n = len(self.indices)
        if self.drop_last or n % self.batch_size == 1 and n > 1:  # a lone leftover joins the batch before it
            return n // self.batch_size
        return -(-n // self.batch_size)


def _as_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


MAX_REPEAT = 100  # --repeat-unchanged: more would fill epochs with copies of a few windows


def make_loaders(
    data: MiniGridTransitions,
    *,
    batch_size: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    unroll: int = 1,
    repeat_unchanged: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """(train, val) DataLoaders of `unroll`-step windows (`frames` [B,unroll+1,H,W,C], `actions`
    [B,unroll]) over an episode-level split. Train batches are shuffled per epoch and
    full-sized, and split across `world_size` ranks; val keeps every window in order (every
    rank evaluates all of it). With unroll 1 the windows are the transitions, in the same order.
    Training windows holding a step whose frame does not change are drawn `repeat_unchanged`
    times per epoch (the train sampler's `repeated` counts them); validation keeps each once."""
    from torch.utils.data import DataLoader

    if unroll < 1:
        fail(f"--unroll must be at least 1 (1: one-step training), got {unroll}")
    longest = int(np.unique(data.episode, return_counts=True)[1].max())
    if unroll > longest:
        fail(f"--unroll {unroll} is longer than the longest episode ({longest} transitions); a window stays inside one episode")
    cores = cpu_cores()
    if num_workers > 4 * cores:
        fail(f"--num-workers {num_workers}: more than 4 per CPU core ({4 * cores} here) only costs memory; use 0 to {4 * cores}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers < 0:
        fail(f"--num-workers must be 0 (load in the main process) or more, got {num_workers}")
    if not 1 <= repeat_unchanged <= MAX_REPEAT:
        fail(f"--repeat-unchanged must be from 1 (each window once per epoch) to {MAX_REPEAT}, got {repeat_unchanged}")
    if batch_size % world_size:
        fail(f"--batch-size {batch_size} is the global batch and must divide evenly over {world_size} processes")
    train_idx, val_idx = split_episodes(data.episode, val_fraction, seed)
    starts = data.window_starts(unroll)
    train_idx, val_idx = np.intersect1d(train_idx, starts), np.intersect1d(val_idx, starts)
    what = "transitions" if unroll == 1 else f"windows of {unroll} consecutive steps"
    if len(train_idx) < batch_size:
        fail(
            f"the training split has {len(train_idx)} {what}, fewer than --batch-size {batch_size}; "
            f"collect more (or longer) episodes, lower --batch-size{' or --unroll' if unroll > 1 else ''}"
        )
    if len(val_idx) == 0:
        fail(f"the validation episodes hold no {what}; collect more (or longer) episodes or lower --unroll")
    kw = dict(collate_fn=_as_batch, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    windows = TransitionWindows(data, unroll)
    repeated = np.zeros(0, dtype=train_idx.dtype)
    if repeat_unchanged > 1:
        # a window's steps are rows start..start+unroll-1 of one episode
        unchanged = data.unchanged()
        holds = np.logical_or.reduce([unchanged[train_idx + j] for j in range(unroll)])
        repeated = np.repeat(train_idx[holds], repeat_unchanged - 1)
    train_sampler = EpochBatchSampler(
        np.concatenate([train_idx, repeated]), batch_size, shuffle=True, seed=seed, drop_last=True, rank=rank, world_size=world_size
    )
    train_sampler.repeated = len(repeated) // max(1, repeat_unchanged - 1)
    train = DataLoader(windows, batch_sampler=train_sampler, **kw)
    val = DataLoader(windows, batch_sampler=EpochBatchSampler(val_idx, batch_size, shuffle=False, seed=seed, drop_last=False), **kw)
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
