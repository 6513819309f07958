"""Scenic's Flax ViViT checkpoints (msgpack, read without JAX) -> vtransfer's factorised encoder.

This is the ``vivit:kinetics400`` source's reader and converter.

**The file.** Scenic saves its train state with ``flax.training.checkpoints``,
i.e. ``flax.serialization.to_bytes(train_state)``: a msgpack map of the state
dict in which every array is a msgpack *extension* of type 1 whose payload is
itself msgpack of ``(shape, dtype name, C-order bytes)`` (type 3: a numpy
scalar, same payload; type 2: a complex number), and arrays over 2**30 bytes
are split into ``{"__msgpack_chunked_array__": True, "shape": {...},
"chunks": {...}}`` (google/flax ``flax/serialization.py``: ``_ndarray_to_bytes``,
``_msgpack_ext_pack``, ``_chunk``). :func:`read_flax_msgpack` decodes that with
``msgpack`` alone (``bfloat16`` widened to float32). Decoding builds numbers,
strings and arrays only: it runs no code from the file. The parameters are
``train_state["params"]``, or ``train_state["optimizer"]["target"]`` in
checkpoints from Scenic's flax.optim days (google-research/scenic
``scenic/projects/baselines/vit.py``, ``load_augreg_params``).

**The parameters** of ``SpaceTimeViViT`` (Scenic's factorised encoder;
google-research/scenic ``scenic/projects/vivit/model.py``: ``temporal_encode``
/ ``embed_3d_patch``, ``SpaceTimeViViT``, ``Encoder``, ``EncoderBlock``;
``scenic/model_lib/layers/attention_layers.py``: ``MlpBlock``;
``scenic/projects/baselines/vit.py``: ``AddPositionEmbs``) with
``classifier='token'`` and ``representation_size=None``, as in
``scenic/projects/vivit/configs/kinetics400/vivit_base_factorised_encoder.py``
(hidden 768, 12 spatial + 4 temporal layers, 12 heads, MLP 3072, patches
16x16x2, 32 frames)::

    embedding/kernel            (t, ph, pw, 3, D)   nn.Conv over N x T x H x W x C
    embedding/bias              (D,)
    cls_SpatialTransformer      (1, 1, D)
    SpatialTransformer/posembed_input/pos_embedding   (1, 1 + N, D)   CLS row first, shared over time
    SpatialTransformer/encoderblock_i/LayerNorm_0/{scale, bias}         (D,)
        .../MultiHeadDotProductAttention_0/{query,key,value}/kernel     (D, heads, head_dim)
        .../MultiHeadDotProductAttention_0/{query,key,value}/bias       (heads, head_dim)
        .../MultiHeadDotProductAttention_0/out/kernel                   (heads, head_dim, D)
        .../MultiHeadDotProductAttention_0/out/bias                     (D,)
        .../LayerNorm_1/{scale, bias}                                   (D,)
        .../MlpBlock_0/Dense_0/{kernel (D, mlp), bias (mlp,)}, Dense_1/{kernel (mlp, D), bias (D,)}
    SpatialTransformer/encoder_norm/{scale, bias}
    cls_TemporalTransformer     (1, 1, D)
    TemporalTransformer/...     the same, with posembed_input/pos_embedding (1, 1 + T', D)
    output_projection/{kernel (D, classes), bias (classes,)}

That is vtransfer's ``ViViT`` in the torchvision layout (``patch_embed="conv"``,
``pos_embed="factorised"``, ``pool="cls"``, ``qkv_bias=True``) with Flax's
defaults: LayerNorm eps 1e-6 and the tanh GELU of ``nn.gelu`` (preset
``b16x2-fe``). The conversion: Conv kernel ``THWIO -> OIDHW``; Dense kernels
``(in, out)`` transposed; query/key/value kernels flattened to
``(D, heads * head_dim)``, transposed and stacked into ``qkv``; the ``out``
kernel flattened to ``(heads * head_dim, D)`` and transposed; LayerNorm
``scale -> weight``; position tables lose their leading 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from vtransfer.utils.errors import WeightsError
from vtransfer.weights.flax_msgpack import find_params, flatten_tree, read_flax_msgpack
from vtransfer.weights.source import WeightSource, resolve_dotted

#: The target model must be in Scenic's layout (preset b16x2-fe).
REQUIRED_LAYOUT = {"variant": "factorised", "patch_embed": "conv", "pos_embed": "factorised", "pool": "cls",
                   "qkv_bias": True, "norm_eps": 1e-6, "gelu": "tanh"}


# -- what the model expects, in Flax layout ----------------------------------------------------


@dataclass(frozen=True)
class FlaxParam:
    """One Flax parameter: its path, its shape in the file, and how it becomes a vtransfer tensor."""

    path: str
    shape: tuple[int, ...]
    target: str
    to_torch: Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _drop_batch(a: np.ndarray) -> np.ndarray:
    return a[0]


def _conv_kernel(a: np.ndarray) -> np.ndarray:
    return a.transpose(4, 3, 0, 1, 2)  # (t, h, w, in, out) -> (out, in, t, h, w)


def _heads_in(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1).T  # (D, heads, dh) -> (heads*dh, D)


def _heads_out(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1]).T  # (heads, dh, D) -> (D, heads*dh)


def _block_params(prefix: str, target: str, d: int, heads: int, dh: int, mlp: int) -> Iterator[FlaxParam]:
    for norm, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
        yield FlaxParam(f"{prefix}/{norm}/scale", (d,), f"{target}.{ours}.weight", _same)
        yield FlaxParam(f"{prefix}/{norm}/bias", (d,), f"{target}.{ours}.bias", _same)
    attn = f"{prefix}/MultiHeadDotProductAttention_0"
    for part in ("query", "key", "value"):  # stacked into qkv by scenic_fe_tensors
        yield FlaxParam(f"{attn}/{part}/kernel", (d, heads, dh), f"{target}.qkv.weight", _heads_in)
        yield FlaxParam(f"{attn}/{part}/bias", (heads, dh), f"{target}.qkv.bias", lambda a: a.reshape(-1))
    yield FlaxParam(f"{attn}/out/kernel", (heads, dh, d), f"{target}.proj.weight", _heads_out)
    yield FlaxParam(f"{attn}/out/bias", (d,), f"{target}.proj.bias", _same)
    for dense, ours, shape in (("Dense_0", "fc1", (d, mlp)), ("Dense_1", "fc2", (mlp, d))):
        yield FlaxParam(f"{prefix}/MlpBlock_0/{dense}/kernel", shape, f"{target}.{ours}.weight", _transpose)
        yield FlaxParam(f"{prefix}/MlpBlock_0/{dense}/bias", (shape[1],), f"{target}.{ours}.bias", _same)


def scenic_fe_params(config: Mapping[str, Any], file_time_tokens: int | None = None) -> list[FlaxParam]:
    """Every Flax parameter of Scenic's ``SpaceTimeViViT`` that fits a vtransfer ViViT of ``config``, in model order.

    ``file_time_tokens``: the length ``T'`` of the file's temporal position
    table when it is longer than the model's (it is then cut to the model's).
    """
    d, heads, dh, mlp = config["dim"], config["heads"], config["dim_head"], config["mlp_dim"]
    t, (ph, pw) = config["frame_patch_size"], config["image_patch_size"]
    (h, w), frames = config["image_size"], config["frames"]
    patches, time_tokens = (h // ph) * (w // pw), file_time_tokens or frames // t
    out = [
        FlaxParam("embedding/kernel", (t, ph, pw, 3, d), "patch_embed.proj.weight", _conv_kernel),
        FlaxParam("embedding/bias", (d,), "patch_embed.proj.bias", _same),
        FlaxParam("cls_SpatialTransformer", (1, 1, d), "spatial_cls", _same),
        FlaxParam("SpatialTransformer/posembed_input/pos_embedding", (1, 1 + patches, d), "spatial_pos", _drop_batch),
    ]
    for i in range(config["spatial_depth"]):
        out += _block_params(f"SpatialTransformer/encoderblock_{i}", f"spatial_blocks.{i}", d, heads, dh, mlp)
    out += [
        FlaxParam("SpatialTransformer/encoder_norm/scale", (d,), "spatial_norm.weight", _same),
        FlaxParam("SpatialTransformer/encoder_norm/bias", (d,), "spatial_norm.bias", _same),
        FlaxParam("cls_TemporalTransformer", (1, 1, d), "temporal_cls", _same),
        FlaxParam("TemporalTransformer/posembed_input/pos_embedding", (1, 1 + time_tokens, d), "temporal_pos",
                  lambda a: a[0, : 1 + frames // t]),
    ]
    for i in range(config["temporal_depth"]):
        out += _block_params(f"TemporalTransformer/encoderblock_{i}", f"temporal_blocks.{i}", d, heads, dh, mlp)
    out += [
        FlaxParam("TemporalTransformer/encoder_norm/scale", (d,), "temporal_norm.weight", _same),
        FlaxParam("TemporalTransformer/encoder_norm/bias", (d,), "temporal_norm.bias", _same),
        FlaxParam("output_projection/kernel", (d, config["num_classes"]), "head.weight", _transpose),
        FlaxParam("output_projection/bias", (config["num_classes"],), "head.bias", _same),
    ]
    return out


# -- the conversion ------------------------------------------------------------------------------


def _file_time_tokens(flat: Mapping[str, Any], model_time_tokens: int) -> int | None:
    """The file's ``T'`` when its temporal position table is longer than the model's (else ``None``)."""
    table = flat.get("TemporalTransformer/posembed_input/pos_embedding")
    shape = getattr(table, "shape", ())
    if len(shape) == 3 and shape[1] - 1 > model_time_tokens:
        return int(shape[1] - 1)
    return None


