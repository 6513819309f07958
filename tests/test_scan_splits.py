"""Dataset scanning, splits, manifests, UCF split lists and categories (no decoding needed)."""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli import data_cmds, deploy_cmds
from vtransfer.cli.app import app
from vtransfer.cli.run_options import run_values
from vtransfer.data.categories import UNCATEGORISED, load_categories
from vtransfer.data.records import DatasetIndex, VideoRecord
from vtransfer.data.scan import load_dataset, scan_dataset
from vtransfer.data.sniff import classify_file, container_from_bytes, sniff_container
from vtransfer.data.splits import (
    _largest_remainder,
    check_ratios,
    read_manifest,
    stratified_split,
    write_manifest,
)
from vtransfer.run_config import FIELDS, parse_ratios
from vtransfer.utils.errors import ConfigError, DatasetError

vtransfer.cli._register_commands()

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# Enough of an MP4 header for the scanner (which never decodes) to take it as a video.
MP4_HEAD = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 64


def fake_video(path: Path | bytes, head: bytes = MP4_HEAD) -> None:
    """Write a file whose first bytes announce a video container."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head)


def make_flat(root: Path, sizes: dict[str, int], name: str = "{c}_{i:02d}.mp4") -> None:
    for c, n in sizes.items():
        for i in range(n):
            fake_video(root / c / name.format(c=c, i=i))


def split_counts(records) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        out[r.label][r.split] += 1
    return out


# ----------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    "head, expected",
    [
        (MP4_HEAD, "mp4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00", "mov"),
        (b"\x00\x00\x00\x14ftyp3gp5\x00\x00\x02\x00", "3gp"),
        (b"\x00\x00\x00\x08wide\x00\x00\x10\x00mdat", "mov"),
        (b"RIFF\x00\x10\x00\x00AVI LIST", "avi"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "webm"),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "matroska"),
        (b"\x47" + b"\xff" * 187 + b"\x47" + b"\xff" * 187 + b"\x47", "mpegts"),
        (b"\x00\x00\x01\xba\x44\x00\x04", "mpeg-ps"),
        (b"FLV\x01\x05\x00\x00\x00\x09", "flv"),
        (b"OggS\x00\x02" + b"\x00" * 20, "ogg"),
        (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c") + b"\x00" * 8, "asf"),
        (b"\x00\x00\x00\x01\x67\x42\x00\x1e", "h264"),
        (b"\x00\x00\x00\x14ftypM4A \x00\x00\x02\x00", None),  # audio-only MP4
        (b"hello world, this is text", None),
        (b"\x89PNG\r\n\x1a\n\x00\x00", None),
        (b"RIFF\x00\x10\x00\x00WAVEfmt ", None),
    ],
)
def test_container_from_magic_bytes(head, expected):
    assert container_from_bytes(head) == expected


def test_classify_file_by_content_not_extension(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video\n")
    (tmp_path / "still.avi").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "empty.mkv").write_bytes(b"")
    (tmp_path / ".hidden.mp4").write_bytes(MP4_HEAD)
    (tmp_path / "clip.dat").write_bytes(MP4_HEAD)  # odd extension, real MP4 content
    (tmp_path / "raw.mp4").write_bytes(b"\x00\x07\x01\x93\xfe" * 20)  # unknown binary, video extension
    (tmp_path / "blob.xyz").write_bytes(b"\x00\x07\x01\x93\xfe" * 20)  # unknown binary, other extension
    verdict = {p.name: classify_file(p) for p in tmp_path.iterdir()}
    assert verdict["notes.mp4"].skip_reason == "not a video (text file)"
    assert verdict["still.avi"].skip_reason == "not a video (PNG image)"
    assert verdict["empty.mkv"].skip_reason == "zero-byte file"
    assert verdict[".hidden.mp4"].skip_reason == "hidden file"
    assert verdict["clip.dat"].is_video and verdict["clip.dat"].container == "mp4"
    assert verdict["raw.mp4"].is_video and verdict["raw.mp4"].container is None
    assert not verdict["blob.xyz"].is_video
    assert sniff_container(tmp_path / "clip.dat") == "mp4"
    assert sniff_container(tmp_path / "notes.mp4") is None
    assert sniff_container(tmp_path / "missing.mp4") is None


# ----------------------------------------------------------------------------- scanning


def test_scan_flat_layout_sorts_classes_and_lists_skips(tmp_path):
    make_flat(tmp_path, {"zebra": 2, "Apple": 3, "mango": 1})
    (tmp_path / "mango" / "readme.mp4").write_text("text\n")
    (tmp_path / "mango" / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "loose.mp4").write_bytes(MP4_HEAD)
    fake_video(tmp_path / "zebra" / "sub" / "nested.webm")
    index = scan_dataset(tmp_path)
    assert index.classes == ["Apple", "mango", "zebra"]
    assert len(index.records) == 7
    assert all(r.split is None and r.path.is_absolute() for r in index.records)
    assert Counter(r.label for r in index.records) == {"Apple": 3, "mango": 1, "zebra": 3}
    reasons = {p.name: s for p, s in ((s.path, s.reason) for s in index.skipped)}
    assert reasons == {
        "readme.mp4": "not a video (text file)",
        ".DS_Store": "hidden file",
        "loose.mp4": "not inside a class folder",
    }


def test_scan_split_folder_layout(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        make_flat(tmp_path / split, {"a": n, "b": n})
    index = scan_dataset(tmp_path)
    assert index.classes == ["a", "b"]
    assert {s: len(index.split(s)) for s in ("train", "val", "test")} == {"train": 6, "val": 2, "test": 4}
    assert index.counts() == {"a": {"train": 3, "val": 1, "test": 2}, "b": {"train": 3, "val": 1, "test": 2}}
    loaded = load_dataset(tmp_path, split_seed=5)
    assert [(r.path, r.split) for r in loaded.records] == [(r.path, r.split) for r in index.records]


def test_split_folders_without_val_get_val_carved_from_train(tmp_path):
    make_flat(tmp_path / "train", {"a": 10, "b": 10})
    make_flat(tmp_path / "test", {"a": 2, "b": 2})
    index = load_dataset(tmp_path)
    counts = split_counts(index.records)
    for c in ("a", "b"):
        assert counts[c]["test"] == 2  # the given test split is untouched
        assert counts[c]["val"] == 2 and counts[c]["train"] == 8  # 10 * 0.15/0.85 = 1.76 -> 2


def test_mixed_layout_is_an_error(tmp_path):
    make_flat(tmp_path / "train", {"a": 2})
    make_flat(tmp_path, {"b": 2})
    with pytest.raises(DatasetError, match="mixes split folders"):
        scan_dataset(tmp_path)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    make_flat(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "empty_one").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*empty_one contains no video"):
        scan_dataset(tmp_path)
    (tmp_path / "empty_one" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"empty_one contains no video files \(1 file\(s\) skipped: not a video"):
        scan_dataset(tmp_path)


def test_missing_dataset_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")


def test_symlink_loops_are_reported_not_followed(tmp_path):
    make_flat(tmp_path, {"a": 3, "b": 3})
    os.symlink(tmp_path / "a", tmp_path / "a" / "self_loop")
    os.symlink(tmp_path, tmp_path / "b" / "up_to_root")
    os.symlink(tmp_path / "b", tmp_path / "a" / "to_b")  # not a loop, but b is scanned on its own
    os.symlink(tmp_path / "gone", tmp_path / "a" / "dangling.mp4")
    index = scan_dataset(tmp_path)
    assert Counter(r.label for r in index.records) == {"a": 3, "b": 3}
    reasons = {s.path.name: s.reason for s in index.skipped}
    assert reasons["self_loop"].startswith("symlink loop")
    assert reasons["up_to_root"].startswith("symlink loop")
    assert reasons["dangling.mp4"] == "broken symbolic link"
    assert reasons["to_b"] == "folder already scanned through another link"


def test_single_class_dataset_is_an_error(tmp_path):
    make_flat(tmp_path, {"only": 5})
    with pytest.raises(DatasetError, match=r"single class \(only\)"):
        load_dataset(tmp_path)


def test_class_in_test_but_not_in_train_is_an_error(tmp_path):
    make_flat(tmp_path / "train", {"a": 3, "b": 3})
    make_flat(tmp_path / "test", {"a": 1, "c": 1})
    with pytest.raises(DatasetError, match=r"class\(es\) c appear in test but have no training video"):
        load_dataset(tmp_path)


def test_odd_names_round_trip_through_the_manifest(tmp_path):
    root = os.fsencode(tmp_path / "data")
    for cls in (b"with space", b"caf\xe9"):  # the second is not valid UTF-8
        for i in range(3):
            fake_video(os.path.join(root, cls, b"clip %d \xff,\"q\".mp4" % i))
    index = load_dataset(Path(os.fsdecode(root)))
    assert sorted(index.classes) == index.classes and len(index.classes) == 2
    assert "with space" in index.classes
    assert all(os.path.exists(r.path) for r in index.records)
    manifest = tmp_path / "data" / "split.csv"
    write_manifest(manifest, index)
    again = read_manifest(manifest)
    assert [(r.path, r.label, r.split) for r in again.records] == [(r.path, r.label, r.split) for r in index.records]
    before = manifest.read_bytes()
    write_manifest(manifest, again)
    assert manifest.read_bytes() == before
    assert b"caf\xe9/clip 0 \xff" in before  # raw bytes preserved, path relative


# ----------------------------------------------------------------------------- stratified splits


def test_largest_remainder_sums_and_rounds():
    for n in range(0, 40):
        counts = _largest_remainder(n, (0.7, 0.15, 0.15), random.Random(n))
        assert sum(counts) == n
        assert all(abs(c - n * r) < 1 for c, r in zip(counts, (0.7, 0.15, 0.15)))


def test_stratified_split_holds_per_class_proportions(tmp_path):
    sizes = {"big": 40, "mid": 20, "small": 7, "three": 3, "two": 2, "one": 1}
    make_flat(tmp_path, sizes)
    records = scan_dataset(tmp_path).records
    ratios = (0.7, 0.15, 0.15)
    counts = split_counts(stratified_split(records, ratios, seed=3))
    for c in ("big", "mid", "small"):
        n = sizes[c]
        for s, r in zip(("train", "val", "test"), ratios):
            assert abs(counts[c][s] - n * r) < 1, (c, s, counts[c])
    assert counts["three"] == {"train": 1, "val": 1, "test": 1}
    assert counts["two"]["train"] == 1 and counts["two"]["val"] + counts["two"]["test"] == 1
    assert counts["one"] == {"train": 1}
    # Other ratios are respected too.
    counts = split_counts(stratified_split(records, (0.5, 0.25, 0.25), seed=3))
    assert (counts["big"]["train"], counts["big"]["val"], counts["big"]["test"]) == (20, 10, 10)


def test_stratified_split_is_deterministic_and_seeded(tmp_path):
    make_flat(tmp_path, {"a": 30, "b": 25})
    records = scan_dataset(tmp_path).records
    first = {r.path: r.split for r in stratified_split(records, seed=11)}
    shuffled = list(reversed(records))
    assert {r.path: r.split for r in stratified_split(shuffled, seed=11)} == first
    other = {r.path: r.split for r in stratified_split(records, seed=12)}
    assert other != first
    train_per_class = lambda split: Counter(p.parent.name for p, s in split.items() if s == "train")  # noqa: E731
    assert train_per_class(other) == train_per_class(first) == {"a": 21, "b": 17}


def test_group_pattern_keeps_groups_together_kth_like(tmp_path):
    # KTH-like: person01..person12 each appear in every class, 2-4 clips per class.
    for p in range(1, 13):
        for c in ("boxing", "jogging", "waving"):
            for d in range(1, 2 + (p + len(c)) % 3 + 1):
                fake_video(tmp_path / c / f"person{p:02d}_{c}_d{d}_uncomp.avi", b"RIFF\x00\x00\x00\x00AVI LIST")
    index = load_dataset(tmp_path, group_pattern=r"(person\d+)", split_seed=1)
    split_of_group: dict[str, set] = defaultdict(set)
    for r in index.records:
        assert r.group == re.search(r"person\d+", r.path.name).group(0)
        split_of_group[r.group].add(r.split)
    assert all(len(s) == 1 for s in split_of_group.values()), split_of_group
    counts = split_counts(index.records)
    for c in counts:
        assert counts[c]["train"] > counts[c]["val"] > 0 and counts[c]["test"] > 0
    n_groups = Counter(next(iter(s)) for s in split_of_group.values())
    assert n_groups["train"] >= 7 and n_groups["val"] >= 1 and n_groups["test"] >= 1
    # Without the pattern, the same person does straddle splits (what the pattern prevents).
    plain = load_dataset(tmp_path, split_seed=1)
    straddling = defaultdict(set)
    for r in plain.records:
        straddling[re.search(r"person\d+", r.path.name).group(0)].add(r.split)
    assert any(len(s) > 1 for s in straddling.values())


def test_group_pattern_whole_match_and_unmatched_files(tmp_path):
    make_flat(tmp_path, {"a": 6, "b": 6}, name="{c}_g{i:02d}.mp4")
    fake_video(tmp_path / "a" / "nogroup.mp4")
    index = load_dataset(tmp_path, group_pattern=r"g0[0-2]")  # no capture group: whole match
    groups = {r.path.name: r.group for r in index.records}
    assert groups["a_g01.mp4"] == "g01" and groups["b_g01.mp4"] == "g01"
    assert groups["a_g05.mp4"] is None and groups["nogroup.mp4"] is None
    by_group = defaultdict(set)
    for r in index.records:
        if r.group:
            by_group[r.group].add(r.split)
    assert all(len(s) == 1 for s in by_group.values())


def test_bad_ratios_and_pattern_are_config_errors(tmp_path):
    assert parse_ratios("70,15,15") == pytest.approx((0.7, 0.15, 0.15))
    assert parse_ratios("0.8, 0.1, 0.1") == pytest.approx((0.8, 0.1, 0.1))
    bad_values = ("0.7,0.3", "a,b,c", "0,0.5,0.5", "0.8,-0.1,0.3", "0.5,0.2,0.2", "7,1.5,1.5", "nan,0.5,0.5", "1,1,1,1")
    for bad in bad_values:
        with pytest.raises(ConfigError, match=f"--ratios '{re.escape(bad)}': "):
            parse_ratios(bad)
    with pytest.raises(ConfigError, match=r"--ratios '0\.5,0\.2,0\.2': the shares sum to 0\.9; give fractions summing to 1 "
                                          r"\(0\.7,0\.15,0\.15\) or percentages summing to 100 \(70,15,15\)"):
        parse_ratios("0.5,0.2,0.2")
    with pytest.raises(ConfigError, match="--ratios '2,1,1': the shares sum to 4"):  # the API follows the same rule
        stratified_split([], (2, 1, 1))
    make_flat(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(ConfigError, match="--group-pattern"):
        load_dataset(tmp_path, group_pattern="person(")


#: Every command that takes --ratios, with what else it needs to get as far as reading it.
RATIO_COMMANDS = {
    "finetune": ["--out", "{tmp}/run"],
    "pretrain": ["--out", "{tmp}/run"],
    "compare-policies": ["--out", "{tmp}/run"],
    "extract-features": ["--out", "{tmp}/emb", "--preset", "tiny"],  # after the backbone argument
    "check": [],
    "split": ["--out", "{tmp}/split.csv"],
}


@pytest.mark.parametrize("fractions, percentages", [("0.7,0.15,0.15", "70,15,15"), ("0.5,0.2,0.3", "50, 20, 30"),
                                                    ("0.8,0.2,0", "80/20/0"), ("0.6,0.2,0.2", "60:20:20")])
def test_ratios_are_fractions_or_percentages_in_every_command(fractions, percentages):
    expected = tuple(float(x) for x in fractions.split(","))
    # finetune, pretrain and compare-policies: the option generated from the run configuration
    assert FIELDS["ratios"][1].metadata["parse"] is parse_ratios
    # extract-features, check and split call the same parser
    assert deploy_cmds.O.parse_ratios is parse_ratios and data_cmds.parse_ratios is parse_ratios
    for text in (fractions, percentages):
        assert parse_ratios(text) == expected  # the very floats: percentages give the split fractions give
        assert run_values({"ratios": text})["ratios"] == expected
        assert check_ratios(text) == check_ratios(expected)
    assert check_ratios([float(x) for x in percentages.replace("/", ",").replace(":", ",").split(",")]) == \
        check_ratios(expected)  # a recipe's or the API's list follows the same rule


@pytest.mark.parametrize("command", sorted(RATIO_COMMANDS))
def test_a_bad_ratios_value_is_refused_by_every_command_naming_it(command, tmp_path):
    data = tmp_path / "data"
    make_flat(data, {"a": 3, "b": 3})
    head = [command, "i3d", str(data)] if command == "extract-features" else [command, str(data)]
    extra = [a.format(tmp=tmp_path) for a in RATIO_COMMANDS[command]]
    result = CliRunner().invoke(app, [*head, *extra, "--ratios", "0.5,0.2,0.2"])
    said = " ".join((str(result.exception) + " " + result.output).split())
    assert result.exit_code != 0, result.output
    assert "--ratios '0.5,0.2,0.2': the shares sum to 0.9" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_cli_split_takes_percentages_as_fractions(tmp_path):
    data = tmp_path / "data"
    make_flat(data, {"a": 13, "b": 9, "c": 4})
    for name, ratios in (("pct.csv", "60,25,15"), ("frac.csv", "0.6,0.25,0.15")):
        result = CliRunner().invoke(app, ["split", str(data), "--out", str(tmp_path / name), "--ratios", ratios])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "pct.csv").read_bytes() == (tmp_path / "frac.csv").read_bytes()
    by_api = load_dataset(data, ratios=(60, 25, 15))
    written = read_manifest(tmp_path / "pct.csv")
    assert [(r.path, r.split) for r in by_api.records] == [(r.path, r.split) for r in written.records]


# ----------------------------------------------------------------------------- manifests


def test_saved_split_is_reused_byte_for_byte(tmp_path):
    data = tmp_path / "data"
    make_flat(data, {"a": 9, "b": 7, "c": 5})
    index = load_dataset(data, split_seed=4)
    inside = data / "split.csv"
    write_manifest(inside, index)
    text = inside.read_text()
    assert text.splitlines()[0] == "path,class,split,group"
    assert "a/a_00.mp4,a," in text  # relative to the manifest's folder

    reused = load_dataset(data, manifest=inside, split_seed=99)  # the seed no longer matters
    assert [(r.path, r.split) for r in reused.records] == [(r.path, r.split) for r in index.records]
    write_manifest(tmp_path / "copy.csv", reused)
    write_manifest(inside, reused)
    assert inside.read_text() == text
    from_file = load_dataset(inside)  # a manifest can be the source itself
    assert [(r.path, r.split) for r in from_file.records] == [(r.path, r.split) for r in index.records]

    outside = tmp_path / "elsewhere" / "split.csv"
    write_manifest(outside, index)
    first_path = outside.read_text().splitlines()[1].split(",")[0]
    assert os.path.isabs(first_path)  # outside the manifest's folder: absolute
    before = outside.read_bytes()
    write_manifest(outside, read_manifest(outside))
    assert outside.read_bytes() == before
    assert [p.name for p in outside.parent.iterdir()] == ["split.csv"]  # no temp files left


def test_manifest_errors_name_the_problem(tmp_path):
    data = tmp_path / "data"
    make_flat(data, {"a": 4, "b": 4})
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, load_dataset(data))
    fake_video(data / "a" / "added_later.mp4")
    index = load_dataset(data, manifest=manifest)
    assert [s.reason for s in index.skipped if s.path.name == "added_later.mp4"] == ["not listed in manifest m.csv"]
    (data / "b" / "b_02.mp4").unlink()
    with pytest.raises(DatasetError, match=r"m\.csv lists 1 video\(s\) that do not exist: .*b_02\.mp4"):
        load_dataset(data, manifest=manifest)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class,split\nx.mp4,a,training\n")
    with pytest.raises(DatasetError, match=r"bad\.csv line 2: split 'training'"):
        read_manifest(bad)
    bad.write_text("file,label\nx.mp4,a\n")
    with pytest.raises(DatasetError, match="no path, class, split column"):
        read_manifest(bad)
    with pytest.raises(DatasetError, match="cannot read manifest"):
        read_manifest(tmp_path / "absent.csv")


def test_manifest_of_hand_built_index(tmp_path):
    videos = [tmp_path / f"v{i}.mp4" for i in range(2)]
    for v in videos:
        v.write_bytes(MP4_HEAD)
    index = DatasetIndex(
        root=tmp_path, classes=["x", "y"],
        records=[VideoRecord(videos[0], "x", "train", "g1"), VideoRecord(videos[1], "y", None, None)],
    )
    write_manifest(tmp_path / "m.csv", index)
    assert (tmp_path / "m.csv").read_text() == "path,class,split,group\nv0.mp4,x,train,g1\nv1.mp4,y,,\n"
    back = read_manifest(tmp_path / "m.csv")
    assert back.records == index.records and back.root == tmp_path


# ----------------------------------------------------------------------------- UCF-101 split lists


def make_ucf(root: Path) -> Path:
    """A UCF-101-shaped dataset with lists; returns the folder holding the lists."""
    for cls, file_cls in (("ApplyEyeMakeup", "ApplyEyeMakeup"), ("HandstandPushups", "HandStandPushups")):
        for g in range(1, 11):
            for clip in range(1, 3):
                fake_video(root / cls / f"v_{file_cls}_g{g:02d}_c{clip:02d}.avi", b"RIFF\x00\x00\x00\x00AVI LIST")
    lists = root.parent / "ucfTrainTestlist"
    lists.mkdir()
    train, test = [], []
    for label, file_cls in ((1, "ApplyEyeMakeup"), (2, "HandStandPushups")):
        for g in range(1, 11):
            for clip in range(1, 3):
                entry = f"{file_cls}/v_{file_cls}_g{g:02d}_c{clip:02d}.avi"
                (test.append(entry) if g <= 3 else train.append(f"{entry} {label}"))
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    return lists


def test_ucf_style_split_files(tmp_path):
    data = tmp_path / "UCF-101"
    lists = make_ucf(data)
    fake_video(data / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g99_c01.avi")  # listed nowhere
    index = load_dataset(data, split_files=lists, split_seed=2)
    assert index.classes == ["ApplyEyeMakeup", "HandstandPushups"]
    test_groups = {r.path.name.split("_g")[1][:2] for r in index.split("test")}
    assert test_groups == {"01", "02", "03"}
    assert len(index.split("test")) == 12
    # Validation is carved out of train by group (g04..g10): no group straddles train and val.
    split_of_group = defaultdict(set)
    for r in index.records:
        if r.split != "test":
            split_of_group[(r.label, r.group)].add(r.split)
    assert all(len(s) == 1 for s in split_of_group.values())
    assert 0 < len(index.split("val")) < len(index.split("train"))
    assert len(index.split("train")) + len(index.split("val")) == 28
    assert [s.reason for s in index.skipped] == ["not listed in trainlist01.txt or testlist01.txt"]
    # Passing one list file works the same way.
    same = load_dataset(data, split_files=lists / "testlist01.txt", split_seed=2)
    assert [(r.path, r.split) for r in same.records] == [(r.path, r.split) for r in index.records]


def test_ucf_split_files_naming_missing_videos(tmp_path):
    data = tmp_path / "UCF-101"
    lists = make_ucf(data)
    (data / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g05_c01.avi").unlink()
    with pytest.raises(DatasetError, match=r"list 1 video\(s\) not found .*v_ApplyEyeMakeup_g05_c01\.avi"):
        load_dataset(data, split_files=lists)
    # A listed file that the scanner skipped (e.g. zero bytes) is reported by check, not an error.
    (data / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g05_c01.avi").write_bytes(b"")
    index = load_dataset(data, split_files=lists)
    assert [s.reason for s in index.skipped] == ["zero-byte file"]
    with pytest.raises(DatasetError, match="holds no trainlistNN"):
        load_dataset(data, split_files=data / "ApplyEyeMakeup")


# ----------------------------------------------------------------------------- categories


def test_categories_from_ucf_groups_file():
    groups = SHARED / "ucf101_groups.csv"
    if not groups.exists():
        pytest.skip("../shared/data is not present")
    classes = [line.split(",")[0] for line in groups.read_text().splitlines()[1:] if line.strip()]
    mapping = load_categories(groups, classes)
    assert len(mapping) == 101
    assert sorted(Counter(mapping.values()).values()) == [5, 10, 16, 20, 50]
    assert mapping["ApplyEyeMakeup"] == "Human-Object Interaction"
    with pytest.raises(DatasetError, match=r"names 100 class\(es\) that are not in the dataset"):
        load_categories(groups, ["ApplyEyeMakeup"])


def test_categories_errors_and_uncategorised(tmp_path):
    f = tmp_path / "cats.csv"
    f.write_text("run,motion\nred_ball,appearance\n")  # no header
    assert load_categories(f, ["red_ball", "run", "zzz"]) == {
        "red_ball": "appearance", "run": "motion", "zzz": UNCATEGORISED,
    }
    f.write_text("class,category\nrun,motion\nJump,motion\nswim,motion\n")
    with pytest.raises(DatasetError, match=r"cats\.csv names 2 class\(es\).*Jump \(did you mean jump\?\), swim"):
        load_categories(f, ["run", "jump"])
    f.write_text("class,category\nrun,motion,extra\n")
    with pytest.raises(DatasetError, match="line 2: expected 'class,category'"):
        load_categories(f, ["run"])
    f.write_text("run,motion\nrun,appearance\n")
    with pytest.raises(DatasetError, match="two categories"):
        load_categories(f, ["run"])
    with pytest.raises(DatasetError, match="cannot read categories file"):
        load_categories(tmp_path / "none.csv", ["run"])


# ----------------------------------------------------------------------------- CLI: split


def test_cli_split_writes_manifest_and_refuses_overwrite(tmp_path):
    data = tmp_path / "data"
    make_flat(data, {"a": 10, "b": 10})
    out = tmp_path / "split.csv"
    runner = CliRunner()
    result = runner.invoke(app, ["split", str(data), "--out", str(out), "--split-seed", "3", "--ratios", "0.6,0.2,0.2"])
    assert result.exit_code == 0, result.output
    written = out.read_bytes()
    index = read_manifest(out)
    assert Counter(r.split for r in index.records) == {"train": 12, "val": 4, "test": 4}
    result = runner.invoke(app, ["split", str(data), "--out", str(out), "--split-seed", "4"])
    assert result.exit_code == 2 and "already exists" in result.output
    assert out.read_bytes() == written
    result = runner.invoke(app, ["split", str(data), "--out", str(out), "--split-seed", "4", "--overwrite", "--json"])
    assert result.exit_code == 0
    payload = json.loads(result.output)
    assert payload["videos"] == 20 and payload["manifest"] == str(out)
    assert payload["counts"]["a"]["train"] == 7 and sum(payload["counts"]["a"].values()) == 10
    assert out.read_bytes() != written
    result = runner.invoke(app, ["split", str(tmp_path / "missing"), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "does not exist" in result.output
