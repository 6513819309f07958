"""``vtransfer demo``: transfer learning end to end on embedded synthetic data.

1. ``make-demo`` writes a *source* and a *target* dataset with different classes
   (both with appearance and motion categories);
2. a small backbone is pretrained from scratch on the source;
3. ``compare-policies`` fine-tunes it on the target under every policy and
   prints the papers' table with per-category columns.

Everything lands in one folder; re-running reuses every finished step.
The settings live in :data:`DEMO_SETTINGS` (``recipes/demo.toml`` mirrors them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_SETTINGS: dict[str, Any] = {
    "backbone": "i3d",
    "preset": "tiny",
    "frames": 16,
    "stride": 1,
    "size": 64,
    "videos_per_class": 24,  # source; the target has few labelled videos, as transfer learning assumes
    "target_videos_per_class": 16,
    "target_ratios": [0.5, 0.2, 0.3],
    "demo_frames": 24,
    "demo_size": 64,
    "clutter": 0.4,
    "pretrain_epochs": 40,
    "epochs": 15,
    "batch_size": 8,
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.0001,
    "crop_scale": [0.6, 0.9],
    "clips_per_video": 4,
    "val_clips": 2,
    "policies": ["scratch", "top-layer", "top-3", "temporal", "all"],
    "seed": 0,
}


def run_demo(out: Path, *, overwrite: bool = False, settings: dict[str, Any] | None = None, reporter=None, on_step=None):
    """Run the demo into ``out`` and return the :class:`~vtransfer.api.CompareResult`."""
    import shutil

    from vtransfer import api
    from vtransfer.data.demo import make_demo

    s = {**DEMO_SETTINGS, **(settings or {})}
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda text: None)

    for name, per_class in (("source", s["videos_per_class"]), ("target", s["target_videos_per_class"])):
        folder = out / "data" / name
        if not (folder / "categories.csv").exists():
            step(f"making the {name} dataset")
            make_demo(folder, class_set=name, videos_per_class=per_class, frames=s["demo_frames"],
                      size=s["demo_size"], clutter=s["clutter"], seed=s["seed"] + (0 if name == "source" else 1),
                      overwrite=True)

    common = dict(backbone=s["backbone"], preset=s["preset"], frames=s["frames"], stride=s["stride"], size=s["size"],
                  batch_size=s["batch_size"], optimizer=s["optimizer"], lr=s["lr"], weight_decay=s["weight_decay"],
                  crop_scale=tuple(s["crop_scale"]), clips_per_video=s["clips_per_video"], val_clips=s["val_clips"],
                  patience=0)
    pretrained = out / "pretrain" / "model.safetensors"
    if not pretrained.exists():
        step("pretraining on the source dataset")
        api.pretrain(out / "data" / "source", name=f"{s['backbone']}:demo-source", register=False,
                     epochs=s["pretrain_epochs"], seed=s["seed"], out=out / "pretrain", overwrite=True,
                     reporter=reporter, **common)
    step("comparing policies on the target dataset")
    return api.compare_policies(out / "data" / "target", weights=str(pretrained), policies=s["policies"],
                                seeds=[s["seed"]], epochs=s["epochs"], out=out / "compare", ratios=tuple(s["target_ratios"]),
                                categories=out / "data" / "target" / "categories.csv", reporter=reporter, **common)
