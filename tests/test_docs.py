"""regenerate_docs.py: every generated block in the docs has its recipe, blocks are replaced in
place, and the runner records what it ran so a kept directory resumes."""

import re
import subprocess

import pytest

import regenerate_docs
from regenerate_docs import DocsConfig, Runner, blocks_in_docs, main, replace_generated
from wm_common import UserError


def test_every_generated_block_in_the_docs_has_its_recipe_and_back():
    assert main(DocsConfig(check=True)) == []
    assert blocks_in_docs() == {name: recipe.doc for name, recipe in regenerate_docs.RECIPES.items()}


def test_replace_generated_keeps_the_markers_and_everything_around_them(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- generated: x -->\nold\n<!-- end generated: x -->\nafter\n")
    replace_generated(doc, "x", "new\nlines")
    assert doc.read_text() == "before\n<!-- generated: x -->\nnew\nlines\n<!-- end generated: x -->\nafter\n"
    replace_generated(doc, "x", "again")  # idempotent shape: one block, replaced again
    assert doc.read_text().count("generated: x") == 2 and "new" not in doc.read_text()


def test_a_doc_without_the_block_is_a_one_line_error_and_is_not_touched(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("no markers here\n")
    with pytest.raises(UserError, match="has no <!-- generated: x --> ... <!-- end generated: x --> block"):
        replace_generated(doc, "x", "text")
    assert doc.read_text() == "no markers here\n"


def test_an_unknown_recipe_is_refused_naming_the_known_ones():
    with pytest.raises(UserError, match="unknown recipe 'nope'; choose from: demo-collect"):
        main(DocsConfig(only=["nope"]))


def test_the_runner_records_each_command_and_a_kept_directory_resumes_without_running_it(tmp_path, tiny_npz, monkeypatch):
    printed, seconds = Runner(tmp_path)("minigrid_dataset.py", str(tiny_npz))
    assert "transitions" in printed and seconds > 0

    def no_run(*args, **kwargs):
        raise AssertionError("a recorded command ran again")

    monkeypatch.setattr(subprocess, "run", no_run)
    assert Runner(tmp_path)("minigrid_dataset.py", str(tiny_npz)) == (printed, seconds)


def test_a_failing_command_stops_the_regeneration_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"python minigrid_dataset.py .*missing.npz failed \(exit 2\)"):
        Runner(tmp_path)("minigrid_dataset.py", str(tmp_path / "missing.npz"))
    assert not list((tmp_path / ".regenerate_docs").iterdir())  # nothing recorded for it


def test_the_demo_data_in_the_docs_is_the_data_make_demo_collects():
    """regenerate_docs.py rebuilds the docs from its own copy of `make demo`'s collection: the two
    must not drift apart (the demo's data changed once; a stale copy would document other data)."""
    line = next(
        x for x in (regenerate_docs.ROOT / "Makefile").read_text().splitlines() if "collect_minigrid_data.py" in x and "DEMO_DATA" in x
    )
    make_flags = (
        line.split("collect_minigrid_data.py", 1)[1].replace("$(DEMO_EPISODES)", "80").replace("$(DEMO_DATA)", "data/demo_empty8x8.npz")
    )
    assert make_flags.split() == [*regenerate_docs.DEMO_COLLECT[1:], "--overwrite"]


def test_the_held_out_planning_recipe_in_the_docs_is_make_plan_unseen():
    """The same for `make plan-unseen`'s collection and training budget, with the Makefile's
    defaults filled in (the data's policy changed once)."""
    makefile = (regenerate_docs.ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+) \?= (.*)$", makefile, re.M))
    recipe = makefile.split("\nplan-unseen:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    collect = recipe.split("collect_minigrid_data.py", 1)[1].split("&&", 1)[0]
    collect = collect.replace("$$(( $(EVAL_SEED) + $(PLAN_EPISODES) ))", str(int(defaults["EVAL_SEED"]) + int(defaults["PLAN_EPISODES"])))
    collect = collect.replace("$$size", "72")
    collect = re.sub(r"\$\((\w+)\)", lambda m: defaults[m.group(1)], collect)
    assert collect.split() == [*regenerate_docs.UNSEEN_COLLECT[1:], "--overwrite"]
    assert defaults["ENV"] == regenerate_docs.UNSEEN_ENV and defaults["EVAL_SEED"] == str(regenerate_docs.UNSEEN_SEED)
    assert defaults["PLAN_TRAIN_FLAGS"].split() == list(regenerate_docs.UNSEEN_TRAIN_FLAGS)
