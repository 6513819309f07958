"""`vtransfer demo` end to end with tiny settings: data, pretraining, policy table; a re-run reuses everything."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.demo import DEMO_SETTINGS


def test_demo_runs_and_reuses(tmp_path, home):  # offline: the demo's weights come from an installed package
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        "[demo]\ntarget_videos_per_class = 4\ndemo_frames = 12\ndemo_size = 48\nframes = 4\nsize = 48\n"
        "epochs = 1\nclips_per_video = 1\nval_clips = 1\npolicies = ['scratch', 'top-layer']\n"
    )
    vtransfer.cli._register_commands()
    out = tmp_path / "demo"
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--out", str(out), "--recipe", str(recipe)])
    assert first.exit_code == 0, first.output
    assert "scrat" in first.output and "top-l" in first.output  # the table (narrow terminal: names are cut)
    assert "policy top-layer" in first.output  # each policy's phase says which policy trains
    table = json.loads((out / "compare" / "compare.json").read_text())
    rows = table["rows"] if isinstance(table, dict) else table
    assert [r["policy"] for r in rows] == ["scratch", "top-layer"]
    assert {"appearance", "motion"} <= set(rows[0]["per_category"])
    config = json.loads((out / "compare" / "top-layer" / "config.json").read_text())
    assert config["resolved"]["weights"]["source"] == "effnet3d:imagenet"
    streams = json.loads((out / "streams" / "compare.json").read_text())
    streams = streams["rows"] if isinstance(streams, dict) else streams
    assert [(r["policy"], r["stream"]) for r in streams] == [("top-layer", "rgb"), ("top-layer", "flow"),
                                                             ("top-layer", "two-stream")]
    assert "two-stream" in first.output
    flow_config = json.loads((out / "streams" / "top-layer" / "flow" / "config.json").read_text())
    assert flow_config["options"]["flow_channels"] == 3  # x, y and magnitude: what a frozen flow network tells apart
    assert json.loads((out / "compare" / "top-layer" / "config.json").read_text())["options"]["stream"] == "rgb"
    for f in ("data/target/categories.csv", "compare/top-layer/report/report.html", "compare/compare_categories.png"):
        assert (out / f).exists(), f
    run_stamp = (out / "compare" / "top-layer" / "model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["demo", "--out", str(out), "--recipe", str(recipe)])
    assert again.exit_code == 0, again.output
    assert (out / "compare" / "top-layer" / "model.safetensors").stat().st_mtime_ns == run_stamp


def test_demo_recipe_rejects_unknown_keys(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[demo]\nvideos_per_klass = 3\n")
    vtransfer.cli._register_commands()
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--recipe", str(recipe)])
    assert r.exit_code != 0
    assert "videos_per_klass" in str(r.exception) + r.output
    assert "target_videos_per_class" in DEMO_SETTINGS
