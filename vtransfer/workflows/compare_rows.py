"""Compare-policies' rows: one policy's cost and accuracy, and their mean ± std over seeds.

:class:`PolicyRow` is built from a policy's test :class:`~vtransfer.evaluation.metrics.EvalResult`
(:meth:`PolicyRow.from_eval`), combined over seeds by :func:`aggregate_seed_rows`,
saved in compare.json (:meth:`PolicyRow.to_dict`, :meth:`PolicyRow.from_dict`)
and drawn by :mod:`vtransfer.reporting.policy_report`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from vtransfer.evaluation.metrics import LEGACY_HIT_K, EvalResult, hit_key
from vtransfer.reporting.policy_report import HIT_K_FIELD, POLICY_METRICS
from vtransfer.utils.jsonable import to_jsonable

__all__ = ["HIT_K_FIELD", "POLICY_METRICS", "PolicyRow", "aggregate_seed_rows"]


def _hit_k_as_field(values: dict[str, Any], k: int) -> dict[str, Any]:
    """``values`` with ``test_video_hit<k>`` (or the legacy ``test_video_hit5``) renamed to ``test_video_hit_k``."""
    for key in (hit_key("test_video", k), hit_key("test_video", LEGACY_HIT_K)):
        if key in values:
            values[HIT_K_FIELD] = values.pop(key)
            break
    return values


@dataclass
class PolicyRow:
    """One line of the compare-policies table: a policy's cost and accuracy.

    Accuracies are fractions in [0, 1] (``None`` when not measured). With
    several seeds the fields hold the mean and ``std`` maps a field name of
    :data:`POLICY_METRICS` to its standard deviation (``per_category_std`` the
    same per category). ``top_k`` is the k of ``test_video_hit_k`` (5, or the
    number of classes when there are fewer); files name it by its k
    (``test_video_hit3``, see :meth:`to_dict`). ``per_category`` maps
    category -> mean class accuracy on the test split.
    """

    policy: str
    seeds: list[int]
    trainable_params: int
    total_params: int
    train_time_s: float
    val_video_acc: float | None
    test_video_hit1: float | None
    test_video_hit_k: float | None
    test_clip_hit1: float | None
    mean_class_acc: float | None
    per_category: dict[str, float | None] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    per_category_std: dict[str, float] = field(default_factory=dict)
    top_k: int = 5
    run_dir: str | None = None
    num_classes: int | None = None
    stream: str | None = None  # a two-stream comparison's rgb, flow or two-stream (fused) row; None: one stream

    @property
    def hit_k_is_trivial(self) -> bool:
        """Whether hit@k covers every class (always 100%); rows without ``num_classes`` know it when k was capped."""
        return self.top_k >= self.num_classes if self.num_classes is not None else self.top_k < 5

    @classmethod
    def from_eval(
        cls,
        policy: str,
        seed: int,
        *,
        trainable_params: int,
        total_params: int,
        train_time_s: float,
        val_video_acc: float | None,
        test: EvalResult,
        run_dir: str | Path | None = None,
        stream: str | None = None,
    ) -> "PolicyRow":
        """A single-seed row from a policy's test-split :class:`EvalResult` and its training numbers."""
        return cls(
            policy=policy,
            seeds=[int(seed)],
            trainable_params=int(trainable_params),
            total_params=int(total_params),
            train_time_s=float(train_time_s),
            val_video_acc=val_video_acc,
            test_video_hit1=test.video_hit1,
            test_video_hit_k=test.video_hit_k,
            test_clip_hit1=test.clip_hit1,
            mean_class_acc=test.mean_class_accuracy,
            per_category=test.category_accuracy(),
            top_k=test.top_k,
            run_dir=None if run_dir is None else str(run_dir),
            num_classes=len(test.classes),
            stream=stream,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN -> ``None``) with hit@k named by its k (``test_video_hit3``, also in ``std``).

        :meth:`from_dict` reverses it.
        """
        data = dataclasses.asdict(self)
        key = hit_key("test_video", self.top_k)
        data[key] = data.pop(HIT_K_FIELD)
        if HIT_K_FIELD in data["std"]:
            data["std"][key] = data["std"].pop(HIT_K_FIELD)
        return to_jsonable(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyRow":
        """Rebuild a row from :meth:`to_dict` output (unknown keys are an error).

        Also reads rows written before hit@k keys carried their k (``test_video_hit5`` for any k).
        """
        k = int(data.get("top_k", 5))
        fields = _hit_k_as_field(dict(data), k)
        if "std" in fields:
            fields["std"] = _hit_k_as_field(dict(fields["std"]), k)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown PolicyRow field(s): {', '.join(sorted(unknown))}")
        return cls(**fields)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1) of the non-``None`` values; std is ``None`` below two."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return None, None
    mean = float(np.mean(finite))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return mean, std


def aggregate_seed_rows(rows_per_seed: Sequence[PolicyRow]) -> PolicyRow:
    """Combine one policy's per-seed rows into a mean ± std row.

    Means are over the seeds that have a value; std is the sample standard
    deviation (ddof=1), present only when two or more seeds have a value.
    ``seeds`` lists all seeds in order, ``run_dir`` is dropped.

    Raises:
        ValueError: no rows, rows of different policies, or differing parameter counts.
    """
    rows = list(rows_per_seed)
    if not rows:
        raise ValueError("aggregate_seed_rows needs at least one row")
    policies = {(r.policy, r.stream) for r in rows}
    if len(policies) > 1:
        raise ValueError("rows of different policies or streams cannot be aggregated: "
                         + ", ".join(sorted(f"{p}{f' ({s})' if s else ''}" for p, s in policies)))
    for attr in ("trainable_params", "total_params", "top_k", "num_classes"):
        values = {getattr(r, attr) for r in rows}
        if len(values) > 1:
            raise ValueError(f"policy {rows[0].policy!r}: seeds disagree on {attr}: {sorted(values)}")
    first = rows[0]
    means: dict[str, Any] = {}
    std: dict[str, float] = {}
    for name in POLICY_METRICS:
        mean, sd = _mean_std([getattr(r, name) for r in rows])
        means[name] = mean
        if sd is not None:
            std[name] = sd
    if means["train_time_s"] is None:
        means["train_time_s"] = float("nan")
    categories = list(dict.fromkeys(c for r in rows for c in r.per_category))
    per_category: dict[str, float | None] = {}
    per_category_std: dict[str, float] = {}
    for cat in categories:
        mean, sd = _mean_std([r.per_category.get(cat) for r in rows])
        per_category[cat] = mean
        if sd is not None:
            per_category_std[cat] = sd
    return PolicyRow(
        policy=first.policy,
        seeds=[s for r in rows for s in r.seeds],
        trainable_params=first.trainable_params,
        total_params=first.total_params,
        per_category=per_category,
        std=std,
        per_category_std=per_category_std,
        top_k=first.top_k,
        run_dir=None,
        num_classes=first.num_classes,
        stream=first.stream,
        **means,
    )
