"""vtransfer's checkpoint format: safetensors tensors plus JSON metadata.

A checkpoint is a plain `safetensors <https://github.com/huggingface/safetensors>`_
file. Its header's ``__metadata__`` (a string -> string map) holds one key,
``vtransfer``, whose value is a JSON document::

    {"format": "vtransfer-checkpoint", "format_version": 1,
     "backbone": "i3d", "config": {...constructor kwargs...},
     "preprocessing": {...}, "classes": ["walking", ...], "num_classes": 6,
     "source": {"name": "i3d:kinetics400", "dataset": {"name": "Kinetics-400", ...}},
     "training": {...summary...}, "extra": {...}, "created": "...", "vtransfer_version": "..."}

and, for a model calibrated on its validation split, ``"temperature": 1.42``
(:mod:`vtransfer.evaluation.calibration`; files without it read as uncalibrated), and,
for a model a parameter-efficient policy added modules to, ``"structure":
{"kind": "lora", ...}`` (:mod:`vtransfer.policies.peft`): loading rebuilds the
family model from ``config``, then redoes that surgery before the tensors load.

Loading never unpickles anything: safetensors holds raw tensors only. Foreign
PyTorch files (``.pt``/``.pth``/``.bin``) are read by
:func:`read_foreign_state_dict` with ``torch.load(weights_only=True)``, which
refuses any pickle that would build arbitrary Python objects (and so could run
code). Files are written atomically: a temporary file in the same folder,
fsync, then ``os.replace``, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from vtransfer.data.preprocessing import Preprocessing
from vtransfer.utils.atomic import atomic_write_bytes
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.utils.jsonable import to_jsonable
from vtransfer.utils.version import package_version
from vtransfer.weights.flax_msgpack import flatten_tree, read_flax_msgpack
from vtransfer.weights.keymatch import state_dict_problems

FORMAT_NAME = "vtransfer-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "vtransfer"
CHECKPOINT_SUFFIX = ".safetensors"

_REQUIRED_FIELDS = ("format", "format_version", "backbone", "config", "preprocessing", "classes")
_PREPROCESSING_FIELDS = ("frames", "stride", "crop_size", "resize_short", "mean", "std")
_MAX_LISTED = 8


@dataclass
class Checkpoint:
    """A loaded vtransfer checkpoint (tensors plus validated metadata).

    Attributes:
        path: the file it came from.
        state_dict: parameter and buffer tensors (CPU), keyed as in ``model.state_dict()``.
        metadata: the whole JSON metadata document.
        classes: class names, in head order.
        backbone: registry name (``i3d``, ``vivit``, ``slowfusion``).
        config: constructor kwargs that rebuild the architecture.
        preprocessing: how clips must be prepared for this model.
        source: weight source / what the backbone was pretrained on (may be empty).
        training: training summary (may be empty).
        temperature: the temperature fitted on validation to scale clip probabilities
            (:func:`vtransfer.evaluation.calibration.scaled`); ``None`` for an uncalibrated model.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    classes: list[str]
    backbone: str
    config: dict[str, Any]
    preprocessing: Preprocessing
    source: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    temperature: float | None = None


# -- saving --------------------------------------------------------------------------