def scenic_fe_tensors(params: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """vtransfer parameter name -> tensor for a Scenic FE parameter tree, after checking every path and shape.

    Raises:
        WeightsError: the first missing or mis-shaped parameter (with both
            shapes) and how many more problems there are, or the unexpected paths.
    """
    flat = flatten_tree(params)
    expected = scenic_fe_params(model.config, _file_time_tokens(flat, model.time_tokens))
    problems: list[str] = []
    for p in expected:
        if p.path not in flat:
            problems.append(f"{p.path} is missing")
        elif tuple(np.shape(flat[p.path])) != p.shape:
            problems.append(f"{p.path} has shape {tuple(np.shape(flat[p.path]))}, this model needs {p.shape}")
    known = {p.path for p in expected}
    unexpected = sorted(path for path in flat if path not in known)
    if problems or unexpected:
        first = problems[0] if problems else f"unexpected parameter {unexpected[0]}"
        rest = len(problems) + len(unexpected) - 1
        raise WeightsError(
            "Scenic ViViT checkpoint does not fit this vivit model: first mismatch: "
            f"{first}{f' (and {rest} more)' if rest else ''}"
        )
    grouped: dict[str, list[np.ndarray]] = {}
    for p in expected:
        grouped.setdefault(p.target, []).append(p.to_torch(np.asarray(flat[p.path], dtype=np.float32)))
    # query, key, value arrive in that order for each qkv target: stacking them gives [q | k | v]
    return {target: torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=0)))
            for target, parts in grouped.items()}


