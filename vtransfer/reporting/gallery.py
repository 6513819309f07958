"""The videos behind a report's numbers: which ones to show, and how a report shows them.

A test report shows, as strips of frames (with where the model looked, when
an explanation was made), every misclassified video and one correct video
per class, and a gallery of the most confident errors and the least
confident correct answers: the videos most worth a look. The strips are PNG
files beside ``report.html``, named by relative paths, so the report folder
can be moved or zipped whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vtransfer.evaluation.metrics import EvalResult, VideoPrediction

#: How many of the most confident errors and of the least confident correct answers the gallery shows.
GALLERY_SIZE = 6


@dataclass(frozen=True)
class GalleryItem:
    """One video of the report's gallery: its prediction and its strip (a path relative to the report)."""

    name: str
    true: str
    predicted: str
    confidence: float
    correct: bool
    strip: str | None = None  # relative path of the PNG strip; None when it could not be drawn
    note: str | None = None  # what the strip shows, or why there is none


def confidence(p: VideoPrediction) -> float:
    """The probability of the predicted class."""
    return float(p.top[0][1]) if p.top else 0.0


def videos_to_show(result: EvalResult, size: int = GALLERY_SIZE) -> list[int]:
    """Prediction indices (into ``result.predictions``) worth a strip, each once, most telling first.

    The misclassified videos, most confident first; one correct video per
    class (its least confident one: the closest call); and the ``size``
    least confident correct answers overall.
    """
    preds = list(result.predictions)
    order = sorted(range(len(preds)), key=lambda i: confidence(preds[i]))
    wrong = sorted((i for i in order if not preds[i].correct), key=lambda i: -confidence(preds[i]))
    per_class: dict[str, int] = {}
    for i in order:
        if preds[i].correct:
            per_class.setdefault(preds[i].true, i)
    shaky = [i for i in order if preds[i].correct][:size]
    return list(dict.fromkeys([*wrong, *per_class.values(), *shaky]))


def gallery_sections(result: EvalResult, items: Sequence[GalleryItem],
                     size: int = GALLERY_SIZE) -> list[tuple[str, list[GalleryItem]]]:
    """The report's galleries as ``(heading, items)``: the most confident errors, the least confident correct answers,
    and one correct video of each class not among those. Each video is shown once; items are matched to predictions
    by name, and videos without an item are left out."""
    by_name = {item.name: item for item in items}
    preds = [p for p in result.predictions if (p.name or str(p.index)) in by_name]

    def pick(ps: list[VideoPrediction]) -> list[GalleryItem]:
        return [by_name[p.name or str(p.index)] for p in ps]

    wrong = sorted((p for p in preds if not p.correct), key=lambda p: -confidence(p))
    right = sorted((p for p in preds if p.correct), key=confidence)
    first_per_class: dict[str, VideoPrediction] = {}
    for p in right:
        first_per_class.setdefault(p.true, p)
    shaky = right[:size]
    above = {p.index for p in shaky}
    others = [p for p in first_per_class.values() if p.index not in above]  # a small test set shows them all above
    sections = [("Most confident errors", pick(wrong[:size])),
                ("Least confident correct answers", pick(shaky)),
                ("A correct video of each class not shown above", pick(others))]
    return [(heading, chosen) for heading, chosen in sections if chosen]
