"""Pieces every stage shares, written once: user errors and the CLI, seeding, device choice,
several processes, atomic files and checkpoints.

Every stage script imports this module before it parses its flags, so it does not import torch
(a second of start-up): the few functions that need torch import it when called.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import os
import random
import signal
import stat
import sys
import threading
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

_P = ParamSpec("_P")
_R = TypeVar("_R")

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

    def __enter__(self) -> StopRequest:
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
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"  # --help lists every choice
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
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; asking for a device that is not there is an error."""
    import torch

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


def no_grad(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`@torch.no_grad()` for the stage scripts' functions: torch is imported when `fn` runs, not
    when the script defines it."""

    @functools.wraps(fn)
    def without_grad(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_grad


# ----------------------------------------------------------------------------- multi-process training


def world_size() -> int:
    # looked up, not imported: a process that never imported torch.distributed is in no process group
    dist = sys.modules.get("torch.distributed")
    return dist.get_world_size() if dist is not None and dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank: from the process group, or before and after it from torchrun's RANK."""
    return sys.modules["torch.distributed"].get_rank() if world_size() > 1 else int(os.environ.get("RANK", "0"))


def say(*args: Any) -> None:
    """print, on rank 0 only: N processes of one run speak with one voice."""
    if rank() == 0:
        print(*args, flush=True)


def init_distributed(device_name: str) -> torch.device:
    """Under `torchrun --nproc_per_node=N` (WORLD_SIZE > 1 in the environment) joins the process
    group, nccl on CUDA (one GPU per process, by LOCAL_RANK) and gloo on CPU; otherwise just
    picks the device."""
    import torch
    import torch.distributed as dist

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


def replace_between(path: Path, start_mark: str, end_mark: str, text: str) -> None:
    """Puts `text` between two marker lines of a text file (the docs' generated blocks), keeping
    the markers; a file without them is a user error and is not touched."""
    doc = path.read_text()
    start, end = doc.find(start_mark), doc.find(end_mark)
    if start < 0 or end < start:
        fail(f"{path} has no {start_mark} ... {end_mark} block")
    new = doc[: start + len(start_mark)] + "\n" + text.rstrip("\n") + "\n" + doc[end:]
    atomic_write(path, lambda p: p.write_text(new))


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
    import torch

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
    import torch

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
