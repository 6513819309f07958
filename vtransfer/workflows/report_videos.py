"""The test report's videos: which test videos a run draws, explained, for the report's gallery.

After the test, a run picks the videos most worth a look
(:func:`vtransfer.reporting.gallery.videos_to_show`: the misclassified ones,
one correct video per class, the least confident correct answers), up to
``--report-videos``, and draws each as ``vtransfer explain`` does: a strip
of frames with the Grad-CAM map and the temporal bar, under
``RUN/report/videos/``. The report links them by relative path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vtransfer.evaluation.metrics import EvalResult
from vtransfer.models.base import VideoBackbone
from vtransfer.reporting.gallery import GalleryItem, confidence, videos_to_show
from vtransfer.workflows.explain import BAR_MEANING, explain_videos

VIDEOS_DIR = "videos"
GALLERY_NOTE = ("Each strip: 8 frames of the clip the model scored, with Grad-CAM (where the evidence for the "
                "predicted class lies) over them; " + BAR_MEANING[0].lower() + BAR_MEANING[1:] + ".")


def draw_report_videos(model: VideoBackbone, result: EvalResult, records: list, classes: list[str], report_dir: Path,
                       limit: int) -> list[GalleryItem]:
    """Explain up to ``limit`` of ``result``'s videos (``records`` in the result's order) into ``report_dir/videos``.

    A video that cannot be drawn keeps its place in the gallery with the reason instead of a strip.
    """
    chosen = videos_to_show(result)[:max(0, limit)]
    if not chosen:
        return []
    out = Path(report_dir) / VIDEOS_DIR
    explained = explain_videos(model, [records[i] for i in chosen], out, classes=classes, gif=False)
    items = []
    for i, expl in zip(chosen, explained):
        p = result.predictions[i]
        strip = expl.png.relative_to(report_dir).as_posix() if expl.png is not None else None
        items.append(GalleryItem(p.name or str(p.index), p.true, p.predicted, confidence(p), p.correct, strip=strip,
                                 note=expl.error and f"not drawn: {expl.error}"))
    return items


def gallery_or_warning(model: VideoBackbone, result: EvalResult, records: list, classes: list[str], report_dir: Path,
                       limit: int, warn: Callable[[str], None]) -> list[GalleryItem]:
    """:func:`draw_report_videos`, or ``[]`` with a warning when drawing fails: the numbers stand without the pictures."""
    if not limit:
        return []
    try:
        return draw_report_videos(model, result, records, classes, report_dir, limit)
    except (RuntimeError, ValueError, OSError) as e:
        warn(f"warning: the report's videos were not drawn: {type(e).__name__}: {e}")
        return []
