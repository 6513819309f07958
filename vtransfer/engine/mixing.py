"""Mixup and CutMix for video clips, with soft labels.

* mixup (Zhang et al., 2018) blends whole clips: ``x = lam * a + (1 - lam) * b``;
* cutmix (Yun et al., 2019), video version: one box, the same in every frame
  of the clip, is pasted from clip ``b`` into clip ``a``; ``lam`` becomes the
  share of the frame left to ``a``.

``b`` is the batch in a random order. Labels become ``lam * onehot(y_a) +
(1 - lam) * onehot(y_b)`` (each row sums to 1), for a cross-entropy with
probability targets. ``lam`` is drawn from ``Beta(alpha, alpha)``; with both
methods on, each batch uses one of them, chosen with probability 1/2 (timm's
``switch_prob`` default).

They act on clips ``B x C x T x H x W``, so they apply only when the
trainable part of the model starts at the input clip (policy ``all``): with a
frozen prefix, the trainable part sees the prefix's (possibly cached) outputs,
never the clips. :func:`check_mixing_applies` rejects that combination.

Randomness comes from an explicit ``numpy.random.Generator`` (see
:func:`mixing_rng`), so an epoch's mixing depends only on ``(seed, epoch)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vtransfer.utils.errors import ConfigError

#: Probability of cutmix (rather than mixup) for a batch when both are on.
SWITCH_PROB = 0.5


@dataclass(frozen=True)
class MixedBatch:
    """A mixed batch: clips, soft targets ``B x classes``, and how they were made."""

    clips: torch.Tensor
    targets: torch.Tensor
    lam: float  # share of each clip's own content (after cutmix: its share of the frame area)
    perm: torch.Tensor  # row i was mixed with row perm[i]
    method: str  # "mixup" or "cutmix"
    box: tuple[int, int, int, int] | None = None  # cutmix: (top, left, height, width), the same in every frame


def check_mixing_applies(mixup: float, cutmix: float, first_trainable_group: int, policy: str) -> None:
    """Raise :class:`ConfigError` when mixup/cutmix is on but the policy freezes a prefix of the model.

    Mixing acts on the input clips; with groups ``0 .. k-1`` frozen the
    trainable part starts from their (cached) outputs, which mixing never sees.
    """
    if (mixup > 0 or cutmix > 0) and first_trainable_group > 0:
        used = " and ".join(n for n, a in (("--mixup", mixup), ("--cutmix", cutmix)) if a > 0)
        raise ConfigError(
            f"{used} mix input clips, but policy {policy!r} freezes the first {first_trainable_group} layer group(s), "
            "so training starts from their (cached) outputs, not from clips; use --policy all, or leave "
            f"{used} at 0")


def mixing_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's mixing: depends on ``(seed, epoch)`` only."""
    return np.random.default_rng([int(seed), int(epoch), 0x6D6978])


def soft_targets(labels: torch.Tensor, perm: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """``lam * onehot(labels) + (1 - lam) * onehot(labels[perm])`` as float ``B x num_classes``."""
    own = torch.nn.functional.one_hot(labels, num_classes).float()
    return own * lam + own[perm] * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, box height, box width)``: a box of about ``(1 - lam)`` of the frame, clipped to it.

    The box's centre is uniform over the frame and its sides are
    ``sqrt(1 - lam)`` of the frame's, so near an edge it is cut smaller.
    """
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return top, left, bottom - top, right - left


def mixup_clips(clips: torch.Tensor, labels: torch.Tensor, num_classes: int, lam: float,
                perm: torch.Tensor) -> MixedBatch:
    """Blend every clip with clip ``perm[i]``: ``lam * x + (1 - lam) * x[perm]``."""
    mixed = clips * lam + clips[perm] * (1.0 - lam)
    return MixedBatch(mixed, soft_targets(labels, perm, lam, num_classes), lam, perm, "mixup")


def cutmix_clips(clips: torch.Tensor, labels: torch.Tensor, num_classes: int, lam: float, perm: torch.Tensor,
                 rng: np.random.Generator) -> MixedBatch:
    """Paste one box of clip ``perm[i]`` into clip ``i``, in every frame (``clips``: ``B x C x T x H x W``).

    ``lam`` is corrected to the share of the frame area outside the box.
    """
    height, width = clips.shape[-2], clips.shape[-1]
    top, left, h, w = cutmix_box(height, width, lam, rng)
    mixed = clips.clone()
    mixed[..., top:top + h, left:left + w] = clips[perm][..., top:top + h, left:left + w]
    lam = 1.0 - (h * w) / float(height * width)
    return MixedBatch(mixed, soft_targets(labels, perm, lam, num_classes), lam, perm, "cutmix", (top, left, h, w))


def mix_batch(clips: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup: float, cutmix: float,
              rng: np.random.Generator) -> MixedBatch:
    """Mixup or cutmix one batch of normalised clips ``B x C x T x H x W`` with integer ``labels``.

    ``mixup``/``cutmix`` are the Beta alphas (0 = off; at least one must be on).
    """
    if not isinstance(clips, torch.Tensor) or clips.ndim != 5:
        shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
        raise ValueError(f"mixup/cutmix need clips B x C x T x H x W, got {shape}")
    if mixup <= 0 and cutmix <= 0:
        raise ValueError("mix_batch needs mixup > 0 or cutmix > 0")
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < SWITCH_PROB)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(clips.shape[0])).to(clips.device)
    labels = labels.to(clips.device)
    if use_cutmix:
        return cutmix_clips(clips, labels, num_classes, lam, perm, rng)
    return mixup_clips(clips, labels, num_classes, lam, perm)
