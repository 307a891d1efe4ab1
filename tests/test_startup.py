"""Start-up without torch: every stage script answers --help, and the user errors it can find
before it needs torch (a bad flag, a missing file), without importing torch, which takes a second.

Each script runs in its own interpreter (all at once, so the module takes about as long as the
slowest), its command lines one after the other through runpy as `__main__`, as `python
script.py ...` would; after each, the interpreter reports whether torch is in sys.modules. The
working directory is a scratch one, so the scripts' default paths (data/..., checkpoints/...)
name nothing there."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

# script -> command lines: --help, then user errors with a fragment of their one-line message
CASES = {
    "collect_minigrid_data.py": [
        (["--help"], None),
        (["--episodes", "0"], "--episodes must be at least 1"),
        (["--out", "x.h5"], "must end in .npz"),
    ],
    "minigrid_dataset.py": [
        (["--help"], None),
        (["missing.npz"], "not found"),
        (["junk.npz"], "is not an .npz"),
    ],
    "train_jepa.py": [
        (["--help"], None),
        (["--data", "missing.npz"], "not found"),
        (["--lr", "nan"], "--lr must be positive"),
    ],
    "train_encdec.py": [
        (["--help"], None),
        (["--data", "missing.npz"], "not found"),
        (["--num-examples", "0"], "--num-examples must be from 1"),
    ],
    "inspect_jepa_model.py": [
        (["--help"], None),
        ([], "give at least one --checkpoint"),
        (["--checkpoint", "missing"], "not found"),
    ],
    "plan_with_world_model.py": [
        (["--help"], None),
        (["--checkpoint", "missing"], "not found"),
        (["--episodes", "0"], "--episodes must be at least 1"),
    ],
    "benchmark.py": [
        (["--help"], None),
        (["--train-steps", "0"], "--train-steps must be at least 1"),
    ],
    "ablation.py": [
        (["--help"], None),
        (["--data", "missing.npz"], "not found"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
}

# Runs each command line of one script in this interpreter and prints one JSON line per run.
RUNNER = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
script = sys.argv[1] + "/" + sys.argv[2]
for argv in json.loads(sys.argv[3]):
    sys.argv = [script, *argv]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "torch": "torch" in sys.modules}), flush=True)
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    """script -> one result per command line of CASES, all scripts run in parallel."""
    cwd = tmp_path_factory.mktemp("startup")
    (cwd / "junk.npz").write_bytes(b"not a zip archive")
    procs = {
        script: subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(ROOT), script, json.dumps([argv for argv, _ in cases])],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, cases in CASES.items()
    }
    out = {}
    for script, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{script}: the runner failed\n{stderr}"
        out[script] = [json.loads(line) for line in stdout.splitlines()]
    return out


@pytest.mark.parametrize("script", CASES)
def test_help_and_early_errors_do_not_import_torch(script, results):
    for (argv, fragment), r in zip(CASES[script], results[script], strict=True):
        said = f"{script} {' '.join(argv)}: exit {r['code']}\nstdout:\n{r['out']}\nstderr:\n{r['err']}"
        if fragment is None:
            assert r["code"] == 0 and r["out"].startswith("usage: "), said
        else:
            lines = r["err"].strip().splitlines()
            assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], said
        assert not r["torch"], f"{script} {' '.join(argv)} imported torch"
