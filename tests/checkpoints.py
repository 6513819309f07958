"""Random-init tiny vtransfer checkpoints standing in for pretrained weights in tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vtransfer.models.registry import build_backbone
from vtransfer.weights.checkpoint import save_checkpoint

BACKBONES = ("i3d", "vivit", "slowfusion")


def random_checkpoints(folder: Path, classes: int = 7, seed: int = 1,
                       overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Path]:
    """One tiny checkpoint per backbone (``overrides[name]`` goes to its constructor), keyed by backbone name."""
    out = {}
    for name in BACKBONES:
        torch.manual_seed(seed)
        model = build_backbone(name, "tiny", num_classes=classes, **(overrides or {}).get(name, {}))
        out[name] = save_checkpoint(folder / f"{name}.safetensors", model, classes=[f"src{i}" for i in range(classes)],
                                    source={"dataset": "synthetic-source", "classes": classes})
    return out
