"""Hugging Face video classifiers as vtransfer backbones: ``--backbone hf:REPO_OR_DIR``.

``hf:MCG-NJU/videomae-base-finetuned-kinetics`` (a hub repo) or
``hf:/data/models/my-videomae`` (a folder written by ``save_pretrained``)
loads the checkpoint with transformers' ``AutoModelForVideoClassification``
and wraps it as a :class:`~vtransfer.models.base.VideoBackbone`. The model
types it knows how to split into layer groups are VideoMAE, TimeSformer,
ViViT and V-JEPA 2 (:data:`FAMILIES`); needs ``pip install "vtransfer[hf]"``.

**Weights.** Naming ``hf:X`` brings X's weights: with no ``--weights`` the
model *is* the checkpoint (its classifier too, when the class count
matches; otherwise the classifier is replaced by a fresh one for the
user's classes, as for every backbone). A checkpoint that has no classifier
(a self-supervised VideoMAE) gets a fresh one. ``--weights RUN/model.safetensors``
loads a vtransfer checkpoint written from the same ``hf:X`` instead; the
``scratch`` policy trains a randomly initialised twin of X's architecture.
vtransfer checkpoints store X's whole transformers config (``hf_config``) and
its processor settings, so they are rebuilt without the hub or the folder.

**Layer groups** come from the model: ``embeddings`` (patch / tubelet
embedding, CLS token, position and time embeddings), ``layer.0`` ...
``layer.N-1`` (one per encoder layer), ``pool`` (the final LayerNorm and
the pooling: CLS token, mean + ``fc_norm`` for mean-pooling VideoMAE, the
attentive pooler of V-JEPA 2) and ``head`` (the classifier). Each group
runs exactly the modules transformers' own forward runs, in the same order,
so the logits are transformers' (checked to 1e-5 in the tests). A group is
tagged ``temporal`` when it combines different frames, ``spatial`` otherwise.

**The temporal policy.** Only TimeSformer's divided space-time attention
has parameters that mix information across time and nothing else: each
layer's ``temporal_layernorm``, ``temporal_attention`` and
``temporal_dense`` are its ``temporal_params`` (the time embedding is added
per frame and mixes nothing). VideoMAE, ViViT, V-JEPA 2 and joint-attention
TimeSformer attend over space and time together, and their 2-frame tubelet
embeddings are a patching step, not the model's motion layers; they have no
time-only part, so ``temporal`` is refused with a :class:`ConfigError`
naming the policies that apply.

**Preprocessing** comes from the checkpoint's ``video_preprocessor_config.json``
or ``preprocessor_config.json`` (mean, std, rescale factor, ViViT's offset,
short-side resize) and the model config (frames, image size, which the
crop must equal: the position embeddings are fixed, so ``--frames`` and
``--size`` cannot change them). A folder without a processor config gets
transformers' defaults for the model type, with a warning. The frame
stride is not in either config; it defaults to what each paper trained
with (:data:`DEFAULT_STRIDES`) and ``--stride`` changes it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vtransfer.models.base import (
    LayerGroup,
    Preprocessing,
    State,
    VideoBackbone,
    as_pair,
    module_buffer_names,
    module_param_names,
)
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.utils.jsonable import to_jsonable
from vtransfer.weights import hub

PREFIX = "hf:"
PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")
#: The processor settings kept in the backbone's config (and so in its checkpoints).
PROCESSOR_KEYS = ("size", "crop_size", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                  "image_mean", "image_std", "offset", "image_processor_type", "video_processor_type")
#: Frame stride each family's published classifiers were trained with: VideoMAE 16x4, TimeSformer 8x32,
#: ViViT-B 16x2 (32 frames, stride 2), V-JEPA 2 16 frames every 4th.
DEFAULT_STRIDES = {"videomae": 4, "timesformer": 32, "vivit": 2, "vjepa2": 4}
INSTALL_HINT = 'pip install "vtransfer[hf]"'


def _transformers():
    """The transformers package, or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError(f"hf: backbones need the Hugging Face transformers package: {INSTALL_HINT}") from e
    return transformers


