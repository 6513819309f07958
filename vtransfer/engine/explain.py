"""Where a model looks and when: spatio-temporal Grad-CAM and per-frame occlusion on one clip.

Both work on any :class:`~vtransfer.models.base.VideoBackbone` through its layer
groups (``model.run_group(i, state)``), with no hooks into a family's modules.

**Grad-CAM** (Selvaraju et al. 2017, extended over time). The clip runs once
without gradients, keeping each group's output that is a *spatial map*: a
``B x C x T' x H' x W'`` feature map with ``H' x W' > 1`` (the CNN families;
Swin's channels-last maps are turned channels-first), or a token tensor whose
tubelet grid this module knows (:func:`state_grid`: vtransfer's ViViT from its
config, torchvision's MViT from its block grids, ``hf:`` VideoMAE, ViViT,
V-JEPA 2 and TimeSformer from the transformers config). From the last such
output ``A`` the remaining groups run again with gradients, and

    cam = ReLU( sum_c  mean_{t,h,w}(d score / d A_c) * A_c )

is upsampled (trilinear) to the clip's ``T x H x W``. ``score`` is the target
class's logit (a fused two-stream model's output is its log-probability). When
the gradient reaching that output is zero everywhere, as on a transformer's
last layer whose CLS token alone is pooled, the map is taken one layer group
earlier (the input of that last layer), as is usual for ViTs.

**Temporal importance.** Each frame of the clip in turn is replaced by the
clip's *mean frame* (every channel's per-pixel mean over the clip's frames: the
frame's own content goes and nothing from a particular other frame comes in),
and the target's logit is recorded. ``importance[t] = logit(clip) -
logit(clip with frame t occluded)``: positive where the frame carries evidence
for the class. Leading layer groups that only mix within a frame (tagged
``spatial`` and keeping the clip's frame count) are run twice, on the clip and
on its mean frame, not once per occluded frame: the occluded clips' outputs
of those groups are spliced from the two, which gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vtransfer.models.base import State, VideoBackbone
from vtransfer.models.hf_video import HFVideoBackbone, TimeSformer
from vtransfer.models.hf_video import ViViT as HFViViT
from vtransfer.models.tv_mvit import TorchvisionMViT
from vtransfer.models.tv_swin3d import TorchvisionSwin3D
from vtransfer.models.two_stream import STREAM_NAMES, TwoStreamBackbone
from vtransfer.models.vivit import ViViT
from vtransfer.utils.shapes import as_pair

#: What replaces an occluded frame (see the module docstring).
OCCLUDER = "mean frame"
GRAD_CAM = "grad-cam"
GRAD_CAM_TOKENS = "grad-cam on the token grid"
NO_MAP = "none"

ToMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SpatialMap:
    """A Grad-CAM map over one clip.

    Attributes:
        cam: float32 ``T x H x W`` at the clip's size, >= 0, scaled so its maximum is 1 (all zeros when no
            location had positive evidence).
        method: :data:`GRAD_CAM` (a feature map) or :data:`GRAD_CAM_TOKENS` (a transformer's token grid).
        layer: name of the layer group whose output it comes from.
        grid: ``(T', H', W')`` of that output.
        stream: ``rgb`` or ``flow`` for one stream of a two-stream model, else ``None``.
    """

    cam: np.ndarray
    method: str
    layer: str
    grid: tuple[int, int, int]
    stream: str | None = None


@dataclass
class ClipExplanation:
    """Grad-CAM and temporal importance of one clip for one class.

    Attributes:
        target: the class index explained.
        logit: its score on the clip (the value Grad-CAM differentiates).
        prob: its softmax probability on the clip.
        maps: one :class:`SpatialMap` (two for a two-stream model: one per stream); empty when there is none.
        method: what the maps are (``grad-cam``, ``grad-cam on the token grid``, ``grad-cam per stream``, ``none``).
        note: why there is no map (or a caveat about it); ``None`` when there is nothing to say.
        occluded_logit, occluded_prob: the target's logit and probability with frame ``t`` occluded (``T`` each).
        importance: ``logit - occluded_logit`` per frame.
        occluder: what replaced the occluded frame.
        probs: every class's softmax probability on the clip.
    """

    target: int
    logit: float
    prob: float
    maps: list[SpatialMap]
    method: str
    note: str | None
    occluded_logit: np.ndarray
    occluded_prob: np.ndarray
    importance: np.ndarray
    occluder: str = OCCLUDER
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


# -- which states are spatial maps --------------------------------------------------------------


def _token_grid(model: VideoBackbone, index: int, clip_shape: tuple[int, ...]) -> tuple[tuple[int, int, int], bool] | None:
    """``((T', H', W'), time_major)`` of the tokens group ``index`` outputs, for the families whose layout is known."""
    t, h, w = clip_shape[2:]
    if isinstance(model, ViViT):
        pt, ph, pw = model.tubelet
        return (t // pt, h // ph, w // pw), True
    if isinstance(model, TorchvisionMViT):
        grids = model.block_thw
        return (tuple(grids[index]), True) if index < len(grids) else None
    if isinstance(model, HFVideoBackbone):
        config = model.hf.config
        pt = model.family.time_extent(config)
        if isinstance(model.family, HFViViT):
            ph, pw = (int(s) for s in config.tubelet_size[1:])
        else:
            ph, pw = as_pair(config.patch_size)
        # TimeSformer orders its tokens patch by patch, each patch's frames together; the others frame by frame
        return (t // pt, h // ph, w // pw), not isinstance(model.family, TimeSformer)
    return None


def state_grid(model: VideoBackbone, index: int, state: State, clip_shape: tuple[int, ...]) -> ToMap | None:
    """How to read group ``index``'s output ``state`` as a ``B x C x T' x H' x W'`` map, or ``None`` if it is not one.

    ``None`` also when the map has no spatial extent (``H' x W' == 1``), and for tokens whose grid is unknown.
    The returned function applies equally to the state and to its gradient.
    """
    if not isinstance(state, torch.Tensor):
        return None
    to_map: ToMap | None = None
    if state.dim() == 5:
        to_map = (lambda s: s.permute(0, 4, 1, 2, 3)) if isinstance(model, TorchvisionSwin3D) else (lambda s: s)
    elif state.dim() in (3, 4):
        known = _token_grid(model, index, clip_shape)
        if known is None:
            return None
        (gt, gh, gw), time_major = known
        if state.dim() == 4:  # factorised ViViT: B x T' x (CLS + H'W') x D
            if state.shape[1] != gt or state.shape[2] - gh * gw not in (0, 1):
                return None
            extra = state.shape[2] - gh * gw
            to_map = lambda s: s[:, :, extra:].reshape(s.shape[0], gt, gh, gw, -1).permute(0, 4, 1, 2, 3)
        else:  # B x (CLS + T'H'W') x D
            extra = state.shape[1] - gt * gh * gw
            if extra not in (0, 1):
                return None
            if time_major:
                to_map = lambda s: s[:, extra:].reshape(s.shape[0], gt, gh, gw, -1).permute(0, 4, 1, 2, 3)
            else:
                to_map = lambda s: s[:, extra:].reshape(s.shape[0], gh, gw, gt, -1).permute(0, 4, 3, 1, 2)
    if to_map is None:
        return None
    shape = to_map(state).shape
    return to_map if shape[3] * shape[4] > 1 else None


def _is_tokens(state: torch.Tensor) -> bool:
    return state.dim() != 5


# -- Grad-CAM ------------------------------------------------------------------------------------


def _forward_keeping_maps(model: VideoBackbone, x: torch.Tensor
                          ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, ToMap]], State]:
    """Logits, every group output that is a spatial map (``(index, state, to_map)``), and the head's input
    (the embedding a two-stream model fuses), without gradients."""
    n = len(model.layer_groups())
    maps = []
    state: State = x
    with torch.no_grad():
        for i in range(n - 1):
            state = model.run_group(i, state)
            to_map = state_grid(model, i, state, tuple(x.shape))
            if to_map is not None:
                maps.append((i, state, to_map))
        embedding = state
        logits = model.run_group(n - 1, embedding)
    return logits, maps, embedding


def _cam_from(model: VideoBackbone, index: int, state: torch.Tensor, to_map: ToMap, target: int,
              clip_size: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """Grad-CAM of ``target`` at group ``index``'s output; ``None`` when no gradient reaches the map."""
    a = state.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.forward_groups(a, index + 1, len(model.layer_groups()))
        (grad,) = torch.autograd.grad(logits[0, target].float(), a)
    fmap, gmap = to_map(a.detach())[:1].float(), to_map(grad)[:1].float()
    if not bool(gmap.abs().amax() > 0):
        return None
    weights = gmap.mean(dim=(2, 3, 4), keepdim=True)
    cam = F.relu((weights * fmap).sum(dim=1, keepdim=True))  # 1 x 1 x T' x H' x W'
    grid = tuple(int(s) for s in cam.shape[2:])
    up = F.interpolate(cam, size=clip_size, mode="trilinear", align_corners=False)[0, 0].clamp_min(0)
    peak = float(up.max())
    return (up / peak if peak > 0 else up).cpu().numpy().astype(np.float32), grid


def _grad_cam_of(model: VideoBackbone, maps: list[tuple[int, torch.Tensor, ToMap]], clip_size: tuple[int, int, int],
                 target: int, stream: str | None) -> tuple[SpatialMap | None, str | None]:
    """Grad-CAM of ``target`` at the last spatial map of ``maps`` that a gradient reaches: ``(map or None, note)``."""
    if not maps:
        return None, ("no layer group's output keeps a spatial layout at this input size (every map is 1 x 1, or "
                      "pooled within its group, or a token layout this version does not know), so there is no map of "
                      "where it looks; the temporal bar still applies")
    names = model.group_names()
    for index, state, to_map in reversed(maps[-2:]):
        found = _cam_from(model, index, state, to_map, target, clip_size)
        if found is not None:
            cam, grid = found
            method = GRAD_CAM_TOKENS if _is_tokens(state) else GRAD_CAM
            return SpatialMap(cam, method, names[index], grid, stream), None
    return None, "no gradient of the class score reaches a spatial layer (the score ignores the map)"


def grad_cam(model: VideoBackbone, x: torch.Tensor, target: int | None = None, stream: str | None = None,
             ) -> tuple[SpatialMap | None, torch.Tensor, int, str | None]:
    """Grad-CAM of class ``target`` (default: the top class) on the normalised clip ``x`` (``1 x C x T x H x W``).

    Returns ``(map or None, logits, target, note)``: ``note`` says why there is no map.
    """
    logits, maps, _ = _forward_keeping_maps(model, x)
    target = int(logits[0].argmax()) if target is None else int(target)
    found, note = _grad_cam_of(model, maps, tuple(int(s) for s in x.shape[2:]), target, stream)
    return found, logits, target, note


# -- temporal importance ---------------------------------------------------------------------------


def _per_frame_prefix(model: VideoBackbone, x: torch.Tensor) -> tuple[int, State]:
    """How many leading groups mix within a frame only and keep the clip's frames, and their output on ``x``."""
    frames = x.shape[2]
    k, state = 0, x
    if isinstance(model, TorchvisionSwin3D):
        return 0, x
    for i, g in enumerate(model.layer_groups()[:-1]):
        if g.tag != "spatial":
            break
        nxt = model.run_group(i, state)
        if not (isinstance(nxt, torch.Tensor) and nxt.dim() == 5 and nxt.shape[2] == frames):
            break
        k, state = i + 1, nxt
    return k, state


def _occluded_states(model: VideoBackbone, x: torch.Tensor, stop: int, batch_size: int, reuse_prefix: bool) -> torch.Tensor:
    """Groups ``0 .. stop - 1`` of ``model`` on ``T`` copies of ``x``, copy ``t`` with frame ``t`` replaced by the mean frame."""
    frames = x.shape[2]
    mean = x.mean(dim=2, keepdim=True).expand_as(x).contiguous()
    start, clip_state = _per_frame_prefix(model, x) if reuse_prefix else (0, x)
    mean_state = model.forward_groups(mean, 0, start)
    outs = []
    for first in range(0, frames, batch_size):
        ts = list(range(first, min(frames, first + batch_size)))
        batch = clip_state.repeat(len(ts), *([1] * (clip_state.dim() - 1)))
        for j, t in enumerate(ts):
            batch[j, :, t] = mean_state[0, :, t]
        outs.append(model.forward_groups(batch, start, stop))
    return torch.cat(outs)


@torch.no_grad()
def temporal_occlusion(model: VideoBackbone, x: torch.Tensor, target: int, batch_size: int = 8,
                       reuse_prefix: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The target's logit and probability with each frame of ``x`` (``1 x C x T x H x W``) replaced by the mean frame.

    ``reuse_prefix`` runs the leading per-frame groups twice instead of ``T`` times (the same result). A
    two-stream model occludes the frame in both streams: each stream's network runs on its own channels (with
    its own per-frame groups reused) up to its embedding, and the fusion head scores each pair.
    """
    if isinstance(model, TwoStreamBackbone):
        embeddings = tuple(
            _occluded_states(net, part, len(net.layer_groups()) - 1, batch_size, reuse_prefix)
            for net, part in zip((model.stream(n) for n in STREAM_NAMES), model.split_clip(x)))
        out = model.run_group(1, embeddings).float()
    else:
        out = _occluded_states(model, x, len(model.layer_groups()), batch_size, reuse_prefix).float()
    return out[:, target].cpu().numpy(), torch.softmax(out, dim=1)[:, target].cpu().numpy()


# -- both ----------------------------------------------------------------------------------------


def explain_clip(model: VideoBackbone, x: torch.Tensor, target: int | None = None, batch_size: int = 8) -> ClipExplanation:
    """Grad-CAM and temporal importance of ``target`` (default: the clip's top class) on the normalised clip ``x``.

    A two-stream model gets one map per stream (each stream's network on its channels, scored by that
    stream's logit for the target); the temporal bar occludes frames of both streams and reads the fused score.
    """
    model.eval()
    if x.dim() != 5 or x.shape[0] != 1:
        raise ValueError(f"explain_clip takes one clip 1 x C x T x H x W, got shape {tuple(x.shape)}")
    if isinstance(model, TwoStreamBackbone):
        # each stream's network runs once: its maps for Grad-CAM, its embedding for the fused score
        forwards = {name: _forward_keeping_maps(model.stream(name), part)
                    for name, part in zip(STREAM_NAMES, model.split_clip(x))}
        with torch.no_grad():
            logits = model.run_group(1, tuple(embedding for _, _, embedding in forwards.values())).float()
        target = int(logits[0].argmax()) if target is None else int(target)
        maps, notes = [], []
        clip_size = tuple(int(s) for s in x.shape[2:])
        for name, (_, stream_maps, _) in forwards.items():
            found, why = _grad_cam_of(model.stream(name), stream_maps, clip_size, target, name)
            if found is not None:
                maps.append(found)
            else:
                notes.append(f"{name} stream: {why}")
        method = "grad-cam per stream" if maps else NO_MAP
        note = ("a two-stream model fuses the streams' probabilities after pooling, so there is no fused map: "
                "each stream's network is explained on its own channels, scored by its own logit for the class"
                + ("; " + "; ".join(notes) if notes else ""))
    else:
        found, logits, target, note = grad_cam(model, x, target)
        logits = logits.float()
        maps = [found] if found is not None else []
        method = found.method if found is not None else NO_MAP
    occluded_logit, occluded_prob = temporal_occlusion(model, x, target, batch_size)
    logit = float(logits[0, target])
    probs = torch.softmax(logits[0].float(), dim=0).cpu().numpy().astype(np.float32)
    return ClipExplanation(
        target=target, logit=logit, prob=float(probs[target]), maps=maps, method=method, note=note,
        occluded_logit=occluded_logit, occluded_prob=occluded_prob,
        importance=(logit - occluded_logit).astype(np.float32), probs=probs)


def mass_summary(cam: np.ndarray) -> dict:
    """Where a ``T x H x W`` map's mass lies: per frame, its centroid and peak, a 3 x 3 grid, its concentration.

    Coordinates are fractions of the clip's width and height (0 = left / top). ``top10_share`` is the share
    of the mass in the hottest 10% of pixels (0.1 for a flat map); ``grid3x3`` rows run top to bottom.
    """
    t, h, w = cam.shape
    total = float(cam.sum())
    if total <= 0:
        return {"frame_mass": [0.0] * t, "centroid": None, "peak": None, "grid3x3": None, "top10_share": None}
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    plane = cam.sum(axis=0)
    peak = np.unravel_index(int(cam.argmax()), cam.shape)
    rows = np.array_split(np.arange(h), 3)
    cols = np.array_split(np.arange(w), 3)
    grid = [[round(float(plane[np.ix_(r, c)].sum()) / total, 4) for c in cols] for r in rows]
    flat = np.sort(cam.ravel())[::-1]
    top = flat[: max(1, flat.size // 10)].sum()
    return {
        "frame_mass": [round(float(v), 4) for v in cam.sum(axis=(1, 2)) / total],
        "centroid": {"x": round(float((plane.sum(axis=0) * xs).sum() / total), 4),
                     "y": round(float((plane.sum(axis=1) * ys).sum() / total), 4)},
        "peak": {"frame": int(peak[0]), "x": round(float(xs[peak[2]]), 4), "y": round(float(ys[peak[1]]), 4)},
        "grid3x3": grid,
        "top10_share": round(float(top / total), 4),
    }


def region_mass(cam: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of ``cam``'s mass (summed over frames) inside ``box`` = ``(top, left, height, width)`` in pixels."""
    top, left, height, width = box
    total = float(cam.sum())
    return float(cam[:, top:top + height, left:left + width].sum()) / total if total > 0 else 0.0