def _tensors_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State tensors on CPU, contiguous, each owning its memory (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu")
        storage = t.untyped_storage().data_ptr()
        shares = storage in seen_storages or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if shares or not t.is_contiguous():
            t = t.contiguous().clone()
        seen_storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def build_metadata(
    model: torch.nn.Module,
    *,
    classes: list[str],
    source: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """The metadata document :func:`save_checkpoint` writes for ``model`` (``temperature`` only when given)."""

    desc = model.describe()
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vtransfer_version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": desc["backbone"],
        "config": desc["config"],
        "preprocessing": desc["preprocessing"],
        "classes": list(classes),
        "num_classes": len(classes),
        "source": dict(source or {}),
        "training": dict(training or {}),
        "extra": dict(extra or {}),
        **({"structure": desc["structure"]} if desc.get("structure") else {}),  # policy-time modules: vtransfer.policies.peft
        **({} if temperature is None else {"temperature": float(temperature)}),
    }


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    classes: list[str],
    source: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    temperature: float | None = None,
) -> Path:
    """Save ``model`` with its metadata to ``path`` (safetensors), atomically.

    Args:
        path: destination file (``.safetensors`` recommended).
        model: the backbone; ``model.describe()`` supplies name, config and preprocessing.
        classes: class names in head order; must match the head size.
        source: weight source / pretrained-on provenance, e.g.
            ``{"name": "i3d:kinetics400", "dataset": {"name": "Kinetics-400", "num_classes": 400, "size": ...}}``.
        training: training summary (policy, epochs, metrics, ...).
        extra: anything else JSON-serialisable.
        temperature: the calibration temperature fitted on validation (``None``: uncalibrated).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: the class list does not match the model's head, the model has no registry name,
            or ``temperature`` is not a finite number > 0.
    """

    path = Path(path)
    classes = [str(c) for c in classes]
    if not model.backbone_name:
        raise ConfigError(f"{path}: cannot save a model without a backbone_name")
    if len(classes) != model.num_classes:
        raise ConfigError(
            f"{path}: {len(classes)} class names given but the model's head has {model.num_classes} outputs"
        )
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{path}: class names must be unique")
    if temperature is not None and _temperature_problem(temperature):
        raise ConfigError(f"{path}: {_temperature_problem(temperature)}")
    meta = build_metadata(model, classes=classes, source=source, training=training, extra=extra, temperature=temperature)
    try:
        meta_json = json.dumps(to_jsonable(meta))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: checkpoint metadata is not JSON-serialisable: {e}") from e
    tensors = _tensors_for_saving(model)
    return atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: meta_json}))


def _temperature_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable temperature (``None`` when it is one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < float("inf")):
        return f"temperature must be a finite number > 0, got {value!r}"
    return None


def set_checkpoint_temperature(path: str | Path, temperature: float | None) -> Path:
    """Store ``temperature`` in an existing checkpoint's metadata (``None`` removes it), atomically.

    For a run that fits the temperature after its best checkpoint was saved;
    the tensors and every other metadata field are kept as they are. The file
    must be a vtransfer checkpoint with valid metadata.

    Raises:
        WeightsError: ``path`` is not a valid vtransfer checkpoint.
        ConfigError: ``temperature`` is not a finite number > 0.
    """

    path, meta, state = read_checkpoint_file(path)
    if temperature is not None and _temperature_problem(temperature):
        raise ConfigError(f"{path}: {_temperature_problem(temperature)}")
    meta = {k: v for k, v in meta.items() if k != "temperature"}
    if temperature is not None:
        meta["temperature"] = float(temperature)
    return atomic_write_bytes(path, save(state, metadata={METADATA_KEY: json.dumps(to_jsonable(meta))}))


