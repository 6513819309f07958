"""Does the split audit find planted near-duplicates and planted label swaps?

For each DATA folder (``DATA/<class>/<video>``, split as ``check`` splits it: stratified
70/15/15, ``--split-seed``):

1. **As it is**: the audit of the unmodified dataset (near-duplicates across splits, group ids
   in file names). Pairs found here are real findings, listed, and kept apart from the planted
   ones below.
2. **Planted near-duplicates**: ``--fraction`` of the videos (5-20%) are copied into a temporary
   folder as H.264 at a random CRF (23/28/32/35; a quarter of them also scaled to 3/4 size):
   re-encoded as they are, mirrored left-right, trimmed by 10-20% (cut at a random share
   between head and tail), or mirrored and trimmed, in turn. Each copy keeps its source's
   class and goes into a split other than its source's. The audit runs on the dataset plus
   the copies; *recall* is the share of planted pairs listed; a listed pair that was not
   planted is a *false pair*, counted twice: strictly, and without the pairs that step 1
   already found or that join a copy to its source's own near-identical twin (a take the
   fingerprint cannot tell from the source, as measured by the same comparison).
   Repeated for each of ``--plant-seeds``.
3. **Planted label swaps** (with ``--backbone``): the training videos are embedded once; then,
   for each of ``--draws`` draws, ``--swap`` (5%) of them get another class at random and the
   label audit (out-of-fold linear probe + cleanlab) runs on the swapped labels. Printed: the
   share of swaps among everything it flags, and among its top-k suggestions (ranked by the
   given label's out-of-fold probability), k = 10% of the training videos. The same with the
   pixel fingerprint's mean and spread as features, to show why the audit asks for a backbone.

Usage::

    python benchmarks/bench_audit.py ../shared/data/real_actions ../shared/data/yoga_poses --backbone effnet3d --weights effnet3d:imagenet
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from _common import base_parser, load_line, rss_line, setup_threads

from vtransfer.data.decode import probe_video, quarter_turns
from vtransfer.data.records import SPLITS, DatasetIndex, VideoRecord
from vtransfer.data.scan import load_dataset
from vtransfer.evaluation.audit import (
    DUPLICATE_THRESHOLD,
    compare,
    label_issues,
    out_of_fold_probabilities,
)
from vtransfer.workflows.audit import audit_dataset, fingerprint_video, load_audit_model
from vtransfer.workflows.extract import compute_embeddings

KINDS = ("re-encoded", "mirrored", "trimmed", "mirrored+trimmed")
CRFS = (23, 28, 32, 35)


def plant_copy(src: Path, dst: Path, *, mirror: bool, trim: float, crf: int, scale: float, rng: random.Random) -> None:
    """Write ``src`` as H.264 at ``crf``: mirrored, with ``trim`` of its frames cut (head/tail at random), scaled."""
    info = probe_video(src)
    cut = round(trim * info.num_frames)
    head = rng.randint(0, cut) if cut else 0
    last = info.num_frames - (cut - head)  # frames [head, last)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = None
        for i, frame in enumerate(inp.decode(video=0)):
            if i >= last:
                break
            if i < head:
                continue
            image = frame.to_ndarray(format="rgb24")
            turns = quarter_turns(frame.rotation)
            if turns:
                image = np.rot90(image, turns)
            if mirror:
                image = image[:, ::-1]
            if stream is None:
                h, w = image.shape[:2]
                stream = out.add_stream("libx264", rate=round(info.fps) or 25)
                stream.width, stream.height = int(w * scale) // 2 * 2, int(h * scale) // 2 * 2
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            picture = picture.reformat(width=stream.width, height=stream.height)
            for packet in stream.encode(picture):
                out.mux(packet)
        if stream is not None:
            for packet in stream.encode():
                out.mux(packet)


def plant(index: DatasetIndex, fraction: float, seed: int, folder: Path) -> tuple[list[VideoRecord], dict[Path, VideoRecord], list[str]]:
    """Copies of ``fraction`` of the videos (each into another split); ``(copies, source of each copy, descriptions)``."""
    rng = random.Random(seed)
    records = list(index.records)
    count = max(1, round(fraction * len(records)))
    chosen = rng.sample(records, count)
    copies, source, described = [], {}, []
    for i, record in enumerate(chosen):
        kind = KINDS[i % len(KINDS)]
        crf = rng.choice(CRFS)
        scale = 0.75 if rng.random() < 0.25 else 1.0
        trim = rng.uniform(0.10, 0.20) if "trimmed" in kind else 0.0
        dst = folder / f"copy{seed}_{i:03d}_{record.path.stem}.mp4"
        plant_copy(record.path, dst, mirror="mirrored" in kind, trim=trim, crf=crf, scale=scale, rng=rng)
        split = rng.choice([s for s in SPLITS if s != record.split])
        copy = VideoRecord(dst, record.label, split)
        copies.append(copy)
        source[dst] = record
        described.append(f"{kind}, crf {crf}" + (f", trim {trim:.0%}" if trim else "") + (", 3/4 size" if scale < 1 else ""))
    return copies, source, described


def pair_key(a: Path, b: Path) -> frozenset:
    return frozenset((str(a), str(b)))


def duplicate_run(index: DatasetIndex, fraction: float, seed: int, existing: set, threshold: float) -> dict:
    """Plant, audit, score. ``existing``: the pairs the audit finds in the unmodified dataset."""
    with tempfile.TemporaryDirectory(prefix="bench_audit_") as tmp:
        t0 = time.perf_counter()
        copies, source, described = plant(index, fraction, seed, Path(tmp))
        planted_s = time.perf_counter() - t0
        planted = {pair_key(c.path, source[c.path].path) for c in copies}
        t0 = time.perf_counter()
        report = audit_dataset(list(index.records) + copies, threshold=threshold)
        audit_s = time.perf_counter() - t0
        found = {pair_key(d.a, d.b): d for d in report.duplicates}
        hits = planted & set(found)
        false = [found[k] for k in found if k not in planted]
        explained = []
        for d in false:
            if pair_key(d.a, d.b) in existing:
                explained.append((d, "found in the dataset as it is"))
                continue
            copy, other = (d.a, d.b) if d.a in source else (d.b, d.a) if d.b in source else (None, None)
            if copy is not None:
                twin = other if other not in source else source[other].path
                m = compare(fingerprint_video(source[copy].path), fingerprint_video(twin))
                if m.difference <= threshold:
                    explained.append((d, f"the source's twin ({m.difference:.1f} from it)"))
        missed = [(c, source[c.path], described[i]) for i, c in enumerate(copies) if pair_key(c.path, source[c.path].path) not in hits]
        differences = sorted(found[k].match.difference for k in hits)
        return {
            "planted": len(planted), "hits": len(hits), "listed": len(found), "false": len(false),
            "unexplained": len(false) - len(explained), "missed": missed, "false_pairs": false,
            "explained": explained, "planted_s": planted_s, "audit_s": audit_s, "described": described,
            "compared": report.pairs_compared, "differences": differences,
        }


def swap_labels(labels: np.ndarray, share: float, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(swapped labels, indices swapped)``: ``share`` of them (at least one) moved to another class at random."""
    count = max(1, round(share * len(labels)))
    chosen = rng.choice(len(labels), count, replace=False)
    out = labels.copy()
    out[chosen] = (out[chosen] + rng.integers(1, classes, size=count)) % classes
    return out, chosen


