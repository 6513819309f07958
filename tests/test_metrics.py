"""vtransfer.evaluation.metrics against scikit-learn and hand-computed references."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from vtransfer.evaluation.metrics import (
    UNCATEGORISED,
    EvalResult,
    aggregate_video_scores,
    classification_report,
    hit_at_k,
)

CLASSES = ["archery", "bowling", "clap", "dive", "jump", "run", "swing", "wave"]
CATEGORIES = {
    "archery": "object",
    "bowling": "object",
    "swing": "object",
    "clap": "motion",
    "jump": "motion",
    "run": "motion",
    "dive": "sport",
    # "wave" deliberately missing -> uncategorised
}
ABSENT = {2, 6}  # clap and swing have no test videos


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    """Random clips: 60 videos with 1-4 clips each, labels never from ABSENT classes."""
    rng = np.random.default_rng(1234)
    present = np.array([c for c in range(len(CLASSES)) if c not in ABSENT])
    labels = rng.choice(present, size=60)
    clips_per_video = rng.integers(1, 5, size=60)
    clip_video = np.repeat(np.arange(60), clips_per_video)
    rng.shuffle(clip_video)  # clips need not be grouped by video
    logits = rng.normal(size=(clip_video.size, len(CLASSES)))
    logits[np.arange(clip_video.size), labels[clip_video]] += 1.2
    return _softmax(logits), clip_video, labels


def _video_probs_reference(probs, clip_video, n):
    return np.stack([probs[clip_video == v].mean(axis=0) for v in range(n)])


def test_aggregate_video_scores_is_mean_of_clip_probabilities(data):
    probs, clip_video, labels = data
    got = aggregate_video_scores(probs, clip_video, len(labels))
    np.testing.assert_allclose(got, _video_probs_reference(probs, clip_video, len(labels)), rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)


def test_aggregate_video_scores_accepts_torch_and_rejects_videos_without_clips():
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]])
    got = aggregate_video_scores(probs, torch.tensor([0, 0, 1]), 2)
    np.testing.assert_allclose(got, [[0.4, 0.6], [1.0, 0.0]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"1 video\(s\) have no clips: 2"):
        aggregate_video_scores(probs, np.array([0, 0, 1]), 3)
    with pytest.raises(ValueError, match="clip_video"):
        aggregate_video_scores(probs, np.array([0, 1]), 2)


def test_hit_at_k_matches_sklearn_and_caps_k(data):
    probs, clip_video, labels = data
    clip_labels = labels[clip_video]
    for k in (1, 2, 3, 5):
        expected = top_k_accuracy_score(clip_labels, probs, k=k, labels=np.arange(len(CLASSES)))
        assert hit_at_k(probs, clip_labels, k) == pytest.approx(expected)
    assert hit_at_k(probs, clip_labels, 1) == pytest.approx(accuracy_score(clip_labels, probs.argmax(1)))
    assert hit_at_k(probs, clip_labels, 50) == 1.0


def test_hit_at_k_hand_example_and_ties_follow_argmax():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    assert hit_at_k(probs, np.array([1, 1, 1]), 1) == pytest.approx(1 / 3)
    assert hit_at_k(probs, np.array([1, 1, 1]), 2) == pytest.approx(1.0)
    # Tie between classes 0 and 1 in row 3: argmax picks 0, so hit@1 for label 0.
    assert hit_at_k(probs[2:], np.array([0]), 1) == 1.0
    assert hit_at_k(probs[2:], np.array([1]), 1) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        hit_at_k(probs, np.array([0, 0, 0]), 0)
    with pytest.raises(ValueError, match="outside"):
        hit_at_k(probs, np.array([0, 3, 0]), 1)


def test_classification_report_agrees_with_sklearn(data):
    probs, clip_video, labels = data
    n, c = len(labels), len(CLASSES)
    r = classification_report(probs, clip_video, labels, CLASSES, CATEGORIES)
    vp = _video_probs_reference(probs, clip_video, n)
    pred = vp.argmax(axis=1)

    assert (r.num_videos, r.num_clips, r.top_k) == (n, len(clip_video), 5)
    assert r.video_hit1 == pytest.approx(accuracy_score(labels, pred))
    assert r.video_hit_k == pytest.approx(top_k_accuracy_score(labels, vp, k=5, labels=np.arange(c)))
    assert r.clip_hit1 == pytest.approx(accuracy_score(labels[clip_video], probs.argmax(1)))
    assert r.clip_hit_k == pytest.approx(
        top_k_accuracy_score(labels[clip_video], probs, k=5, labels=np.arange(c))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has classes absent from y_true
        balanced = balanced_accuracy_score(labels, pred)
    assert r.mean_class_accuracy == pytest.approx(balanced)
    np.testing.assert_array_equal(r.confusion, confusion_matrix(labels, pred, labels=np.arange(c)))

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(c), zero_division=0
    )
    for i, m in enumerate(r.per_class):
        assert m.name == CLASSES[i]
        assert m.support == support[i]
        assert m.precision == pytest.approx(precision[i])
        assert m.recall == pytest.approx(recall[i])
        assert m.f1 == pytest.approx(f1[i])
        if i in ABSENT:
            assert m.support == 0 and m.accuracy is None
        else:
            assert m.accuracy == pytest.approx(np.mean(pred[labels == i] == i))
    # The sanity the sklearn numbers rest on: something was wrong and something right.
    assert 0.2 < r.video_hit1 < 1.0


def test_per_category_is_mean_of_supported_class_accuracies(data):
    probs, clip_video, labels = data
    r = classification_report(probs, clip_video, labels, CLASSES, CATEGORIES)
    acc = {m.name: m.accuracy for m in r.per_class}
    cats = {c.name: c for c in r.per_category}
    assert list(cats) == ["object", "motion", "sport", UNCATEGORISED]
    assert cats["object"].accuracy == pytest.approx(np.mean([acc["archery"], acc["bowling"]]))  # swing absent
    assert (cats["object"].num_classes, cats["object"].classes_with_support) == (3, 2)
    assert cats["motion"].accuracy == pytest.approx(np.mean([acc["jump"], acc["run"]]))  # clap absent
    assert cats["sport"].accuracy == pytest.approx(acc["dive"])
    assert cats[UNCATEGORISED].accuracy == pytest.approx(acc["wave"])
    assert sum(c.support for c in r.per_category) == len(labels)
    assert r.per_class[CLASSES.index("wave")].category == UNCATEGORISED
    assert r.category_accuracy()["sport"] == cats["sport"].accuracy


def test_category_with_only_absent_classes_has_no_accuracy():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    r = classification_report(probs, [0, 1], [0, 1], ["a", "b", "c"], {"a": "x", "b": "x", "c": "y"})
    assert [(c.name, c.accuracy) for c in r.per_category] == [("x", 1.0), ("y", None)]
    assert r.top_k == 3 and r.video_hit_k == 1.0


def test_most_confused_pairs_and_predictions(data):
    probs, clip_video, labels = data
    names = [f"video_{i:02d}.mp4" for i in range(len(labels))]
    r = classification_report(probs, clip_video, labels, CLASSES, video_names=names)
    cm = r.confusion.copy()
    np.fill_diagonal(cm, 0)
    cells = sorted(
        ((-cm[t, p], t, p) for t in range(len(CLASSES)) for p in range(len(CLASSES)) if cm[t, p] > 0)
    )[:10]
    assert [(x.true, x.predicted, x.count) for x in r.most_confused] == [
        (CLASSES[t], CLASSES[p], -neg) for neg, t, p in cells
    ]
    support = r.confusion.sum(axis=1)
    for x in r.most_confused:
        assert x.fraction == pytest.approx(x.count / support[CLASSES.index(x.true)])

    vp = _video_probs_reference(probs, clip_video, len(labels))
    assert len(r.predictions) == len(labels)
    for p in r.predictions:
        assert p.name == names[p.index]
        assert p.true == CLASSES[labels[p.index]]
        assert p.predicted == CLASSES[vp[p.index].argmax()]
        assert p.correct == (p.true == p.predicted)
        assert [name for name, _ in p.top] == [CLASSES[j] for j in np.argsort(-vp[p.index])[:5]]
        assert p.top[0][1] == pytest.approx(vp[p.index].max())
    assert r.per_category == [] and r.categories is None


def test_to_dict_is_strict_json_and_round_trips(data):
    probs, clip_video, labels = data
    r = classification_report(probs, clip_video, labels, CLASSES, CATEGORIES)
    text = json.dumps(r.to_dict(), allow_nan=False)
    back = EvalResult.from_dict(json.loads(text))
    assert back.summary() == r.summary()
    assert back.per_class == r.per_class
    assert back.per_category == r.per_category
    assert back.most_confused == r.most_confused
    assert back.predictions == r.predictions
    np.testing.assert_array_equal(back.confusion, r.confusion)
    assert json.loads(text)["per_class"][CLASSES.index("clap")]["accuracy"] is None  # no test videos


def test_classification_report_rejects_bad_input():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="2 class names given for 3"):
        classification_report(probs, [0, 0, 1, 1], [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="video_labels"):
        classification_report(probs, [0, 0, 1, 1], [0, 5], ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        classification_report(np.full((4, 3), np.nan), [0, 0, 1, 1], [0, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="video names"):
        classification_report(probs, [0, 0, 1, 1], [0, 1], ["a", "b", "c"], video_names=["x"])


def test_a_model_that_predicts_one_class_for_every_video_is_called_collapsed():
    probs = np.tile([[0.2, 0.7, 0.1]], (6, 1))  # every clip says class 1
    r = classification_report(probs, [0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert r.collapsed_to() == "b"
    assert "all 6 videos predicted as 'b'" in r.collapse_warning()
    assert r.to_dict()["collapsed_to"] == "b"
    fine = classification_report(np.eye(3)[[0, 0, 1, 1, 2, 2]], [0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert fine.collapsed_to() is None and fine.collapse_warning() is None
    one_class = classification_report(np.tile([[0.9, 0.1]], (2, 1)), [0, 1], [0, 0], ["a", "b"])
    assert one_class.collapsed_to() is None  # a test set of one class cannot show a collapse
