"""Reliability, generated: every numeric flag of every stage, given NaN, inf, -inf, -1, 0
or a huge value (10**12; also 2**63 for int flags, 1e12 for float ones), is refused with one line
`error: ...` that names the flag (exit 2, no traceback, no warning, nothing written) or accepted
because the value means something there: ACCEPTED below gives the reason, one line per entry. NaN
and inf are never accepted. Any other accepted value is what the issue rules out: a value that
silently changes nothing, or that breaks the run later (a hang, a traceback, a NaN loss far from
its cause). The table is exact both ways: a value it accepts that a stage refuses fails too, so it
never describes code that has moved on.

The flags are read from each stage's config dataclass (dataclasses.fields + get_type_hints: int,
float, their `| None` forms, list[int]/list[float] repeat flags), so a numeric flag added later is
probed without touching this file, and fails until the table has a word on it.

Each case runs the stage's command line in-process (as test_reliability does; a subprocess would
cost a torch import each) on the tiny session dataset and a one-epoch checkpoint. The first
expensive step after a stage's checks (the training loop, the collector's episodes, the
inspection, the planner, the ablation's runs, the benchmark's measurements) is replaced by one
that raises `_Accepted`: a stage that gets there has taken the value, and a refusal must come
before it, so before any real work. A watchdog turns a case that hangs before then into a
failure, and a cap on the address space one that allocates without end.

A hypothesis test then draws other members of each category (-7, 3e15, "Infinity", "-0.0", ...)
for random flags: the verdict must be the category's, not the representative's.
"""

import contextlib
import dataclasses
import io
import itertools
import math
import resource
import shutil
import signal
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import HIDDEN_WARNINGS, SCRIPTS

import ablation
import benchmark
import collect_minigrid_data
import inspect_jepa_model
import minigrid_dataset
import plan_with_world_model
import train_jepa
import training
import wm_common

# ----------------------------------------------------------------------------- the stages


class _Accepted(BaseException):
    """Raised in place of a stage's real work: every check has passed. A BaseException, so no
    `except Exception` in a stage can mistake it for a failure of its own."""


class _Hung(BaseException):
    """The watchdog's alarm: the stage was still in its checks after the deadline."""


@dataclasses.dataclass(frozen=True)
class Inputs:
    data: Path  # the tiny session dataset
    run: Path  # a CNN JEPA run directory trained one epoch on it
    root: Path  # a directory for the cases' outputs


@dataclasses.dataclass(frozen=True)
class Stage:
    script: str  # key of CLIS
    argv: Callable[[Inputs, Path], list]  # a valid command line on the tiny inputs, writing under the given path
    work: tuple[object, str]  # (module, name): the first expensive step once every flag is checked


# script -> (module, config class, the keyword arguments its __main__ block gives run_cli)
CLIS = {name: (module, cfg_cls, kw) for name, (_, module, cfg_cls, kw) in SCRIPTS.items()}
CLIS["ablation"] = (ablation, ablation.AblationConfig, {})
CLIS["benchmark"] = (benchmark, benchmark.BenchConfig, {})

# small models: a value that slipped through to building one costs little (the CNN gets no ViT
# flags: it would note each as ignored)
TRAIN = ["--device", "cpu", "--latent-dim", "16", "--batch-size", "16"]
VIT = [*TRAIN, "--mlp-dim", "32"]
STAGES = {
    "collect": Stage("collect", lambda i, o: ["--out", o / "data.npz"], (collect_minigrid_data, "remove_leftovers")),
    "summary": Stage("summary", lambda i, o: [i.data], (minigrid_dataset, "summary")),
    "train_jepa_cnn": Stage("train_jepa", lambda i, o: ["--data", i.data, "--out-dir", o / "run", *TRAIN], (training, "fit")),
    "train_jepa_vit": Stage(
        "train_jepa",
        lambda i, o: ["--arch", "vit", "--data", i.data, "--out-dir", o / "run", *VIT, "--jepa-predictor-hidden-dim", "32"],
        (training, "fit"),
    ),
    "train_encdec": Stage(
        "train_encdec", lambda i, o: ["--data", i.data, "--out-dir", o / "run", *VIT, "--decoder-dim", "16"], (training, "fit")
    ),
    "inspect": Stage(
        "inspect",
        lambda i, o: ["--checkpoint", i.run, "--data", i.data, "--out-dir", o / "inspection", "--device", "cpu"],
        (inspect_jepa_model, "inspect_model"),
    ),
    "plan_exhaustive": Stage(
        "plan",
        lambda i, o: ["--checkpoint", i.run, "--out-dir", o / "planning", "--device", "cpu"],
        (plan_with_world_model, "model_from_checkpoint"),
    ),
    "plan_cem": Stage(
        "plan",
        lambda i, o: ["--checkpoint", i.run, "--out-dir", o / "planning", "--device", "cpu", "--planner", "cem"],
        (plan_with_world_model, "model_from_checkpoint"),
    ),
    "plan_imagined": Stage(
        "plan",
        lambda i, o: ["--checkpoint", i.run, "--out-dir", o / "planning", "--device", "cpu", "--planner", "imagined"],
        (plan_with_world_model, "model_from_checkpoint"),
    ),
    "ablation": Stage(
        "ablation", lambda i, o: ["--data", i.data, "--out-dir", o / "ablation", "--device", "cpu"], (ablation, "train_and_inspect")
    ),
    "benchmark": Stage("benchmark", lambda i, o: ["--out", o / "bench.json", "--device", "cpu"], (benchmark, "bench_collect")),
}


