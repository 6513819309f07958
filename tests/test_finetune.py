"""The main flow end to end on make-demo data with tiny backbones: finetune, evaluate, resume, predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vtransfer.api as api
from checkpoints import random_checkpoints
from vtransfer.models.registry import build_backbone

FAST = dict(epochs=2, batch_size=8, clips_per_video=2, val_clips=1, workers=0, patience=0, device="cpu", cache="memory")


@pytest.fixture(scope="module")
def demo_data(demo_datasets):
    """Three appearance and three motion classes, 6 videos each (tiny; shared, read only)."""
    return demo_datasets("target", class_set="target", videos_per_class=6, frames=16, size=48, seed=3)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Random-init tiny checkpoints standing in for pretrained weights, one per backbone."""
    return random_checkpoints(tmp_path_factory.mktemp("pretrained"))


def _kw(name):
    return dict(backbone=name, preset="tiny", size=48 if name != "vivit" else None, **FAST)


def test_top_layer_changes_only_the_classifier(demo_data, pretrained, tmp_path):
    res = api.finetune(demo_data, policy="top-layer", weights=str(pretrained["i3d"]), out=tmp_path / "run", **_kw("i3d"))
    before, after = load_file(pretrained["i3d"]), load_file(res.model_path)
    changed = {k for k in after if k in before and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])}
    assert changed == set()  # only the (replaced, differently shaped) classifier differs
    assert {k for k in after if before.get(k) is None or before[k].shape != after[k].shape} == {"logits.conv3d.weight", "logits.conv3d.bias"}
    # the run folder holds what the issue lists
    for f in ("config.json", "split.csv", "metrics.jsonl", "model.safetensors", "report/report.json", "report/per_class.csv"):
        assert (res.run_dir / f).exists(), f
    assert len((res.run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_temporal_on_vivit_changes_only_temporal_and_head(demo_data, pretrained, tmp_path):
    res = api.finetune(demo_data, policy="temporal", weights=str(pretrained["vivit"]), out=tmp_path / "run", **_kw("vivit"))
    before, after = load_file(pretrained["vivit"]), load_file(res.model_path)
    m = build_backbone("vivit", "tiny", num_classes=6)
    group_of = {p: g.name for g in m.layer_groups() for p in g.params}
    changed_groups = {group_of[k] for k in after if k in group_of and (k not in before or before[k].shape != after[k].shape or not torch.equal(before[k], after[k]))}
    assert changed_groups and all(g.startswith("temporal") or g == "head" for g in changed_groups)
    assert any(g.startswith("temporal") for g in changed_groups)


def test_frozen_batchnorm_stats_unchanged(demo_data, pretrained, tmp_path):
    res = api.finetune(demo_data, policy="top-3", weights=str(pretrained["i3d"]), out=tmp_path / "run", cached_views=0, **_kw("i3d"))
    before, after = load_file(pretrained["i3d"]), load_file(res.model_path)
    for k in ("Mixed_3b.b0.bn.running_mean", "Mixed_4f.b1b.bn.running_var", "Conv3d_1a_7x7.bn.running_mean"):
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["Mixed_5c.b0.bn.running_mean"], after["Mixed_5c.b0.bn.running_mean"])


def test_same_seed_same_metrics_and_evaluate_reproduces(demo_data, tmp_path):
    a = api.finetune(demo_data, policy="all", out=tmp_path / "a", seed=5, **_kw("slowfusion"))
    b = api.finetune(demo_data, policy="all", out=tmp_path / "b", seed=5, **_kw("slowfusion"))
    assert a.history == [{**h, "time_s": a.history[i]["time_s"]} for i, h in enumerate(b.history)]
    assert a.test.video_hit1 == b.test.video_hit1
    # evaluate on the saved model and the saved split gives finetune's test accuracy
    ev = api.evaluate(a.model_path, demo_data, manifest=a.run_dir / "split.csv", clips_per_video=2, workers=0, device="cpu")
    assert ev.video_hit1 == pytest.approx(a.test.video_hit1)
    assert ev.mean_class_accuracy == pytest.approx(a.test.mean_class_accuracy)


def test_resume_finishes_with_same_epochs_and_metrics(demo_data, tmp_path):
    kw = {**_kw("slowfusion"), "epochs": 3}
    full = api.finetune(demo_data, policy="all", out=tmp_path / "full", **kw)
    part = api.finetune(demo_data, policy="all", out=tmp_path / "part", stop_after_epochs=1, **kw)
    assert len(part.history) == 1 and not part.report
    resumed = api.finetune(demo_data, resume=tmp_path / "part")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    strip = lambda hs: [{k: v for k, v in h.items() if k != "time_s"} for h in hs]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert resumed.test.video_hit1 == full.test.video_hit1


def test_existing_run_folder_needs_overwrite(demo_data, tmp_path):
    from vtransfer.utils.errors import ConfigError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("user file")
    with pytest.raises(ConfigError, match="--overwrite"):
        api.finetune(demo_data, policy="top-layer", out=tmp_path / "run", **_kw("slowfusion"))
    assert (tmp_path / "run" / "keep.txt").read_text() == "user file"


def test_predict_gives_probabilities_and_reports_bad_files(demo_data, tmp_path):
    res = api.finetune(demo_data, policy="top-layer", out=tmp_path / "run", **_kw("slowfusion"))
    videos = sorted(demo_data.glob("*/*.mp4"))[:2]
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    rows = api.predict(res.model_path, [*videos, bad], top_k=3, clips_per_video=2, device="cpu")
    assert [r["path"] for r in rows] == [str(v) for v in videos] + [str(bad)]
    for r in rows[:2]:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert "error" in rows[2]


def test_config_records_resolved_options(demo_data, tmp_path):
    res = api.finetune(demo_data, policy="top-3", out=tmp_path / "run", **_kw("i3d"))
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["options"]["policy"] == "top-3"
    assert cfg["resolved"]["train"]["optimizer"] == "sgd"
    assert cfg["resolved"]["trainable_params"] == res.trainable_params < res.total_params
    assert np.isclose(sum(cfg["resolved"]["split_sizes"].values()), 36)


def test_tensorboard_logging_or_a_clear_error(demo_data, tmp_path):
    from vtransfer.utils.errors import ConfigError

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            api.finetune(demo_data, policy="top-layer", out=tmp_path / "run", tensorboard=True, **_kw("slowfusion"))
        return
    res = api.finetune(demo_data, policy="top-layer", out=tmp_path / "run", tensorboard=True, **_kw("slowfusion"))
    assert list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_evaluate_without_a_manifest_scores_the_runs_own_test_split_and_says_so(demo_data, tmp_path):
    a = api.finetune(demo_data, policy="all", out=tmp_path / "a", seed=5, **_kw("slowfusion"))
    seen = []
    ev = api.evaluate(a.run_dir, demo_data, clips_per_video=2, workers=0, device="cpu", out=tmp_path / "ev",
                      on_selection=seen.append)  # a run folder finds its model.safetensors
    assert ev.num_videos == a.test.num_videos < 36 and ev.video_hit1 == pytest.approx(a.test.video_hit1)
    assert seen[0].description.startswith("test split of") and str(a.run_dir / "split.csv") in seen[0].description
    assert seen[0].warning is None
    doc = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert doc["title"] == f"a / all: {seen[0].description}"
    assert all(p["name"] and p["name"].endswith(".mp4") for p in doc["predictions"])

    alone = tmp_path / "alone.safetensors"  # a model file without its run folder: every video, with a warning
    alone.write_bytes(a.model_path.read_bytes())
    seen.clear()
    ev = api.evaluate(alone, demo_data, clips_per_video=1, workers=0, device="cpu", on_selection=seen.append)
    assert ev.num_videos == 36
    assert seen[0].description == f"all 36 videos of {demo_data}, including any the model trained on"
    assert "training videos included" in seen[0].warning
