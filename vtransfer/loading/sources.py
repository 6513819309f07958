"""Every weight source by name: the ones the model families declare, and the user's own registered ones.

Each family module declares its pretrained weights in ``WEIGHT_SOURCES``
(:class:`~vtransfer.weights.source.WeightSource`: ``i3d:kinetics400`` in
:mod:`vtransfer.models.i3d`, ``effnet3d:imagenet`` in
:mod:`vtransfer.models.effnet3d`, ``r3d_18:kinetics400`` in
:mod:`vtransfer.models.tv_resnet3d`, ...) and the foreign state-dict layouts it
imports in ``FOREIGN_LAYOUTS``. :data:`BUILTIN_SOURCES` collects them on first
use, importing only the family a looked-up name belongs to (listing every
source imports them all); ``vtransfer weights list`` shows them.

The user's own files (vtransfer checkpoints from ``vtransfer pretrain`` or a
recognised foreign layout) are registered under a name with
:func:`register_source`, which records them in ``<home>/sources.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, MutableMapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vtransfer.loading.checkpoints import load_checkpoint
from vtransfer.models import registry
from vtransfer.utils.atomic import atomic_write_json
from vtransfer.utils.errors import WeightsError
from vtransfer.weights import hub
from vtransfer.weights.checkpoint import is_vtransfer_checkpoint, read_foreign_state_dict, trained_on
from vtransfer.weights.source import ForeignLayout, WeightSource

SOURCES_FILE = "sources.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]*$")


def _family_modules(backbones: list[str]) -> list[Any]:
    """The distinct model-family modules of ``backbones``, in that order (importing them)."""
    modules: dict[str, Any] = {}
    for name in backbones:
        module = registry.family_module(name)
        modules.setdefault(module.__name__, module)
    return list(modules.values())


class SourceTable(MutableMapping):
    """Built-in sources by name: the ``WEIGHT_SOURCES`` of the model families, in registry order.

    A dict to its users (``in``, ``[name]``, ``.get``, iteration, item
    assignment). Family modules are imported only when needed: looking up
    ``backbone:dataset`` imports that backbone's family; iterating (or ``len``)
    imports every family once. Sources set by assignment (tests do) come first.
    """

    def __init__(self, own: dict[str, WeightSource] | None = None):
        self._data: dict[str, WeightSource] = dict(own or {})
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

        backbone = name.partition(":")[0]
        if backbone in registry.backbone_names():
            self._collect([backbone])

    def _collect_all(self) -> None:
        if self._complete:
            return

        family = [n for n in self._collect(registry.backbone_names()) if n in self._data]
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
BUILTIN_SOURCES = SourceTable()


def foreign_layouts() -> list[ForeignLayout]:
    """The ``FOREIGN_LAYOUTS`` every model family declares, in registry order (importing the families)."""
    family = [lay for module in _family_modules(registry.backbone_names()) for lay in getattr(module, "FOREIGN_LAYOUTS", ())]
    return family


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