def numeric_flags(cfg_cls: type) -> list[tuple[str, type]]:
    """(field name, int or float) for every numeric field of a config dataclass, `| None` and
    list[...] (repeat flags) included; bool fields are switches, not numbers."""
    hints = typing.get_type_hints(cfg_cls)
    found = []
    for f in dataclasses.fields(cfg_cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (list, tuple):
            tp = typing.get_args(tp)[0]
        if tp in (int, float):
            found.append((f.name, tp))
    return found


# ----------------------------------------------------------------------------- the values

NON_FINITE = ("nan", "inf", "-inf")
# category -> the values every flag gets, and those for one kind of flag only (2**63: past int64,
# the first size C code cannot hold)
VALUES = {"nan": ["nan"], "inf": ["inf"], "-inf": ["-inf"], "-1": ["-1"], "0": ["0"], "huge": [str(10**12)]}
KIND_ONLY = {int: {"huge": [str(2**63)]}, float: {"huge": ["1e12"]}}


@dataclasses.dataclass(frozen=True)
class Case:
    stage: str
    flag: str  # the config field
    kind: type  # int or float
    category: str  # a key of VALUES
    text: str  # the value as typed

    @property
    def option(self) -> str:
        return "--" + self.flag.replace("_", "-")

    @property
    def id(self) -> str:
        return f"{self.stage}{self.option}={self.text}"


# ----------------------------------------------------------------------------- the verdicts


@dataclasses.dataclass(frozen=True)
class Why:
    reason: str
    note: bool  # the stage ignores the value and says so: a stderr line `note: ... --flag ...`


ACCEPTED: dict[tuple[str, str, str], Why] = {}


def accept(stages: str, flags: str, categories: str, reason: str, note: bool = False) -> None:
    for key in itertools.product(stages.split(), flags.split(), categories.split()):
        assert key not in ACCEPTED, key
        ACCEPTED[key] = Why(reason, note)


TRAINERS = "train_jepa_cnn train_jepa_vit train_encdec"
JEPA = "train_jepa_cnn train_jepa_vit"
PLANS = "plan_exhaustive plan_cem plan_imagined"
# (the seeds' upper end, 2**32 - 1, is below 10**12: a huge seed is refused everywhere)
accept(f"collect {TRAINERS} inspect {PLANS} benchmark", "seed", "0", "a seed like any other")
accept("ablation", "seeds", "0", "a seed like any other")
accept("collect", "episodes", "huge", "a budget: episodes go to shards on disk as they come; Ctrl-C keeps them and --resume goes on")
accept("collect", "shard_mb", "huge", "a RAM cap never reached: one shard, written at the end")
accept(TRAINERS, "epochs steps", "huge", "a budget: each step is logged as it goes; Ctrl-C saves a checkpoint that --resume continues")
accept(TRAINERS, "lr", "huge", "a diverging lr: the trainer's non-finite-loss guard stops the first bad step naming --lr (test_cli)")
accept(TRAINERS, "weight_decay", "0", "0: no weight decay, the default")
accept(TRAINERS, "grad_clip", "0", "0: clipping off, as the help says")
accept(TRAINERS, "grad_clip", "huge", "a norm never reached: clipping off, as with 0")
accept(TRAINERS, "log_every", "huge", "a count past every epoch: one train row per epoch, written at its end")
accept(TRAINERS, "num_workers", "0", "0: load in the main process, the default")
accept(TRAINERS, "save_every", "0", "0: checkpoints at epoch ends only, the default")
accept(TRAINERS, "save_every", "huge", "a period past every epoch: epoch-end checkpoints only, as the user asked")
cnn_ignores = "the CNN does not use the ViT's setting, and says so in a note"
accept("train_jepa_cnn", "image_size input_channels patch_size", "-1 0 huge", cnn_ignores, note=True)
accept("train_jepa_cnn", "local_attention", "-1 huge", cnn_ignores, note=True)
accept(TRAINERS, "local_attention", "0", "the default: every patch attends to all (the CNN has no attention)")
weight = "a relative weight: AdamW is blind to the loss's scale, and each epoch's collapse check reports a lopsided mix"
accept(JEPA, "sim_coeff std_coeff cov_coeff idm_coeff smooth_coeff", "huge", weight)
accept(JEPA, "std_coeff cov_coeff idm_coeff smooth_coeff", "0", "0: the term is off, as the help says")
accept(JEPA, "idm_hidden_dim", "0", "the default: the inverse-dynamics head as wide as the predictor")
accept(JEPA, "predictor_hidden_dim", "0", "the default: the CNN predictor's own width (256, --spatial 64)")
accept("train_jepa_cnn", "ema_decay", "0", "the CNN's default --target online does not use the EMA encoder, and says so", note=True)
accept("train_jepa_vit", "ema_decay", "0", "0: the EMA target is the online encoder of the step before, no averaging")
accept("train_encdec", "change_weight", "0", "0: plain MSE, the default")
accept("train_encdec", "change_weight", "huge", "a relative weight: the pixels that change dominate the loss, as asked")
accept("inspect", "max_samples", "huge", "a cap: the held-out split's size bounds it")
accept("inspect", "batch_size", "huge", "one forward pass over at most --max-samples rows")
accept(PLANS, "episodes", "huge", "episodes to plan: the progress bar shows each, at the same cost")
other_planner = "another planner's setting: this one does not use it, and says so"
accept("plan_exhaustive", "samples iterations max_nodes", "huge", other_planner, note=True)
accept("plan_cem", "max_nodes", "huge", other_planner, note=True)
accept(PLANS, "max_nodes", "0", "the default: a search's size taken from the model's latent (8 per position of a spatial map)")
accept("plan_imagined", "horizon samples iterations", "huge", other_planner, note=True)
accept("ablation", "steps", "huge", "the budget each run gets from train_jepa.py --steps (see there)")

BIG, PAST_INT64 = str(10**12), str(2**63)


def cases() -> list:
    out = []
    for name, stage in STAGES.items():
        _, cfg_cls, _ = CLIS[stage.script]
        for flag, kind in numeric_flags(cfg_cls):
            for category, texts in VALUES.items():
                for text in texts + KIND_ONLY[kind].get(category, []):
                    c = Case(name, flag, kind, category, text)
                    out.append(pytest.param(c, id=c.id))
    return out


CASES = cases()

# ----------------------------------------------------------------------------- running a case


@contextlib.contextmanager
def watchdog(seconds: float):
    """Raises _Hung in the main thread after `seconds`, and again every 50 ms until it gets
    through: C code that calls back into Python may swallow one exception."""

    def expire(signum, frame):
        raise _Hung

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_cap(extra: int = 4 << 30):
    """Lets the address space grow by `extra` bytes during a case: a value that slips through to a
    huge allocation fails the case at once (MemoryError) instead of paging the machine to a halt,
    which the watchdog cannot interrupt."""
    statm = Path("/proc/self/statm")
    if not statm.exists():  # not Linux: no cap
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(statm.read_text().split()[0]) * resource.getpagesize()
    cap = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclasses.dataclass
class Outcome:
    accepted: bool
    code: int | None
    out: str
    err: str
    shown: list[str]  # warnings that would print
    wrote: list[str]  # what the case left under its output path


def run_case(c: Case, inputs: Inputs, deadline: float = 10.0) -> Outcome:
    """Runs the case's command line in-process, its outputs under a scratch directory emptied
    afterwards (hundreds of cases leave nothing for pytest to clean up)."""
    where = inputs.root / "case"
    stage = STAGES[c.stage]
    module, cfg_cls, kw = CLIS[stage.script]
    argv = [str(a) for a in (*stage.argv(inputs, where), f"{c.option}={c.text}")]

    def reached(*args, **kwargs):
        raise _Accepted

    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, where, ignore_errors=True)
        stack.enter_context(mock.patch.object(*stage.work, reached))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        try:
            with memory_cap(), watchdog(deadline):
                wm_common.run_cli(module.main, cfg_cls, argv=argv, **kw)
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        except _Accepted:
            pass
        except _Hung:
            pytest.fail(f"{c.id}: still in the stage's checks after {deadline} s (a hang)")
        wrote = sorted(str(p.relative_to(where)) for p in where.rglob("*")) if where.exists() else []
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
    return Outcome(code is None, code, out.getvalue(), err.getvalue(), shown, wrote)


