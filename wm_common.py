"""Pieces every stage shares, written once: user errors and the CLI, seeding, device choice,
atomic files, checkpoints, metrics, the JEPA losses and collapse diagnostics, and the training
loop the trainers run."""

import argparse
import contextlib
import csv
import dataclasses
import errno
import json
import math
import os
import random
import re
import signal
import stat
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- errors and CLI


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file): printed as one line, no
    traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a stage after it saved its work; the CLI exits 128 + signal
    (130 for Ctrl-C, 143 for SIGTERM) so scripts can tell an interrupted run from a finished one."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a request (`requested` holds the signal number) that
    a loop answers at its next safe point by saving and raising `Interrupted`; a second signal
    aborts at once. Used as a context manager so the old handlers come back afterwards."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, what: str):
        self.what, self.requested, self._old, self._pid = what, 0, {}, os.getpid()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherited the handler: the parent decides
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        if rank() == 0:  # torchrun signals every process: one notice is enough
            print(
                f"\n{signal.Signals(signum).name}: stopping {self.what} at the next safe point (send it again to abort)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def fail(message: str) -> typing.NoReturn:
    raise UserError(message)


# Above these a model is beyond any machine (a width of 65536 squared is 4e9 weights per layer)
# and torch fails with a message about another flag, or hangs copying layers.
MAX_WIDTH, MAX_DEPTH = 65536, 1024


def check_sizes(cfg: Any, names: tuple[str, ...]) -> None:
    """Model sizes (widths, depths, heads) given as flags: each a whole number from 1 to its cap."""
    for name in names:
        value, flag = getattr(cfg, name), f"--{name.replace('_', '-')}"
        cap = MAX_DEPTH if name.startswith("num_") else MAX_WIDTH
        if not 1 <= value <= cap:
            fail(f"{flag} must be from 1 to {cap}, got {value}")


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # One line, like every other user error, instead of argparse's usage block.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _field_parser(tp: Any) -> tuple[Callable[[str], Any], bool]:
    """Returns (string -> value converter, whether None is allowed) for a dataclass field type."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) in (list, tuple):
        inner = typing.get_args(tp)[0]

        def parse_list(s: str) -> list:
            return [inner(x) for x in s.replace(",", " ").split()]

        return parse_list, optional
    return tp, optional


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A flag converter that also takes 'none'; named after `convert`, so argparse's message for a
    bad value reads 'invalid int value', not 'invalid <lambda> value'."""

    def parse(s: str) -> Any:
        return None if s.lower() == "none" else convert(s)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Checks and converts a value read from a YAML file to the field's type."""
    convert, optional = _field_parser(tp)
    if value is None:
        if optional:
            return None
        fail(f"config key '{name}' cannot be empty")
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if base in (int, float) and isinstance(value, str):
        # PyYAML reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            fail(f"config key '{name}' must be a number, got {value!r}")
    if typing.get_origin(base) in (list, tuple):
        if not isinstance(value, list):
            fail(f"config key '{name}' must be a list, got {value!r}")
        return [_coerce(name, v, typing.get_args(base)[0]) for v in value]
    if base is bool and not isinstance(value, bool):
        fail(f"config key '{name}' must be true or false, got {value!r}")
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        fail(f"config key '{name}' must be a number, got {value!r}")
    if base is int and isinstance(value, float) and not value.is_integer():
        fail(f"config key '{name}' must be a whole number, got {value!r}")
    return convert(value)


def parse_config(
    cfg_cls: type,
    argv: list[str] | None = None,
    *,
    description: str = "",
    aliases: dict[str, str] | None = None,
    ignored: tuple[str, ...] = (),
) -> Any:
    """Builds the CLI from a config dataclass: one `--flag-name` per field, help from the
    field's `help` metadata. If the dataclass has a `config` field, `--config FILE.yaml` sets
    fields from the file (keys are field names or `aliases`, e.g. seed 000's names); flags given
    on the command line override the file; an unknown key is an error, never ignored."""
    hints = typing.get_type_hints(cfg_cls)
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cfg_cls):
        meta = dict(f.metadata)
        flag = f.name if meta.get("positional") else "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"help": meta.get("help", " "), "default": argparse.SUPPRESS}
        if meta.get("positional"):
            kw["nargs"] = "?"
        if meta.get("repeat"):
            # `--flag a b` and `--flag a --flag b` both give [a, b], each converted to the list's element type
            (element,) = typing.get_args(hints[f.name]) or (str,)
            kw.update(action="extend", nargs="+", type=_field_parser(element)[0], metavar=meta.get("metavar", f.name.upper()))
            if default:
                kw["help"] += f" (default: {' '.join(map(str, default))})"
            parser.add_argument(flag, **kw)
            continue
        if hints[f.name] is bool:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            convert, optional = _field_parser(hints[f.name])
            kw["type"] = _or_none(convert) if optional else convert
            kw["metavar"] = meta.get("metavar", f.name.upper())
            if "choices" in meta:
                kw["choices"] = meta["choices"]
        if default is not None and default != "":
            kw["help"] += f" (default: {default})"
        parser.add_argument(flag, **kw)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if given.get("config"):
        values = load_yaml_config(given["config"], cfg_cls, aliases or {}, ignored)
        # a flag that replaces another (--steps for the file's num_epochs) drops it from the file
        for f in dataclasses.fields(cfg_cls):
            if f.name in given and f.metadata.get("replaces") not in given:
                values.pop(f.metadata.get("replaces"), None)
    values.update(given)
    return cfg_cls(**values)