def trained_on(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What the checkpoint's classifier was trained on, as ``{"name", "num_classes", "size"}``.

    Understands the shapes ``source`` metadata takes: a built-in source's
    ``{"dataset": {"name", ...}}``, and a fine-tuning run's
    ``{"pretrain_source": {...}}`` / ``{"finetuned_on": {"dataset": PATH, "classes", "videos"}}``.
    ``None`` when the metadata does not say.
    """
    source = metadata.get("source") or {}
    training = metadata.get("training") or {}
    for cand in (source.get("pretrain_source"), source.get("finetuned_on"), source.get("dataset"), training.get("dataset")):
        if isinstance(cand, str) and cand:
            cand = {"name": cand}
        if not isinstance(cand, dict):
            continue
        # A run's record names the dataset under "dataset" (its "name" is the source's name);
        # a dataset description names itself under "name".
        name = cand.get("dataset") if isinstance(cand.get("dataset"), str) else cand.get("name")
        if not isinstance(name, str) or not name:
            continue
        if "/" in name or "\\" in name:  # a dataset folder path: its last part names it
            name = Path(name).name or name
        classes = cand.get("classes")
        out: dict[str, Any] = {"name": name}
        num = cand.get("num_classes") or (len(classes) if isinstance(classes, list) else None)
        if num:
            out["num_classes"] = int(num)
        size = cand.get("size") or (f"{cand['videos']} videos" if cand.get("videos") else None)
        if size:
            out["size"] = size
        return out
    return None


# -- reading headers -----------------------------------------------------------------


def _file_kind(path: Path) -> str:
    """Rough kind of a weights file from its first bytes: safetensors, zip-pickle, pickle, msgpack, unknown."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip-pickle"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"  # a map: what flax.serialization.to_bytes writes (0x80, an empty map, reads as pickle)
    return "unknown"


def safetensors_metadata(path: str | Path, strict: bool = False) -> dict[str, str] | None:
    """The string metadata of a safetensors file (``{}`` when it has none), or ``None`` if ``path`` is not one.

    Only the header is read (``safetensors.safe_open``), so this is cheap on big
    files. With ``strict``, a file that starts like safetensors but cannot be
    opened (truncated, say) raises :class:`WeightsError` with safetensors' reason.
    """

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if strict and path.is_file() and _file_kind(path) == "safetensors":
            raise checkpoint_error(path, f"corrupt safetensors data: {e}") from e
        return None


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any] | None:
    """The vtransfer metadata of ``path`` (header only), or ``None`` if it is not a vtransfer checkpoint."""
    raw = (safetensors_metadata(path) or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def is_vtransfer_checkpoint(path: str | Path) -> bool:
    """True if ``path`` is a safetensors file carrying vtransfer metadata (not yet validated)."""
    return METADATA_KEY in (safetensors_metadata(path) or {})


# -- loading and validation ----------------------------------------------------------


def checkpoint_error(path: Path, problem: str) -> WeightsError:
    return WeightsError(f"{path}: {problem}")


def _not_a_checkpoint_reason(path: Path) -> str:
    kind = _file_kind(path)
    if kind in ("zip-pickle", "pickle"):
        return (
            "is a PyTorch/pickle file, not a vtransfer checkpoint; vtransfer never unpickles checkpoints. "
            "If it is a state dict in a recognised layout, pass it as --weights to import it"
        )
    if kind == "safetensors":
        return "is a safetensors file without vtransfer metadata, not a vtransfer checkpoint"
    return "is not a vtransfer checkpoint (not a safetensors file)"


def _validate_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Check the metadata document's shape; raise WeightsError naming the problem."""
    missing = [k for k in _REQUIRED_FIELDS if k not in meta]
    if missing:
        raise checkpoint_error(path, f"checkpoint metadata lacks field(s): {', '.join(missing)}")
    if meta["format"] != FORMAT_NAME:
        raise checkpoint_error(path, f"metadata format is {meta['format']!r}, expected {FORMAT_NAME!r}")
    version = meta["format_version"]
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise checkpoint_error(
            path,
            f"checkpoint format version {version!r} is not supported by this vtransfer "
            f"(reads versions 1..{FORMAT_VERSION}); upgrade vtransfer",
        )
    if not isinstance(meta["backbone"], str):
        raise checkpoint_error(path, f"metadata 'backbone' must be a backbone name, got {meta['backbone']!r}")
    if not isinstance(meta["config"], dict):
        raise checkpoint_error(path, "metadata 'config' must be an object of constructor arguments")
    pre = meta["preprocessing"]
    if not isinstance(pre, dict) or any(k not in pre for k in _PREPROCESSING_FIELDS):
        need = ", ".join(_PREPROCESSING_FIELDS)
        raise checkpoint_error(path, f"metadata 'preprocessing' must have the fields {need}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise checkpoint_error(path, "metadata 'classes' must be a list of class names")
    if "num_classes" in meta and meta["num_classes"] != len(classes):
        raise checkpoint_error(path, f"metadata lists {len(classes)} classes but says num_classes={meta['num_classes']}")
    for key in ("source", "training", "extra", "structure"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise checkpoint_error(path, f"metadata {key!r} must be an object")
    if meta.get("temperature") is not None and _temperature_problem(meta["temperature"]):
        raise checkpoint_error(path, f"metadata {_temperature_problem(meta['temperature'])}")


def describe_state_mismatch(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], *, limit: int = _MAX_LISTED
) -> str | None:
    """A message naming missing/unexpected keys and shape mismatches, or ``None`` if they agree."""
    return "; ".join(state_dict_problems(expected, found, limit)) or None


def read_checkpoint_file(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """Path, validated metadata and raw tensors of a checkpoint (architecture not yet checked)."""

    path = Path(path)
    if not path.is_file():
        raise checkpoint_error(path, "no such checkpoint file")
    raw = (safetensors_metadata(path, strict=True) or {}).get(METADATA_KEY)
    if raw is None:
        raise checkpoint_error(path, _not_a_checkpoint_reason(path))
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise checkpoint_error(path, f"vtransfer metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise checkpoint_error(path, "vtransfer metadata must be a JSON object")
    _validate_metadata(path, meta)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise checkpoint_error(path, f"corrupt safetensors data: {e}") from e
    return path, meta, state


def checkpoint_against_model(
    path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor], model: torch.nn.Module
) -> Checkpoint:
    """Check tensors and classes against ``model`` (built from the stored config); wrap as :class:`Checkpoint`."""
    backbone = meta["backbone"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = describe_state_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise checkpoint_error(path, f"tensors do not match a {backbone} built from the stored config: {problem}")
    classes = list(meta["classes"])
    if len(classes) != model.num_classes:
        raise checkpoint_error(path, f"{len(classes)} class names but the classifier has {model.num_classes} outputs")
    try:
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise checkpoint_error(path, f"metadata 'preprocessing' is malformed: {e}") from e
    return Checkpoint(
        path=path,
        state_dict=state,
        metadata=meta,
        classes=classes,
        backbone=backbone,
        config=dict(meta["config"]),
        preprocessing=preprocessing,
        source=dict(meta.get("source") or {}),
        training=dict(meta.get("training") or {}),
        temperature=None if meta.get("temperature") is None else float(meta["temperature"]),
    )


# -- foreign files -------------------------------------------------------------------


def _unwrap_state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under a usual key (``state_dict``, ``model``)."""
    for _ in range(3):
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in ("state_dict", "model_state_dict", "model", "module", "net"):
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict) or not obj:
        raise checkpoint_error(path, "does not contain a state dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise checkpoint_error(path, f"entries that are not tensors: {', '.join(bad[:_MAX_LISTED])}")
    state = {str(k): v for k, v in obj.items()}
    # Strip the DataParallel/DDP prefix so key maps see the model's own names.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_foreign_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a foreign weights file (safetensors, a ``.pt``/``.pth``/``.bin`` pickle, a Flax msgpack) safely.

    Pickles are read only with ``torch.load(weights_only=True, map_location="cpu")``,
    which rebuilds tensors and plain containers and refuses everything else,
    so a crafted file cannot run code. A Flax msgpack checkpoint (Scenic's) is
    decoded with ``msgpack`` alone and returned flat, as numpy arrays under
    Flax's ``a/b/c`` paths (:func:`vtransfer.weights.scenic_vivit.read_flax_msgpack`).

    Raises:
        WeightsError: the file is missing, refused as unsafe, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise checkpoint_error(path, "no such weights file")
    if safetensors_metadata(path) is not None:

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise checkpoint_error(path, f"corrupt safetensors data: {e}") from e
    kind = _file_kind(path)
    if kind == "msgpack":

        return flatten_tree(read_flax_msgpack(path))
    if kind == "unknown":
        raise checkpoint_error(
            path,
            "is not a recognised weights file (expected a vtransfer .safetensors checkpoint, "
            "a safetensors state dict, a PyTorch .pt/.pth/.bin state dict or a Flax msgpack checkpoint)",
        )
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zip errors...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise checkpoint_error(
            path,
            "refused: not a plain tensor file that can be read safely (torch.load with weights_only=True "
            f"rejected it: {first_line}). vtransfer never unpickles arbitrary objects, which could run code; "
            "convert the file to a plain state dict or safetensors",
        ) from e
    return _unwrap_state_dict(path, obj)