def check(c: Case, o: Outcome) -> None:
    """The property, for one case and what the stage did with it."""
    why = ACCEPTED.get((c.stage, c.flag, c.category))
    said = f"{c.id}: exit {o.code}\nstdout:\n{o.out}\nstderr:\n{o.err}"
    assert "Traceback" not in o.out + o.err, said
    if o.accepted:
        assert c.category not in NON_FINITE, f"{c.id}: a non-finite value was accepted"
        assert why is not None, f"{c.id} was accepted: refuse it in one line, or give ACCEPTED the reason it means something"
        if why.note:
            assert any(line.startswith("note:") and c.option in line for line in o.err.splitlines()), (
                f"{c.id}: no note that it is ignored\n{said}"
            )
        return
    assert o.code == 2, said
    lines = o.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), said
    # config.yaml spells the ViT's settings as keys (image_size, num_heads), and so do their messages
    assert c.option in lines[0] or c.flag in lines[0], f"{c.id}: the error does not name {c.option}: {lines[0]}"
    assert not o.shown, o.shown
    assert not o.wrote, f"{c.id}: refused, but wrote {o.wrote}"
    assert why is None, f"{c.id}: refused ({lines[0]}), but ACCEPTED says: {why.reason}"


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_npz, tiny_run) -> Inputs:
    # the session's shared one-epoch CNN: the stages only read it, each writing under its own --out-dir
    return Inputs(data=tiny_npz, run=tiny_run("cnn")[0], root=tmp_path_factory.mktemp("flag_properties") / "cases")


