"""Rebuilds every printed example and results table in README.md and docs/ from the current code.

    python regenerate_docs.py                     # the quick recipes (~15 min on 2 CPU cores)
    python regenerate_docs.py --only demo-train   # one recipe
    python regenerate_docs.py --long              # also the long ones (held-out planning, three training seeds: ~50 min on 2 cores)
    python regenerate_docs.py --check             # only check that the docs' blocks and the recipes match

Each generated block sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->`
lines. Its recipe here runs the real scripts as a user would, in a scratch directory (so that the
paths printed are the ones the docs show), and writes the commands, what they printed and how
long they took on this machine. Nothing in a block is typed by hand: edit the recipe instead.
The ablation table in docs/training.md is rebuilt the same way by `make ablation`.
"""

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wm_common import atomic_write, fail, replace_between, run_cli

ROOT = Path(__file__).resolve().parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEMO = "data/demo_empty8x8.npz"
DEMO_COLLECT = (
    "collect_minigrid_data.py",
    "--env",
    "MiniGrid-Empty-8x8-v0",
    "--episodes",
    "80",
    "--actions",
    "nav",
    "--through-goal",
    "--max-steps",
    "200",
    "--seed",
    "0",
    "--out",
    DEMO,
)
PARTIAL = "data/partial.npz"
GENERATED = ("<!-- generated: ", "<!-- end generated: ")


@dataclass
class DocsConfig:
    only: list[str] = field(default_factory=list, metadata={"help": "recipes to run (default: every quick one)", "repeat": True})
    long: bool = field(default=False, metadata={"help": "also run the long recipes (~50 min on 2 cores)"})
    check: bool = field(default=False, metadata={"help": "only check that every block in the docs has a recipe and back"})
    train_seeds: int = field(default=3, metadata={"help": "training seeds of the held-out planning recipe (mean and spread)"})
    keep: str = field(
        default="", metadata={"help": "run in this directory and keep it; run again, it resumes (default: a temporary one, removed)"}
    )


def replace_generated(path: Path, name: str, text: str) -> None:
    """Puts `text` into the doc's generated block `name`, keeping its markers."""
    replace_between(path, f"{GENERATED[0]}{name} -->", f"{GENERATED[1]}{name} -->", text)


