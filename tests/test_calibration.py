"""Calibration: ECE and its reliability table, temperature scaling, the report's diagram, checkpoint temperature."""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
from rich.console import Console

from vtransfer.reporting import plots
from vtransfer.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    Calibration,
    apply_temperature,
    calibrate_on_validation,
    expected_calibration_error,
    fit_temperature,
    log_probabilities,
    negative_log_likelihood,
    scaled,
)
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.engine.inference import ClipPredictions
from vtransfer.evaluation.metrics import EvalResult, aggregate_video_scores, classification_report
from vtransfer.models.registry import build_backbone
from vtransfer.reporting.report import render_eval_table, write_eval_report
from vtransfer.weights.checkpoint import METADATA_KEY, read_checkpoint_metadata, save_checkpoint, set_checkpoint_temperature
from vtransfer.loading.checkpoints import load_checkpoint, model_from_checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _two_class(top: float, n: int, correct: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows predicting class 0 with probability ``top``, ``correct`` of them labelled 0."""
    probs = np.tile([top, 1.0 - top], (n, 1))
    labels = np.array([0] * correct + [1] * (n - correct))
    return probs, labels


def _histogram_ece(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE the plain way: np.histogram of confidences, accuracy and confidence sums per bin."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    n, _ = np.histogram(conf, edges)
    acc_sum, _ = np.histogram(conf, edges, weights=correct)
    conf_sum, _ = np.histogram(conf, edges, weights=conf)
    keep = n > 0
    return float(np.sum(np.abs(acc_sum[keep] - conf_sum[keep])) / len(conf))


def _synthetic(temperature: float, n: int = 4000, classes: int = 10, seed: int = 0):
    """Logits whose true label distribution is softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, classes))
    truth = _softmax(logits / temperature)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return logits, labels


# --------------------------------------------------------------------------- ECE


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    parts = [_two_class(0.6, 20, 12), _two_class(0.75, 20, 15), _two_class(0.9, 20, 18), _two_class(1.0, 20, 20)]
    probs = np.concatenate([p for p, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    cal = expected_calibration_error(probs, labels)
    assert cal.ece == pytest.approx(0.0, abs=1e-12)
    assert cal.count == 80 and cal.num_bins == 15 and cal.level == "video"
    filled = [b for b in cal.bins if b.count]
    assert [b.count for b in filled] == [20, 20, 20, 20]
    assert [b.accuracy for b in filled] == pytest.approx([0.6, 0.75, 0.9, 1.0])

    # sampled: confidence uniform in (1/C, 1], right with exactly that probability
    rng = np.random.default_rng(1)
    top = rng.uniform(0.5, 1.0, size=200_000)
    probs = np.stack([top, 1 - top], axis=1)
    labels = (rng.uniform(size=top.size) >= top).astype(int)
    assert expected_calibration_error(probs, labels).ece < 0.005


def test_ece_of_an_overconfident_set_matches_the_hand_computed_value():
    sure, sure_y = _two_class(0.95, 4, 2)  # bin (14/15, 1]: accuracy 0.5, confidence 0.95
    mid, mid_y = _two_class(0.55, 6, 3)  # bin (8/15, 9/15]: accuracy 0.5, confidence 0.55
    cal = expected_calibration_error(np.concatenate([sure, mid]), np.concatenate([sure_y, mid_y]))
    assert cal.ece == pytest.approx(0.4 * 0.45 + 0.6 * 0.05, abs=1e-12)  # = 0.21
    counts = [b.count for b in cal.bins]
    assert counts[14] == 4 and counts[8] == 6 and sum(counts) == 10
    assert (cal.bins[14].accuracy, cal.bins[14].confidence) == pytest.approx((0.5, 0.95))
    assert cal.bins[8].lower == pytest.approx(8 / 15) and cal.bins[8].upper == pytest.approx(9 / 15)
    assert all(b.accuracy is None and b.confidence is None for i, b in enumerate(cal.bins) if i not in (8, 14))
    assert cal.describe() == "ECE 0.210 (15 bins, video level)"


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_agrees_with_a_numpy_histogram_computation(bins):
    rng = np.random.default_rng(bins)
    probs = rng.dirichlet(np.full(5, 0.4), size=500)
    labels = np.where(rng.uniform(size=500) < 0.6, probs.argmax(axis=1), rng.integers(0, 5, size=500))
    ours = expected_calibration_error(probs, labels, bins, level="clip")
    assert ours.ece == pytest.approx(_histogram_ece(probs, labels, bins), abs=1e-12)
    assert ours.ece > 0.01 and ours.level == "clip"
    assert [b.count for b in ours.bins] == np.histogram(probs.max(axis=1), np.linspace(0, 1, bins + 1))[0].tolist()
    torch_ece = expected_calibration_error(torch.from_numpy(probs), torch.from_numpy(labels), bins).ece
    assert torch_ece == pytest.approx(ours.ece, abs=1e-6)  # tensors are read as float32


def test_ece_bins_are_closed_on_the_right_and_reject_bad_input():
    cal = expected_calibration_error(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]), bins=10)
    assert cal.bins[4].count == 1 and cal.bins[9].count == 1  # 0.5 -> (0.4, 0.5]; 1.0 -> (0.9, 1.0]
    with pytest.raises(ValueError, match="bins must be >= 1"):
        expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0]), bins=0)
    with pytest.raises(ValueError, match="zero predictions"):
        expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="outside"):
        expected_calibration_error(np.array([[1.0, 0.0]]), np.array([2]))
    with pytest.raises(ValueError, match="level"):
        expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0]), level="frame")