def load_scenic_vivit_fe(tree: Mapping[str, Any], model: nn.Module) -> None:
    """Load a Scenic factorised-encoder ViViT (a train state or its parameter tree) into ``model``, in place.

    ``model`` must be a vtransfer ViViT in Scenic's layout (:data:`REQUIRED_LAYOUT`,
    preset ``b16x2-fe``). A file whose temporal position table is longer
    than the model's (a 32-frame checkpoint into a 16-frame model) keeps its
    first rows, the ones a shorter clip uses. Nothing is copied unless every
    parameter fits.

    Raises:
        WeightsError: wrong model layout, no parameters found, or the first mismatch (see :func:`scenic_fe_tensors`).
    """
    cfg = getattr(model, "config", {})
    wrong = {k: cfg.get(k) for k, v in REQUIRED_LAYOUT.items() if cfg.get(k) != v}
    if wrong:
        raise WeightsError(f"Scenic ViViT import: the target model has {wrong}, but Scenic's factorised encoder needs "
                           f"{REQUIRED_LAYOUT}; use preset b16x2-fe")
    tensors = scenic_fe_tensors(find_params(tree), model)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))


def load_scenic_vivit_fe_flat(flat: Mapping[str, Any], model: nn.Module) -> None:
    """:func:`load_scenic_vivit_fe` for a checkpoint read flat (``a/b/c`` paths), as ``--weights FILE`` reads it."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    load_scenic_vivit_fe(tree, model)


@dataclass(frozen=True)
class FlaxMsgpackSource(WeightSource):
    """A :class:`WeightSource` whose file is a Flax msgpack checkpoint: read with msgpack, never unpickled."""

    def load_into(self, model: Any, path: Path | None = None) -> Path:
        """Read the msgpack train state and convert it into ``model``; return the file's path."""
        path = path or self.fetch()
        if not self.converter:
            raise WeightsError(f"weight source {self.name} has no converter")
        try:
            resolve_dotted(self.converter)(read_flax_msgpack(path), model)
        except WeightsError as e:
            raise WeightsError(f"{path} (weight source {self.name}): {e}") from e
        if self.preprocessing:
            model.preprocessing = model.preprocessing.replace(**self.preprocessing)
        return path
