"""Scoring predictions: pure functions of scores and labels, no models and no files.

``metrics`` (hit@k, per-class, per-category, confusion, the classification
report), ``calibration`` (ECE, reliability, temperature), ``arrays``
(validated views of scores and labels), ``motion_baseline`` (the
motion-energy + logistic-regression baseline a video model must beat).
"""
