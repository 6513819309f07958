"""`vtransfer demo` end to end with tiny settings: data, pretraining, policy table; a re-run reuses everything."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.demo_run import DEMO_SETTINGS


def test_demo_runs_and_reuses(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        "[demo]\nvideos_per_class = 3\ndemo_frames = 16\ndemo_size = 32\nframes = 10\nsize = 32\n"
        "pretrain_epochs = 1\nepochs = 1\nclips_per_video = 1\nval_clips = 1\npolicies = ['scratch', 'top-layer']\n"
    )
    vtransfer.cli._register_commands()
    out = tmp_path / "demo"
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--out", str(out), "--recipe", str(recipe)])
    assert first.exit_code == 0, first.output
    assert "scrat" in first.output and "top-l" in first.output  # the table (narrow terminal: names are cut)
    table = json.loads((out / "compare" / "compare.json").read_text())
    rows = table["rows"] if isinstance(table, dict) else table
    assert [r["policy"] for r in rows] == ["scratch", "top-layer"]
    assert {"appearance", "motion"} <= set(rows[0]["per_category"])
    for f in ("data/source/categories.csv", "data/target/categories.csv", "pretrain/model.safetensors",
              "compare/top-layer/report/report.html", "compare/compare_categories.png"):
        assert (out / f).exists(), f
    model_stamp = (out / "pretrain" / "model.safetensors").stat().st_mtime_ns
    run_stamp = (out / "compare" / "top-layer" / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["demo", "--out", str(out), "--recipe", str(recipe)])
    assert again.exit_code == 0, again.output
    assert (out / "pretrain" / "model.safetensors").stat().st_mtime_ns == model_stamp
    assert (out / "compare" / "top-layer" / "model.safetensors").stat().st_mtime_ns == run_stamp


def test_demo_recipe_rejects_unknown_keys(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[demo]\nvideos_per_klass = 3\n")
    vtransfer.cli._register_commands()
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--recipe", str(recipe)])
    assert r.exit_code != 0
    assert "videos_per_klass" in str(r.exception) + r.output
    assert "videos_per_class" in DEMO_SETTINGS
