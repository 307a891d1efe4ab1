"""The training loop every trainer runs (`fit`), the run around it (`run_training`: data, seed,
model, resume, run directory) and its records (`metrics.csv`, TensorBoard events, `loss.png`)."""

import contextlib
import csv
import dataclasses
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from losses import collapse_warning, effective_rank, embedding_std
from minigrid_dataset import MiniGridTransitions, make_loaders
from trainer_flags import DEFAULT_STEPS, MAX_SKIPPED_IN_A_ROW, MIN_STEPS

# re-exported: the tests read seed 000's names from here, where they were before trainer_flags.py
from trainer_flags import SEED000_ALIASES as SEED000_ALIASES
from trainer_flags import SEED000_COLLECTION_KEYS as SEED000_COLLECTION_KEYS
from wm_common import (
    Interrupted,
    StopRequest,
    atomic_write,
    check_data_fits_model,
    check_writable_dir,
    fail,
    init_distributed,
    load_checkpoint,
    printable,
    rank,
    save_checkpoint,
    say,
    seed_everything,
    to_jsonable,
    world_size,
    write_error,
    write_json,
)

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
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 4.4), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    for phase, style, label in (("train", "-", "train (per logged window)"), ("val", "o-", "validation (per epoch)")):
        x, y = series(phase, "loss")
        if x:
            ax.plot(x, y, style, label=label, ms=4)
    ax.set(title="loss (what is optimised)", xlabel="optimizer step", ylabel="loss")
    _log_if_positive(ax)
    _legend_under(ax)
    if terms:
        ax = axes.pop(0)
        for key in terms:
            x, y = series("train", key)
            if x:
                ax.plot(x, y, label=key)
        ax.set(title="loss terms (train)", xlabel="optimizer step", ylabel="term value (unweighted)")
        _log_if_positive(ax)
        _legend_under(ax, ncol=2)
    if has_diag:
        x, y = series("val", "embedding_std")
        ax = axes.pop(0)
        ax.plot(x, y, "o-", label="held-out episodes")
        ax.axhline(1 / math.sqrt(latent_dim), color="g", ls=":", label="uniform spread on the sphere")
        ax.axhline(0.1 / math.sqrt(latent_dim), color="r", ls="--", label="collapsed below this")
        ax.set(title="latent per-dimension std", xlabel="optimizer step", ylabel="std of unit latents", ylim=(0, None))
        _legend_under(ax)
        x, y = series("val", "effective_rank")
        ax = axes.pop(0)
        ax.plot(x, y, "o-", label="held-out episodes")
        ax.axhline(max(1.5, min(3.0, 0.02 * latent_dim)), color="r", ls="--", label="collapsed below this")
        ax.set(title=f"effective rank (RankMe), of {latent_dim}", xlabel="optimizer step", ylabel="RankMe", ylim=(0, None))
        _legend_under(ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out_png, lambda p: fig.savefig(p, dpi=90, format="png", bbox_inches="tight"))
    plt.close(fig)


def _legend_under(ax: Any, ncol: int = 1) -> None:
    """Legends go under the axes: on the curves they hide what they label."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=ncol, frameon=False, fontsize=8)


def _log_if_positive(ax: Any) -> None:
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if ys and min(ys) > 0:
        ax.set_yscale("log")


# ----------------------------------------------------------------------------- training loop


class _LossForward(nn.Module):
    """DDP synchronises gradients of what runs through `forward`; the trainers' models expose
    their objective as `loss`, so this routes one to the other."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.model.loss(frames, actions)


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
    lr_schedule: str = "constant"


