"""The transitions layout's episodes, and Minari datasets in and out (the Farama Foundation's
format for offline Gymnasium data).

Reading maps a Minari dataset onto this project's transitions (the layout
`minigrid_dataset.load_arrays` validates), so every stage takes `--data <dataset id>`: image
observations as they are, other observations rendered by replaying the recorded episodes.
Writing turns a collection into a Minari dataset that `minari.load_dataset` opens. minari is an
optional extra (`make setup-extras`); nothing here imports it until a Minari dataset is used.
"""

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from envs import image_space, is_minigrid, make_env, make_pixel_env, to_frames
from wm_common import fail

INSTALL_HINT = "run `make setup-extras` (or: pip install 'minari[hdf5]')"
# our per-transition labels, stored as Minari step infos so a round trip keeps them
LABEL_KEYS = ("agent_pos", "agent_dir", "goal_pos", "step", "door_state", "carrying")
# our collection's meta, kept beside minari's own metadata.json
META_FILE = "collector_meta.json"


def require_minari() -> Any:
    try:
        import minari
    except ImportError:
        fail(f"reading or writing Minari datasets needs the minari package: {INSTALL_HINT}")
    return minari


def check_dataset_id(dataset_id: str) -> None:
    """A dataset id minari accepts, (namespace/)name-v<version>, whose parts are plain names (it
    becomes a path under minari's root)."""
    require_minari()
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # minari 0.5 raises TypeError for an id without -v<version>
        fail(f"--out {dataset_id} is not a Minari dataset id: (namespace/)name-v<version>, e.g. minigrid/empty8x8-random-v0")
    if any(part in ("", ".", "..") for part in dataset_id.split("/")):
        fail(f"--out {dataset_id}: each part of a Minari dataset id must be a plain name, not '.', '..' or empty")