# --------------------------------------------------------------------------- temperature scaling


def test_apply_temperature_equals_torch_softmax_of_scaled_logits():
    logits = np.random.default_rng(2).normal(scale=4.0, size=(64, 7))
    probs = _softmax(logits)
    for t in (0.5, 1.0, 2.5):
        ref = torch.softmax(torch.from_numpy(logits) / t, dim=1).numpy()
        out = apply_temperature(probs, t)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_array_equal(out.argmax(axis=1), probs.argmax(axis=1))
    np.testing.assert_array_equal(apply_temperature(probs, 1.0), probs)
    # float32 softmax underflows to 0; the floor keeps the result finite and normalised
    hard = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    assert np.all(np.isfinite(apply_temperature(hard, 3.0))) and apply_temperature(hard, 3.0).sum() == pytest.approx(1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(probs, bad)


@pytest.mark.parametrize("true_t", [2.0, 0.6])
def test_fit_temperature_recovers_a_known_temperature_and_lowers_nll(true_t):
    logits, labels = _synthetic(true_t)
    log_p = log_probabilities(_softmax(logits))
    t = fit_temperature(log_p, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    # logits and their log-softmax give the same fit (a per-row constant)
    assert fit_temperature(logits, labels) == pytest.approx(t, rel=1e-5)
    # an independent brute-force search over a fine grid agrees
    grid = np.exp(np.linspace(math.log(true_t / 2), math.log(true_t * 2), 801))
    nll = [float(-np.mean(torch.log_softmax(torch.from_numpy(logits) / g, 1).numpy()[np.arange(len(labels)), labels]))
           for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], rel=2e-3)
    before = negative_log_likelihood(_softmax(logits), labels)
    after = negative_log_likelihood(apply_temperature(_softmax(logits), t), labels)
    assert after < before - 0.01
    assert after == pytest.approx(min(nll), abs=1e-6)


def test_fit_temperature_stops_at_a_bound_when_validation_is_all_right():
    probs, labels = _two_class(0.8, 10, 10)
    assert fit_temperature(log_probabilities(probs), labels) == pytest.approx(TEMPERATURE_BOUNDS[0])
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(log_probabilities(probs), labels, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="zero predictions"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))