def load_yaml_config(path: str, cfg_cls: type, aliases: dict[str, str], ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """Reads a YAML config for `cfg_cls`. Keys in `ignored` belong to other stages (e.g. the
    collection keys of a shared config.yaml): skipped with a note. Any other unknown key is an
    error, so a typo never goes unnoticed."""
    import yaml

    p = Path(path)
    odd = odd_path(p)
    if odd:
        fail(f"config file {path} is {odd}, not a file")
    if not p.is_file():
        fail(f"config file {path} not found")

    class UniqueKeys(yaml.SafeLoader):
        """PyYAML keeps the last of two equal keys without a word: a typo'd copy would win silently."""

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
        keys = [loader.construct_object(k) for k, _ in node.value]
        dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
        if dup is not None:
            raise yaml.YAMLError(f"key '{dup}' is given twice")
        return loader.construct_mapping(node)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        raw = yaml.load(p.read_text(), Loader=UniqueKeys) or {}
    except yaml.YAMLError as e:
        fail(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(raw, dict):
        fail(f"config file {path} must be a mapping of key: value")
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    names = set(fields)
    out: dict[str, Any] = {}
    unknown = []
    skipped = [k for k in raw if k in ignored]
    if skipped:
        print(f"note: {path}: keys for other stages skipped here: {', '.join(skipped)}")
    for key, value in raw.items():
        if key in ignored:
            continue
        name = aliases.get(key, key)
        if name not in names or name == "config":
            unknown.append(key)
            continue
        out[name] = _coerce(key, value, hints[name])
        choices = fields[name].metadata.get("choices")
        if choices and out[name] not in choices:
            fail(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    if unknown:
        fail(
            f"config file {path} has unknown keys {', '.join(map(str, unknown))}; valid keys: "
            + ", ".join(sorted(names - {"config"} | set(aliases)))
        )
    return out


def run_cli(main: Callable[[Any], Any], cfg_cls: type, argv: list[str] | None = None, **kw: Any) -> None:
    """Thin CLI around `main(cfg)`: user errors print one line on stderr and exit 2; Ctrl-C
    exits 130 after the stage has saved what it could."""
    try:
        main(parse_config(cfg_cls, argv, **kw))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        if rank() == 0:
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def to_jsonable(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


# ----------------------------------------------------------------------------- seeding, devices


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        fail(f"--seed must be from 0 to 2**32 - 1, got {seed}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; asking for a device that is not there is an error."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda asked for, but torch sees no CUDA GPU; use --device auto or cpu")
    if name == "mps" and not has_mps:
        fail("--device mps asked for, but MPS is not available; use --device auto or cpu")
    if name not in ("cpu", "cuda", "mps"):
        fail(f"unknown --device {name}; choose auto, cpu, cuda or mps")
    return torch.device(name)


# ----------------------------------------------------------------------------- multi-process training


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: from the process group, or before and after it from torchrun's RANK."""
    return dist.get_rank() if world_size() > 1 else int(os.environ.get("RANK", "0"))


def say(*args: Any) -> None:
    """print, on rank 0 only: N processes of one run speak with one voice."""
    if rank() == 0:
        print(*args, flush=True)


def init_distributed(device_name: str) -> torch.device:
    """Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1 in the environment) joins the process
    group, nccl on CUDA (one GPU per process, by LOCAL_RANK) and gloo on CPU; otherwise just
    picks the device."""
    device = choose_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "mps":
        fail("multi-process training runs on CUDA (nccl) or on the CPU (gloo), not MPS; pass --device cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


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


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: nccl only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist(), strict=True))


class _LossForward(nn.Module):
    """DDP synchronises gradients of what runs through `forward`; the trainers' models expose
    their objective as `loss`, so this routes one to the other."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.model.loss(frames, actions)


# ----------------------------------------------------------------------------- atomic files


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(tmp_path)` then renames over `path`, so a crash never leaves a half file
    where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        fail(f"cannot write {printable(path)} ({write_error(e)}); the previous {path.name}, if any, is unchanged")
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_error(e: BaseException) -> str:
    """Why a write failed, in a few words (a full disk says so)."""
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno)
    return " ".join(str(e).split())[:100] or type(e).__name__


def printable(path: str | Path) -> str:
    """A path as text that prints and renders anywhere: bytes that are not UTF-8 (kept by
    Python as surrogates) become escapes instead of crashing a print or a plot title."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def odd_path(path: Path) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a directory (a FIFO, a
    socket, a device, a symlink loop, a dangling symlink); None for a file, a directory or nothing.
    Such paths must be named as what they are: is_file() and is_dir() both say False, which reads
    as "not found", and opening a FIFO to read it blocks forever."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return "a dangling symlink" if path.is_symlink() else None  # absent, or a parent is not a directory
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def check_writable_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        in_the_way = next((p for p in (path, *path.parents) if p.is_file()), None)
        why = f"{in_the_way} is a file" if in_the_way is not None else e.strerror
        fail(f"cannot create {what} {path} ({why}); choose another location")
    if not os.access(path, os.W_OK):
        fail(f"{what} {path} is not writable; choose another location")
    return path


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_KEYS = ("model", "model_config", "train_config", "step", "epoch", "optimizer", "data_meta", "arch")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    missing = [k for k in CHECKPOINT_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    return atomic_write(path, lambda p: torch.save(payload, p))


def load_checkpoint(path: str | Path, *, arch: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Loads `model.pt` (or a run directory holding one) with `weights_only=True`, so a file
    from someone else cannot run code, and checks it is a checkpoint of the expected arch."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    odd = odd_path(p)
    if odd:
        fail(f"checkpoint {path} is {odd}, not a file; fix the path")
    if not p.is_file():
        fail(f"checkpoint {path} not found; train a model first (train_jepa.py) or fix the path")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{p} is not a readable checkpoint ({type(e).__name__}); point --checkpoint at a model.pt written by a trainer")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        fail(f"{p} is not a checkpoint of this project (missing keys); point --checkpoint at a model.pt written by a trainer")
    wanted = (arch,) if isinstance(arch, str) else arch
    if wanted and ckpt["arch"] not in wanted:
        fail(f"{p} holds a {ckpt['arch']} model, expected {' or '.join(wanted)}; use the matching script or --arch")
    return ckpt


def check_data_fits_model(model_config: dict[str, Any], data: Any, what: str = "the model") -> None:
    """A model's action input must take the data's actions: discrete ids below its table size,
    or vectors of its width. Checked before a stage writes anything."""
    continuous = bool(model_config.get("continuous_actions", False))
    n = int(model_config.get("num_actions", 0))
    if data.continuous_actions != continuous:
        kinds = ("vector", "discrete")
        fail(
            f"{data.path} has {kinds[not data.continuous_actions]} actions but {what} was trained on {kinds[not continuous]} ones; "
            "use data from the env it was trained on"
        )
    if continuous and data.num_actions != n:
        fail(f"{data.path} has {data.num_actions}-dim actions but {what} takes {n}; use data from the env it was trained on")
    if not continuous and data.num_actions > n:
        fail(f"{data.path} has {data.num_actions} actions but {what} knows {n}; use data from the env it was trained on")


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


# ----------------------------------------------------------------------------- metrics and plots


class MetricsLog:
    """`metrics.csv`, one row per logged step (phase `train`) or per epoch (phase `val`), and the
    same values as TensorBoard scalars (`<phase>/<term>`) in event files beside it. On resume,
    rows written after the checkpoint's step are dropped so the curve has no doubles (TensorBoard
    is told the same with `purge_step`)."""

    def __init__(self, path: Path, fields: list[str], keep_until_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.fields = path, fields
        purge = keep_until_step + 1 if keep_until_step is not None else None
        self.board = SummaryWriter(log_dir=str(path.parent), purge_step=purge)
        rows = []
        if keep_until_step is not None and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until_step]

        def rewrite(p: Path) -> None:
            with p.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, rewrite)

    def write(self, row: dict[str, Any]) -> None:
        try:
            with self.path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            for k, v in row.items():
                if k in self.fields and k not in ("step", "epoch", "phase") and isinstance(v, (int, float)):
                    self.board.add_scalar(f"{row['phase']}/{k}", v, int(row["step"]))
            self.board.flush()  # a run stopped or failed later keeps every row it logged
        except OSError as e:
            fail(f"cannot write {printable(self.path)} ({write_error(e)}); the run's checkpoint is kept, continue with --resume")

    def close(self) -> None:
        self.board.close()


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def plot_metrics(metrics_csv: Path, out_png: Path, *, latent_dim: int | None, title: str) -> None:
    """loss.png: train/val loss, each loss term, and the two collapse diagnostics with the
    thresholds of `collapse_warning` drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)

    def series(phase: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r["phase"] == phase and r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    terms = [k for k in (rows[0].keys() if rows else []) if k.endswith("_loss") and k != "loss"]
    has_diag = latent_dim is not None and series("val", "effective_rank")[0]
    ncols = 1 + (1 if terms else 0) + (2 if has_diag else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.6), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    for phase, style in (("train", "-"), ("val", "o-")):
        x, y = series(phase, "loss")
        if x:
            ax.plot(x, y, style, label=phase, ms=4)
    ax.set(title="loss (what is optimised)", xlabel="step")
    _log_if_positive(ax)
    ax.legend()
    if terms:
        ax = axes.pop(0)
        for key in terms:
            x, y = series("train", key)
            if x:
                ax.plot(x, y, label=key)
        ax.set(title="loss terms (train)", xlabel="step")
        _log_if_positive(ax)
        ax.legend(fontsize=8)
    if has_diag:
        x, y = series("val", "embedding_std")
        ax = axes.pop(0)
        ax.plot(x, y, "o-")
        ax.axhline(1 / math.sqrt(latent_dim), color="g", ls=":", label="uniform spread")
        ax.axhline(0.1 / math.sqrt(latent_dim), color="r", ls="--", label="collapse below")
        ax.set(title="latent per-dim std (val)", xlabel="step", ylim=(0, None))
        ax.legend(fontsize=8)
        x, y = series("val", "effective_rank")
        ax = axes.pop(0)
        ax.plot(x, y, "o-")
        ax.axhline(max(1.5, min(3.0, 0.02 * latent_dim)), color="r", ls="--", label="collapse below")
        ax.set(title=f"effective rank, RankMe (of {latent_dim})", xlabel="step", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out_png, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)


def _log_if_positive(ax: Any) -> None:
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if ys and min(ys) > 0:
        ax.set_yscale("log")


# ----------------------------------------------------------------------------- training loop


@dataclasses.dataclass
class FitSettings:
    epochs: int
    lr: float
    weight_decay: float
    grad_clip: float
    log_every: int
    out_dir: Path
    resume: bool
    title: str
    compile: bool = False
    amp: bool = False
    save_every: int = 0
    skip_nonfinite: bool = False


MAX_SKIPPED_IN_A_ROW = 10


@dataclasses.dataclass
class _Running:
    """The running sums behind the logged averages. A checkpoint taken mid-epoch stores them, so
    a resumed run logs exactly the rows an uninterrupted one would."""

    window: dict[str, float] = dataclasses.field(default_factory=dict)
    window_n: int = 0
    epoch_sum: float = 0.0
    epoch_n: int = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_n += 1
        self.epoch_sum += values["loss"]
        self.epoch_n += 1

    def averages(self) -> dict[str, float]:
        """Window means over every rank (each rank's pred loss is of its own share)."""
        return {k: v / self.window_n for k, v in mean_across_ranks(self.window).items()}

    def across_ranks(self) -> "_Running":
        both = mean_across_ranks({**{f"w.{k}": v for k, v in self.window.items()}, "epoch_sum": self.epoch_sum})
        return _Running({k[2:]: v for k, v in both.items() if k.startswith("w.")}, self.window_n, both["epoch_sum"], self.epoch_n)


def _grad_norm(model: nn.Module, clip: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def fit(
    *,
    model: torch.nn.Module,
    train_loader: Any,
    val_loader: Any,
    device: torch.device,
    settings: FitSettings,
    checkpoint_info: dict[str, Any],
    resume_from: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The loop every trainer runs. The model supplies `loss(frames [B,K+1,...], actions [B,K])
    -> (loss, {term: value})` with the terms named by `term_names()`, optionally `update_target()` (EMA) after each optimiser step, and
    `encode(obs)` for the per-epoch collapse diagnostics. Data order comes from the loader's
    epoch-seeded sampler, and a checkpoint records how far into its epoch it was taken, so
    `--resume` continues with exactly the batches (and, on CPU, the losses) of an uninterrupted
    run. Under torchrun the model runs in DDP and only rank 0 writes. Returns a summary of the
    last epoch."""
    out = settings.out_dir
    main_rank = rank() == 0
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    step, start_epoch, start_batch, carried = 0, 0, 0, None
    if resume_from is not None:
        opt.load_state_dict(resume_from["optimizer"])
        for group in opt.param_groups:  # the optimiser state keeps its moments; the flags set lr and decay
            group.update(lr=settings.lr, weight_decay=settings.weight_decay)
        step, start_epoch = int(resume_from["step"]), int(resume_from["epoch"])
        start_batch = int(resume_from.get("batch_in_epoch", 0))
        if start_batch:
            carried = _Running(**resume_from["running"])
        if "rng_state" in resume_from:
            torch.set_rng_state(resume_from["rng_state"])
    latent_dim = getattr(model, "latent_dim", None)
    fields = ["step", "epoch", "phase", "loss", *model.term_names(), "embedding_std", "effective_rank", "samples_per_s", "time_s"]
    log = MetricsLog(out / "metrics.csv", fields, keep_until_step=step if resume_from else None) if main_rank else None
    sampler = train_loader.batch_sampler
    if len(sampler) == 0:
        fail("the training split gave no full batch; collect more episodes or lower --batch-size")
    if world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        engine: Any = DistributedDataParallel(_LossForward(model), device_ids=[device.index] if device.type == "cuda" else None)
    else:
        engine = model.loss
    # compiling the loss leaves the module (and its state_dict) as it is
    loss_fn = torch.compile(engine) if settings.compile else engine
    t_start = time.perf_counter()
    summary: dict[str, Any] = {}

    def save(epoch: int, batch_in_epoch: int = 0, running: _Running | None = None) -> None:
        # every rank joins the reduction of the running sums; rank 0 writes
        shared = dataclasses.asdict(running.across_ranks()) if running is not None else None
        if not main_rank:
            return
        payload = dict(checkpoint_info, model=model.state_dict(), optimizer=opt.state_dict(), step=step, epoch=epoch)
        payload.update(batch_in_epoch=batch_in_epoch, running=shared, rng_state=torch.get_rng_state())
        save_checkpoint(out / "model.pt", payload)

    def kept() -> str:
        ckpt = out / "model.pt"
        return f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written"

    def write_row(row: dict[str, Any]) -> None:
        if log is not None:
            log.write(row)

    if start_epoch >= settings.epochs:
        say(f"Run in {out} already has {start_epoch} epochs; ask for more with --epochs")
    skipped_in_a_row = skipped = 0
    history: list[tuple[float, float]] = []  # (train, val) loss per epoch of this process
    warned_overfit = False
    with StopRequest("training") as stop:
        for epoch in range(start_epoch, settings.epochs):
            first = start_batch if epoch == start_epoch else 0
            sampler.set_epoch(epoch, start=first)
            model.train()
            run = carried if epoch == start_epoch and carried is not None else _Running()
            t_window = time.perf_counter()
            for batch_idx, batch in enumerate(train_loader, start=first + 1):
                frames, actions = (batch[k].to(device, non_blocking=True) for k in ("frames", "actions"))
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.amp):
                    loss, terms = loss_fn(frames, actions)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = _grad_norm(model, settings.grad_clip)
                # one small reduction per step: every rank must agree to skip or to stop
                flags = torch.tensor([float(not (torch.isfinite(loss) and torch.isfinite(grad_norm))), float(stop.requested)])
                if world_size() > 1:
                    flags = flags.to(comm_device())
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                bad, stopping = bool(flags[0]), bool(flags[1])
                step += 1
                if bad:
                    what = f"loss became {loss.item():.4g} (gradient norm {grad_norm.item():.4g}) at step {step} (epoch {epoch + 1}, batch {batch_idx})"
                    if not settings.skip_nonfinite:
                        fail(f"{what}; {kept()}; lower --lr, check the data, or pass --skip-nonfinite")
                    skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                    if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                        fail(f"{what}: {skipped_in_a_row} non-finite steps in a row, the model is broken; {kept()}")
                    say(f"warning: {what}: skipped the update")
                    opt.zero_grad(set_to_none=True)
                else:
                    opt.step()
                    if hasattr(model, "update_target"):
                        model.update_target()
                    skipped_in_a_row = 0
                    run.add({"loss": loss.item(), **{k: float(v) for k, v in terms.items()}})
                if batch_idx % settings.log_every == 0 and run.window_n:
                    now = time.perf_counter()
                    avg = run.averages()
                    say(f"Epoch {epoch + 1:02d} | Batch {batch_idx:04d} | Step {step:05d} | Avg Loss {avg['loss']:.4f}")
                    rate = run.window_n * sampler.batch_size / (now - t_window)
                    write_row({"step": step, "epoch": epoch + 1, "phase": "train", **avg, "samples_per_s": rate, "time_s": now - t_start})
                    run.window, run.window_n, t_window = {}, 0, now
                periodic = settings.save_every > 0 and step % settings.save_every == 0 and batch_idx < len(sampler)
                if stopping or periodic:
                    save(epoch, batch_idx, run)
                if stopping:
                    raise Interrupted(
                        f"interrupted at step {step} (epoch {epoch + 1}, batch {batch_idx}/{len(sampler)}); saved {out / 'model.pt'}; "
                        "continue with --resume",
                        stop.requested or signal.SIGTERM,
                    )
            if run.epoch_n == 0:
                fail(f"no finite step in epoch {epoch + 1}; {kept()}")
            if run.window_n:
                avg = run.averages()
                rate = run.window_n * sampler.batch_size / (time.perf_counter() - t_window)
                write_row(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "phase": "train",
                        **avg,
                        "samples_per_s": rate,
                        "time_s": time.perf_counter() - t_start,
                    }
                )
            epoch_mean = run.across_ranks().epoch_sum / run.epoch_n
            val = evaluate(model, val_loader, device)
            line = f"Epoch {epoch + 1:02d} finished | Mean Loss {epoch_mean:.4f} | Val Loss {val['loss']:.4f}"
            if latent_dim is not None:
                line += f" | Latent std {val['embedding_std']:.4f} | RankMe {val['effective_rank']:.1f}/{latent_dim}"
            say(line)
            if getattr(model, "can_collapse", False) and collapse_warning(val["embedding_std"], val["effective_rank"], latent_dim):
                say(
                    f"WARNING: the latents look collapsed (RankMe {val['effective_rank']:.1f} of {latent_dim}, per-dim std "
                    f"{val['embedding_std']:.4f}, uniform spread is {1 / math.sqrt(latent_dim):.4f}): a low loss here means "
                    "nothing. Train with --reg vicreg (CNN) or larger --std-coeff/--cov-coeff."
                )
            history.append((epoch_mean, val["loss"]))
            best = overfitting(history)
            if best is not None and not warned_overfit:
                warned_overfit = True
                (t0, v0), (t1, v1) = history[best], history[-1]
                say(
                    f"WARNING: validation loss has risen {len(history) - 1 - best} epochs past its best ({v0:.4f} -> {v1:.4f}) "
                    f"while training loss fell ({t0:.4f} -> {t1:.4f}): the model is fitting its training episodes, not the "
                    f"env. Use fewer epochs (about {start_epoch + best + 1}) or collect more episodes"
                )
            write_row({"step": step, "epoch": epoch + 1, "phase": "val", **val, "time_s": time.perf_counter() - t_start})
            save(epoch + 1)
            if main_rank:
                plot_metrics(out / "metrics.csv", out / "loss.png", latent_dim=latent_dim, title=settings.title)
            summary = {"epoch": epoch + 1, "step": step, "train_loss": epoch_mean, **{f"val_{k}": v for k, v in val.items()}}
            if skipped:
                summary["skipped_steps"] = skipped
            stop_now = torch.tensor([float(stop.requested)])
            if world_size() > 1:
                stop_now = stop_now.to(comm_device())
                dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
            if stop_now.item() and epoch + 1 < settings.epochs:
                raise Interrupted(
                    f"interrupted after epoch {epoch + 1} (step {step}); saved {out / 'model.pt'}; continue with --resume",
                    stop.requested or signal.SIGTERM,
                )
    if main_rank and not (out / "loss.png").exists() and (out / "metrics.csv").exists():
        plot_metrics(out / "metrics.csv", out / "loss.png", latent_dim=latent_dim, title=settings.title)
    if log is not None:
        log.close()
    return summary


OVERFIT_EPOCHS, OVERFIT_MARGIN = 3, 0.05


def overfitting(history: list[tuple[float, float]]) -> int | None:
    """The epoch index of the best validation loss when the run has moved away from it: for
    OVERFIT_EPOCHS epochs or more since, validation loss is more than OVERFIT_MARGIN above that
    best while the training loss went on falling (a margin and a span, so epoch-to-epoch noise
    in a small validation set is not mistaken for it). None otherwise."""
    best = min(range(len(history)), key=lambda i: history[i][1])
    (t_best, v_best), (t_now, v_now) = history[best], history[-1]
    if len(history) - 1 - best >= OVERFIT_EPOCHS and v_now > (1 + OVERFIT_MARGIN) * v_best and t_now < t_best:
        return best
    return None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, device: torch.device, max_latents: int = 4096) -> dict[str, float]:
    """Mean loss and terms over a loader, plus the collapse diagnostics on the online latents."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    latents = []
    kept = 0
    for batch in loader:
        frames, actions = batch["frames"].to(device), batch["actions"].to(device)
        loss, terms = model.loss(frames, actions)
        b = len(frames)
        sums["loss"] = sums.get("loss", 0.0) + loss.item() * b
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
        if hasattr(model, "latent_dim") and kept < max_latents:
            latents.append(model.encode(frames[: max_latents - kept, 0]).cpu())
            kept += len(latents[-1])
    model.train(was_training)
    if n == 0:
        fail("the validation split is empty; collect more episodes or lower --val-fraction")
    out = {k: v / n for k, v in sums.items()}
    if latents:
        z = torch.cat(latents)
        out["embedding_std"] = embedding_std(z)
        out["effective_rank"] = effective_rank(z)
    return out


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(i + batch_size, n))


# ----------------------------------------------------------------------------- a training run

# seed 000's config.yaml names for settings the trainers call otherwise
SEED000_ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "vicreg_sim_coeff": "sim_coeff",
    "vicreg_std_coeff": "std_coeff",
    "vicreg_cov_coeff": "cov_coeff",
}
# seed 000 keys that configure data collection: the trainers accept and skip them
SEED000_COLLECTION_KEYS = ("environment_name", "num_episodes_data_collection", "max_steps_per_episode_data_collection")


# Fewer optimizer steps than this left the CNN JEPA short of what its data can teach (measured
# on four MiniGrid layouts: at 84-243 steps the predicted-cell probe was 0.17-0.75 one step
# ahead, at 648-2,000 steps 0.999-1.0); such runs are told so. The default budget is above it.
MIN_STEPS = 500
DEFAULT_STEPS = 2000


@dataclasses.dataclass
class RunConfig:
    """Settings every trainer shares; each trainer's config adds its model's fields."""

    data: str = dataclasses.field(default="data/demo_empty8x8.npz", metadata={"help": "transitions .npz from collect_minigrid_data.py"})
    epochs: int | None = dataclasses.field(
        default=None,
        metadata={"help": "total epochs (with --resume: train until this many; default: enough for --steps)", "replaces": "steps"},
    )
    batch_size: int = dataclasses.field(default=64, metadata={"help": "transitions per batch"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = dataclasses.field(default=1.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "one seed for init, data split and data order"})
    out_dir: str = dataclasses.field(default="", metadata={"help": "run directory (default: checkpoints/<arch>)"})
    device: str = dataclasses.field(
        default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": ["auto", "cpu", "cuda", "mps"]}
    )
    config: str = dataclasses.field(default="", metadata={"help": "YAML file of these keys (seed 000 names accepted); flags override it"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue the run in --out-dir from its checkpoint up to --epochs"})
    overwrite: bool = dataclasses.field(
        default=False,
        metadata={"help": "replace an existing run in --out-dir (the old one is moved to <out-dir>.prev, or .prev2, ...: never deleted)"},
    )
    val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "fraction of episodes held out for validation"})
    log_every: int = dataclasses.field(default=100, metadata={"help": "print and log every this many batches"})
    compile: bool = dataclasses.field(
        default=False, metadata={"help": "torch.compile the training loss (about 2x for the CNN JEPA on a CPU; the first steps compile)"}
    )
    amp: bool = dataclasses.field(default=False, metadata={"help": "bfloat16 autocast for the training forward pass (for GPUs)"})
    num_workers: int = dataclasses.field(
        default=0, metadata={"help": "DataLoader worker processes (0: load in the main process; batches are one gather)"}
    )
    save_every: int = dataclasses.field(
        default=0, metadata={"help": "also checkpoint every this many steps within an epoch (0: at epoch ends only)"}
    )
    skip_nonfinite: bool = dataclasses.field(
        default=False,
        metadata={
            "help": f"skip an update whose loss or gradient is NaN/inf instead of stopping ({MAX_SKIPPED_IN_A_ROW} in a row still stop)"
        },
    )
    steps: int | None = dataclasses.field(
        default=None,
        metadata={
            "help": f"budget in optimizer steps: the fewest whole epochs that reach it (default without --epochs: {DEFAULT_STEPS})",
            "replaces": "epochs",
        },
    )
    unroll: int = dataclasses.field(
        default=1,
        metadata={"help": "train on windows of K consecutive steps, the predictor fed its own output K times (1: one-step)"},
    )


def epochs_for(cfg: Any, steps_per_epoch: int) -> int:
    """--epochs, or the fewest whole epochs that give --steps (default DEFAULT_STEPS) optimizer steps:
    a budget in steps fits any data size, where a fixed number of epochs under-trains small data."""
    if cfg.epochs is not None:
        return cfg.epochs
    return -(-(cfg.steps or DEFAULT_STEPS) // steps_per_epoch)


def warn_if_short(total_steps: int, steps_per_epoch: int, epochs: int) -> None:
    if total_steps < MIN_STEPS:
        need = -(-MIN_STEPS // steps_per_epoch)
        say(
            f"warning: {epochs} epochs x {steps_per_epoch} batches = {total_steps} optimizer steps, too few for this data "
            f"(under {MIN_STEPS} the world models here were measured under-trained). "
            f"Use --epochs {need} or more, or --steps {DEFAULT_STEPS} (the default without --epochs)"
        )


def free_name(path: Path) -> Path:
    """path, or path2, path3, ...: the first that does not exist (a backup never replaces anything)."""
    n = 1
    candidate = path
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}{n}")
    return candidate


def check_out_dir_apart_from_data(out: Path, data: str | Path) -> None:
    """A run directory never holds, or sits inside, the dataset it trains on: --overwrite would
    move the data aside with the old run."""
    o, d = out.resolve(), Path(data).resolve()
    if o == d or o in d.parents or d in o.parents and Path(data).is_dir():
        fail(f"--out-dir {printable(out)} and --data {printable(data)} overlap; write the run to a directory of its own")


# flags that may differ on --resume: how long, where and how fast, not what is trained
RESUME_MAY_CHANGE = {"epochs", "steps", "resume", "overwrite", "log_every", "device", "num_workers", "save_every", "skip_nonfinite"}
RESUME_MAY_CHANGE |= {"compile", "config", "out_dir"}
# what runs saved before a flag existed were trained with
FLAG_BEFORE_IT_EXISTED = {"unroll": 1}


def check_same_run(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """--resume continues the same run: refuses any flag that changes the data or the training
    (naming each with its saved value), so a checkpoint never mixes two runs."""
    changed = []
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE:
            continue
        before = saved.get(key, FLAG_BEFORE_IT_EXISTED.get(key, value))
        if before != value:
            changed.append(f"--{key.replace('_', '-')} {before} (now {value})")
    if changed:
        fail(f"--resume: the run was trained with {', '.join(changed)}; resume with the same values, or start a new run with --out-dir")


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """One training at a time per run directory. An flock on a file beside it: the kernel drops
    it when the process ends, however it ends, so a killed run never leaves it stuck."""
    import fcntl

    lock_path = check_writable_dir(out.parent, "--out-dir's parent") / f".{out.name}.lock"
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"another training is writing to {printable(out)} right now; wait for it to end or choose another --out-dir")
        yield


def remove_stale_temp_files(out: Path) -> None:
    """Deletes what a killed run left of its atomic writes in its run directory
    (`.<name>.tmp<pid><suffix>`, see atomic_write). Called under the run's lock: no other trainer
    is writing here, so every such file is stale."""
    if not out.is_dir():
        return
    stale = [p for p in out.iterdir() if p.is_file() and not p.is_symlink() and re.fullmatch(r"\..+\.tmp\d+(\.\w+)?", p.name)]
    for p in stale:
        p.unlink()
    if stale:
        say(f"note: removed {len(stale)} temporary file(s) an interrupted run left in {printable(out)}: {', '.join(p.name for p in stale)}")


def run_training(
    cfg: Any,
    *,
    arch: str,
    build_model: Callable[[dict[str, Any] | None, Any], torch.nn.Module],
) -> dict[str, Any]:
    """`_train_run` with the run directory's lock, taken once every input is checked and before
    the first write (so a bad input writes nothing, not even the lock file), and held to the end
    by rank 0 for every process."""
    with contextlib.ExitStack() as held:
        return _train_run(cfg, arch=arch, build_model=build_model, hold=held)


def _train_run(
    cfg: Any,
    *,
    arch: str,
    build_model: Callable[[dict[str, Any] | None, Any], torch.nn.Module],
    hold: contextlib.ExitStack,
) -> dict[str, Any]:
    """What every trainer does around `fit`: load and split the data, seed, build (or restore,
    with `cfg.resume`) the model, refuse to clobber an earlier run, write `config.json`, train.
    `build_model(saved_model_config_or_None, data)` returns the model. Everything that can fail
    on user input is checked before anything is written. Under `torchrun` every process runs
    this; rank 0 alone writes."""
    from minigrid_dataset import MiniGridTransitions, make_loaders

    if cfg.epochs is not None and cfg.steps is not None:
        fail("give the budget as --epochs or as --steps, not both")
    if cfg.epochs is not None and cfg.epochs < 1:
        fail(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.steps is not None and cfg.steps < 1:
        fail(f"--steps must be at least 1, got {cfg.steps}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        fail(f"--lr must be positive and finite, got {cfg.lr}")
    if not (cfg.weight_decay >= 0 and math.isfinite(cfg.weight_decay)):
        fail(f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    if cfg.lr * cfg.weight_decay >= 1:
        # AdamW multiplies every weight by 1 - lr * weight_decay each step: 0 or below zeroes or flips them all
        fail(
            f"--weight-decay {cfg.weight_decay} x --lr {cfg.lr} is 1 or more: every step would zero or flip all weights; lower --weight-decay"
        )
    if not (cfg.grad_clip >= 0 and math.isfinite(cfg.grad_clip)):
        fail(f"--grad-clip must be 0 (off) or a positive norm, got {cfg.grad_clip}")
    check_seed(cfg.seed)
    if cfg.log_every < 1:
        fail(f"--log-every must be at least 1, got {cfg.log_every}")
    if cfg.save_every < 0:
        fail(f"--save-every must be 0 (epoch ends only) or a number of steps, got {cfg.save_every}")
    out = Path(cfg.out_dir)
    ckpt_path = out / "model.pt"
    resume_from = None
    if cfg.resume:
        if not ckpt_path.is_file():
            fail(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
        resume_from = load_checkpoint(ckpt_path, arch=arch)
        check_same_run(resume_from.get("train_config") or {}, to_jsonable(cfg))
    elif ckpt_path.exists() and not cfg.overwrite:
        fail(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --out-dir")
    device = init_distributed(cfg.device)
    try:
        say(f"Using device: {device}" + (f" x {world_size()} processes (DDP), global batch {cfg.batch_size}" if world_size() > 1 else ""))
        seed_everything(cfg.seed)
        data = MiniGridTransitions(cfg.data)
        for note in data.notes:
            say(f"note: {note}")
        train_loader, val_loader = make_loaders(
            data,
            batch_size=cfg.batch_size,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            rank=rank(),
            world_size=world_size(),
            unroll=cfg.unroll,
        )
        steps_per_epoch = len(train_loader.batch_sampler)
        epochs = cfg.epochs = epochs_for(cfg, steps_per_epoch)  # config.json records the epochs a --steps budget gave
        warn_if_short(epochs * steps_per_epoch, steps_per_epoch, epochs)
        if resume_from and (resume_from.get("data_meta") or {}).get("transitions", len(data)) != len(data):
            fail(
                f"--resume: the run trained on {resume_from['data_meta']['transitions']} transitions but {cfg.data} now holds "
                f"{len(data)}; resume on the same data or start a new run"
            )
        try:
            model = build_model(resume_from["model_config"] if resume_from else None, data)
        except (RuntimeError, MemoryError) as e:  # a huge --latent-dim etc.: torch's allocator refuses
            if "alloc" not in str(e) and not isinstance(e, MemoryError):
                raise
            fail(f"the model does not fit in memory ({write_error(e)[:80]}...); choose smaller sizes (e.g. --latent-dim)")
        check_data_fits_model(model.model_config(), data, "the checkpoint's model")
        if getattr(model, "can_collapse", False) and cfg.batch_size < 2:
            fail(f"--batch-size {cfg.batch_size}: a JEPA's VICReg terms are statistics over the batch and need at least 2 samples")
        if resume_from:
            model.load_state_dict(resume_from["model"])
        model.to(device)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        say(
            f"Data: {len(data)} transitions from {len(np.unique(data.episode))} episodes "
            f"({len(train_loader.batch_sampler.indices)} train / {len(val_loader.batch_sampler.indices)} val"
            f"{f' windows of {cfg.unroll} steps' if cfg.unroll > 1 else ''}) | "
            f"Model: {arch}, {n_params / 1e6:.2f}M trainable parameters"
        )
        train_config = to_jsonable(cfg)
        if world_size() > 1:
            dist.barrier()  # every rank has read the old run before rank 0 moves or writes anything
        if rank() == 0:
            check_out_dir_apart_from_data(out, cfg.data)
            hold.enter_context(run_lock(out))
            remove_stale_temp_files(out)
            if ckpt_path.exists() and not (cfg.resume or cfg.overwrite):  # a run that ended while this one started
                fail(f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, or another --out-dir")
            if ckpt_path.exists() and not cfg.resume:
                # --overwrite: keep the earlier run whole beside the new one until the user deletes
                # it, so a new run that fails never leaves a mix of old and new files.
                backup = free_name(out.with_name(out.name + ".prev"))
                os.replace(out, backup)
                say(f"Moved the earlier run in {out} to {backup}")
            check_writable_dir(out, "--out-dir")
            write_json(out / "config.json", {"arch": arch, "train": train_config, "model": model.model_config()})
        data_meta = dict(data.meta, path=str(cfg.data), transitions=len(data), frame_shape=list(data.frame_shape))
        settings = FitSettings(
            epochs=epochs,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip,
            log_every=cfg.log_every,
            out_dir=out,
            resume=cfg.resume,
            title=f"{arch} on {printable(Path(cfg.data).name)}",
            compile=cfg.compile,
            amp=cfg.amp,
            save_every=cfg.save_every,
            skip_nonfinite=cfg.skip_nonfinite,
        )
        info = {"arch": arch, "model_config": model.model_config(), "train_config": train_config, "data_meta": data_meta}
        summary = fit(
            model=model,
            train_loader=train_loader,
            val_loader=val_loader,
            device=device,
            settings=settings,
            checkpoint_info=info,
            resume_from=resume_from,
        )
        say(f"Saved {ckpt_path}, {out / 'metrics.csv'}, {out / 'loss.png'}")
        return summary
    finally:
        if world_size() > 1:
            dist.barrier()  # a rank that tears down gloo while another still talks to it aborts
            dist.destroy_process_group()
