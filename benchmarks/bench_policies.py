"""compare-policies vs a plain tutorial-style loop over the same five policies.

Both sides train the same backbone from the same pretrained checkpoint, on the
same split, with the same epochs, batch size, optimiser, LR schedule and
per-epoch validation, then test with the same clips per video. The reference
does what a first PyTorch script does: decode every clip every epoch, freeze
by ``requires_grad=False`` only (the whole network still runs forward, in
train mode), fp32. vtransfer decodes once (frame cache), computes frozen
prefixes once (feature cache, shared across policies) and skips autograd below
the first trainable group.

Prints both wall times, their ratio, and the test accuracies side by side.
The target videos default to the length, size and encoding of real action
clips: 150 frames (6 s at 25 fps) at 120x160 like KTH, H.264 with x264's
default keyframe interval of 250 frames (the real KTH files under
shared/data have keyframes every 250 or 300 frames), because the cost of
seeking into a clip is part of what a plain loop pays every epoch.
``--keyframe-interval 25`` gives the cheapest case for the plain loop (a
keyframe every second). Modules both sides use (reports, plots, metrics) are
imported before timing, so neither side pays first-import costs.

Also prints the cost of a ``top-layer`` epoch after the first relative to an
``all`` epoch (both measured inside vtransfer's runs), and the floor of the
ratio: the time vtransfer spends training the policies that have no frozen
prefix (``scratch``, ``all``, I3D ``temporal``), whose arithmetic is the same
on both sides.

    python benchmarks/bench_policies.py                          # realistic target data
    python benchmarks/bench_policies.py --keyframe-interval 25   # a keyframe every second
    python benchmarks/bench_policies.py --quick                  # seconds, for the test suite
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from _common import base_parser, load_line, rss_line, setup_threads

from vtransfer import api
from vtransfer.engine.batches import epoch_indices, make_loader
from vtransfer.data.dataset import ClipDataset
from vtransfer.data.demo import make_demo
from vtransfer.data.scan import load_dataset
from vtransfer.data.transforms import normalize_clips
from vtransfer.engine.feature_cache import clear_stores
from vtransfer.engine.inference import predict_clip_probs
from vtransfer.evaluation.metrics import classification_report
from vtransfer.models.registry import build_from_config, training_defaults
from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.policies.freezing import apply_policy, resolve_policy
from vtransfer.run_config import RunConfig, resolve_training
from vtransfer.workflows.runs import read_metrics
from vtransfer.engine.trainer import build_optimizer, warmup_cosine
from vtransfer.loading.checkpoints import model_from_checkpoint


#: The tiny-I3D transfer setting both sides train with (the demo's before it moved to ImageNet weights):
#: a source set to pretrain on, a small target set, AdamW.
SETTINGS = {
    "videos_per_class": 24, "target_videos_per_class": 16, "target_ratios": [0.5, 0.2, 0.3], "clutter": 0.4,
    "pretrain_epochs": 40, "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0001, "crop_scale": [0.6, 0.9],
}


def reference_run(policy: str, data: Path, manifest: Path, weights: Path, s: dict) -> tuple[float, float]:
    """The plain loop for one policy; returns (test video hit@1, seconds)."""
    t0 = time.perf_counter()
    torch.manual_seed(s["seed"])
    index = load_dataset(data, manifest=manifest)
    classes = index.classes
    base, ckpt = model_from_checkpoint(weights)
    if policy == "scratch":
        model = build_from_config(ckpt.backbone, ckpt.config)
    else:
        model = base
    model.reset_classifier(len(classes))
    model.preprocessing = base.preprocessing
    plan = resolve_policy(model, policy)
    apply_policy(model, plan)  # requires_grad=False on frozen parameters; nothing else
    options = RunConfig.from_options(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], optimizer=s["optimizer"],
                                     weight_decay=s["weight_decay"], seed=s["seed"])
    config = resolve_training(options, training_defaults(ckpt.backbone))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config, fused=False)  # torch defaults
    train = index.split("train")
    labels = [index.class_to_idx[r.label] for r in train]
    steps = math.ceil(len(train) / s["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps * s["epochs"], steps))
    train_ds = ClipDataset(train, index.class_to_idx, model.preprocessing, "train", seed=s["seed"], crop_scale=s["crop_scale"])
    val_ds = ClipDataset(index.split("val"), index.class_to_idx, model.preprocessing, "eval", clips_per_video=s["val_clips"])
    for epoch in range(1, s["epochs"] + 1):
        model.train()
        train_ds.set_epoch(epoch)
        loader = make_loader(train_ds, s["batch_size"], s["workers"], epoch_indices(labels, s["seed"], epoch))
        for batch in loader:
            x = normalize_clips(batch["clip"], model.preprocessing)
            loss = torch.nn.functional.cross_entropy(model(x), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
        predict_clip_probs(model, make_loader(val_ds, s["batch_size"], s["workers"]), torch.device("cpu"))
    test = index.split("test")
    test_ds = ClipDataset(test, index.class_to_idx, model.preprocessing, "eval", clips_per_video=s["clips_per_video"])
    preds = predict_clip_probs(model, make_loader(test_ds, s["batch_size"], s["workers"]), torch.device("cpu"))
    result = classification_report(preds.probs, preds.video, [index.class_to_idx[r.label] for r in test], classes)
    return result.video_hit1, time.perf_counter() - t0


def _mean_std_text(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def prefix_groups(run_dir: Path) -> int:
    """How many frozen groups a finished run could cache (its policy's first trainable group)."""
    return int(json.loads((run_dir / "config.json").read_text())["resolved"]["policy"]["first_trainable_group"])


def main() -> None:
    """Run both sides and print times, ratio and accuracies."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--backbone", default="i3d")
    parser.add_argument("--video-frames", type=int, default=None, help="frames per target video (default 150, quick 24)")
    parser.add_argument("--video-size", default=None, help="target video size HxW (default 120x160 like KTH, quick 32x32)")
    parser.add_argument("--fps", type=int, default=25, help="frame rate of the target videos")
    parser.add_argument("--keyframe-interval", type=int, default=250,
                        help="most frames between keyframes in the target videos (x264's default: 250)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train every policy with seeds 0..N-1 on both sides; accuracies are mean ± std over seeds")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    print(load_line())
    demo = SETTINGS  # the same hyperparameters on both sides
    s = dict(epochs=args.epochs or (2 if args.quick else 10), batch_size=8, lr=demo["lr"], optimizer=demo["optimizer"],
             weight_decay=demo["weight_decay"], crop_scale=tuple(demo["crop_scale"]), seed=0, workers=0 if args.quick else 2,
             val_clips=1 if args.quick else 2, clips_per_video=1 if args.quick else 4,
             frames=10 if args.quick else 16, size=32 if args.quick else 64)
    vpc, src_vpc = (3, 2) if args.quick else (demo["target_videos_per_class"], demo["videos_per_class"])
    policies = list(FREEZING_POLICY_NAMES)
    seeds = list(range(max(1, args.seeds)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_demo(tmp / "source", class_set="source", videos_per_class=src_vpc, frames=16 if args.quick else 24,
                  size=32 if args.quick else 64, clutter=demo["clutter"], seed=0)
        vframes = args.video_frames or (16 if args.quick else 150)
        vsize = tuple(int(v) for v in (args.video_size or ("32x32" if args.quick else "120x160")).split("x"))
        make_demo(tmp / "target", class_set="target", videos_per_class=vpc, frames=vframes, size=vsize,
                  clutter=demo["clutter"], seed=1, fps=args.fps, keyframe_interval=args.keyframe_interval)
        geometry = dict(backbone=args.backbone, preset="tiny", frames=s["frames"], size=s["size"], batch_size=8,
                        lr=s["lr"], optimizer=s["optimizer"], weight_decay=s["weight_decay"], crop_scale=s["crop_scale"],
                        patience=0, val_clips=s["val_clips"], clips_per_video=s["clips_per_video"], threads=threads)
        pre = api.pretrain(tmp / "source", register=False, epochs=1 if args.quick else demo["pretrain_epochs"],
                           out=tmp / "pre", **geometry)
        print(f"setup: {args.backbone} tiny, {s['frames']}x{s['size']}x{s['size']} clips, {s['epochs']} epochs, "
              f"{vpc} videos/class on the target ({vframes} frames at {vsize[0]}x{vsize[1]}, {args.fps} fps, H.264 with "
              f"a keyframe every {args.keyframe_interval} frames), {threads} threads, seeds {seeds}")
        for module in ("vtransfer.reporting.plots", "vtransfer.reporting.report", "vtransfer.reporting.policy_report"):  # before timing: neither side pays first-import costs
            importlib.import_module(module)

        clear_stores()
        t0 = time.perf_counter()
        res = api.compare_policies(tmp / "target", weights=str(pre.model_path), policies=policies, epochs=s["epochs"],
                                   ratios=tuple(demo["target_ratios"]), seeds=seeds,
                                   out=tmp / "cmp", categories=tmp / "target" / "categories.csv", **geometry)
        t_vt = time.perf_counter() - t0
        manifest = tmp / "cmp" / "split.csv"

        ref_acc: dict[str, list[float]] = {p: [] for p in policies}
        ref_time: dict[str, list[float]] = {p: [] for p in policies}
        for seed in seeds:
            for policy in policies:
                acc, t = reference_run(policy, tmp / "target", manifest, pre.model_path, {**s, "seed": seed})
                ref_acc[policy].append(acc)
                ref_time[policy].append(t)
        t_ref = sum(sum(t) for t in ref_time.values())

        print(f"\ntest video hit@1{' (mean ± std over seeds)' if len(seeds) > 1 else ''}; times per seed")
        print(f"{'policy':<10} {'vtransfer acc':>15} {'reference acc':>15} {'vt train':>9} {'ref total':>10}")
        for row in res.rows:
            vt_acc = _mean_std_text(row.test_video_hit1, row.std.get("test_video_hit1"))
            ref = torch.tensor(ref_acc[row.policy], dtype=torch.float64)
            ref_text = _mean_std_text(float(ref.mean()), float(ref.std()) if len(ref) > 1 else None)
            print(f"{row.policy:<10} {vt_acc:>15} {ref_text:>15} {row.train_time_s:>8.1f}s "
                  f"{sum(ref_time[row.policy]) / len(seeds):>9.1f}s")
        print(f"\nvtransfer compare-policies: {t_vt:.1f}s   reference loop: {t_ref:.1f}s")
        print(f"ratio vtransfer/reference: {t_vt / t_ref:.3f}  (target <= 0.333)")

        def run_dir(policy: str) -> Path:
            return tmp / "cmp" / policy if len(seeds) == 1 else tmp / "cmp" / policy / "seed-0"

        def epochs_after_first(policy: str) -> float:
            hist = [h["time_s"] for h in read_metrics(run_dir(policy))]
            return sum(hist[1:]) / max(1, len(hist) - 1)

        top, full = epochs_after_first("top-layer"), epochs_after_first("all")
        print(f"top-layer epoch after the first / all epoch: {top:.3f}s / {full:.3f}s = "
              f"{top / max(full, 1e-9):.3f}  (target <= 0.05)")
        uncached = [r for r in res.rows if prefix_groups(run_dir(r.policy)) == 0]
        t_floor = sum(r.train_time_s for r in uncached) * len(seeds)
        print(f"floor: vtransfer's training of the policies without a frozen prefix "
              f"({', '.join(r.policy for r in uncached)}) alone is {t_floor:.1f}s = {t_floor / t_ref:.3f} of the reference")
    print(rss_line())


if __name__ == "__main__":
    main()
