"""compare-policies: one split, one table, per-category columns, seeds, reuse; pretrain -> finetune provenance."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import vtransfer.api as api
import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.loading.checkpoints import load_checkpoint

FAST = dict(backbone="slowfusion", preset="tiny", size=48, epochs=2, batch_size=8, clips_per_video=2, val_clips=1,
            workers=0, patience=0, device="cpu", cache="memory")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, demo_datasets):
    root = tmp_path_factory.mktemp("cmp")
    shutil.copytree(demo_datasets("source", class_set="source", videos_per_class=4, frames=16, size=48, seed=0),
                    root / "source")
    shutil.copytree(demo_datasets("target", class_set="target", videos_per_class=5, frames=16, size=48, seed=1),
                    root / "target")
    return root


def test_pretrain_then_finetune_names_its_source(datasets, tmp_path):
    pre = api.pretrain(datasets / "source", name="slowfusion:demo-src", register=False, out=tmp_path / "pre", **FAST)
    meta = load_checkpoint(pre.model_path).metadata
    assert meta["source"]["pretrain_source"]["name"] == "slowfusion:demo-src"
    assert meta["source"]["pretrain_source"]["videos"] == 40
    res = api.finetune(datasets / "target", policy="top-3", weights=str(pre.model_path), out=tmp_path / "ft", **FAST)
    src = load_checkpoint(res.model_path).metadata["source"]["pretrained"]
    assert src["source"] == "slowfusion:demo-src"
    assert src["pretrained_on"] == {"name": "source", "num_classes": 10, "size": "40 videos"}


def test_compare_policies_table_with_categories_and_seeds(datasets, tmp_path):
    cats = datasets / "target" / "categories.csv"
    res = api.compare_policies(datasets / "target", policies=["top-layer", "all"], seeds=[0, 1], out=tmp_path / "cmp",
                               categories=cats, **FAST)
    assert [r.policy for r in res.rows] == ["top-layer", "all"]
    for row in res.rows:
        assert row.seeds == [0, 1]
        assert set(row.per_category) == {"appearance", "motion"}
        assert "test_video_hit1" in row.std
    top, full = res.rows
    assert top.trainable_params < full.trainable_params == full.total_params
    # one split for every run
    manifests = {(d / "split.csv").read_bytes() for runs in res.runs.values() for d in runs}
    assert manifests == {(tmp_path / "cmp" / "split.csv").read_bytes()}
    for name in ("compare.json", "compare.csv", "compare.md", "compare.html", "compare_categories.png"):
        assert (tmp_path / "cmp" / name).exists(), name
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    assert [r["policy"] for r in rows] == ["top-layer", "all"]


def test_compare_skips_inapplicable_policy_and_reuses_finished_runs(datasets, tmp_path):
    kw = dict(FAST, policies=["temporal", "top-layer"], out=tmp_path / "cmp")
    first = api.compare_policies(datasets / "target", **{**kw, "backbone": "slowfusion"}, )
    assert [r.policy for r in first.rows] == ["temporal", "top-layer"]
    stamp = (tmp_path / "cmp" / "top-layer" / "model.safetensors").stat().st_mtime_ns
    again = api.compare_policies(datasets / "target", **kw)
    assert (tmp_path / "cmp" / "top-layer" / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert again.rows[1].test_video_hit1 == first.rows[1].test_video_hit1


def test_single_frame_backbone_skips_temporal(datasets, tmp_path):
    from vtransfer.utils.errors import ConfigError
    from vtransfer.models.registry import build_backbone
    from vtransfer.policies.freezing import resolve_policy

    with pytest.raises(ConfigError):
        resolve_policy(build_backbone("slowfusion", "tiny", fusion="single"), "temporal")


def test_cli_compare_policies_json(datasets, tmp_path):
    vtransfer.cli._register_commands()
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["compare-policies", str(datasets / "target"), "--backbone", "slowfusion", "--preset", "tiny",
                                 "--size", "48", "--epochs", "1", "--policies", "top-layer,top-3", "--clips-per-video", "1",
                                 "--val-clips", "1", "--workers", "0", "--out", str(out), "--json",
                                 "--categories", str(datasets / "target" / "categories.csv")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [row["policy"] for row in doc["rows"]] == ["top-layer", "top-3"]
    assert torch.tensor([row["test_video_hit1"] for row in doc["rows"]]).le(1).all()


def test_every_row_trains_the_checkpoints_architecture(datasets, tmp_path):
    """scratch beside a tiny checkpoint trains the tiny network, not the backbone's full default preset."""
    pre = api.pretrain(datasets / "source", register=False, out=tmp_path / "pre", **{**FAST, "epochs": 1})
    kw = {k: v for k, v in FAST.items() if k not in ("preset", "size")}  # what a user types: no preset
    res = api.compare_policies(datasets / "target", weights=str(pre.model_path), policies=["scratch", "top-layer"],
                               out=tmp_path / "cmp", **kw)
    want = load_checkpoint(pre.model_path).config
    for policy in ("scratch", "top-layer"):
        got = load_checkpoint(tmp_path / "cmp" / policy / "model.safetensors").config
        assert {k: v for k, v in got.items() if k != "num_classes"} == {k: v for k, v in want.items() if k != "num_classes"}
    scratch, top = res.rows
    assert scratch.total_params == top.total_params
    info = json.loads((tmp_path / "cmp" / "scratch" / "config.json").read_text())["resolved"]["weights"]
    assert info["kind"] == "random" and info["architecture_from"] == str(pre.model_path)
    # the table states the one architecture and geometry every row trained
    assert "architecture mismatch" not in res.setup
    assert res.setup["parameters"] == f"{top.total_params:,}"
    assert f"{want['frames']} frames" in res.setup["input"] if "frames" in want else "frames" in res.setup["input"]
    assert res.setup["pretrained weights"] == str(pre.model_path)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert res.setup["architecture"] in md and res.setup["input"] in md