def _clip_predictions(true_t: float, videos: int = 200, clips: int = 5, classes: int = 4, seed: int = 3):
    """Clips of ``videos`` videos whose labels follow softmax(logits / true_t); clip logits share a video offset."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=videos)
    video = np.repeat(np.arange(videos), clips)
    logits = rng.normal(scale=2.5, size=(videos * clips, classes))
    logits[np.arange(video.size), labels[video]] += 2.0
    return ClipPredictions(probs=_softmax(logits).astype(np.float32), video=video), labels


def test_calibrate_on_validation_fits_clip_level_and_scaled_keeps_the_rest():
    preds, labels = _clip_predictions(1.0)
    fit = calibrate_on_validation(preds, labels)
    clip_labels = labels[preds.video]
    assert fit.temperature == pytest.approx(fit_temperature(log_probabilities(preds.probs), clip_labels), rel=1e-9)
    assert fit.temperature > 1.2  # the synthetic clips are overconfident
    assert fit.clips == 1000 and fit.nll_after < fit.nll_before and not fit.at_bound
    assert "fitted on 1000 validation clips" in fit.describe()

    out = scaled(preds, fit.temperature)
    assert out is not preds and out.probs.dtype == np.float32 and out.probs.shape == preds.probs.shape
    np.testing.assert_array_equal(out.video, preds.video)
    np.testing.assert_allclose(out.probs, apply_temperature(preds.probs, fit.temperature), atol=1e-6)
    assert scaled(preds, None) is preds and scaled(preds, 1.0) is preds

    perfect = ClipPredictions(probs=np.tile(np.float32([0.9, 0.1]), (6, 1)), video=np.repeat(np.arange(3), 2))
    assert calibrate_on_validation(perfect, [0, 0, 0]).at_bound
    with pytest.raises(ValueError, match="no clips"):
        calibrate_on_validation(ClipPredictions(np.zeros((0, 2), np.float32), np.zeros(0, np.int64)), [0])


def test_classification_report_with_temperature_scales_clips_before_aggregating():
    preds, labels = _clip_predictions(1.0, videos=40)
    classes = ["a", "b", "c", "d"]
    plain = classification_report(preds.probs, preds.video, labels, classes)
    video_probs = aggregate_video_scores(preds.probs, preds.video, 40)
    assert plain.ece == pytest.approx(expected_calibration_error(video_probs, labels).ece, abs=1e-12)
    assert plain.clip_ece == pytest.approx(_histogram_ece(preds.probs.astype(float), labels[preds.video], 15), abs=1e-9)
    assert plain.temperature is None and plain.unscaled_ece is None

    t = 1.8
    hot = classification_report(preds.probs, preds.video, labels, classes, temperature=t)
    expected = aggregate_video_scores(scaled(preds, t).probs, preds.video, 40)
    assert hot.temperature == t and hot.unscaled_ece == pytest.approx(plain.ece, abs=1e-12)
    assert hot.ece == pytest.approx(expected_calibration_error(expected, labels).ece, abs=1e-6)
    assert hot.clip_hit1 == plain.clip_hit1  # a clip's top class never changes
    assert hot.predictions[0].top[0][1] == pytest.approx(float(expected[0].max()), abs=1e-6)


# --------------------------------------------------------------------------- report


def _report_result(temperature=None) -> EvalResult:
    preds, labels = _clip_predictions(1.0, videos=24, clips=3, classes=3, seed=5)
    return classification_report(preds.probs, preds.video, labels, ["walk", "wave", "jump"], temperature=temperature)


def test_write_eval_report_writes_a_reliability_diagram_and_shows_ece(tmp_path):
    result = _report_result(temperature=1.5)
    paths = write_eval_report(result, tmp_path, title="calibrated")
    png = paths["reliability_png"]
    assert png.name == "reliability.png" and png.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 400 and image.std() > 0.01

    line = f"ECE {result.ece:.3f} (15 bins, video level; clip level {result.clip_ece:.3f})"
    md = paths["markdown"].read_text()
    assert f"| Calibration | {line} |" in md and "![reliability.png](reliability.png)" in md
    assert f"| Temperature | 1.5 on clip scores (video ECE {result.unscaled_ece:.3f} without) |" in md
    page = paths["html"].read_text()
    assert line in page and page.count("data:image/png;base64,") == 3
    console = Console(record=True, width=160)
    render_eval_table(result, console)
    assert line in console.export_text()

    doc = json.loads(paths["json"].read_text())
    assert doc["calibration"]["ece"] == pytest.approx(result.ece) and len(doc["calibration"]["bins"]) == 15
    back = EvalResult.from_dict(doc)
    assert back.calibration == result.calibration and isinstance(back.calibration, Calibration)
    assert (back.clip_ece, back.temperature, back.unscaled_ece) == (result.clip_ece, 1.5, result.unscaled_ece)


def test_reports_written_before_calibration_still_load_and_render(tmp_path):
    doc = _report_result().to_dict()
    del doc["calibration"]
    old = EvalResult.from_dict(json.loads(json.dumps(doc)))
    assert old.calibration is None and old.ece is None and old.clip_ece is None and old.temperature is None
    paths = write_eval_report(old, tmp_path)
    assert "reliability_png" not in paths and not (tmp_path / "reliability.png").exists()
    assert "Calibration" not in paths["markdown"].read_text()


def test_reliability_png_rejects_mismatched_bins():
    with pytest.raises(ValueError, match="one lower/upper edge"):
        plots.reliability_png([0.0, 0.5], [0.5, 1.0], [0.5], [0.4, 0.9], [1, 2])


# --------------------------------------------------------------------------- checkpoint


def _tiny_model():
    torch.manual_seed(0)
    return build_backbone("slowfusion", "tiny", num_classes=3).eval()


def test_checkpoint_stores_and_returns_the_temperature(tmp_path):
    model, classes = _tiny_model(), ["a", "b", "c"]
    path = save_checkpoint(tmp_path / "cal.safetensors", model, classes=classes, temperature=1.7)
    assert read_checkpoint_metadata(path)["temperature"] == 1.7
    _, ckpt = model_from_checkpoint(path)
    assert ckpt.temperature == 1.7 and load_checkpoint(path).temperature == 1.7

    old = save_checkpoint(tmp_path / "old.safetensors", model, classes=classes)
    assert "temperature" not in read_checkpoint_metadata(old)
    assert model_from_checkpoint(old)[1].temperature is None

    set_checkpoint_temperature(old, 2.5)
    loaded, ckpt = model_from_checkpoint(old)
    assert ckpt.temperature == 2.5 and ckpt.classes == classes
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    set_checkpoint_temperature(old, None)
    assert load_checkpoint(old).temperature is None

    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="temperature"):
            save_checkpoint(tmp_path / "bad.safetensors", model, classes=classes, temperature=bad)
    with pytest.raises(ConfigError, match="temperature"):
        set_checkpoint_temperature(path, float("inf"))


def test_checkpoint_with_a_broken_temperature_is_refused(tmp_path):
    from safetensors.torch import load_file, save

    path = save_checkpoint(tmp_path / "m.safetensors", _tiny_model(), classes=["a", "b", "c"])
    meta = {**read_checkpoint_metadata(path), "temperature": -2}
    path.write_bytes(save(load_file(str(path)), metadata={METADATA_KEY: json.dumps(meta)}))
    with pytest.raises(WeightsError, match="temperature must be a finite number > 0"):
        load_checkpoint(path)