def lr_at(step: int, total: int, lr: float, schedule: str) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total`: constant, or a half
    cosine from `lr` down to 0 at the last step."""
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total) / total))


def comm_device() -> torch.device:
    """Where small tensors for collectives must live: nccl only moves CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist(), strict=True))


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
    loop = _Loop(model, train_loader, val_loader, device, settings, checkpoint_info, resume_from)
    try:
        with StopRequest("training") as stop:
            for epoch in range(loop.start_epoch, settings.epochs):
                loop.train_epoch(epoch, stop)
                loop.end_epoch(epoch, stop)
        loop.finish()
    finally:
        if loop.log is not None:
            loop.log.close()
    return loop.summary


class _Loop:
    """`fit`'s state: the optimiser, where the run is (step, epoch, batch), the log, and the
    per-epoch history the overfitting warning reads."""

    def __init__(self, model, train_loader, val_loader, device, settings: FitSettings, checkpoint_info, resume_from) -> None:
        self.model, self.train_loader, self.val_loader, self.device = model, train_loader, val_loader, device
        self.settings, self.checkpoint_info, self.out = settings, checkpoint_info, settings.out_dir
        self.main_rank = rank() == 0
        self.opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.step, self.start_epoch, self.start_batch, self.carried = 0, 0, 0, None
        if resume_from is not None:
            self._restore(resume_from)
        self.latent_dim = getattr(model, "latent_dim", None)
        fields = ["step", "epoch", "phase", "loss", *model.term_names(), "embedding_std", "effective_rank", "samples_per_s", "time_s"]
        keep = self.step if resume_from else None
        self.log = MetricsLog(self.out / "metrics.csv", fields, keep_until_step=keep) if self.main_rank else None
        self.sampler = train_loader.batch_sampler
        if len(self.sampler) == 0:
            fail("the training split gave no full batch; collect more episodes or lower --batch-size")
        if world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            engine: Any = DistributedDataParallel(_LossForward(model), device_ids=[device.index] if device.type == "cuda" else None)
        else:
            engine = model.loss
        # compiling the loss leaves the module (and its state_dict) as it is
        self.loss_fn = torch.compile(engine) if settings.compile else engine
        self.t_start = time.perf_counter()
        self.summary: dict[str, Any] = {}
        self.skipped_in_a_row = self.skipped = 0
        self.history: list[tuple[float, float]] = []  # (train, val) loss per epoch of this process
        self.warned_overfit = False
        if self.start_epoch >= settings.epochs:
            say(f"Run in {self.out} already has {self.start_epoch} epochs; ask for more with --epochs")

    def _restore(self, resume_from: dict[str, Any]) -> None:
        self.opt.load_state_dict(resume_from["optimizer"])
        for group in self.opt.param_groups:  # the optimiser state keeps its moments; the flags set lr and decay
            group.update(lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        self.step, self.start_epoch = int(resume_from["step"]), int(resume_from["epoch"])
        self.start_batch = int(resume_from.get("batch_in_epoch", 0))
        if self.start_batch:
            self.carried = _Running(**resume_from["running"])
        if "rng_state" in resume_from:
            torch.set_rng_state(resume_from["rng_state"])

    def save(self, epoch: int, batch_in_epoch: int = 0, running: _Running | None = None) -> None:
        # every rank joins the reduction of the running sums; rank 0 writes
        shared = dataclasses.asdict(running.across_ranks()) if running is not None else None
        if not self.main_rank:
            return
        payload = dict(self.checkpoint_info, model=self.model.state_dict(), optimizer=self.opt.state_dict(), step=self.step, epoch=epoch)
        payload.update(batch_in_epoch=batch_in_epoch, running=shared, rng_state=torch.get_rng_state())
        save_checkpoint(self.out / "model.pt", payload)

    def kept(self) -> str:
        ckpt = self.out / "model.pt"
        return f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written"

    def write_row(self, row: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(row)

    def write_train_row(self, epoch: int, run: _Running, avg: dict[str, float], t_window: float) -> float:
        """The window's averages as a `train` row; returns the time the next window starts."""
        now = time.perf_counter()
        rate = run.window_n * self.sampler.batch_size / (now - t_window)
        self.write_row(
            {"step": self.step, "epoch": epoch + 1, "phase": "train", **avg, "samples_per_s": rate, "time_s": now - self.t_start}
        )
        run.window, run.window_n = {}, 0
        return now

    def train_step(self, batch: dict[str, torch.Tensor], run: _Running, stop: StopRequest, where: str) -> bool:
        """One optimiser step (or a skipped non-finite one); returns whether every rank asked to stop."""
        frames, actions = (batch[k].to(self.device, non_blocking=True) for k in ("frames", "actions"))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.amp):
            loss, terms = self.loss_fn(frames, actions)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        lr = lr_at(self.step, self.settings.epochs * len(self.sampler), self.settings.lr, self.settings.lr_schedule)
        for group in self.opt.param_groups:
            group["lr"] = lr
        grad_norm = _grad_norm(self.model, self.settings.grad_clip)
        # one small reduction per step: every rank must agree to skip or to stop
        flags = torch.tensor([float(not (torch.isfinite(loss) and torch.isfinite(grad_norm))), float(stop.requested)])
        if world_size() > 1:
            flags = flags.to(comm_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stopping = bool(flags[0]), bool(flags[1])
        self.step += 1
        if bad:
            what = f"loss became {loss.item():.4g} (gradient norm {grad_norm.item():.4g}) at step {self.step} ({where})"
            if not self.settings.skip_nonfinite:
                fail(f"{what}; {self.kept()}; lower --lr, check the data, or pass --skip-nonfinite")
            self.skipped, self.skipped_in_a_row = self.skipped + 1, self.skipped_in_a_row + 1
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                fail(f"{what}: {self.skipped_in_a_row} non-finite steps in a row, the model is broken; {self.kept()}")
            say(f"warning: {what}: skipped the update")
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            if hasattr(self.model, "update_target"):
                self.model.update_target()
            self.skipped_in_a_row = 0
            run.add({"loss": loss.item(), **{k: float(v) for k, v in terms.items()}})
        return stopping

    def train_epoch(self, epoch: int, stop: StopRequest) -> None:
        first = self.start_batch if epoch == self.start_epoch else 0
        self.sampler.set_epoch(epoch, start=first)
        self.model.train()
        self.run = self.carried if epoch == self.start_epoch and self.carried is not None else _Running()
        run, t_window = self.run, time.perf_counter()
        for batch_idx, batch in enumerate(self.train_loader, start=first + 1):
            stopping = self.train_step(batch, run, stop, f"epoch {epoch + 1}, batch {batch_idx}")
            if batch_idx % self.settings.log_every == 0 and run.window_n:
                avg = run.averages()
                say(f"Epoch {epoch + 1:02d} | Batch {batch_idx:04d} | Step {self.step:05d} | Avg Loss {avg['loss']:.4f}")
                t_window = self.write_train_row(epoch, run, avg, t_window)
            periodic = self.settings.save_every > 0 and self.step % self.settings.save_every == 0 and batch_idx < len(self.sampler)
            if stopping or periodic:
                self.save(epoch, batch_idx, run)
            if stopping:
                raise Interrupted(
                    f"interrupted at step {self.step} (epoch {epoch + 1}, batch {batch_idx}/{len(self.sampler)}); saved {self.out / 'model.pt'}; "
                    "continue with --resume",
                    stop.requested or signal.SIGTERM,
                )
        if run.epoch_n == 0:
            fail(f"no finite step in epoch {epoch + 1}; {self.kept()}")
        if run.window_n:
            self.write_train_row(epoch, run, run.averages(), t_window)

    def end_epoch(self, epoch: int, stop: StopRequest) -> None:
        """Validation, the collapse and overfitting warnings, the checkpoint and loss.png."""
        epoch_mean = self.run.across_ranks().epoch_sum / self.run.epoch_n
        val = evaluate(self.model, self.val_loader, self.device)
        line = f"Epoch {epoch + 1:02d} finished | Mean Loss {epoch_mean:.4f} | Val Loss {val['loss']:.4f}"
        if self.latent_dim is not None:
            line += f" | Latent std {val['embedding_std']:.4f} | RankMe {val['effective_rank']:.1f}/{self.latent_dim}"
        say(line)
        self.warn(val, epoch_mean)
        self.write_row({"step": self.step, "epoch": epoch + 1, "phase": "val", **val, "time_s": time.perf_counter() - self.t_start})
        self.save(epoch + 1)
        if self.main_rank:
            plot_metrics(self.out / "metrics.csv", self.out / "loss.png", latent_dim=self.latent_dim, title=self.settings.title)
        self.summary = {"epoch": epoch + 1, "step": self.step, "train_loss": epoch_mean, **{f"val_{k}": v for k, v in val.items()}}
        if self.skipped:
            self.summary["skipped_steps"] = self.skipped
        stop_now = torch.tensor([float(stop.requested)])
        if world_size() > 1:
            stop_now = stop_now.to(comm_device())
            dist.all_reduce(stop_now, op=dist.ReduceOp.MAX)
        if stop_now.item() and epoch + 1 < self.settings.epochs:
            raise Interrupted(
                f"interrupted after epoch {epoch + 1} (step {self.step}); saved {self.out / 'model.pt'}; continue with --resume",
                stop.requested or signal.SIGTERM,
            )

    def warn(self, val: dict[str, float], epoch_mean: float) -> None:
        dim = self.latent_dim
        if getattr(self.model, "can_collapse", False) and collapse_warning(val["embedding_std"], val["effective_rank"], dim):
            say(
                f"WARNING: the latents look collapsed (RankMe {val['effective_rank']:.1f} of {dim}, per-dim std "
                f"{val['embedding_std']:.4f}, uniform spread is {1 / math.sqrt(dim):.4f}): a low loss here means "
                "nothing. Train with --reg vicreg (CNN) or larger --std-coeff/--cov-coeff."
            )
        self.history.append((epoch_mean, val["loss"]))
        best = overfitting(self.history)
        if best is not None and not self.warned_overfit:
            self.warned_overfit = True
            (t0, v0), (t1, v1) = self.history[best], self.history[-1]
            say(
                f"WARNING: validation loss has risen {len(self.history) - 1 - best} epochs past its best ({v0:.4f} -> {v1:.4f}) "
                f"while training loss fell ({t0:.4f} -> {t1:.4f}): the model is fitting its training episodes, not the "
                f"env. Use fewer epochs (about {self.start_epoch + best + 1}) or collect more episodes"
            )

    def finish(self) -> None:
        if self.main_rank and not (self.out / "loss.png").exists() and (self.out / "metrics.csv").exists():
            plot_metrics(self.out / "metrics.csv", self.out / "loss.png", latent_dim=self.latent_dim, title=self.settings.title)


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


# ----------------------------------------------------------------------------- a training run


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
FLAG_BEFORE_IT_EXISTED = {"unroll": 1, "lr_schedule": "constant", "repeat_unchanged": 1, "predictor_dilations": []}


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
    by rank 0 for every process. The trainer has checked `cfg` with `check_run_flags` already,
    before importing this module (and torch)."""
    with contextlib.ExitStack() as held:
        return _train_run(cfg, arch=arch, build_model=build_model, hold=held)


def build_checked_model(build_model: Callable, resume_from: dict[str, Any] | None, data: Any, batch_size: int) -> torch.nn.Module:
    """The model (restored from a checkpoint with --resume), refused in one line when it does not
    fit in memory, does not fit the data's frames, or cannot train on batches this small."""
    try:
        model = build_model(resume_from["model_config"] if resume_from else None, data)
    except (RuntimeError, MemoryError) as e:  # a huge --latent-dim etc.: torch's allocator refuses
        if "alloc" not in str(e) and not isinstance(e, MemoryError):
            raise
        fail(f"the model does not fit in memory ({write_error(e)[:80]}...); choose smaller sizes (e.g. --latent-dim)")
    check_data_fits_model(model.model_config(), data, "the checkpoint's model")
    if getattr(model, "can_collapse", False) and batch_size < 2:
        fail(f"--batch-size {batch_size}: a JEPA's VICReg terms are statistics over the batch and need at least 2 samples")
    if resume_from:
        model.load_state_dict(resume_from["model"])
    return model


def prepare_run_dir(cfg: Any, out: Path, hold: contextlib.ExitStack) -> None:
    """Rank 0, before its first write: the run directory locked, apart from the data, cleared of
    a killed run's temp files, and an earlier run moved aside with --overwrite."""
    ckpt_path = out / "model.pt"
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


def fit_settings(cfg: Any, arch: str, epochs: int) -> FitSettings:
    return FitSettings(
        epochs=epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        log_every=cfg.log_every,
        out_dir=Path(cfg.out_dir),
        resume=cfg.resume,
        title=f"{arch} on {printable(Path(cfg.data).name)}",
        compile=cfg.compile,
        amp=cfg.amp,
        save_every=cfg.save_every,
        skip_nonfinite=cfg.skip_nonfinite,
        lr_schedule=cfg.lr_schedule,
    )


def describe(data: Any, train_loader: Any, val_loader: Any, unroll: int, arch: str, model: torch.nn.Module, repeat: int = 1) -> str:
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sampler = train_loader.batch_sampler
    n_train = len(sampler.indices) - sampler.repeated * (repeat - 1)
    repeats = f", the {sampler.repeated} with an unchanged frame drawn {repeat}x" if repeat > 1 else ""
    return (
        f"Data: {len(data)} transitions from {len(np.unique(data.episode))} episodes "
        f"({n_train} train{repeats} / {len(val_loader.batch_sampler.indices)} val"
        f"{f' windows of {unroll} steps' if unroll > 1 else ''}) | "
        f"Model: {arch}, {n_params / 1e6:.2f}M trainable parameters"
    )


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
    out = Path(cfg.out_dir)
    ckpt_path = out / "model.pt"
    resume_from = None
    if cfg.resume:
        resume_from = load_checkpoint(ckpt_path, arch=arch)
        check_same_run(resume_from.get("train_config") or {}, to_jsonable(cfg))
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
            repeat_unchanged=cfg.repeat_unchanged,
        )
        steps_per_epoch = len(train_loader.batch_sampler)
        epochs = cfg.epochs = epochs_for(cfg, steps_per_epoch)  # config.json records the epochs a --steps budget gave
        warn_if_short(epochs * steps_per_epoch, steps_per_epoch, epochs)
        if resume_from and (resume_from.get("data_meta") or {}).get("transitions", len(data)) != len(data):
            fail(
                f"--resume: the run trained on {resume_from['data_meta']['transitions']} transitions but {cfg.data} now holds "
                f"{len(data)}; resume on the same data or start a new run"
            )
        model = build_checked_model(build_model, resume_from, data, cfg.batch_size)
        model.to(device)
        say(describe(data, train_loader, val_loader, cfg.unroll, arch, model, cfg.repeat_unchanged))
        train_config = to_jsonable(cfg)
        if world_size() > 1:
            dist.barrier()  # every rank has read the old run before rank 0 moves or writes anything
        if rank() == 0:
            prepare_run_dir(cfg, out, hold)
            write_json(out / "config.json", {"arch": arch, "train": train_config, "model": model.model_config()})
        data_meta = dict(data.meta, path=str(cfg.data), transitions=len(data), frame_shape=list(data.frame_shape))
        settings = fit_settings(cfg, arch, epochs)
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