def test_comparison_setup_flags_rows_of_different_architectures(tmp_path):
    """Rows reused from runs of another geometry are named, not silently tabulated together."""
    def run(name, frames):
        d = tmp_path / name
        d.mkdir()
        pre = {"frames": frames, "stride": 2, "crop_size": [32, 32], "resize_short": 36}
        resolved = {"preprocessing": pre, "total_params": 10, "architecture": {"width": 8, "frames": frames},
                    "weights": {"backbone": "i3d", "weights": None}}
        (d / "config.json").write_text(json.dumps({"options": {}, "resolved": resolved}))
        return d

    same = api.comparison_setup({"scratch": [run("a", 4)], "all": [run("b", 4)]})
    assert "architecture mismatch" not in same and same["input"].startswith("4 frames, stride 2, 32x32 crop")
    differ = api.comparison_setup({"scratch": [run("c", 4)], "all": [run("d", 8)]})
    assert differ["architecture mismatch"] == "scratch; all"


def test_feature_stores_are_let_go_once_no_later_policy_needs_them(datasets, tmp_path):
    from vtransfer.engine import feature_cache
    from vtransfer.workflows.compare import compare_policies

    held = []  # stores alive when each run starts
    real = api.finetune

    def watching(*args, **kwargs):
        held.append(set(feature_cache.store_keys()))
        return real(*args, **kwargs)

    before = feature_cache.store_keys()
    compare_policies(datasets / "target", policies=["top-3", "top-layer"], out=tmp_path / "cmp", finetune=watching,
                     **{**FAST, "epochs": 1})
    assert len(held) == 2 and held[1] - before  # top-layer derived its features from top-3's stores, still held
    assert feature_cache.store_keys() - before == set()  # and after the comparison none of them are


def test_attentive_probe_derives_its_features_from_top_3s_after_top_layer(datasets, tmp_path, monkeypatch):
    """Run third, after top-layer, attentive-probe still finds top-3's stores: it runs only the groups above them."""
    from vtransfer.engine import feature_cache
    from vtransfer.workflows.compare import compare_policies

    computed = []  # (depth, clips) of every store computed from decoded clips
    real = feature_cache.compute_store
    monkeypatch.setattr(feature_cache, "compute_store",
                        lambda model, dataset, stop, *a, **k: computed.append((stop, len(dataset))) or real(model, dataset, stop, *a, **k))
    before = feature_cache.store_keys()
    result = compare_policies(datasets / "target", policies=["attentive-probe", "top-layer", "top-3"],
                              out=tmp_path / "cmp", finetune=api.finetune,
                              **{**FAST, "epochs": 1, "backbone": "effnet3d"})  # a family the probe reads
    assert not result.skipped and {r.policy for r in result.rows} == {"top-3", "top-layer", "attentive-probe"}
    assert computed and {stop for stop, _ in computed} == {min(stop for stop, _ in computed)}  # top-3's depth only
    assert feature_cache.store_keys() - before == set()


def test_prune_keeps_the_deepest_stores_and_the_base_below_them():
    import torch

    from vtransfer.engine import feature_cache

    def store(stop: int):
        return feature_cache.FeatureStore(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2), [], stop)

    feature_cache.clear_stores()
    held = {("s3", "train"): 3, ("s5", "train"): 5, ("s9", "train"): 9, ("s9-probe", "train"): 9, ("s5", "val"): 5}
    for key, stop in held.items():
        feature_cache._STORES[key] = store(stop)
    assert feature_cache.prune_stores(set(held)) == 2 * 4 * 4  # only the stop-3 training store goes
    assert feature_cache.store_keys() == set(held) - {("s3", "train")}
    feature_cache.clear_stores()
