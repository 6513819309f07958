"""Does ``--max-memory`` keep a run's memory flat as the data grows? compare-policies at two sizes, with and without.

Issue 23 measured ``compare-policies --policies top-layer,top-3,attentive-probe --epochs 2 --cache none`` on
make-demo videos at 160x120: peak RSS 3.2 GB on 92 videos and 5.8 GB on 368, about 9.5 MB more per video (the
frozen-prefix feature stores, held in memory for the whole comparison). This script writes make-demo datasets of
each size in ``--videos`` (the ``all`` set: 23 classes, so 92 = 4 a class; not timed), then runs that comparison
(effnet3d from ImageNet, seed 0) in a fresh process (``python -m vtransfer``, from the repository root), once as it
is and once with ``--max-memory BUDGET``. For each run it prints wall, user and system seconds, the peak resident
set (``ru_maxrss`` of the child, from ``os.wait4``), the peak of the memory the budget counts (anonymous +
shared-memory pages, ``RssAnon + RssShmem`` of ``/proc/PID/status``, sampled every 0.2 s; file pages of the
memory-mapped stores are page cache the kernel can drop), the load average before and after, and whether the
budgeted run gave the same test accuracies as the unbudgeted one (exit 1 if not).

    python benchmarks/bench_budget.py                              # 92 and 368 videos, --max-memory 4G
    python benchmarks/bench_budget.py --videos 92 --budget 1.5G    # one size
    python benchmarks/bench_budget.py --quick                      # tiny videos and model: a few minutes

Absolute times on a shared machine are noise; the load average is printed with them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _common import base_parser, load_line, make_demo, rss_line, run_child

CLASSES_IN_ALL = 23


def accuracies(out: Path) -> dict[str, dict]:
    """Each policy's test summary under comparison folder ``out``."""
    return {str(p.parent.parent.relative_to(out)): json.loads(p.read_text())["summary"]
            for p in sorted(out.rglob("report.json"))}


def make_data(root: Path, videos: int, quick: bool) -> Path:
    """A make-demo dataset of about ``videos`` videos (the ``all`` set at 160x120; ``--quick``: the target set, tiny)."""
    data = root / f"demo-{videos}"
    if quick:
        opts = ["--set", "target", "-n", str(max(2, videos // 6)), "--frames", "16", "--size", "48"]
    else:
        opts = ["--set", "all", "-n", str(max(1, round(videos / CLASSES_IN_ALL))), "--size", "160x120"]
    make_demo(data, opts)
    return data


def main() -> None:
    """Make each dataset, run the comparison without and with the budget, print the table and the accuracy check."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--videos", default=None, help="dataset sizes, comma-separated (default 92,368; --quick 12,24)")
    parser.add_argument("--budget", default=None, help="--max-memory of the budgeted runs (default 4G; --quick 1G)")
    parser.add_argument("--policies", default="top-layer,top-3,attentive-probe")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", choices=("none", "budget"), default=None,
                        help="run only the unbudgeted or only the budgeted variant (no accuracy check)")
    args = parser.parse_args()
    sizes = [int(v) for v in (args.videos or ("12,24" if args.quick else "92,368")).split(",")]
    budget = args.budget or ("1G" if args.quick else "4G")
    print(load_line())
    model = (["--backbone", "effnet3d", "--preset", "tiny", "--clips-per-video", "2"] if args.quick else
             ["--backbone", "effnet3d", "--weights", "effnet3d:imagenet"])
    options = ["--policies", args.policies, "--epochs", str(args.epochs), "--cache", "none", "--seeds", "0", *model]
    if args.threads:
        options += ["--threads", str(args.threads)]
    print(f"workload: python -m vtransfer compare-policies DATA {' '.join(options)} [--max-memory {budget}]")
    print(f"\n{'videos':>6} {'budget':>8} {'wall s':>8} {'user s':>8} {'sys s':>8} {'peak RSS MiB':>13} "
          f"{'peak anon MiB':>14} {'spilled':>8}   load before -> after")
    same = True
    with tempfile.TemporaryDirectory(prefix="vt-max-memory-") as tmp_name:
        tmp = Path(tmp_name)
        for n in sizes:
            data = make_data(tmp, n, args.quick)
            count = sum(1 for _ in data.rglob("*.mp4"))
            found = {}
            variants = [("none", []), (budget, ["--max-memory", budget])]
            variants = [v for v in variants if args.only is None or (v[0] == "none") == (args.only == "none")]
            for label, extra in variants:
                out = tmp / f"run-{n}-{label}"
                argv = [sys.executable, "-m", "vtransfer", "compare-policies", str(data), *options, *extra,
                        "--out", str(out)]
                r = run_child(argv, tmp / f"run-{n}-{label}.log")
                said = " ".join((r["stdout"] + (tmp / f"run-{n}-{label}.log").read_text()).split())
                spilled = said.count("memory-mapped")
                found[label] = accuracies(out)
                print(f"{count:>6} {label:>8} {r['wall']:8.1f} {r['user']:8.1f} {r['sys']:8.1f} {r['rss_mib']:13.0f} "
                      f"{r['anon_mib']:14.0f} {spilled:>8}   {r['load']}", flush=True)
                for policy, why in json.loads((out / "skipped.json").read_text()).items():
                    print(f"{'':>6} skipped {policy}: {why}")
                if "memory: one training step" in said:
                    print(f"{'':>6} {said[said.index('memory: one training step'):].split(' clips per optimiser step')[0]}"
                          " clips per optimiser step")
            if args.only:
                continue
            agree = found["none"] == found[budget] and bool(found["none"])
            same = same and agree
            print(f"{'':>6} same test accuracies with and without --max-memory {budget}: {'yes' if agree else 'NO'}"
                  + ("" if agree else f"\n  without: {found['none']}\n  with:    {found[budget]}"), flush=True)
    print(rss_line(include_children=True))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