def label_runs(features: np.ndarray, labels: np.ndarray, classes: int, share: float, draws: int, top_share: float) -> dict:
    """Swap, audit, score over ``draws`` draws."""
    k = max(1, math.ceil(top_share * len(labels)))
    swaps = flagged = in_flagged = in_top = 0
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        noisy, chosen = swap_labels(labels, share, classes, rng)
        probs = out_of_fold_probabilities(features, noisy, classes, seed=draw)
        issues = label_issues(noisy, probs)
        ranked = np.argsort(probs[np.arange(len(noisy)), noisy], kind="stable")[:k]
        swaps += len(chosen)
        flagged += len(issues)
        in_flagged += len(set(issues) & set(chosen.tolist()))
        in_top += len(set(ranked.tolist()) & set(chosen.tolist()))
    return {"swaps": swaps, "flagged": flagged, "in_flagged": in_flagged, "in_top": in_top, "k": k}


def pixel_features(records: list[VideoRecord]) -> np.ndarray:
    """Mean and spread over time of each video's 24x24 fingerprint thumbnails."""
    rows = []
    for r in records:
        thumbs = fingerprint_video(r.path).thumbs
        rows.append(np.concatenate([thumbs.mean(0).ravel(), thumbs.std(0).ravel()]))
    return np.stack(rows)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="+", help="dataset folders DATA/<class>/<video>")
    parser.add_argument("--fraction", type=float, default=0.15, help="share of the videos copied (0.05-0.2)")
    parser.add_argument("--plant-seeds", default="0,1,2", help="one planting per seed")
    parser.add_argument("--swap", type=float, default=0.05, help="share of the training videos whose label is swapped")
    parser.add_argument("--draws", type=int, default=10, help="label-swap draws")
    parser.add_argument("--top", type=float, default=0.10, help="top-k suggestions: k = this share of the training videos")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=DUPLICATE_THRESHOLD)
    parser.add_argument("--backbone", default=None, help="label audit backbone (e.g. effnet3d); without it no label rows")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--clips", type=int, default=3, help="clips per training video for the embedding")
    args = parser.parse_args()
    threads = setup_threads(args.threads)
    seeds = [int(s) for s in args.plant_seeds.split(",")][: 1 if args.quick else None]
    draws = 2 if args.quick else args.draws
    print(f"{load_line()}; torch threads {threads}; duplicate threshold {args.threshold:g} (similarity "
          f"{1 - args.threshold / 255:.3f})", flush=True)
    model = load_audit_model(args.backbone, args.weights, args.preset)
    table = []
    for data in args.data:
        index = load_dataset(data, split_seed=args.split_seed)
        name = data.resolve().name
        print(f"\n== {name}: {len(index.records)} videos, split "
              + "/".join(str(len(index.split(s))) for s in SPLITS), flush=True)
        t0 = time.perf_counter()
        as_is = audit_dataset(index, threshold=args.threshold)
        print(f"as it is ({time.perf_counter() - t0:.1f} s, {as_is.pairs_compared} cross-split pairs compared):")
        for w in as_is.warnings():
            print("  " + w.replace(str(data.resolve()) + "/", "").replace(str(data) + "/", ""))
        if not as_is.warnings():
            print("  nothing")
        existing = {pair_key(d.a, d.b) for d in as_is.duplicates}

        runs = []
        for seed in seeds:
            run = duplicate_run(index, args.fraction, seed, existing, args.threshold)
            runs.append(run)
            print(f"planting seed {seed}: {run['hits']}/{run['planted']} planted pairs found; {run['listed']} listed, "
                  f"{run['false']} not planted ({run['unexplained']} unexplained); copies {run['planted_s']:.0f} s, "
                  f"audit {run['audit_s']:.0f} s over {run['compared']} pairs; difference of the planted pairs found "
                  f"{min(run['differences'], default=float('nan')):.1f}-{max(run['differences'], default=float('nan')):.1f}",
                  flush=True)
            for copy, src, how in run["missed"]:
                print(f"  missed: {copy.path.name} ({how}) of {src.path.name}")
            for d, why in run["explained"]:
                print(f"  not planted, explained: {d.a.name} / {d.b.name} ({d.match.similarity:.3f}): {why}")
            for d in run["false_pairs"]:
                if all(d is not e for e, _ in run["explained"]):
                    print(f"  not planted: {d.a.name} / {d.b.name} ({d.match.similarity:.3f})")
        planted = sum(r["planted"] for r in runs)
        hits = sum(r["hits"] for r in runs)
        listed = sum(r["listed"] for r in runs)
        false = sum(r["false"] for r in runs)
        unexplained = sum(r["unexplained"] for r in runs)
        table.append((name, "duplicates", f"recall {hits}/{planted} = {hits / planted:.1%}",
                      (f"false pairs {false}/{listed} = {false / max(listed, 1):.1%} strict, "
                       f"{unexplained}/{listed} = {unexplained / max(listed, 1):.1%} without real twins")))

        train = index.split("train")
        classes = sorted({r.label for r in train})
        if model is not None:
            t0 = time.perf_counter()
            emb = compute_embeddings(model.model, train, clips_per_video=args.clips)
            embed_s = time.perf_counter() - t0
            labels = np.array([classes.index(r.label) for r in emb.records])
            feats = emb.video.numpy()
            as_is_issues = label_issues(labels, out_of_fold_probabilities(feats, labels, len(classes)))
            print(f"label audit as it is ({model.description}, embedding {embed_s:.0f} s): "
                  + (", ".join(f"{emb.records[i].path.name} ({emb.records[i].label})" for i in as_is_issues) or "nothing"))
            res = label_runs(feats, labels, len(classes), args.swap, draws, args.top)
            table.append((name, f"label swaps, {model.description}",
                          f"in top-{res['k']}: {res['in_top']}/{res['swaps']} = {res['in_top'] / res['swaps']:.1%}",
                          (f"flagged: {res['in_flagged']}/{res['swaps']} = {res['in_flagged'] / res['swaps']:.1%} "
                           f"of swaps, {res['flagged'] / draws:.1f} flagged per draw of {len(labels)} "
                           f"(precision {res['in_flagged'] / max(res['flagged'], 1):.1%})")))
        pixels = pixel_features(train)
        labels = np.array([classes.index(r.label) for r in train])
        res = label_runs(pixels, labels, len(classes), args.swap, draws, args.top)
        table.append((name, "label swaps, pixel fingerprint features",
                      f"in top-{res['k']}: {res['in_top']}/{res['swaps']} = {res['in_top'] / res['swaps']:.1%}",
                      (f"flagged: {res['in_flagged']}/{res['swaps']} = {res['in_flagged'] / res['swaps']:.1%} "
                       f"of swaps, {res['flagged'] / draws:.1f} flagged per draw of {len(labels)} "
                       f"(precision {res['in_flagged'] / max(res['flagged'], 1):.1%})")))

    print(f"\nplanted: {args.fraction:.0%} of the videos per seed ({len(seeds)} seed(s)); "
          f"swapped: {args.swap:.0%} of the training videos per draw ({draws} draws)")
    for row in table:
        print(" | ".join(row))
    print(rss_line())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