def datasets_root() -> Path:
    """Where minari itself keeps local datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root) if root else Path.home() / ".minari" / "datasets"


def dataset_dir(path: str | Path) -> Path | None:
    """The `data/` folder of the Minari dataset `path` names, or None when it names none. `path`
    is a dataset folder (holding data/), its data/ folder, or a dataset id such as
    `minigrid/empty5x5-mine-v0` looked up under `datasets_root()`."""
    p = Path(path)
    for candidate in (p / "data", p):
        if (candidate / "metadata.json").is_file() and candidate.name == "data":
            return candidate
    if not p.is_absolute() and not p.exists():
        candidate = datasets_root() / str(path) / "data"
        if (candidate / "metadata.json").is_file():
            return candidate
    return None


def _frames(obs: Any, where: str) -> np.ndarray:
    """An episode's observations [T+1,...] as uint8 frames [T+1,H,W,C]: image observations as
    they are; of a dict observation (MiniGrid's own) its 'image' entry. (Other observations are
    rendered by `_Replay`.)"""
    if isinstance(obs, dict):
        if "image" not in obs:
            fail(
                f"{where}: observations are dicts without an 'image' entry (keys {', '.join(sorted(obs))}); only image observations can be trained on"
            )
        obs = obs["image"]
    obs = np.asarray(obs)
    if obs.ndim == 3:
        obs = obs[..., None]
    if obs.ndim != 4 or obs.dtype != np.uint8:
        fail(
            f"{where}: observations are {obs.dtype} {list(obs.shape[1:])}, not uint8 images [H,W,C]; record the env with "
            "pixel observations (e.g. gymnasium.wrappers.AddRenderObservation, or collect_minigrid_data.py --format minari)"
        )
    return obs


RENDER_SIZE = 64  # the collector's default --image-size


class _Replay:
    """Frames for a dataset whose observations are not pictures (CartPole's state vector, ...),
    rendered as the collector renders them: the env recovered by id, each episode reset with its
    recorded seed and stepped with its recorded actions. A replay whose rewards or terminations
    differ from the recorded ones is refused: the frames would not be the dataset's."""

    def __init__(self, env_id: str, where: str):
        self.where = where
        if is_minigrid(env_id):
            self.env, _ = make_env(env_id, "rgb", RENDER_SIZE)
            self.picture = lambda obs: obs
        else:
            self.env, source = make_pixel_env(env_id)
            self.picture = (lambda obs: self.env.render()) if source == "render" else (lambda obs: obs)

    def frames(self, episode: Any, seed: int | None, index: int) -> np.ndarray:
        if seed is None:
            fail(
                f"{self.where}: episode {index} has no recorded reset seed, so its frames cannot be rendered; record image observations instead"
            )
        obs, _ = self.env.reset(seed=int(seed))
        pictures = [self.picture(obs)]
        for t, a in enumerate(np.asarray(episode.actions)):
            obs, reward, terminated, _, _ = self.env.step(int(a) if a.ndim == 0 else a)
            if not np.isclose(reward, episode.rewards[t]) or bool(terminated) != bool(episode.terminations[t]):
                fail(
                    f"{self.where}: replaying episode {index} from its seed gives other rewards or ends at step {t}; the env is not the one recorded"
                )
            pictures.append(self.picture(obs))
        return to_frames(np.stack(pictures), 3, RENDER_SIZE)


def _pictures(space: Any) -> bool:
    """Whether the observations are pictures (or a dict holding an 'image')."""
    from gymnasium import spaces

    if isinstance(space, spaces.Dict):
        return "image" in space.spaces
    return image_space(space)


def _action_space(space: Any, where: str) -> dict[str, Any]:
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        if int(space.start) != 0:
            fail(f"{where}: a Discrete action space starting at {int(space.start)} is not supported (actions must start at 0)")
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return {"type": "box", "shape": [int(space.shape[0])], "low": space.low.tolist(), "high": space.high.tolist()}
    fail(f"{where}: actions of space {space} cannot be mapped; discrete actions or a flat Box of floats can")


def read(path: str | Path) -> dict[str, np.ndarray]:
    """A Minari dataset as transition arrays in the collector's compact layout (obs, next_obs_index,
    terminal_obs, action, reward, done, terminated, episode, labels, meta). Each frame is copied
    once, straight into the one array that holds it."""
    data = dataset_dir(path)
    assert data is not None, path
    minari = require_minari()
    try:
        dataset = minari.MinariDataset(data)
        ids = list(dataset.episode_indices)
        # episode lengths from minari's metadata, so the arrays are allocated before any frame is read
        episode_meta = list(dataset.storage.get_episode_metadata(ids))
        lengths = np.array([int(m["total_steps"]) for m in episode_meta], np.int64)
    except Exception as e:  # h5py, arrow and JSON errors of a damaged dataset have many types
        fail(f"{path}: the Minari dataset cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:80]}); re-create it")
    if not ids:
        fail(f"{path}: the Minari dataset holds no episodes")
    space = _action_space(dataset.action_space, str(path))
    replay = None
    if not _pictures(dataset.observation_space):
        spec = dataset.spec.env_spec
        if spec is None:
            fail(f"{path}: observations are not images and the dataset records no env to render them with; record image observations")
        replay = _Replay(spec.id, str(path))
    first = next(dataset.iterate_episodes(ids[:1]))
    if replay is not None:
        frame_shape = (RENDER_SIZE, RENDER_SIZE, 3)
    else:
        frame_shape = _frames(first.observations, str(path)).shape[1:]
    n = int(lengths.sum())
    arrays: dict[str, Any] = {
        "obs": np.empty((n, *frame_shape), np.uint8),
        "terminal_obs": np.empty((len(ids), *frame_shape), np.uint8),
    }
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("action", "reward", "terminated", *LABEL_KEYS)}
    start = 0
    for i, e in enumerate(dataset.iterate_episodes(ids)):  # one episode in memory at a time
        frames = replay.frames(e, episode_meta[i].get("seed"), i) if replay else _frames(e.observations, str(path))
        t = int(lengths[i])
        if frames.shape[1:] != frame_shape or len(frames) != t + 1 or len(e.rewards) != t:
            fail(
                f"{path}: episode {i} has {len(frames)} frames of {list(frames.shape[1:])}; every episode needs T+1 frames of {list(frame_shape)}"
            )
        arrays["obs"][start : start + t] = frames[:t]
        arrays["terminal_obs"][i] = frames[t]
        columns["action"].append(np.asarray(e.actions))
        columns["reward"].append(np.asarray(e.rewards, np.float32))
        columns["terminated"].append(np.asarray(e.terminations, bool))
        infos = e.infos or {}
        for k in LABEL_KEYS:
            if k in infos and len(infos[k]) >= t:
                columns[k].append(np.asarray(infos[k])[:t])
        start += t
    arrays.update(link_episodes(lengths))
    action = np.concatenate(columns["action"])
    arrays["action"] = action.astype(np.int64) if space["type"] == "discrete" else action.astype(np.float32).reshape(n, -1)
    arrays["reward"] = np.concatenate(columns["reward"])
    arrays["terminated"] = np.concatenate(columns["terminated"])
    arrays["done"] = np.zeros(n, bool)
    arrays["done"][np.cumsum(lengths) - 1] = True
    arrays.update({k: np.concatenate(v).astype(np.int64) for k in LABEL_KEYS if len(v := columns[k]) == len(ids)})
    meta = _meta(data, dataset, space, frame_shape)
    if replay is not None:
        meta.update(obs_mode="rgb, rendered by replaying the recorded seeds and actions", image_size=RENDER_SIZE)
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def link_episodes(lengths: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays that tie concatenated episodes together: `episode` ids and `next_obs_index`,
    which points obs_t+1 at the next row of `obs` inside an episode and at the episode's row of
    `terminal_obs` (after all of `obs`) at its end."""
    n = int(lengths.sum())
    next_index = np.arange(1, n + 1, dtype=np.int64)
    next_index[np.cumsum(lengths) - 1] = n + np.arange(len(lengths))
    return {"episode": np.repeat(np.arange(len(lengths), dtype=np.int64), lengths), "next_obs_index": next_index}


def _meta(data: Path, dataset: Any, space: dict[str, Any], frame_shape: tuple[int, ...]) -> dict[str, Any]:
    """Our collection's meta when the dataset came from our collector, else what Minari records."""
    ours = data / META_FILE
    if ours.is_file():
        try:
            meta = json.loads(ours.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            fail(f"{ours} is damaged ({type(e).__name__}); re-export the dataset")
    else:
        spec = dataset.spec.env_spec
        meta = {"env": spec.id if spec is not None else "", "action_space": space, "obs_mode": "minari"}
    meta["source"] = {"minari": dataset.spec.dataset_id, "path": str(data.parent)}
    meta["frame_shape"] = list(frame_shape)
    return meta


def split_episodes(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Our compact transitions as whole episodes: frames [T+1,...] and the per-step arrays."""
    frames = np.concatenate([arrays["obs"], arrays["terminal_obs"]])
    ends = np.flatnonzero(np.diff(arrays["episode"])) + 1
    out = []
    for rows in np.split(np.arange(len(arrays["obs"])), ends):
        last = rows[-1]
        episode = {k: arrays[k][rows] for k in ("action", "reward", "terminated", *LABEL_KEYS) if k in arrays}
        episode["frames"] = np.concatenate([arrays["obs"][rows], frames[arrays["next_obs_index"][last]][None]])
        episode["truncated"] = np.zeros(len(rows), bool)
        episode["truncated"][-1] = not episode["terminated"][-1]
        out.append(episode)
    return out


def write(arrays: dict[str, np.ndarray], meta: dict[str, Any], dataset_id: str, overwrite: bool) -> Path:
    """Writes our transitions as the local Minari dataset `dataset_id` (lossless: raw arrays, no
    JPEG) and returns its folder. It is built under a temporary root and moved into place once
    complete; an existing dataset is replaced only with `overwrite`, and only then."""
    minari = require_minari()
    import minigrid  # noqa: F401  (registers the MiniGrid ids minari looks up)
    from gymnasium import spaces
    from minari.data_collector import EpisodeBuffer

    root, target = datasets_root(), datasets_root() / dataset_id
    if target.exists() and not overwrite:
        fail(f"Minari dataset {dataset_id} already exists in {root}; pass --overwrite to replace it or pick another id")
    frame_shape = arrays["obs"].shape[1:]
    observation_space = spaces.Box(0, 255, frame_shape, np.uint8)
    space = meta.get("action_space") or {}
    if arrays["action"].ndim == 1:
        action_space: Any = spaces.Discrete(int(space.get("n", arrays["action"].max() + 1)))
    else:
        action_space = spaces.Box(
            np.float32(space.get("low", -np.inf)), np.float32(space.get("high", np.inf)), arrays["action"].shape[1:], np.float32
        )
    buffers = []
    for i, e in enumerate(split_episodes(arrays)):
        # Minari's infos hold one entry per observation (T+1): the last state's labels are unknown, so its step repeats
        infos = {k: np.concatenate([e[k], e[k][-1:]]) for k in LABEL_KEYS if k in e}
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=e["frames"],
                actions=e["action"],
                rewards=e["reward"],
                terminations=e["terminated"],
                truncations=e["truncated"],
                infos=infos or None,
            )
        )
    tmp_root = root / f".{dataset_id.replace('/', '_')}.tmp{os.getpid()}"
    shutil.rmtree(tmp_root, ignore_errors=True)
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_root)
    try:
        with warnings.catch_warnings():
            # minari asks for an author, an e-mail and a code link; a local dataset has none to give
            warnings.filterwarnings("ignore", category=UserWarning, module="minari")
            minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=buffers,
                env=meta.get("env") or None,
                observation_space=observation_space,
                action_space=action_space,
                algorithm_name="random policy (collect_minigrid_data.py)",
                description=f"{meta.get('env', 'pixel')} transitions collected by collect_minigrid_data.py",
                data_format="hdf5",
                jpeg_encoding=False,
            )
        (tmp_root / dataset_id / "data" / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        _move_into_place(tmp_root, root, dataset_id)
    except Exception as e:
        fail(f"cannot write Minari dataset {dataset_id} ({type(e).__name__}: {' '.join(str(e).split())[:80]}); nothing was replaced")
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return target


def _move_into_place(tmp_root: Path, root: Path, dataset_id: str) -> None:
    """Moves the dataset built under `tmp_root` to `root`; an older one is set aside until the new
    one is in place, and restored if the move fails."""
    target = root / dataset_id
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = target.with_name(f".{target.name}.old{os.getpid()}")
    if target.exists():
        target.rename(aside)
    try:
        (tmp_root / dataset_id).rename(target)
    except OSError:
        if aside.exists():
            aside.rename(target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    namespace = Path(dataset_id).parent
    made = tmp_root / namespace / "namespace_metadata.json"
    if str(namespace) != "." and made.is_file() and not (root / namespace / "namespace_metadata.json").exists():
        shutil.copy(made, root / namespace / "namespace_metadata.json")
