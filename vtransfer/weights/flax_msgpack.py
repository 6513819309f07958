"""Flax msgpack checkpoints (``flax.serialization.to_bytes``), read with ``msgpack`` alone: no JAX, no code run.

Every array is a msgpack *extension* of type 1 whose payload is itself
msgpack of ``(shape, dtype name, C-order bytes)`` (type 3: a numpy scalar;
type 2: a complex number); arrays over 2**30 bytes are split into
``{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}``
(google/flax ``flax/serialization.py``). ``bfloat16`` is widened to float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import msgpack
import numpy as np

from vtransfer.utils.errors import WeightsError

#: msgpack extension codes of flax.serialization.
EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3
CHUNKED_KEY = "__msgpack_chunked_array__"


# -- reading the msgpack file ----------------------------------------------------------------


def _ndarray_from_payload(payload: bytes) -> np.ndarray:
    """An array from flax's ``(shape, dtype name, bytes)`` extension payload (a writable copy)."""

    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else str(dtype_name)
    if name == "bfloat16":  # no numpy dtype: the upper half of a float32
        halves = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        flat = halves.view(np.float32)
    else:
        flat = np.frombuffer(buffer, dtype=np.dtype(name)).copy()
    return flat.reshape(tuple(shape))


def _ext_hook(code: int, payload: bytes) -> Any:
    if code == EXT_NDARRAY:
        return _ndarray_from_payload(payload)
    if code == EXT_NPSCALAR:
        return _ndarray_from_payload(payload)[()]
    if code == EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    return msgpack.ExtType(code, payload)


def _unchunk(tree: Any) -> Any:
    """Join flax's chunked arrays back (in place for maps; returns the joined leaf)."""
    if not isinstance(tree, dict):
        return tree
    if tree.get(CHUNKED_KEY):
        shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    for key, value in tree.items():
        tree[key] = _unchunk(value)
    return tree


def decode_flax_msgpack(data: bytes) -> dict[str, Any]:
    """The state dict that ``flax.serialization.to_bytes`` encoded as ``data`` (arrays as numpy)."""

    tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    return _unchunk(tree)


def read_flax_msgpack(path: str | Path) -> dict[str, Any]:
    """Read a Flax msgpack checkpoint file (``flax.serialization.to_bytes``) without JAX.

    Raises:
        WeightsError: the file is missing, not msgpack, or not a map (each message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such Flax checkpoint file")
    try:
        tree = decode_flax_msgpack(path.read_bytes())
    except (msgpack.UnpackException, ValueError, TypeError) as e:
        raise WeightsError(f"{path}: not a Flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict):
        raise WeightsError(f"{path}: a Flax checkpoint holds a map; this file holds a {type(tree).__name__}")
    return tree


def find_params(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """The parameter tree inside a Scenic train state (``params``, ``optimizer/target``) or ``tree`` itself.

    Raises:
        WeightsError: naming the top-level keys when no candidate holds ``embedding`` and ``output_projection``.
    """
    candidates = [tree, tree.get("params"), (tree.get("optimizer") or {}).get("target")]
    candidates += [c.get("params") for c in list(candidates) if isinstance(c, Mapping)]
    for candidate in candidates:
        if isinstance(candidate, Mapping) and "embedding" in candidate and "output_projection" in candidate:
            return candidate
    raise WeightsError(
        "no ViViT parameters in this Flax checkpoint (looked for embedding and output_projection at the top, "
        f"under params and under optimizer/target); its top-level keys: {', '.join(map(str, tree)) or 'none'}"
    )


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}} -> {"a/b": x}`` (Flax's path spelling)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat
