"""Speed and memory, as ratios measured in one run on this machine (compare them anywhere).

    python benchmark.py --out bench.json

- collect (parallel): the whole collector with --num-envs N vs 1, wall clock; and gymnasium's
  AsyncVectorEnv with N envs vs one plain env, both bare loops, counting only real transitions
  (the autoreset step after an episode ends is a reset, not a transition).
- collect: collector steps/s vs a bare gymnasium loop stepping the same env, seeds and actions
  and rendering the same frames (1.0 = no overhead); with and without writing the .npz.
- train: full training-loop samples/s (DataLoader, uint8 -> float, EMA, logging) vs the
  model-only step on a batch already on the device.
- train (unroll): one optimizer step on K-step windows vs K one-step steps, CNN JEPA with
  train_jepa.py's default objective; the target is at most 1.2 (K steps of prediction cost no
  more than K one-step updates + 20%).
- train (DDP): `torchrun --nproc_per_node N` vs one process, CNN JEPA, same global batch and
  steps, samples/s from each run's metrics.csv.
- data: dataset RAM vs the uint8 bytes of its frames; bytes per transition in RAM and on disk
  vs the naive layout that stores obs and next_obs separately.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from collect_minigrid_data import MAX_EPISODE_BYTES, CollectConfig, assemble, run_episode
from collect_minigrid_data import check_flags as check_collect_flags
from collect_minigrid_data import main as collect_main
from envs import make_env
from minigrid_dataset import MiniGridTransitions, make_loaders
from model_configs import EncDecConfig, JEPAConfig, ViTJEPAConfig
from train_jepa import TrainConfig, cnn_config
from wm_common import check_writable_dir, choose_device, fail, run_cli, seed_everything, write_json

if TYPE_CHECKING:
    import torch

# torch, and the models and training loop that import it (a second of start-up), are imported by
# the measurements that use them, so --help and a bad flag answer at once.

ARCHS = ("jepa_cnn", "jepa_vit", "encdec_vit")
# The measurements print nothing while they run: a budget with zeros too many would look like a
# hang. A median of step times is steady long before this many.
MAX_TRAIN_STEPS = 10_000


@dataclass
class BenchConfig:
    out: str = field(default="bench.json", metadata={"help": "where to write the figures"})
    env: str = field(default="MiniGrid-Empty-8x8-v0", metadata={"help": "MiniGrid env id"})
    episodes: int = field(default=12, metadata={"help": "episodes per collection measurement"})
    train_steps: int = field(default=80, metadata={"help": "optimiser steps per training measurement"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or mps", "choices": ["auto", "cpu", "cuda", "mps"]})
    seed: int = field(default=0, metadata={"help": "seed"})
    num_envs: int = field(default=2, metadata={"help": "worker processes for the parallel-collection figure"})
    unroll: int = field(default=4, metadata={"help": "K of the unroll figure"})


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_collect(cfg: BenchConfig, tmp: Path) -> dict:
    ccfg = CollectConfig(env=cfg.env, episodes=cfg.episodes, seed=cfg.seed, actions="nav")
    env, _ = make_env(ccfg.env, ccfg.obs, ccfg.image_size)
    base = env.unwrapped

    def bare() -> int:
        steps = 0
        for e in range(cfg.episodes):
            rng = np.random.default_rng([cfg.seed, e])
            env.reset(seed=cfg.seed + e)
            for _ in range(base.max_steps):
                steps += 1
                _, _, term, trunc, _ = env.step(int(rng.choice((0, 1, 2))))
                if term or trunc:
                    break
        return steps

    bare()  # warm the tile cache both loops share
    t = time.perf_counter()
    steps = bare()
    bare_rate = steps / (time.perf_counter() - t)
    t = time.perf_counter()
    episodes = [run_episode(env, e, ccfg, int(env.action_space.n), ccfg.image_size, ccfg.seed + e) for e in range(cfg.episodes)]
    collect_rate = steps / (time.perf_counter() - t)
    arrays = assemble(episodes, {"env": cfg.env})
    t2 = time.perf_counter()
    path = tmp / "bench.npz"
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)
    write_s = time.perf_counter() - t2
    total_rate = steps / (time.perf_counter() - t)
    env.close()
    return {
        "steps": steps,
        "bare_env_steps_per_s": bare_rate,
        "collector_steps_per_s": collect_rate,
        "collector_with_write_steps_per_s": total_rate,
        "bare_over_collector": bare_rate / collect_rate,
        "bare_over_collector_with_write": bare_rate / total_rate,
        "write_seconds": write_s,
        "path": path,
    }


def bench_parallel(cfg: BenchConfig, tmp: Path) -> dict:
    """The whole collector (start-up, episodes, writing) with --num-envs 1 and N on the same
    episodes: wall-clock speed-up of N worker processes."""
    times = {}
    for n in (1, cfg.num_envs):
        ccfg = CollectConfig(
            env=cfg.env, episodes=10 * cfg.episodes, seed=cfg.seed, actions="nav", num_envs=n, out=str(tmp / f"par{n}.npz")
        )
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            collect_main(ccfg)
        times[n] = time.perf_counter() - t
    return {"episodes": 10 * cfg.episodes, "num_envs": cfg.num_envs, "seconds": times, "speedup": times[1] / times[cfg.num_envs]}


def _vector_env_member(env_id: str, obs: str, image_size: int):
    return make_env(env_id, obs, image_size)[0]


def bench_vector_env(cfg: BenchConfig, steps: int) -> dict:
    """gymnasium's AsyncVectorEnv (one subprocess per env, stepped in lock-step) against a
    single plain env, both bare loops over `steps` transitions of the same rendered frames."""
    import gymnasium as gym

    def transitions_per_s(n: int) -> float:
        make = partial(_vector_env_member, cfg.env, "rgb", 64)
        venv = gym.vector.AsyncVectorEnv([make] * n) if n > 1 else gym.vector.SyncVectorEnv([make])
        rng = np.random.default_rng(cfg.seed)
        venv.reset(seed=cfg.seed)
        ended = np.zeros(n, bool)
        done = 0
        t = time.perf_counter()
        while done < steps:
            _, _, term, trunc, _ = venv.step(rng.choice(3, size=n))
            done += int((~ended).sum())  # an env that ended last step was reset by this one
            ended = term | trunc
        rate = done / (time.perf_counter() - t)
        venv.close()
        return rate

    one, many = transitions_per_s(1), transitions_per_s(cfg.num_envs)
    return {"num_envs": cfg.num_envs, "single_env_transitions_per_s": one, "async_vector_transitions_per_s": many, "speedup": many / one}


def bench_ddp(cfg: BenchConfig, data_path: Path, tmp: Path) -> dict:
    """The CNN JEPA trained by `train_jepa.py` in one process and by torchrun with N
    processes (gloo on CPU, nccl on GPUs), same global batch and steps: samples/s of each."""
    rates = {}
    for n in (1, cfg.num_envs):
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        out = tmp / f"ddp{n}"
        args = ["train_jepa.py", "--data", str(data_path), "--out-dir", str(out), "--epochs", "8", "--batch-size", str(cfg.batch_size)]
        args += ["--log-every", "5", "--seed", str(cfg.seed), "--device", cfg.device]
        proc = subprocess.run(launcher + args, cwd=Path(__file__).parent, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        with (out / "metrics.csv").open() as f:
            r = [float(row["samples_per_s"]) for row in csv.DictReader(f) if row["phase"] == "train" and row["samples_per_s"]]
        rates[n] = statistics.median(r[1:] if len(r) > 2 else r)
    return {"processes": cfg.num_envs, "samples_per_s": rates, "speedup": rates[cfg.num_envs] / rates[1]}


def _load_and_measure(path: str) -> dict:
    import torch  # noqa: F401  (imported first: the memory torch takes is not the dataset's)

    before = rss_bytes()
    data = MiniGridTransitions(path)
    ram = rss_bytes() - before
    return {"rss_increase_bytes": ram, "frame_uint8_bytes": data.frame_bytes, "transitions": len(data), "obs_bytes": data.obs.nbytes}


def bench_data(path: Path) -> dict:
    """Loads the file in a fresh process, so memory freed earlier in this one cannot hide
    what loading costs."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        m = pool.submit(_load_and_measure, str(path)).result()
    n, naive = m["transitions"], 2 * m["obs_bytes"]
    return {
        "transitions": n,
        "frame_uint8_bytes": m["frame_uint8_bytes"],
        "rss_increase_bytes": m["rss_increase_bytes"],
        "ram_over_frame_bytes": m["rss_increase_bytes"] / m["frame_uint8_bytes"],
        "ram_bytes_per_transition_over_naive": m["frame_uint8_bytes"] / naive,
        "disk_bytes_per_transition": path.stat().st_size / n,
        "disk_over_naive_uncompressed": path.stat().st_size / naive,
    }