@pytest.mark.parametrize("c", CASES)
def test_numeric_flag_is_refused_in_one_line_or_accepted_for_a_reason(c, inputs, monkeypatch):
    monkeypatch.chdir(inputs.root.parent)  # a stage falling back to a relative default path writes there
    check(c, run_case(c, inputs, deadline=10.0))


# Other members of each category. Spellings float() takes ("Infinity", "1e999" overflows to inf,
# "-0.0"); any negative (a subnormal one too); huge values from past every seed (2**32) to past
# int64.
SPELLINGS = {
    "nan": ["nan", "NaN", "-nan", "+NAN"],
    "inf": ["inf", "+inf", "Infinity", "1e999"],
    "-inf": ["-inf", "-Infinity", "-1e999"],
}
ZEROS = {int: ["0", "-0", "00", "+0"], float: ["0", "-0", "00", "+0", "0.0", "-0.0", "0e5", ".0"]}
FINITE = dict(allow_nan=False, allow_infinity=False)
MEMBERS = {
    (int, "-1"): st.integers(max_value=-1).map(str),
    (float, "-1"): st.floats(max_value=-math.ulp(0.0), **FINITE).map(repr),
    (int, "huge"): st.integers(min_value=10**10, max_value=10**30).map(str),
    (float, "huge"): st.floats(min_value=1e10, **FINITE).map(repr),
}
KINDS = sorted({(c.stage, c.flag, c.kind.__name__, c.category) for p in CASES for c in p.values})


def members(kind: type, category: str) -> st.SearchStrategy[str]:
    if category in SPELLINGS:
        return st.sampled_from(SPELLINGS[category])
    if category == "0":
        return st.sampled_from(ZEROS[kind])
    return MEMBERS[kind, category]


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_member_of_a_category_gets_the_categorys_verdict(inputs, monkeypatch, data):
    stage, flag, kind_name, category = data.draw(st.sampled_from(KINDS), label="flag")
    kind = {"int": int, "float": float}[kind_name]
    c = Case(stage, flag, kind, category, data.draw(members(kind, category), label="value"))
    monkeypatch.chdir(inputs.root.parent)
    check(c, run_case(c, inputs))


def test_every_stage_is_probed():
    assert {s.script for s in STAGES.values()} == set(CLIS) >= {*SCRIPTS, "ablation", "benchmark"}


def test_numeric_flags_reads_every_numeric_type():
    flags = dict(numeric_flags(train_jepa.TrainConfig))
    assert flags["epochs"] is int and flags["sim_coeff"] is float and flags["lr"] is float  # int | None, float | None, float
    assert "resume" not in flags and "device" not in flags  # switches and words are not numbers
    assert dict(numeric_flags(ablation.AblationConfig)) == {"steps": int, "seeds": int}  # seeds: a list[int] repeat flag


def test_the_tables_name_only_real_cases():
    keys = {(c.stage, c.flag, c.category) for p in CASES for c in p.values}
    assert set(ACCEPTED) <= keys, set(ACCEPTED) - keys
