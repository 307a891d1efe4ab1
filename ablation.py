"""Which parts of the JEPA objective matter? Trains the default model and one variant per
removed (or swapped) term on the same data, budget and seeds, inspects each on the held-out
episodes, and writes the table docs/training.md shows.

    python ablation.py --data data/demo_empty8x8.npz --steps 800 --seeds 0 1 --out-dir ablation

Writes `<out-dir>/ablation.json` (every variant's flags and metrics per seed) and
`<out-dir>/ablation.md` (mean and spread over the seeds): open-loop rollout error at 1/5/10
steps (1 = chance) beside the copy baseline, the probe of the agent's cell on the predicted
latent at 1 and 5 steps, RankMe, and training time. Each run keeps its run directory and
inspection under `<out-dir>/<variant>/seed<k>/`, so an interrupted ablation continues where it
stopped (finished runs are read back, not retrained).
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wm_common import atomic_write, check_writable_dir, fail, replace_between, run_cli, write_json

# variant -> the train_jepa.py flags that differ from its defaults
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "one-step (--unroll 1)": {"unroll": 1},
    "no inverse dynamics (--idm-coeff 0)": {"idm_coeff": 0.0},
    "no VICReg (--reg none)": {"reg": "none"},
    "VICReg on every frame (--vc-all-steps)": {"vc_all_steps": True},
    "plain predictor (--no-residual)": {"residual": False},
    "EMA target encoder (--target ema)": {"target": "ema"},
    "with smoothness (--smooth-coeff 0.1)": {"smooth_coeff": 0.1},
    "unit-vector prediction loss (--pred-loss normalized)": {"pred_loss": "normalized"},
    "seed 003 (--unroll 1 --reg none --idm-coeff 0 --no-residual --pred-loss normalized --target ema)": {
        "pred_loss": "normalized",
        "target": "ema",
        "unroll": 1,
        "reg": "none",
        "idm_coeff": 0.0,
        "residual": False,
    },
}
REPORT_HORIZONS = (1, 5, 10)
MARKERS = ("<!-- ablation table: start -->", "<!-- ablation table: end -->")
PROBE_HORIZONS = (1, 5)


@dataclass
class AblationConfig:
    data: str = field(default="data/demo_empty8x8.npz", metadata={"help": "transitions to train and evaluate on"})
    out_dir: str = field(default="ablation", metadata={"help": "where runs, ablation.json and ablation.md go"})
    arch: str = field(default="cnn", metadata={"help": "JEPA architecture", "choices": ["cnn", "vit"]})
    steps: int = field(default=800, metadata={"help": "optimizer steps per run (the same budget for every variant)"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "training seeds (mean and spread)", "repeat": True})
    variants: list[str] = field(
        default_factory=list, metadata={"help": f"names of variants to run (default: all): {'; '.join(VARIANTS)}", "repeat": True}
    )
    config: str = field(default="", metadata={"help": "YAML of train_jepa.py keys shared by every run (e.g. config.yaml for --arch vit)"})
    device: str = field(default="auto", metadata={"help": "auto picks cuda, then mps, then cpu", "choices": ["auto", "cpu", "cuda", "mps"]})
    readme: str = field(default="", metadata={"help": f"also put the table into this markdown file, between {MARKERS[0]} and {MARKERS[1]}"})


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_")


def train_and_inspect(cfg: AblationConfig, name: str, seed: int) -> dict[str, Any]:
    """One variant and seed: train (unless a finished run is there), inspect, return its metrics."""
    import inspect_jepa_model
    import train_jepa
    from wm_common import load_yaml_config

    run = Path(cfg.out_dir) / slug(name) / f"seed{seed}"
    done = run / "metrics.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        # JSON keys are strings: the horizons come back as the ints a fresh run has
        for key in ("rollout_error", "copy_baseline_error", "predicted_cell_probe"):
            saved[key] = {int(h): v for h, v in saved[key].items()}
        return saved
    base = (
        load_yaml_config(
            cfg.config, train_jepa.TrainConfig, train_jepa.SEED000_ALIASES, train_jepa.SEED000_COLLECTION_KEYS + train_jepa.ENCDEC_KEYS
        )
        if cfg.config
        else {}
    )
    base.pop("epochs", None)  # the budget is --steps, the same for every variant
    flags = {**base, **VARIANTS[name]}
    train_cfg = train_jepa.TrainConfig(
        **flags, arch=cfg.arch, data=cfg.data, steps=cfg.steps, seed=seed, out_dir=str(run / "model"), device=cfg.device, overwrite=True
    )
    t0 = time.perf_counter()
    train_jepa.main(train_cfg)
    seconds = time.perf_counter() - t0
    report = inspect_jepa_model.main(
        inspect_jepa_model.InspectConfig(
            checkpoint=[str(run / "model")],
            data=cfg.data,
            out_dir=str(run / "inspection"),
            device=cfg.device,
            probe_horizons=list(PROBE_HORIZONS),
        )
    )
    (model,) = report["models"].values()
    metrics = summarise(model, seconds, flags)
    write_json(done, metrics)
    return metrics


def summarise(model: dict[str, Any], seconds: float, flags: dict[str, Any]) -> dict[str, Any]:
    ro = model["rollout"]
    at = {h: i for i, h in enumerate(ro["horizons"])}
    pp = model.get("probe_predicted") or {}
    probe = dict(zip(pp.get("horizons", []), pp.get("agent_pos_acc", []), strict=True))
    return {
        "flags": flags,
        "rollout_error": {h: ro["error"][at[h]] for h in REPORT_HORIZONS},
        "copy_baseline_error": {h: ro["copy_baseline_error"][at[h]] for h in REPORT_HORIZONS},
        "predicted_cell_probe": {h: probe.get(h) for h in PROBE_HORIZONS},
        "effective_rank": model["effective_rank"],
        "train_seconds": seconds,
    }


def cell(values: list[float | None], digits: int = 2) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}"


def table(results: dict[str, list[dict[str, Any]]], cfg: AblationConfig) -> str:
    hs = "/".join(map(str, REPORT_HORIZONS))
    lines = [
        f"Data `{Path(cfg.data).name}`, {cfg.arch} JEPA, {cfg.steps} optimizer steps per run, seeds {' '.join(map(str, cfg.seeds))} "
        f"(mean ± std over seeds). Rollout error: open-loop from the held-out episodes' frames, squared distance of unit "
        f"latents / that of the best constant guess (1 = chance). Probe: the agent's cell read by a linear probe from the "
        f"predicted latent. Regenerate with `python ablation.py --data {cfg.data} --steps {cfg.steps} --seeds {' '.join(map(str, cfg.seeds))}`.",
        "",
        f"| variant | rollout error @{hs} | copy baseline @{hs} | cell probe on prediction @1/5 | RankMe | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        ro = " / ".join(cell([r["rollout_error"][h] for r in runs]) for h in REPORT_HORIZONS)
        cp = " / ".join(cell([r["copy_baseline_error"][h] for r in runs]) for h in REPORT_HORIZONS)
        pr = " / ".join(cell([r["predicted_cell_probe"][h] for r in runs]) for h in PROBE_HORIZONS)
        rk = cell([r["effective_rank"] for r in runs], 1)
        lines.append(f"| {name} | {ro} | {cp} | {pr} | {rk} | {cell([r['train_seconds'] for r in runs], 0)} |")
    return "\n".join(lines) + "\n"


def main(cfg: AblationConfig) -> dict[str, Any]:
    names = cfg.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        fail(f"unknown variant {unknown[0]!r}; choose from: {'; '.join(VARIANTS)}")
    if cfg.steps < 1:
        fail(f"--steps must be at least 1, got {cfg.steps}")
    if not cfg.seeds:
        fail("give at least one --seeds value")
    for s in cfg.seeds:
        if not 0 <= s < 2**32:
            fail(f"--seeds must each be from 0 to 2**32 - 1, got {s}")
    if cfg.readme and (not Path(cfg.readme).is_file() or MARKERS[0] not in Path(cfg.readme).read_text()):
        fail(f"{cfg.readme} has no {MARKERS[0]} line to put the table after")
    if not Path(cfg.data).exists():
        fail(f"data {cfg.data} not found; run collect_minigrid_data.py first (make demo collects data/demo_empty8x8.npz)")
    out = check_writable_dir(cfg.out_dir, "--out-dir")
    results = {n: [train_and_inspect(cfg, n, s) for s in cfg.seeds] for n in names}
    summary = {"data": cfg.data, "arch": cfg.arch, "steps": cfg.steps, "seeds": cfg.seeds, "variants": results}
    write_json(out / "ablation.json", summary)
    text = table(results, cfg)
    atomic_write(out / "ablation.md", lambda p: p.write_text(text))
    if cfg.readme:
        replace_between(Path(cfg.readme), *MARKERS, text)
    print(text)
    return summary


if __name__ == "__main__":
    run_cli(main, AblationConfig, description=__doc__.split("\n\n")[0])
