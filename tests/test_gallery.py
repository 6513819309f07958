"""The videos behind a report's numbers: which are shown, and the report's gallery with relative strips."""

from __future__ import annotations

import json

import numpy as np

from vtransfer.evaluation.metrics import classification_report
from vtransfer.reporting.gallery import GalleryItem, confidence, gallery_sections, videos_to_show
from vtransfer.reporting.report import write_eval_report


def _result():
    # six videos, two per class; video 1 is wrong with 0.8, video 4 wrong with 0.5, video 2 right with 0.4
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.3, 0.4, 0.3],
                      [0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.1, 0.1, 0.8]])
    names = [f"v{i}.mp4" for i in range(6)]
    return classification_report(probs, np.arange(6), [0, 0, 1, 1, 2, 2], ["a", "b", "c"], video_names=names)


def test_errors_come_first_most_confident_first_then_one_correct_video_per_class():
    result = _result()
    order = videos_to_show(result)
    assert order[:2] == [1, 4]  # the errors, 0.8 before 0.5
    correct_per_class = {result.predictions[i].true for i in order[2:] if result.predictions[i].correct}
    assert correct_per_class == {"a", "b", "c"} and len(order) == len(set(order))
    assert confidence(result.predictions[2]) == 0.4


def test_the_report_shows_the_strips_by_relative_path_and_lists_them(tmp_path):
    result = _result()
    items = [GalleryItem(p.name, p.true, p.predicted, confidence(p), p.correct, strip=f"gallery/{i}.png")
             for i, p in enumerate(result.predictions)]
    sections = dict(gallery_sections(result, items))
    assert [i.name for i in sections["Most confident errors"]] == ["v1.mp4", "v4.mp4"]
    assert sections["Least confident correct answers"][0].name == "v2.mp4"
    shown = [i.name for chosen in sections.values() for i in chosen]
    assert len(shown) == len(set(shown))  # each video once: every class's correct video is already shown above
    assert "A correct video of each class not shown above" not in sections
    few = dict(gallery_sections(result, items, size=1))  # only v2 (class b) above: a and c get their own
    assert [i.name for i in few["A correct video of each class not shown above"]] == ["v5.mp4", "v0.mp4"]
    write_eval_report(result, tmp_path, gallery=items, gallery_note="frames of each video")
    html = (tmp_path / "report.html").read_text()
    assert 'src="gallery/1.png"' in html and "The videos behind the numbers" in html and str(tmp_path) not in html
    assert len(json.loads((tmp_path / "report.json").read_text())["gallery"]) == 6


def test_a_run_s_report_draws_its_test_videos_and_a_moved_report_keeps_them(demo_dataset, tmp_path):
    import shutil

    from vtransfer import api

    options = dict(backbone="effnet3d", frames=4, stride=2, size=48, policy="top-layer", epochs=1, clips_per_video=1,
                   val_clips=1)
    res = api.finetune(demo_dataset, **options, report_videos=4, out=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    strips = [item["strip"] for item in report["gallery"]]
    assert len(strips) == min(4, len(res.test.predictions)) and all(s.startswith("videos/") for s in strips)
    shutil.move(str(tmp_path / "run" / "report"), str(tmp_path / "moved"))
    html = (tmp_path / "moved" / "report.html").read_text()
    for strip in strips:
        assert f'src="{strip}"' in html and (tmp_path / "moved" / strip).is_file()
    api.finetune(demo_dataset, **options, report_videos=0, out=tmp_path / "none")
    assert "gallery" not in json.loads((tmp_path / "none" / "report" / "report.json").read_text())