class Runner:
    """Runs stage scripts in the scratch directory, each distinct command once. What a command
    printed and how long it took is recorded in the directory, so a kept one (`--keep`) resumes
    where an interrupted regeneration stopped."""

    def __init__(self, work: Path, train_seeds: int = 3):
        self.work, self.records, self.train_seeds = work, work / ".regenerate_docs", train_seeds
        self.records.mkdir(exist_ok=True)
        self.loads: dict[tuple[str, ...], float | None] = {}  # load average when each command ended

    def __call__(self, script: str, *args: str) -> tuple[str, float]:
        """-> (what the script printed on stdout, seconds it took). A failure stops everything: a
        doc must never show the output of a broken run."""
        key = (script, *args)
        record = self.records / (hashlib.sha1(json.dumps(key).encode()).hexdigest() + ".json")
        if not record.is_file():
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=self.work, capture_output=True, text=True)
            if proc.returncode != 0:
                fail(f"{shell(key)} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            done = {"command": key, "stdout": proc.stdout, "seconds": time.perf_counter() - start, "load": os.getloadavg()[0]}
            atomic_write(record, lambda p: p.write_text(json.dumps(done)))
        done = json.loads(record.read_text())
        self.loads[key] = done.get("load")
        return done["stdout"], done["seconds"]


def shell(command: tuple[str, ...]) -> str:
    return "python " + " ".join(shlex.quote(a) for a in command)


def took(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def commands_block(run: Runner, *commands: tuple[str, ...]) -> str:
    """The commands as a bash block, each with the time it took here and the machine's load
    average (1 min) when it ended: times taken while other jobs ran are not the script's alone."""
    lines = []
    for c in commands:
        seconds = run(*c)[1]
        load = run.loads.get(c)
        lines.append(f"{shell(c)}   # {took(seconds)}" + (f", load {load:.1f}" if load is not None else ""))
    return (
        "```bash\n"
        + "\n".join(lines)
        + f"\n```\n\n(times on {os.cpu_count()} CPU cores; `load` is the load average when the command ended)"
    )


def abridged(text: str, keep_head: int, keep_tail: int) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) <= keep_head + keep_tail + 1:
        return "\n".join(lines)
    return "\n".join([*lines[:keep_head], "...", *lines[-keep_tail:]])


def demo_collect(run: Runner) -> str:
    printed = run(*DEMO_COLLECT)[0].strip().splitlines()[-1]
    return f"Prints `{printed}`."


def demo_summary(run: Runner) -> str:
    run(*DEMO_COLLECT)
    command = ("minigrid_dataset.py", DEMO)
    return f"{commands_block(run, command)}\n\nprints\n\n```\n{run(*command)[0].rstrip()}\n```"


def demo_train(run: Runner) -> str:
    run(*DEMO_COLLECT)
    command = ("train_jepa.py", "--arch", "cnn", "--data", DEMO, "--epochs", "3", "--seed", "0", "--out-dir", "checkpoints/jepa_cnn")
    printed = [line for line in run(*command)[0].splitlines() if "Batch" not in line or "Batch 0100" in line]
    return f"{commands_block(run, command)}\n\nprints (the per-100-batch lines after the first left out)\n\n```\n{abridged(chr(10).join(printed), 4, 2)}\n```"


def three_models(run: Runner, data: str, runs: str) -> list[tuple[str, ...]]:
    """Train the CNN JEPA, the ViT JEPA and the encoder-decoder on `data`, inspect them side by
    side: the commands, in order."""
    return [
        ("train_jepa.py", "--arch", "cnn", "--data", data, "--out-dir", f"{runs}/jepa_cnn"),
        ("train_jepa.py", "--arch", "vit", "--config", "config.yaml", "--data", data, "--out-dir", f"{runs}/jepa_vit"),
        ("train_encdec.py", "--config", "config.yaml", "--data", data, "--out-dir", f"{runs}/encdec_vit"),
        (
            "inspect_jepa_model.py",
            *("--checkpoint", f"{runs}/jepa_cnn", "--checkpoint", f"{runs}/jepa_vit", "--checkpoint", f"{runs}/encdec_vit"),
            *("--data", data, "--out-dir", f"{runs}/inspection"),
        ),
    ]


def compared(run: Runner, commands: list[tuple[str, ...]], runs: str, preamble: tuple[str, ...] = ()) -> str:
    for command in commands:
        run(*command)
    table = (run.work / runs / "inspection" / "compare.md").read_text().strip()
    shown = commands_block(run, *([preamble] if preamble else []), *commands)
    return f"{shown}\n\nwrote `{runs}/inspection/compare.md`:\n\n{table}"


def comparison(run: Runner) -> str:
    run(*DEMO_COLLECT)
    return compared(run, three_models(run, DEMO, "runs/demo"), "runs/demo")


def egocentric(run: Runner) -> str:
    collect = ("collect_minigrid_data.py", "--env", "MiniGrid-Empty-8x8-v0", "--episodes", "80", "--actions", "nav")
    collect += ("--obs", "rgb_partial", "--start", "random", "--seed", "0", "--out", PARTIAL)
    run(*collect)
    return compared(run, three_models(run, PARTIAL, "runs/partial"), "runs/partial", preamble=collect)


def plan_row(run: Runner, label: str, plan_dir: str) -> str:
    r = json.loads((run.work / plan_dir / "plan.json").read_text())
    steps = f"{r['mean_steps']:.1f} ({r['oracle_mean_steps']:.1f}, {r['steps_over_oracle']:.2f}x)" if r["success_rate"] else "-"
    where = r["evaluated_on"]["summary"]
    planner = r["planner"] + (f", {r['cost']}" if r["planner"] != "imagined" else "")
    random = f"{r['random_success_rate']:.2f}"
    return f"| {label} | {r['env'].removeprefix('MiniGrid-')} | {planner} | {where} | **{r['success_rate']:.2f}** | {steps} | {random} | {r['seconds_per_episode']:.2f} |"


PLAN_HEADER = "| model | env | planner, cost | evaluated on | success | mean steps (oracle, ratio) | random policy | s / episode |\n|---|---|---|---|---|---|---|---|"


def plan_demo(run: Runner) -> str:
    """`make plan` and its neighbours on the demo's model: the planners and costs side by side."""
    run(*DEMO_COLLECT)
    train = ("train_jepa.py", "--arch", "cnn", "--data", DEMO, "--epochs", "3", "--seed", "0", "--out-dir", "checkpoints/jepa_cnn")
    run(*train)
    variants = {"planning": (), "planning_cem": ("--planner", "cem"), "planning_latent": ("--cost", "latent")}
    plans = [
        ("plan_with_world_model.py", "--checkpoint", "checkpoints/jepa_cnn", "--episodes", "20", "--out-dir", out, *extra)
        for out, extra in variants.items()
    ]
    for command in plans:
        run(*command)
    rows = [plan_row(run, "CNN JEPA (`make demo`)", out) for out in variants]
    return f"{commands_block(run, *plans)}\n\n{PLAN_HEADER}\n" + "\n".join(rows)


UNSEEN_ENV, UNSEEN_SEED = "MiniGrid-SimpleCrossingS9N1-v0", 10000
UNSEEN_DATA = "plan_unseen/data.npz"
# `make plan-unseen`'s collection with its defaults (a test keeps the two the same)
UNSEEN_COLLECT = (
    ("collect_minigrid_data.py", "--env", UNSEEN_ENV, "--episodes", "250", "--max-steps", "60", "--seed", "0")
    + ("--exclude-layouts", f"{UNSEEN_SEED}:{UNSEEN_SEED + 20}", "--through-goal", "--start", "random", "--actions", "nav")
    + ("--policy", "waypoints", "--image-size", "72", "--out", UNSEEN_DATA)
)
UNSEEN_TRAIN_FLAGS = ("--steps", "4000", "--compile")


def unseen_runs(run: Runner) -> tuple[tuple[str, ...], list[tuple[str, ...]], list[tuple[str, ...]], list[dict]]:
    """`make plan-unseen`'s default row with `--train-seeds` training seeds: SimpleCrossingS9N1,
    the 20 evaluation layouts left out of training, the same data for every seed. -> (the
    collection, the trainings, the plans, each plan's plan.json); the runs are recorded, so a
    second call costs nothing."""
    run(*UNSEEN_COLLECT)
    trains, plans = [], []
    for seed in (str(seed) for seed in range(run.train_seeds)):
        model = f"plan_unseen/model_seed{seed}"
        trains.append(
            ("train_jepa.py", "--arch", "cnn", "--spatial", "--data", UNSEEN_DATA, "--seed", seed, "--out-dir", model, *UNSEEN_TRAIN_FLAGS)
        )
        plans.append(
            ("plan_with_world_model.py", "--checkpoint", model, "--planner", "imagined", "--env", UNSEEN_ENV)
            + ("--seed", str(UNSEEN_SEED), "--episodes", "20", "--out-dir", f"plan_unseen/plan_seed{seed}")
        )
    # one after another, each with every core: the training time each reports is the recipe's own
    for command in (*trains, *plans):
        run(*command)
    results = [json.loads((run.work / plan[plan.index("--out-dir") + 1] / "plan.json").read_text()) for plan in plans]
    return UNSEEN_COLLECT, trains, plans, results


def success_summary(results: list[dict]) -> str:
    rates = [r["success_rate"] for r in results]
    mean = sum(rates) / len(rates)
    spread = (sum((x - mean) ** 2 for x in rates) / max(1, len(rates) - 1)) ** 0.5
    return f"Success over the {len(rates)} training seeds: **{mean:.2f} ± {spread:.2f}** (mean ± sample std)."


def plan_unseen(run: Runner) -> str:
    """The held-out planning block of docs/planning.md: every command, one row per training seed."""
    collect, trains, plans, results = unseen_runs(run)
    rows = [plan_row(run, f"spatial CNN JEPA, training seed {seed}", plan[plan.index("--out-dir") + 1]) for seed, plan in enumerate(plans)]
    return f"{commands_block(run, collect, *trains, *plans)}\n\n{PLAN_HEADER}\n" + "\n".join(rows) + f"\n\n{success_summary(results)}"


def unseen_summary(run: Runner) -> str:
    """The README's short table of the same runs."""
    _, trains, _, results = unseen_runs(run)
    lines = [
        "| training seed | success | steps over the oracle | random policy | s / episode | training time |",
        "|---|---|---|---|---|---|",
    ]
    for seed, (train, r) in enumerate(zip(trains, results, strict=True)):
        ratio = f"{r['steps_over_oracle']:.2f}x" if r["success_rate"] else "-"
        lines.append(
            f"| {seed} | **{r['success_rate']:.2f}** | {ratio} | {r['random_success_rate']:.2f} | {r['seconds_per_episode']:.2f} | {took(run(*train)[1])} |"
        )
    where = results[0]["evaluated_on"]["summary"]
    return (
        f"{UNSEEN_ENV.removeprefix('MiniGrid-')}, {where}; pure latent planning (`--planner imagined`), {os.cpu_count()} CPU cores.\n\n"
        + "\n".join(lines)
        + f"\n\n{success_summary(results)}"
    )


def bench(run: Runner) -> str:
    """benchmark.py's ratios as a table (meaningful on an otherwise idle machine: see the load)."""
    from benchmark import summary_rows

    command = ("benchmark.py", "--out", "bench.json")
    run(*command)
    rows = summary_rows(json.loads((run.work / "bench.json").read_text()))
    table = "\n".join(f"| {name} | {ratio:.2f} | {detail} |" for name, ratio, detail in rows)
    return f"{commands_block(run, command)}\n\n| figure | ratio | measured |\n|---|---|---|\n{table}"


@dataclass
class Recipe:
    doc: str  # the file, relative to the repo, whose block it fills
    build: Callable[[Runner], str]
    long: bool = False


RECIPES = {
    "demo-collect": Recipe("docs/data.md", demo_collect),
    "demo-summary": Recipe("docs/data.md", demo_summary),
    "demo-train": Recipe("docs/training.md", demo_train),
    "comparison": Recipe("docs/inspection.md", comparison),
    "egocentric": Recipe("docs/inspection.md", egocentric),
    "plan-demo": Recipe("docs/planning.md", plan_demo),
    "benchmark": Recipe("docs/performance.md", bench),
    "plan-unseen": Recipe("docs/planning.md", plan_unseen, long=True),
    "plan-unseen-summary": Recipe("README.md", unseen_summary, long=True),
}


def blocks_in_docs() -> dict[str, str]:
    """Every generated block's name -> the doc it is in (relative to the repo)."""
    found: dict[str, str] = {}
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            if line.startswith(GENERATED[0]) and line.endswith(" -->"):
                found[line.removeprefix(GENERATED[0]).removesuffix(" -->")] = str(doc.relative_to(ROOT))
    return found


def check() -> None:
    found = blocks_in_docs()
    for name, recipe in RECIPES.items():
        if found.get(name) != recipe.doc:
            fail(f"{recipe.doc} has no generated block {name!r} (its recipe has nowhere to write)")
    for name, doc in found.items():
        if name not in RECIPES:
            fail(f"{doc} has a generated block {name!r} that no recipe fills")


def main(cfg: DocsConfig) -> list[str]:
    """Runs the chosen recipes and rewrites their blocks; returns the names rebuilt."""
    check()
    unknown = [n for n in cfg.only if n not in RECIPES]
    if unknown:
        fail(f"unknown recipe {unknown[0]!r}; choose from: {', '.join(RECIPES)}")
    if cfg.train_seeds < 1:
        fail(f"--train-seeds must be at least 1, got {cfg.train_seeds}")
    if cfg.check:
        print(f"ok: {len(RECIPES)} generated blocks, each with its recipe")
        return []
    names = cfg.only or [n for n, r in RECIPES.items() if cfg.long or not r.long]
    with tempfile.TemporaryDirectory(prefix="regenerate_docs_") as tmp:
        work = Path(cfg.keep or tmp)
        for sub in ("data", "runs"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        (work / "config.yaml").write_text((ROOT / "config.yaml").read_text())
        run = Runner(work, cfg.train_seeds)
        for name in names:
            start = time.perf_counter()
            replace_generated(ROOT / RECIPES[name].doc, name, RECIPES[name].build(run))
            print(f"{name}: {RECIPES[name].doc} rebuilt ({took(time.perf_counter() - start)})", flush=True)
    return names


if __name__ == "__main__":
    run_cli(main, DocsConfig, description=__doc__)