def _first(out: Any) -> torch.Tensor:
    """A layer's hidden states, whether it returns them alone or first in a tuple (transformers 4 vs 5)."""
    return out[0] if isinstance(out, tuple) else out


# -- where each model type keeps its parts ---------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One transformers model type: the modules of each layer group and how its forward runs them.

    Module paths are relative to the ``...ForVideoClassification`` model.
    """

    embeddings: str
    layers: str
    frames_key: str
    size_key: str

    def pool_modules(self, hf: nn.Module) -> list[str]:
        """The final norm and pooling modules this model has."""
        raise NotImplementedError

    def embed(self, hf: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens from ``B x T x C x H x W`` pixels (transformers' layout)."""
        return hf.get_submodule(self.embeddings)(pixels)

    def run_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """One encoder layer."""
        return _first(layer(h))

    def pool(self, hf: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Final norm and pooling: tokens to the ``B x D`` classifier input."""
        raise NotImplementedError

    def time_extent(self, config: Any) -> int:
        """Frames the patch embedding spans."""
        return 1

    def temporal_modules(self, config: Any) -> tuple[str, ...]:
        """Submodules of an encoder layer that mix across time only."""
        return ()

    def pool_mixes_frames(self, hf: nn.Module) -> bool:
        """Whether pooling combines tokens of different frames (mean or attention over all tokens)."""
        return False

    def check(self, config: Any) -> None:
        """Refuse a configuration whose classification forward vtransfer cannot reproduce."""


class VideoMAE(Family):
    """``VideoMAEForVideoClassification``: joint space-time attention over tubelets."""

    def pool_modules(self, hf):
        return [m for m in ("videomae.layernorm", "fc_norm") if _has(hf, m)]

    def embed(self, hf, pixels):
        return hf.videomae.embeddings(pixels, None)

    def pool(self, hf, h):
        if hf.videomae.layernorm is not None:
            h = hf.videomae.layernorm(h)
        return hf.fc_norm(h.mean(1)) if hf.fc_norm is not None else h[:, 0]

    def time_extent(self, config):
        return int(config.tubelet_size)

    def pool_mixes_frames(self, hf):
        return hf.fc_norm is not None


class TimeSformer(Family):
    """``TimesformerForVideoClassification``: divided (time, then space) or joint attention."""

    def pool_modules(self, hf):
        return ["timesformer.layernorm"]

    def pool(self, hf, h):
        return hf.timesformer.layernorm(h)[:, 0]

    def temporal_modules(self, config):
        if config.attention_type == "divided_space_time":
            return ("temporal_layernorm", "temporal_attention", "temporal_dense")
        return ()

    def check(self, config):
        if config.attention_type == "space_only":
            raise ConfigError("hf: TimeSformer with attention_type 'space_only' classifies every frame separately "
                              "(one row of logits per frame, not per clip); vtransfer supports divided_space_time "
                              "and joint_space_time")


class ViViT(Family):
    """``VivitForVideoClassification``: joint space-time attention over tubelets, CLS pooling."""

    def pool_modules(self, hf):
        return ["vivit.layernorm"]

    def embed(self, hf, pixels):
        return hf.vivit.embeddings(pixels, interpolate_pos_encoding=False)

    def run_layer(self, layer, h):
        return _first(layer(h, None))  # no padding: the bidirectional mask transformers builds is None

    def pool(self, hf, h):
        return hf.vivit.layernorm(h)[:, 0]

    def time_extent(self, config):
        return int(config.tubelet_size[0])


class VJEPA2(Family):
    """``VJEPA2ForVideoClassification``: RoPE joint attention, attentive pooler (the predictor is dropped)."""

    def pool_modules(self, hf):
        return ["vjepa2.encoder.layernorm", "pooler"]

    def run_layer(self, layer, h):
        return _first(layer(h, None))

    def pool(self, hf, h):
        return hf.pooler(hf.vjepa2.encoder.layernorm(h))

    def time_extent(self, config):
        return int(config.tubelet_size)

    def pool_mixes_frames(self, hf):
        return True


#: Model type (``config.model_type``) -> where its parts are.
FAMILIES: dict[str, Family] = {
    "videomae": VideoMAE("videomae.embeddings", "videomae.encoder.layer", "num_frames", "image_size"),
    "timesformer": TimeSformer("timesformer.embeddings", "timesformer.encoder.layer", "num_frames", "image_size"),
    "vivit": ViViT("vivit.embeddings", "vivit.layers", "num_frames", "image_size"),
    "vjepa2": VJEPA2("vjepa2.encoder.embeddings", "vjepa2.encoder.layer", "frames_per_clip", "crop_size"),
}


def _has(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def family_of(model_type: str, ref: str) -> Family:
    """The :class:`Family` of ``model_type``; others are a ConfigError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ConfigError(f"hf:{ref} is a {model_type!r} model; vtransfer can split these video classifiers into "
                          f"layer groups: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


# -- loading from the hub or a folder --------------------------------------------------------------


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists()


def _unreachable(ref: str, error: Exception) -> WeightsError:
    """The error for a reference that is neither a folder nor a loadable hub repo (offline, not cached, missing)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return WeightsError(
        f"hf:{ref}: could not load {ref!r}: it is not a local folder, not in the Hugging Face cache, and it could not "
        f"be downloaded ({reason}). Without network access, save it on a machine that has it: "
        f"AutoModelForVideoClassification.from_pretrained({ref!r}).save_pretrained(FOLDER) and "
        f"AutoVideoProcessor.from_pretrained({ref!r}).save_pretrained(FOLDER), copy FOLDER here and pass "
        "--backbone hf:FOLDER")


def _hub_kwargs() -> dict[str, Any]:
    return {"local_files_only": True} if hub.is_offline() else {}


def load_hf_config(ref: str) -> Any:
    """The transformers config of ``ref`` (a hub repo id or a ``save_pretrained`` folder)."""
    transformers = _transformers()
    if _looks_like_path(ref) and not Path(ref).expanduser().is_dir():
        raise WeightsError(f"hf:{ref}: no such folder (give a hub repo id or a folder written by save_pretrained)")
    try:
        return transformers.AutoConfig.from_pretrained(str(Path(ref).expanduser()) if _looks_like_path(ref) else ref,
                                                       **_hub_kwargs())
    except (OSError, ValueError) as e:
        raise _unreachable(ref, e) from e


def read_processor_config(ref: str) -> dict[str, Any] | None:
    """The checkpoint's video/image processor settings (:data:`PROCESSOR_KEYS`), or ``None`` if it has none."""
    transformers = _transformers()
    folder = Path(ref).expanduser()
    for name in PROCESSOR_FILES:
        if folder.is_dir():
            found = folder / name if (folder / name).is_file() else None
        else:
            found = transformers.utils.cached_file(ref, name, _raise_exceptions_for_missing_entries=False,
                                                   _raise_exceptions_for_connection_errors=False, **_hub_kwargs())
        if found:
            raw = json.loads(Path(found).read_text())
            return to_jsonable({k: raw[k] for k in PROCESSOR_KEYS if k in raw})
    return None


def default_processor_config(model_type: str) -> tuple[dict[str, Any], str]:
    """transformers' own default video processor settings for ``model_type``, and the processor's name."""
    transformers = _transformers()
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    entry = VIDEO_PROCESSOR_MAPPING_NAMES[model_type]
    name = entry if isinstance(entry, str) else next(v for v in entry.values() if v)
    raw = getattr(transformers, name)().to_dict()
    return to_jsonable({k: raw[k] for k in PROCESSOR_KEYS if k in raw}), name


# -- processor settings -> Preprocessing -----------------------------------------------------------


def _size_pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict) and "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    return None


def _short_side(size: Any) -> int | None:
    """Short side of a processor's resize: ``shortest_edge``, or the smaller of a fixed ``height x width``."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    pair = _size_pair(size)
    return min(pair) if pair else None


def _triple(v: Any) -> tuple[float, float, float]:
    vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
    return (vals[0], vals[1], vals[2])


def preprocessing_from(processor: dict[str, Any], model_type: str, frames: int, crop: tuple[int, int], stride: int) -> Preprocessing:
    """vtransfer's :class:`Preprocessing` equal to the processor's rescale + normalise, for the model's geometry.

    transformers computes ``((x255 * rescale_factor) - offset - mean) / std``
    (ViViT's offset is 1; it is 0 elsewhere); vtransfer computes
    ``(x01 - mean') / std'`` from ``x01 = x255 / 255``, so
    ``mean' = (offset + mean) / (255 * rescale_factor)`` and
    ``std' = std / (255 * rescale_factor)``. The crop is the model's image
    size; the short-side resize keeps the processor's resize-to-crop ratio.
    """
    rescale = processor.get("do_rescale", True) is not False
    scale = 255.0 * float(processor.get("rescale_factor", 1 / 255)) if rescale else 255.0
    offset = 1.0 if rescale and model_type == "vivit" and processor.get("offset") is not False else 0.0
    if processor.get("do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean, std = _triple(processor.get("image_mean", 0.0)), _triple(processor.get("image_std", 1.0))
    proc_crop = _size_pair(processor.get("crop_size")) or crop
    short = _short_side(processor.get("size")) if processor.get("do_resize", True) is not False else None
    short = short or max(proc_crop)
    resize = max(max(crop), int(round(short * max(crop) / max(proc_crop))))
    return Preprocessing(
        frames=int(frames), stride=int(stride), crop_size=crop, resize_short=resize,
        mean=tuple((offset + m) / scale for m in mean), std=tuple(s / scale for s in std),
    )


# -- the backbone ------------------------------------------------------------------------------------


class HFVideoBackbone(VideoBackbone):
    """A transformers ``...ForVideoClassification`` model as a vtransfer backbone (see the module docstring).

    Args:
        model: the hub repo id or folder (the part of ``hf:...`` after the prefix).
        num_classes: classifier outputs; ``None`` keeps the checkpoint's.
        hf_config: a transformers config as a dict. Given (as when a vtransfer
            checkpoint is rebuilt), the architecture is built from it with random
            weights and neither the hub nor the folder is touched; ``None`` loads
            ``model``'s config and weights.
        processor: processor settings (:data:`PROCESSOR_KEYS`); ``None`` reads them from ``model``.
        frame_stride: frame stride of the declared preprocessing (default: :data:`DEFAULT_STRIDES`).

    After loading weights, ``pretrained_info`` says where they came from
    (``kind="hf"``, ``source``, ``path``, ``pretrained_classes``, ``classes``,
    ``head_reset``); it is ``None`` for a randomly initialised model.
    """

    def __init__(self, model: str, num_classes: int | None = None, hf_config: dict[str, Any] | None = None,
                 processor: dict[str, Any] | None = None, frame_stride: int | None = None):
        super().__init__()
        transformers = _transformers()
        self.backbone_name = PREFIX + model
        self.pretrained_info: dict[str, Any] | None = None
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"{self.backbone_name}: num_classes must be >= 1, got {num_classes}")
        from_config = hf_config is not None
        if from_config:
            config = transformers.AutoConfig.for_model(**hf_config)
            if num_classes is not None:
                config.num_labels = int(num_classes)
            self.family = family_of(config.model_type, model)
            self.family.check(config)
            self.hf = transformers.AutoModelForVideoClassification.from_config(config)
        else:
            config = load_hf_config(model)
            self.family = family_of(config.model_type, model)
            self.family.check(config)
            self.hf = self._load_weights(model, config, transformers)
        if hasattr(self.hf, "vjepa2"):
            self.hf.vjepa2.predictor = None  # V-JEPA 2's pretraining predictor: unused by classification
        hf_config = to_jsonable(self.hf.config.to_dict()) if hf_config is None else hf_config
        frames = int(getattr(self.hf.config, self.family.frames_key))
        self.crop = as_pair(getattr(self.hf.config, self.family.size_key))
        if processor is None:  # from the folder / repo when loading it; a config-only build never looks there
            processor = self._processor_or_defaults(None if from_config else model, config.model_type)
        stride = int(frame_stride) if frame_stride else DEFAULT_STRIDES[config.model_type]
        self._preprocessing = preprocessing_from(processor, config.model_type, frames, self.crop, stride)
        if num_classes is not None and num_classes != self.num_classes:
            self.reset_classifier(int(num_classes))
        self.config: dict[str, Any] = {
            "model": model, "num_classes": self.num_classes, "hf_config": hf_config,
            "processor": processor, "frame_stride": stride,
        }

    def _load_weights(self, ref: str, config: Any, transformers: Any) -> nn.Module:
        """``ref``'s weights (on the meta device: the architecture only, for shape-only builds)."""
        if torch.empty(0).device.type == "meta":
            return transformers.AutoModelForVideoClassification.from_config(config)
        source = str(Path(ref).expanduser()) if _looks_like_path(ref) else ref
        try:
            hf, loading = transformers.AutoModelForVideoClassification.from_pretrained(
                source, config=config, dtype=torch.float32, output_loading_info=True, **_hub_kwargs())
        except (OSError, ValueError) as e:
            raise _unreachable(ref, e) from e
        fresh_head = any(k.startswith("classifier.") for k in loading.get("missing_keys", ()))
        labels = None if fresh_head else [str(config.id2label[i]) for i in range(config.num_labels)]
        self.pretrained_info = {"kind": "hf", "source": PREFIX + ref, "path": source,
                                "pretrained_classes": labels, "classes": labels, "head_reset": fresh_head}
        return hf.float()

    def _processor_or_defaults(self, ref: str | None, model_type: str) -> dict[str, Any]:
        """``ref``'s processor settings, else transformers' defaults for the model type (with a warning)."""
        try:
            found = read_processor_config(ref) if ref is not None else None
        except (OSError, ValueError):
            found = None
        if found is not None:
            return found
        defaults, name = default_processor_config(model_type)
        warnings.warn(
            f"{self.backbone_name}: no {' or '.join(PROCESSOR_FILES)}; using transformers' {name} defaults "
            f"(mean {defaults.get('image_mean')}, std {defaults.get('image_std')}, resize {defaults.get('size')}). "
            "If the model was trained with other values, save its processor into the folder "
            "(AutoVideoProcessor.from_pretrained(REPO).save_pretrained(FOLDER))", stacklevel=3)
        return defaults

    # -- preprocessing: fixed by the position embeddings ------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        """The declared preprocessing; frames and crop are the model config's and cannot change."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing) -> None:
        frames = self._preprocessing.frames
        if value.frames != frames or tuple(value.crop_size) != self.crop:
            raise ConfigError(
                f"{self.backbone_name} takes clips of exactly {frames} frames of {self.crop[0]}x{self.crop[1]} pixels "
                f"(its position embeddings are fixed); got {value.frames} frames of "
                f"{value.crop_size[0]}x{value.crop_size[1]}: leave --frames and --size unset")
        self._preprocessing = value

    # -- contract -----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return self.hf.classifier.out_features

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for ``num_classes`` classes (PyTorch's default Linear initialisation)."""
        if num_classes < 1:
            raise ConfigError(f"{self.backbone_name}: num_classes must be >= 1, got {num_classes}")
        old = self.hf.classifier
        self.hf.classifier = nn.Linear(old.in_features, num_classes).to(device=old.weight.device, dtype=old.weight.dtype)
        self.hf.config.num_labels = int(num_classes)
        if getattr(self, "config", None) is not None:
            self.config["num_classes"] = int(num_classes)
        if self.pretrained_info is not None:
            self.pretrained_info.update(classes=None, head_reset=True)

    def _layers(self) -> nn.ModuleList:
        return self.hf.get_submodule(self.family.layers)

    def _group_modules(self) -> list[tuple[str, list[str]]]:
        layers = self.family.layers
        return ([("embeddings", [self.family.embeddings])]
                + [(f"layer.{i}", [f"{layers}.{i}"]) for i in range(len(self._layers()))]
                + [("pool", self.family.pool_modules(self.hf)), ("head", ["classifier"])])

    def layer_groups(self) -> list[LayerGroup]:
        """``embeddings``, ``layer.0`` ... ``layer.N-1``, ``pool``, ``head``; temporal params: TimeSformer's temporal attention."""
        config = self.hf.config
        temporal_names = self.family.temporal_modules(config)
        out = []
        for name, modules in self._group_modules():
            params: list[str] = []
            buffers: list[str] = []
            temporal: list[str] = []
            for m in modules:
                module = self.hf.get_submodule(m)
                params += module_param_names(f"hf.{m}", module)
                buffers += module_buffer_names(f"hf.{m}", module)
                if name.startswith("layer."):
                    for t in temporal_names:
                        temporal += module_param_names(f"hf.{m}.{t}", module.get_submodule(t))
            if name == "head":
                tag = "head"
            elif name == "embeddings":
                tag = "temporal" if self.family.time_extent(config) > 1 else "spatial"
            elif name == "pool":
                tag = "temporal" if self.family.pool_mixes_frames(self.hf) else "spatial"
            else:
                tag = "temporal"  # every encoder layer attends across frames (jointly, or TimeSformer's time step)
            out.append(LayerGroup(name, tag, params, temporal, buffers))
        return out

    def run_group(self, index: int, state: State) -> State:
        """Group ``index``: the ``B x 3 x T x H x W`` clip into ``embeddings``, tokens between layers, ``B x D`` into ``head``."""
        assert isinstance(state, torch.Tensor)
        n_layers = len(self._layers())
        if index == 0:
            self._check_input(state)
            return self.family.embed(self.hf, state.transpose(1, 2))  # transformers takes B x T x C x H x W
        if index <= n_layers:
            return self.family.run_layer(self._layers()[index - 1], state)
        if index == n_layers + 1:
            return self.family.pool(self.hf, state)
        return self.hf.classifier(state)

    def _check_input(self, x: torch.Tensor) -> None:
        frames = self._preprocessing.frames
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[2] != frames or tuple(x.shape[3:]) != self.crop:
            raise ConfigError(f"{self.backbone_name}: input must be B x 3 x {frames} x {self.crop[0]} x {self.crop[1]}, "
                              f"got shape {tuple(x.shape)}")

    @property
    def no_temporal_reason(self) -> str:
        """Why the ``temporal`` policy does not apply (quoted in its error)."""
        return (f"its {self.hf.config.model_type} layers attend over space and time jointly; among hf: models only "
                "TimeSformer's divided attention has time-only layers")


MODEL_CLASS = HFVideoBackbone

#: The constructor keyword that receives the part of ``hf:...`` after the prefix (see the registry).
REFERENCE_KEY = "model"

#: The architecture is the checkpoint's: one preset that changes nothing.
PRESETS: dict[str, dict[str, Any]] = {"checkpoint": {}}
DEFAULT_PRESET = "checkpoint"

#: AdamW at 1e-4 for the pretrained layers and 10x that for the fresh classifier: the usual range for
#: fine-tuning pretrained video transformers at small batch sizes (not measured on vtransfer's benchmarks).
TRAINING_DEFAULTS = {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.05, "head_lr_scale": 10.0}

#: Only the stride is free: frames and crop size are fixed by the checkpoint's position embeddings.
GEOMETRY_KEYS = {"stride": "frame_stride"}
