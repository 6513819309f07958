"""Report files (JSON/CSV/Markdown/PNG/HTML), Rich tables, atomic writes and the policy table."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import stat

import matplotlib.image as mpimg
import numpy as np
import pytest
from rich.console import Console

from vtransfer.reporting import plots
from vtransfer.utils.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from vtransfer.evaluation.metrics import EvalResult, classification_report
from vtransfer.reporting.formatting import format_duration, format_pct
from vtransfer.reporting.policy_report import policy_table, render_policy_table, write_policy_table
from vtransfer.reporting.report import render_eval_table, write_eval_report
from vtransfer.workflows.compare_rows import PolicyRow, aggregate_seed_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["brush_hair", "clap", "drink", "jump", "run", "wave"]
CATEGORIES = {"brush_hair": "appearance", "drink": "appearance", "wave": "appearance",
              "clap": "motion", "jump": "motion", "run": "motion"}
HISTORY = [
    {"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e, "val_video_acc": 0.08 * e, "lr": 1e-3 / e}
    for e in range(1, 6)
]


def _result(num_classes: int = 6, classes=None, categories=None, seed: int = 0) -> EvalResult:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(num_classes - 1, 1), size=4 * num_classes)  # last class has no videos
    clip_video = np.repeat(np.arange(labels.size), 3)
    logits = rng.normal(size=(clip_video.size, num_classes))
    logits[np.arange(clip_video.size), labels[clip_video]] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    classes = classes or [f"class_{i:03d}" for i in range(num_classes)]
    return classification_report(probs, clip_video, labels, classes, categories)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)  # full decode
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # not a blank canvas
    return image


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_write_eval_report_files_parse(tmp_path):
    result = _result(classes=CLASSES, categories=CATEGORIES)
    paths = write_eval_report(result, tmp_path / "rep", title="demo · top-layer",
                              extra={"backbone": "vivit", "policy": "top-layer", "cfg": {"lr": 1e-3}},
                              history=HISTORY)
    out = tmp_path / "rep"
    assert set(paths) == {"json", "per_class_csv", "confusion_csv", "markdown", "confusion_png",
                          "per_class_png", "reliability_png", "training_curves_png", "html"}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "per_class.csv", "confusion.csv", "report.md", "confusion.png",
         "per_class.png", "reliability.png", "training_curves.png", "report.html"])

    doc = json.loads((out / "report.json").read_text())
    assert doc["title"] == "demo · top-layer"
    assert doc["summary"]["video_hit1"] == pytest.approx(result.video_hit1)
    assert doc["extra"]["cfg"] == {"lr": 1e-3}
    assert len(doc["history"]) == 5
    assert EvalResult.from_dict(doc).summary() == result.summary()

    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in rows] == CLASSES
    assert rows[-1]["accuracy"] == "" and rows[-1]["support"] == "0"  # "wave" has no videos
    for r, m in zip(rows, result.per_class):
        assert r["category"] == m.category and int(r["support"]) == m.support
        assert float(r["f1"]) == pytest.approx(m.f1, abs=1e-6)

    cm_rows = list(csv.reader((out / "confusion.csv").open()))
    assert cm_rows[0] == ["true\\predicted", *CLASSES]
    assert [r[0] for r in cm_rows[1:]] == CLASSES
    np.testing.assert_array_equal(np.array([r[1:] for r in cm_rows[1:]], dtype=int), result.confusion)

    md = (out / "report.md").read_text()
    assert "| Video hit@1 | " + format_pct(result.video_hit1) + " |" in md
    assert "## Per category" in md and "![confusion.png](confusion.png)" in md

    for name in ("confusion.png", "per_class.png", "reliability.png", "training_curves.png"):
        _assert_png(out / name)

    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    assert {base64.b64decode(i) for i in images} == {(out / n).read_bytes() for n in
                                                     ("confusion.png", "per_class.png", "reliability.png",
                                                      "training_curves.png")}
    assert "<table>" in page and "<td class=\"\">brush_hair</td>" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert _no_temp_files(out) == []


def test_eval_report_without_history_or_categories(tmp_path):
    result = _result(num_classes=2)
    paths = write_eval_report(result, tmp_path, title="two classes")
    assert "training_curves_png" not in paths and not (tmp_path / "training_curves.png").exists()
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "Per category" not in page
    assert json.loads(paths["json"].read_text())["top_k"] == 2


def test_render_eval_table_shows_summary_classes_and_pairs():
    result = _result(classes=CLASSES, categories=CATEGORIES)
    console = Console(record=True, width=160)
    render_eval_table(result, console, title="Test split")
    text = console.export_text()
    assert "Test split" in text and "Video hit@1" in text and "Mean class accuracy" in text
    assert format_pct(result.video_hit1) in text
    for name in CLASSES + ["appearance", "motion", "Most confused pairs"]:
        assert name in text


def test_plots_handle_ucf101_size(tmp_path):
    n = 101
    result = _result(num_classes=n, categories={f"class_{i:03d}": f"group {i % 5}" for i in range(n)})
    cats = [c.category for c in result.per_class]
    conf = plots.write_png(plots.confusion_png(result.confusion, result.classes, categories=cats),
                           tmp_path / "c.png")
    bars = plots.write_png(plots.per_class_accuracy_png(result.classes, [c.accuracy for c in result.per_class],
                                                        categories=cats), tmp_path / "b.png")
    img = _assert_png(conf)
    assert img.shape[0] > 1500 and img.shape[1] > 1500  # big enough to read 101 names
    assert _assert_png(bars).shape[0] > 1500
    with pytest.raises(ValueError, match="does not match 5 classes"):
        plots.confusion_png(np.zeros((4, 4)), ["a"] * 5)


def test_training_curves_tolerate_missing_values(tmp_path):
    history = [{"epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_video_acc": None, "lr": 0.1},
               {"epoch": 2, "train_loss": 0.5, "train_acc": 0.7, "val_video_acc": 0.6, "lr": 0.05}]
    _assert_png(plots.write_png(plots.training_curves_png(history), tmp_path / "t.png"))
    with_ema = [{**h, "raw_val_video_acc": 0.4} for h in history]  # EMA on: the raw weights' line is drawn too
    assert plots.training_curves_png(with_ema) != plots.training_curves_png(history)
    with pytest.raises(ValueError, match="at least one epoch"):
        plots.training_curves_png([])


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_keeps_mode_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    os.chmod(target, 0o640)
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _no_temp_files(target.parent) == []


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new text")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"a": 1}
    assert _no_temp_files(tmp_path) == []
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", {"x": float("nan")})
    assert not (tmp_path / "nan.json").exists() and _no_temp_files(tmp_path) == []


# --------------------------------------------------------------------------- policy table


def _row(policy, seed, hit1, cats, time_s=10.0, trainable=1000):
    return PolicyRow(policy=policy, seeds=[seed], trainable_params=trainable, total_params=50_000,
                     train_time_s=time_s, val_video_acc=hit1 - 0.05, test_video_hit1=hit1,
                     test_video_hit_k=min(1.0, hit1 + 0.2), test_clip_hit1=hit1 - 0.1,
                     mean_class_acc=hit1 - 0.02, per_category=cats, top_k=5)


def test_aggregate_seed_rows_mean_and_sample_std():
    hits = [0.60, 0.70, 0.65]
    motion = [0.5, 0.55, None]  # one seed without a motion value
    rows = [_row("top-3", s, h, {"appearance": h + 0.1, "motion": m}, time_s=10.0 + s)
            for s, h, m in zip((1, 2, 3), hits, motion)]
    agg = aggregate_seed_rows(rows)
    assert agg.seeds == [1, 2, 3] and agg.trainable_params == 1000
    assert agg.test_video_hit1 == pytest.approx(np.mean(hits))
    assert agg.std["test_video_hit1"] == pytest.approx(np.std(hits, ddof=1))
    assert agg.train_time_s == pytest.approx(12.0) and agg.std["train_time_s"] == pytest.approx(1.0)
    assert agg.per_category["appearance"] == pytest.approx(np.mean(hits) + 0.1)
    assert agg.per_category["motion"] == pytest.approx(0.525)
    assert agg.per_category_std["motion"] == pytest.approx(np.std([0.5, 0.55], ddof=1))
    single = aggregate_seed_rows(rows[:1])
    assert single.std == {} and single.test_video_hit1 == pytest.approx(0.60)
    with pytest.raises(ValueError, match="different policies"):
        aggregate_seed_rows([rows[0], _row("all", 1, 0.5, {})])
    with pytest.raises(ValueError, match="trainable_params"):
        aggregate_seed_rows([rows[0], _row("top-3", 2, 0.5, {}, trainable=7)])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_seed_rows([])


def _compare_rows():
    per_policy = {"scratch": [0.30, 0.34], "top-layer": [0.60, 0.64], "all": [0.55, 0.61]}
    return [aggregate_seed_rows([_row(p, s, h, {"appearance": h + 0.1, "motion": h - 0.1}, time_s=10.0 + s)
                                 for s, h in zip((1, 2), hits)]) for p, hits in per_policy.items()]


def test_render_policy_table_papers_form():
    rows = _compare_rows()
    console = Console(record=True, width=220)
    render_policy_table(rows, console, title="Policies on demo")
    text = console.export_text()
    for header in ("Policy", "Seeds", "Trainable", "Train time", "Val acc", "Test hit@1",
                   "Test hit@5", "Mean class acc", "appearance", "motion"):
        assert header in text
    assert f"62.0 ± {100 * np.std([0.60, 0.64], ddof=1):.1f}%" in text
    assert "1e+03" not in text and "1K 2%" in text
    assert format_duration(11.5, 0.7071) in text


def test_policy_table_leaves_out_hit_at_k_when_k_covers_every_class():
    rng = np.random.default_rng(0)
    three = [PolicyRow.from_eval(p, 0, trainable_params=10, total_params=100, train_time_s=1.0, val_video_acc=0.5,
                                 test=classification_report(rng.dirichlet(np.ones(3), size=9), np.arange(9),
                                                            np.arange(9) % 3, list("abc"), top_k=5))
             for p in ("scratch", "top-layer")]
    assert three[0].top_k == 3 and three[0].num_classes == 3 and three[0].test_video_hit_k == 1.0
    table = policy_table([aggregate_seed_rows([r]) for r in three])
    assert "Test hit@1" in table.headers and not any(h.startswith("Test hit@3") for h in table.headers)
    assert PolicyRow.from_dict(three[0].to_dict()) == three[0]
    legacy = {k: v for k, v in three[0].to_dict().items() if k != "num_classes"}  # compare.json of an older run
    assert PolicyRow.from_dict(legacy).hit_k_is_trivial


def test_write_policy_table_files(tmp_path):
    rows = _compare_rows()
    paths = write_policy_table(rows, tmp_path, extra={"backbone": "vivit", "seeds": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["compare.json", "compare.csv", "compare.md", "compare_categories.png", "compare.html"])
    doc = json.loads(paths["json"].read_text())
    assert doc["categories"] == ["appearance", "motion"]
    back = [PolicyRow.from_dict(d) for d in doc["rows"]]
    assert [r.policy for r in back] == ["scratch", "top-layer", "all"]
    assert back[1].test_video_hit1 == pytest.approx(0.62) and back[1].std == rows[1].std

    table = list(csv.DictReader(paths["csv"].open()))
    assert [r["policy"] for r in table] == ["scratch", "top-layer", "all"]
    assert float(table[1]["test_video_hit1"]) == pytest.approx(0.62)
    assert float(table[1]["test_video_hit1_std"]) == pytest.approx(np.std([0.60, 0.64], ddof=1), rel=1e-5)
    assert float(table[0]["category:motion"]) == pytest.approx(0.22)
    assert table[0]["seeds"] == "1;2"

    md = paths["markdown"].read_text()
    assert "| top-layer |" in md and "**62.0 ± 2.8%**" in md  # best test hit@1 in bold
    assert "![compare_categories](compare_categories.png)" in md
    _assert_png(paths["categories_png"])
    page = paths["html"].read_text()
    (img,) = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(img) == paths["categories_png"].read_bytes()
    assert "<td class=\"\">top-layer</td>" in page and "<b>62.0 ± 2.8%</b>" in page
    assert _no_temp_files(tmp_path) == []


def test_policy_row_from_eval_and_unknown_fields():
    result = _result(classes=CLASSES, categories=CATEGORIES)
    row = PolicyRow.from_eval("temporal", 3, trainable_params=10, total_params=100, train_time_s=1.5,
                              val_video_acc=0.4, test=result, run_dir="runs/x")
    assert row.test_video_hit1 == result.video_hit1 and row.mean_class_acc == result.mean_class_accuracy
    assert row.per_category == result.category_accuracy() and row.seeds == [3]
    with pytest.raises(ValueError, match="unknown PolicyRow field"):
        PolicyRow.from_dict({**row.to_dict(), "colour": "red"})


def test_report_says_when_every_video_got_one_class_and_drops_trivial_hit_k(tmp_path):
    probs = np.tile([[0.2, 0.7, 0.1]], (6, 1))
    r = classification_report(probs, list(range(6)), [0, 0, 1, 1, 2, 2], ["a", "b", "c"],
                              video_names=[f"c/v{i}.mp4" for i in range(6)])
    paths = write_eval_report(r, tmp_path)
    md = paths["markdown"].read_text()
    assert "all 6 videos predicted as 'b'" in md
    assert "Video hit@3" not in md and "always 100%" in md  # 3 classes: hit@3 is trivial
    doc = json.loads(paths["json"].read_text())
    assert doc["collapsed_to"] == "b"
    assert [p["name"] for p in doc["predictions"]] == [f"c/v{i}.mp4" for i in range(6)]


def test_policy_table_keeps_durations_on_one_line_at_80_columns():
    rows = [PolicyRow(policy=p, seeds=[0], trainable_params=1_234_567, total_params=3_714_787, train_time_s=467.0,
                      val_video_acc=0.5, test_video_hit1=0.5, test_video_hit_k=1.0, test_clip_hit1=0.5, mean_class_acc=0.5,
                      per_category={"appearance": 0.5, "motion": 0.5}, top_k=5)
            for p in ("scratch", "top-layer", "top-3", "temporal", "all")]
    console = Console(width=80, record=True)
    render_policy_table(rows, console)
    text = console.export_text()
    assert text.count("7m 47s") == 5, text


def test_hit_k_keys_carry_their_k_and_reports_written_before_still_read(tmp_path):
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(1)
    labels = np.arange(12) % 4
    probs = rng.dirichlet(np.ones(4), size=12)
    r = classification_report(probs, np.arange(12), labels, list("abcd"), top_k=2)
    doc = json.loads(write_eval_report(r, tmp_path / "k2")["json"].read_text())
    assert list(doc["summary"]) == ["video_hit1", "video_hit2", "clip_hit1", "clip_hit2", "mean_class_accuracy"]
    hit2 = top_k_accuracy_score(labels, probs, k=2, labels=np.arange(4))
    assert 0 < hit2 < 1 and doc["summary"]["video_hit2"] == pytest.approx(hit2) == r.video_hit_k
    # what the writer wrote before: "video_hit5" holding hit@top_k, whatever top_k was
    old = {**doc, "summary": {("video_hit5" if k == "video_hit2" else "clip_hit5" if k == "clip_hit2" else k): v
                              for k, v in doc["summary"].items()}}
    assert EvalResult.from_dict(old).video_hit_k == pytest.approx(hit2)
    assert EvalResult.from_dict(old).summary() == EvalResult.from_dict(doc).summary() == r.summary()

    seeds = [PolicyRow.from_eval("top-3", s, trainable_params=10, total_params=100, train_time_s=1.0 + s,
                                 val_video_acc=0.5, test=classification_report(
                                     rng.dirichlet(np.ones(4), size=12), np.arange(12), labels, list("abcd"), top_k=2))
             for s in (0, 1)]
    row = aggregate_seed_rows(seeds)
    data = row.to_dict()
    assert "test_video_hit2" in data and "test_video_hit2" in data["std"]
    assert not {"test_video_hit5", "test_video_hit_k"} & (set(data) | set(data["std"]))
    assert PolicyRow.from_dict(data) == row
    legacy = {("test_video_hit5" if k == "test_video_hit2" else k): v for k, v in data.items()}
    legacy["std"] = {("test_video_hit5" if k == "test_video_hit2" else k): v for k, v in data["std"].items()}
    assert PolicyRow.from_dict(legacy) == row

    paths = write_policy_table([row], tmp_path / "cmp")
    (line,) = csv.DictReader(paths["csv"].open())
    assert float(line["test_video_hit2"]) == pytest.approx(row.test_video_hit_k)
    assert float(line["test_video_hit2_std"]) == pytest.approx(row.std["test_video_hit_k"], rel=1e-5)
    assert "| Test hit@2 |" in paths["markdown"].read_text()
    mixed = write_policy_table([row, _row("all", 0, 0.5, {})], tmp_path / "mixed")  # k = 2 and k = 5
    header = next(csv.reader(mixed["csv"].open()))
    assert "test_video_hitk" in header and "test_video_hit5" not in header and "top_k" in header


# --------------------------------------------------------------------------- HTML templates and layering


def test_html_pages_escape_every_string_they_are_given(tmp_path):
    hostile = "<script>alert(1)</script>"
    classes = ["a & b", hostile, "c"]
    result = _result(num_classes=3, classes=classes, categories={"a & b": "x<y", hostile: "x<y", "c": "z"})
    page = write_eval_report(result, tmp_path / "rep", title=f"title {hostile}", extra={hostile: hostile})["html"]
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &amp; b" in text and "x&lt;y" in text
    assert text.count("<title>title &lt;script&gt;") == 1 and text.count("<h1>title &lt;script&gt;") == 1

    row = _row(hostile, 0, 0.5, {"x<y": 0.4})
    cmp = write_policy_table([row], tmp_path / "cmp", title=hostile, extra={"k": hostile},
                             figures=[(hostile, "f.png", PNG_SIGNATURE)])["html"].read_text()
    assert "<script>" not in cmp and cmp.count("&lt;script&gt;") >= 5


def test_templates_ship_with_the_package():
    from importlib.resources import files

    names = {p.name for p in (files("vtransfer.reporting") / "templates").iterdir()}
    assert {"page.html.j2", "macros.html.j2", "eval_report.html.j2", "compare.html.j2"} <= names


def test_reporting_never_imports_workflows():
    """Workflows use reporting; reporting draws plain data and never reaches back (not even for type checking)."""
    import ast
    from pathlib import Path

    import vtransfer.reporting

    for path in Path(vtransfer.reporting.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.startswith("vtransfer.workflows") for n in names), f"{path.name}:{node.lineno}"
