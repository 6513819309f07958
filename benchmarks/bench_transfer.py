"""Does deep transfer beat a trivial model on *your* real videos? The five policies next to a motion baseline.

Runs ``compare-policies`` on any dataset folder (``DATA/<class>/<video>``) over
several seeds, with the tool's default options for the backbone and weights
you name, and prints one table: test video accuracy (mean ± std over seeds),
trainable parameters and training time per policy. Beside it, on the same
split (the baseline trains on train + val, as the policies see both), the
motion-energy + logistic-regression baseline and the flow-orientation-histogram
one (which way things move, per cell of a 4x4 grid) of
:mod:`vtransfer.evaluation.motion_baseline`, and the chance level.

    python benchmarks/bench_transfer.py ../shared/data/real_actions                # effnet3d:imagenet, 3 seeds
    python benchmarks/bench_transfer.py DATA --backbone i3d --preset tiny --no-weights
    python benchmarks/bench_transfer.py --quick                                    # seconds, for the test suite

Accuracies do not depend on the machine's load; the times do, so the load
average at the start is printed with them.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import base_parser, load_line, rss_line, setup_threads

from vtransfer import api
from vtransfer.data.scan import load_dataset
from vtransfer.evaluation.motion_baseline import fit_and_score, flow_histogram_features
from vtransfer.policies.names import FREEZING_POLICY_NAMES


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:5.1f}%" + (f" ± {100 * std:4.1f}" if std is not None else "")


def main() -> None:
    """Run the comparison and the baseline; print the table."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, help="dataset folder DATA/<class>/<video> (not needed with --quick)")
    parser.add_argument("--backbone", default="effnet3d")
    parser.add_argument("--weights", default=None, help="weights of the pretrained policies (default: effnet3d:imagenet for effnet3d)")
    parser.add_argument("--no-weights", action="store_true", help="no pretrained weights (every policy starts random)")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--policies", default=",".join(FREEZING_POLICY_NAMES))
    parser.add_argument("--epochs", type=int, default=None, help="default: the tool's own default")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    print(load_line())
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        options: dict = {}
        if args.quick:
            from vtransfer.data.demo import make_demo

            data = Path(tmp) / "data"
            make_demo(data, class_set="target", videos_per_class=4, frames=20, size=(48, 64), seed=1)
            options = dict(preset="tiny", epochs=1, clips_per_video=1, val_clips=1)
            args.seeds = 1
        if data is None:
            parser.error("give a dataset folder (or --quick)")
        weights = None if args.no_weights else (args.weights or ("effnet3d:imagenet" if args.backbone == "effnet3d" else None))
        if args.preset:
            options["preset"] = args.preset
        if args.epochs:
            options["epochs"] = args.epochs
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        seeds = list(range(max(1, args.seeds)))
        out = args.out or Path(tmp) / "cmp"
        t0 = time.perf_counter()
        res = api.compare_policies(data, backbone=args.backbone, weights=weights, policies=policies, seeds=seeds,
                                   out=out, overwrite=args.out is None, threads=threads, **options)
        wall = time.perf_counter() - t0
        index = load_dataset(data, manifest=out / "split.csv")
        train = [(r.path, r.label) for r in index.records if r.split in ("train", "val")]
        test = [(r.path, r.label) for r in index.split("test")]
        base = fit_and_score(train, test)
        flow_base = fit_and_score(train, test, features=flow_histogram_features)

    n_classes = len(index.classes)
    print(f"\n{data}: {len(index.records)} videos, {n_classes} classes; split train/val/test "
          f"{len(index.split('train'))}/{len(index.split('val'))}/{len(test)}; backbone {args.backbone}"
          f"{' (' + options['preset'] + ')' if options.get('preset') else ''}, weights {weights or 'none'}, "
          f"seeds {seeds}, {threads} threads")
    print(f"{'policy':<12} {'test video acc':>16} {'trainable':>12} {'train time':>11}")
    for row in res.rows:
        print(f"{row.policy:<12} {_fmt(row.test_video_hit1, row.std.get('test_video_hit1') if len(seeds) > 1 else None):>16} "
              f"{row.trainable_params:>12,} {row.train_time_s:>10.1f}s")
    for policy, why in res.skipped.items():
        print(f"{policy:<12} skipped: {why}")
    print(f"{'motion+LR':<12} {_fmt(base.accuracy, None):>16} {'(baseline)':>12}")
    print(f"{'flowhist+LR':<12} {_fmt(flow_base.accuracy, None):>16} {'(baseline)':>12}")
    print(f"{'chance':<12} {_fmt(1 / n_classes, None):>16}")
    best = max((r for r in res.rows if r.policy != "scratch" and r.test_video_hit1 is not None),
               key=lambda r: r.test_video_hit1, default=None)
    if best is not None:
        verdict = "beats" if best.test_video_hit1 > base.accuracy else "does not beat"
        print(f"best pretrained policy: {best.policy} {_fmt(best.test_video_hit1, None)}, which {verdict} the baseline")
    print(f"compare-policies wall time: {wall:.0f}s")
    print(rss_line())


if __name__ == "__main__":
    main()