def build(arch: str, data: MiniGridTransitions) -> torch.nn.Module:
    """Each architecture at its CPU default (the ViTs as in config.yaml)."""
    from world_model_jepa import JEPAWorldModel
    from world_model_vit import ViTEncoderDecoder, ViTJEPA

    if arch == "jepa_cnn":
        return JEPAWorldModel(config=JEPAConfig(obs_shape=list(data.frame_shape), num_actions=data.num_actions))
    vit = dict(image_size=data.frame_shape[0], patch_size=16, num_actions=data.num_actions)
    return ViTJEPA(config=ViTJEPAConfig(**vit)) if arch == "jepa_vit" else ViTEncoderDecoder(config=EncDecConfig(**vit))


def bench_train(cfg: BenchConfig, arch: str, data: MiniGridTransitions, tmp: Path) -> dict:
    from training import FitSettings, fit

    device = choose_device(cfg.device)
    seed_everything(cfg.seed)
    model = build(arch, data).to(device)
    tmp.mkdir(parents=True, exist_ok=True)
    model_rate = cfg.batch_size / seconds_per_step(model, data, 1, cfg, device)

    train_loader, val_loader = make_loaders(data, batch_size=cfg.batch_size, val_fraction=0.1, seed=cfg.seed)
    log_every = 20
    epochs = max(1, -(-cfg.train_steps // len(train_loader)))
    settings = FitSettings(
        epochs=epochs, lr=1e-3, weight_decay=0.0, grad_clip=1.0, log_every=log_every, out_dir=tmp, resume=False, title="bench"
    )
    info = {"arch": arch, "model_config": model.model_config(), "train_config": {}, "data_meta": {}}
    with contextlib.redirect_stdout(io.StringIO()):
        fit(
            model=model,
            train_loader=train_loader,
            val_loader=val_loader,
            device=device,
            settings=settings,
            checkpoint_info=info,
        )
    with (tmp / "metrics.csv").open() as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r["phase"] == "train" and r["samples_per_s"]]
    loop_rate = statistics.median(rates[1:] if len(rates) > 2 else rates)
    return {
        "device": str(device),
        "batch_size": cfg.batch_size,
        "model_only_samples_per_s": model_rate,
        "training_loop_samples_per_s": loop_rate,
        "model_only_over_loop": model_rate / loop_rate,
    }


def seconds_per_step(model: torch.nn.Module, data: MiniGridTransitions, k: int, cfg: BenchConfig, device: torch.device) -> float:
    """Median wall time of one optimizer step (loss, backward, clip, AdamW, EMA) on a fixed batch
    of k-step windows already on the device."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = data.windows(torch.from_numpy(data.window_starts(k)[: cfg.batch_size]), k)
    frames, actions = batch["frames"].to(device), batch["actions"].to(device)

    def step() -> float:
        t = time.perf_counter()
        loss, _ = model.loss(frames, actions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if hasattr(model, "update_target"):
            model.update_target()
        loss.item()
        return time.perf_counter() - t

    for _ in range(5):
        step()
    return statistics.median(step() for _ in range(cfg.train_steps))


def bench_unroll(cfg: BenchConfig, data: MiniGridTransitions) -> dict:
    """A K-step update against K one-step updates, the trainer's CNN JEPA objective."""
    from world_model_jepa import JEPAWorldModel

    device = choose_device(cfg.device)
    times = {}
    for k in (1, cfg.unroll):
        seed_everything(cfg.seed)
        config = cnn_config(data, TrainConfig(unroll=k))  # train_jepa.py's default objective
        times[k] = seconds_per_step(JEPAWorldModel(config=config).to(device), data, k, cfg, device)
    return {"unroll": cfg.unroll, "seconds_per_step": times, "over_k_one_step": times[cfg.unroll] / (cfg.unroll * times[1])}


def check_flags(cfg: BenchConfig) -> None:
    """One line for each value that would crash a measurement minutes in, never end, or hold more
    frames in RAM than the collector ever does."""
    ccfg = CollectConfig(env=cfg.env, episodes=cfg.episodes, seed=cfg.seed, num_envs=cfg.num_envs)
    check_collect_flags(ccfg)  # --episodes, --seed, --num-envs: the collector's own checks
    for name in ("train_steps", "batch_size", "unroll"):
        if getattr(cfg, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.train_steps > MAX_TRAIN_STEPS:
        fail(
            f"--train-steps {cfg.train_steps} is above {MAX_TRAIN_STEPS}: the timings are steady long before, and nothing prints meanwhile"
        )
    env, _ = make_env(cfg.env, ccfg.obs, ccfg.image_size)
    limit = env.unwrapped.max_steps
    env.close()
    episode_bytes = (limit + 1) * ccfg.image_size**2 * ccfg.channels
    if cfg.episodes * episode_bytes > MAX_EPISODE_BYTES:
        fail(
            f"--episodes {cfg.episodes} can hold {cfg.episodes * episode_bytes / 1e9:.0f} GB of frames, kept in RAM by the collection "
            f"measurement; use at most {int(MAX_EPISODE_BYTES // episode_bytes)}"
        )
    if cfg.batch_size > cfg.episodes * limit:
        fail(
            f"--batch-size {cfg.batch_size} is more than the {cfg.episodes * limit} transitions {cfg.episodes} episodes of {cfg.env} can have"
        )
    if cfg.unroll > limit:
        fail(f"--unroll {cfg.unroll} is longer than an episode of {cfg.env} can be ({limit} steps)")


def summary_rows(result: dict) -> list[tuple[str, float, str]]:
    """(what, ratio, detail) for each measurement, as main prints them, from the results or from
    bench.json (whose keys, process and step counts among them, are strings: so are they here)."""
    result = json.loads(json.dumps(result))
    col, par, vec, unroll, ddp, dat = (
        result[k] for k in ("collect", "collect_parallel", "collect_vector_env", "train_unroll", "train_ddp", "data")
    )
    trains = {arch: result[f"train_{arch}"] for arch in ARCHS}
    return [
        (
            "collect: bare env loop / collector (target <= 1.2)",
            col["bare_over_collector"],
            f"{col['bare_env_steps_per_s']:.0f} vs {col['collector_steps_per_s']:.0f} steps/s",
        ),
        (
            "collect: bare / collector incl. writing .npz",
            col["bare_over_collector_with_write"],
            f"{col['collector_with_write_steps_per_s']:.0f} steps/s",
        ),
        (
            f"collect: --num-envs {par['num_envs']} speed-up over 1 (target >= 1.3)",
            par["speedup"],
            f"{par['episodes']} episodes: {par['seconds']['1']:.1f} s vs {par['seconds'][str(par['num_envs'])]:.1f} s",
        ),
        (
            f"collect: gymnasium AsyncVectorEnv({vec['num_envs']}) over one env, bare",
            vec["speedup"],
            f"{vec['async_vector_transitions_per_s']:.0f} vs {vec['single_env_transitions_per_s']:.0f} transitions/s",
        ),
        *(
            (
                f"train {arch}: model-only / full loop (target <= 1.1)",
                tr["model_only_over_loop"],
                f"{tr['model_only_samples_per_s']:.0f} vs {tr['training_loop_samples_per_s']:.0f} samples/s",
            )
            for arch, tr in trains.items()
        ),
        (
            f"train jepa_cnn: --unroll {unroll['unroll']} step / {unroll['unroll']} one-step steps (target <= 1.2)",
            unroll["over_k_one_step"],
            f"{1e3 * unroll['seconds_per_step'][str(unroll['unroll'])]:.0f} ms vs {1e3 * unroll['seconds_per_step']['1']:.0f} ms",
        ),
        (
            f"train jepa_cnn: DDP {ddp.get('processes')} processes / 1 (same global batch)",
            ddp.get("speedup", float("nan")),
            ddp.get("error") or f"{ddp['samples_per_s']['1']:.0f} vs {ddp['samples_per_s'][str(ddp['processes'])]:.0f} samples/s",
        ),
        (
            "data: RAM / uint8 frame bytes (target <= 1.1)",
            dat["ram_over_frame_bytes"],
            f"{dat['rss_increase_bytes'] / 1e6:.1f} MB vs {dat['frame_uint8_bytes'] / 1e6:.1f} MB",
        ),
        ("data: RAM per transition / naive obs+next_obs", dat["ram_bytes_per_transition_over_naive"], ""),
        (
            "data: disk per transition / naive uncompressed",
            dat["disk_over_naive_uncompressed"],
            f"{dat['disk_bytes_per_transition']:.0f} B per transition",
        ),
    ]


def main(cfg: BenchConfig) -> dict:
    check_flags(cfg)
    check_writable_dir(Path(cfg.out).resolve().parent, "--out directory")
    import torch

    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        col = bench_collect(cfg, tmp)
        par = bench_parallel(cfg, tmp)
        vec = bench_vector_env(cfg, col["steps"])
        path = col.pop("path")
        dat = bench_data(path)
        data = MiniGridTransitions(path)
        trains = {arch: bench_train(cfg, arch, data, tmp / arch) for arch in ARCHS}
        unroll = bench_unroll(cfg, data)
        ddp = bench_ddp(cfg, path, tmp)
    result = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "collect": col,
        "collect_parallel": par,
        "collect_vector_env": vec,
        "train_ddp": ddp,
        "train_unroll": unroll,
        "data": dat,
        **{f"train_{arch}": tr for arch, tr in trains.items()},
    }
    rows = summary_rows(result)
    for name, ratio, detail in rows:
        print(f"{name:<52} {ratio:7.3f}   {detail}")
    write_json(cfg.out, result)
    print(f"Saved {cfg.out}")
    return result


if __name__ == "__main__":
    run_cli(main, BenchConfig, description=__doc__.split("\n\n")[0])
