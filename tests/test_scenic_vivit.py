"""Scenic's Flax factorised-encoder ViViT checkpoints (msgpack) -> vtransfer's ViViT model 2.

The test writes a Scenic train state at a small size the way flax's
``serialization.to_bytes`` does (msgpack ext type 1 = msgpack of
``(shape, dtype name, bytes)``), with the parameter names and shapes of
Scenic's ``SpaceTimeViViT`` (scenic/projects/vivit/model.py), and checks the
import against a numpy float64 forward pass written here in Flax's own
conventions (kernels ``(in, out)``, attention kernels ``(D, heads, head_dim)``,
NTHWC convolution, tanh GELU, LayerNorm eps 1e-6), and one encoder block
against transformers' ``VivitLayer``, which has the same maths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtransfer.utils.errors import WeightsError
from vtransfer.models.vivit import PRESETS, ViViT
from vtransfer.weights.flax_msgpack import decode_flax_msgpack, read_flax_msgpack
from vtransfer.weights.scenic_vivit import load_scenic_vivit_fe

msgpack = pytest.importorskip("msgpack")

#: The tiny model-2 preset in Scenic's layout (Flax GELU): D=64, 2+2 blocks, 4 heads of 16, MLP 128, 16 patches, T'=4.
TINY_FE = {**PRESETS["tiny"], "gelu": "tanh"}


# -- a Scenic train state, written the way flax writes it --------------------------------------


def flax_to_bytes(tree) -> bytes:
    """``flax.serialization.to_bytes`` of a dict tree with numpy leaves (no chunking: every array is small)."""

    def payload(a: np.ndarray) -> bytes:
        return msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)

    def ext(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, payload(x))
        if isinstance(x, np.generic):
            return msgpack.ExtType(3, payload(np.asarray(x)))
        raise TypeError(f"cannot encode {type(x)}")

    return msgpack.packb(tree, default=ext, strict_types=True)


def scenic_block(rng, d: int, heads: int, mlp: int) -> dict:
    """One ``encoderblock_i`` of Scenic's Encoder (EncoderBlock: LayerNorm_0, MHDPA_0, LayerNorm_1, MlpBlock_0)."""
    dh = d // heads

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    norm = lambda: {"scale": (1 + r(d)).astype(np.float32), "bias": r(d)}  # noqa: E731
    return {
        "LayerNorm_0": norm(),
        "MultiHeadDotProductAttention_0": {
            **{part: {"kernel": r(d, heads, dh, scale=d ** -0.5), "bias": r(heads, dh)}
               for part in ("query", "key", "value")},
            "out": {"kernel": r(heads, dh, d, scale=d ** -0.5), "bias": r(d)},
        },
        "LayerNorm_1": norm(),
        "MlpBlock_0": {"Dense_0": {"kernel": r(d, mlp, scale=d ** -0.5), "bias": r(mlp)},
                       "Dense_1": {"kernel": r(mlp, d, scale=mlp ** -0.5), "bias": r(d)}},
    }


def scenic_fe_params(cfg: dict, num_classes: int, seed: int = 0, frames: int | None = None) -> dict:
    """The parameter tree of Scenic's SpaceTimeViViT (classifier='token') for vtransfer config ``cfg``."""
    rng = np.random.default_rng(seed)
    d, heads, mlp = cfg["dim"], cfg["heads"], cfg["mlp_dim"]
    t, (ph, pw), (h, w) = cfg["frame_patch_size"], cfg["image_patch_size"], cfg["image_size"]
    n, time_tokens = (h // ph) * (w // pw), (frames or cfg["frames"]) // t

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def encoder(depth: int, tokens: int) -> dict:
        tree = {f"encoderblock_{i}": scenic_block(rng, d, heads, mlp) for i in range(depth)}
        tree["posembed_input"] = {"pos_embedding": r(1, tokens, d)}
        tree["encoder_norm"] = {"scale": (1 + r(d)).astype(np.float32), "bias": r(d)}
        return tree

    return {
        "embedding": {"kernel": r(t, ph, pw, 3, d, scale=(3 * t * ph * pw) ** -0.5), "bias": r(d)},
        "cls_SpatialTransformer": r(1, 1, d),
        "SpatialTransformer": encoder(cfg["spatial_depth"], 1 + n),
        "cls_TemporalTransformer": r(1, 1, d),
        "TemporalTransformer": encoder(cfg["temporal_depth"], 1 + time_tokens),
        "output_projection": {"kernel": r(d, num_classes, scale=d ** -0.5), "bias": r(num_classes)},
    }


def train_state(params: dict, *, optimizer: bool = True) -> dict:
    """A Scenic TrainState as flax.serialization.to_state_dict gives it (old flax.optim form, or params at the top)."""
    momentum = {"embedding": {"kernel": np.zeros_like(params["embedding"]["kernel"])}}
    common = {"global_step": 3, "model_state": {}, "rng": np.array([0, 42], np.uint32), "accum_train_time": 12.5,
              "metadata": {"chrono": {"note": "written by the test"}}}
    if optimizer:
        return {**common, "optimizer": {"target": params, "state": {"step": np.int64(3), "param_states": momentum}}}
    return {**common, "params": params, "opt_state": {"momentum": momentum}}


# -- the reference: Scenic's forward pass in numpy, Flax conventions --------------------------------


def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _gelu(x):  # flax.linen.gelu = jax.nn.gelu(approximate=True)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _attention(x, p):
    q, k, v = (np.einsum("...d,dhk->...hk", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
    logits = np.einsum("...qhd,...khd->...hqk", q / np.sqrt(q.shape[-1]), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("...hqk,...khd->...qhd", weights, v)
    return np.einsum("...hk,hkd->...d", out, p["out"]["kernel"]) + p["out"]["bias"]


def ref_block(x, p):
    """Scenic's EncoderBlock (deterministic)."""
    x = x + _attention(_ln(x, p["LayerNorm_0"]), p["MultiHeadDotProductAttention_0"])
    m = p["MlpBlock_0"]
    y = _gelu(_ln(x, p["LayerNorm_1"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"])
    return x + (y @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"])


def _ref_encoder(x, p):
    x = x + p["posembed_input"]["pos_embedding"]
    for i in range(sum(k.startswith("encoderblock_") for k in p)):
        x = ref_block(x, p[f"encoderblock_{i}"])
    return _ln(x, p["encoder_norm"])


def ref_space_time_vivit(video_nthwc, params):
    """Scenic's SpaceTimeViViT logits (3d_conv tubelets, token classifier) in float64."""
    p = {k: v for k, v in params.items()}
    kernel = params["embedding"]["kernel"].astype(np.float64)
    kt, kh, kw, c, d = kernel.shape
    n, t, h, w, _ = video_nthwc.shape
    cubes = video_nthwc.reshape(n, t // kt, kt, h // kh, kh, w // kw, kw, c)
    tok = np.einsum("nTaHbWcC,abcCD->nTHWD", cubes, kernel) + params["embedding"]["bias"]
    tok = tok.reshape(n, t // kt, -1, d)
    per_time = []
    for i in range(tok.shape[1]):
        x = np.concatenate([np.broadcast_to(p["cls_SpatialTransformer"], (n, 1, d)), tok[:, i]], axis=1)
        per_time.append(_ref_encoder(x, params["SpatialTransformer"])[:, 0])
    x = np.concatenate([np.broadcast_to(p["cls_TemporalTransformer"], (n, 1, d)), np.stack(per_time, 1)], axis=1)
    x = _ref_encoder(x, params["TemporalTransformer"])[:, 0]
    return x @ params["output_projection"]["kernel"] + params["output_projection"]["bias"]


def as64(tree):
    return {k: as64(v) if isinstance(v, dict) else np.asarray(v, np.float64) for k, v in tree.items()}


# -- the tests ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("optimizer", [True, False])
def test_written_train_state_imports_with_scenic_logits(tmp_path, optimizer):
    params = scenic_fe_params(TINY_FE, num_classes=10)
    path = tmp_path / "checkpoint"
    path.write_bytes(flax_to_bytes(train_state(params, optimizer=optimizer)))
    state = read_flax_msgpack(path)
    assert state["global_step"] == 3 and state["rng"].dtype == np.uint32
    model = ViViT(**TINY_FE).eval()
    load_scenic_vivit_fe(state, model)
    clip = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        ours = model(clip).double().numpy()
    ref = ref_space_time_vivit(clip.permute(0, 2, 3, 4, 1).double().numpy(), as64(params))
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()


def test_every_tensor_lands_where_scenic_uses_it():
    params = scenic_fe_params(TINY_FE, num_classes=10)
    model = ViViT(**TINY_FE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_scenic_vivit_fe(train_state(params), model)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert all(not np.array_equal(sd[k], before[k].numpy()) for k in sd), "a parameter was left at its init"
    emb = params["embedding"]["kernel"]  # (t, h, w, in, out)
    for o, c, t, y, x in [(0, 0, 0, 0, 0), (5, 2, 1, 3, 11), (63, 1, 0, 15, 7)]:
        assert sd["patch_embed.proj.weight"][o, c, t, y, x] == emb[t, y, x, c, o]
    blk = params["TemporalTransformer"]["encoderblock_1"]
    attn, mlp, inner = blk["MultiHeadDotProductAttention_0"], blk["MlpBlock_0"], 4 * 16
    qkv_w, qkv_b = sd["temporal_blocks.1.qkv.weight"], sd["temporal_blocks.1.qkv.bias"]
    for which, part in enumerate(("query", "key", "value")):
        for d, h, j in [(0, 0, 0), (17, 2, 9), (63, 3, 15)]:
            assert qkv_w[which * inner + h * 16 + j, d] == attn[part]["kernel"][d, h, j]
            assert qkv_b[which * inner + h * 16 + j] == attn[part]["bias"][h, j]
    assert sd["temporal_blocks.1.proj.weight"][40, 2 * 16 + 5] == attn["out"]["kernel"][2, 5, 40]
    assert sd["temporal_blocks.1.fc1.weight"][100, 7] == mlp["Dense_0"]["kernel"][7, 100]
    assert sd["temporal_blocks.1.fc2.weight"][7, 100] == mlp["Dense_1"]["kernel"][100, 7]
    np.testing.assert_array_equal(sd["temporal_blocks.1.norm2.weight"], blk["LayerNorm_1"]["scale"])
    np.testing.assert_array_equal(sd["spatial_pos"], params["SpatialTransformer"]["posembed_input"]["pos_embedding"][0])
    np.testing.assert_array_equal(sd["temporal_cls"], params["cls_TemporalTransformer"])
    np.testing.assert_array_equal(sd["spatial_norm.bias"], params["SpatialTransformer"]["encoder_norm"]["bias"])
    np.testing.assert_array_equal(sd["head.weight"], params["output_projection"]["kernel"].T)


def test_an_encoder_block_equals_numpy_and_transformers_vivit_layer():
    transformers = pytest.importorskip("transformers")
    flax_block = scenic_block(np.random.default_rng(1), d=64, heads=4, mlp=128)
    params = scenic_fe_params(TINY_FE, num_classes=10)
    params["SpatialTransformer"]["encoderblock_0"] = flax_block
    model = ViViT(**TINY_FE).eval()
    load_scenic_vivit_fe(train_state(params), model)
    # transformers' VivitLayer: pre-norm, q/k/v/o projections, gelu_fast MLP, LayerNorm eps 1e-6 - Scenic's block
    layer = transformers.models.vivit.modeling_vivit.VivitLayer(
        transformers.VivitConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128)).eval()
    a, m = flax_block["MultiHeadDotProductAttention_0"], flax_block["MlpBlock_0"]
    t = torch.from_numpy
    with torch.no_grad():
        qkv = (("query", layer.attention.q_proj), ("key", layer.attention.k_proj), ("value", layer.attention.v_proj))
        for part, proj in qkv:
            proj.weight.copy_(t(a[part]["kernel"].reshape(64, 64).T))
            proj.bias.copy_(t(a[part]["bias"].reshape(64)))
        layer.attention.o_proj.weight.copy_(t(a["out"]["kernel"].reshape(64, 64).T))
        layer.attention.o_proj.bias.copy_(t(a["out"]["bias"]))
        for norm, ln in (("LayerNorm_0", layer.layernorm_before), ("LayerNorm_1", layer.layernorm_after)):
            ln.weight.copy_(t(flax_block[norm]["scale"]))
            ln.bias.copy_(t(flax_block[norm]["bias"]))
        for dense, fc in (("Dense_0", layer.mlp.fc1), ("Dense_1", layer.mlp.fc2)):
            fc.weight.copy_(t(m[dense]["kernel"].T))
            fc.bias.copy_(t(m[dense]["bias"]))
        x = torch.randn(3, 17, 64)
        ours = model.spatial_blocks[0](x)
        hf = layer(x)
    ref = ref_block(x.double().numpy(), as64(flax_block))
    assert np.abs(ours.double().numpy() - ref).max() <= 1e-5
    assert (ours - hf).abs().max().item() <= 1e-5


def test_a_missing_or_misshaped_parameter_names_the_first_mismatch():
    model = ViViT(**TINY_FE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = scenic_fe_params(TINY_FE, num_classes=10)
    del params["TemporalTransformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_1"]["bias"]
    with pytest.raises(WeightsError, match=r"first mismatch: TemporalTransformer/encoderblock_1/MlpBlock_0/Dense_1/"
                                           r"bias is missing$"):
        load_scenic_vivit_fe(train_state(params), model)
    params = scenic_fe_params(TINY_FE, num_classes=10)
    params["SpatialTransformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"] = np.zeros((64, 96), np.float32)
    params["output_projection"]["bias"] = np.zeros(7, np.float32)
    with pytest.raises(WeightsError, match=r"first mismatch: SpatialTransformer/encoderblock_1/MlpBlock_0/Dense_0/"
                                           r"kernel has shape \(64, 96\), this model needs \(64, 128\) "
                                           r"\(and 1 more\)"):
        load_scenic_vivit_fe(train_state(params), model)
    params = scenic_fe_params(TINY_FE, num_classes=10)
    params["pre_logits"] = {"kernel": np.zeros((64, 64), np.float32)}
    with pytest.raises(WeightsError, match="unexpected parameter pre_logits/kernel"):
        load_scenic_vivit_fe(train_state(params), model)
    with pytest.raises(WeightsError, match="its top-level keys: global_step, params"):
        load_scenic_vivit_fe({"global_step": 1, "params": {"Transformer": {}}}, model)
    with pytest.raises(WeightsError, match=r"'gelu': 'exact'.*use preset b16x2-fe"):
        load_scenic_vivit_fe(train_state(scenic_fe_params(TINY_FE, 10)), ViViT(**PRESETS["tiny"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_shorter_model_keeps_the_first_temporal_positions():
    params = scenic_fe_params(TINY_FE, num_classes=10)  # 8 frames: temporal table 1 + 4
    model = ViViT(**{**TINY_FE, "frames": 4}).eval()
    load_scenic_vivit_fe(train_state(params), model)
    np.testing.assert_array_equal(model.temporal_pos.detach().numpy(),
                                  params["TemporalTransformer"]["posembed_input"]["pos_embedding"][0, :3])
    clip = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():
        ours = model(clip).double().numpy()
    params["TemporalTransformer"]["posembed_input"]["pos_embedding"] = \
        params["TemporalTransformer"]["posembed_input"]["pos_embedding"][:, :3]
    assert np.abs(ours - ref_space_time_vivit(clip.permute(0, 2, 3, 4, 1).double().numpy(), as64(params))).max() <= 1e-5


def test_decoder_reads_bfloat16_chunked_arrays_and_scalars_and_refuses_other_files(tmp_path):
    values = np.array([1.5, -2.25, 3.0e-3, 1234.0], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # flax writes bfloat16 as its 2-byte words
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3},
               "chunks": {"0": np.arange(4, dtype=np.float32), "1": np.arange(4, 6, dtype=np.float32)}}
    tree = {"b": msgpack.ExtType(1, msgpack.packb(((4,), "bfloat16", bf16), use_bin_type=True)),
            "c": chunked, "s": np.float32(0.5), "nested": {"i": np.arange(3, dtype=np.int64)}}
    out = decode_flax_msgpack(flax_to_bytes(tree))
    np.testing.assert_array_equal(out["b"], (values.view(np.uint32) & 0xFFFF0000).view(np.float32))
    np.testing.assert_array_equal(out["c"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert out["s"] == 0.5 and out["nested"]["i"].tolist() == [0, 1, 2]
    bad = tmp_path / "not_msgpack"
    bad.write_bytes(b"\xc1 definitely not msgpack")
    with pytest.raises(WeightsError, match="not a Flax msgpack checkpoint"):
        read_flax_msgpack(bad)
    with pytest.raises(WeightsError, match="no such Flax checkpoint file"):
        read_flax_msgpack(tmp_path / "absent")


def test_source_names_the_file_offline_then_loads_it_from_the_cache(home):
    from vtransfer.loading.backbone import load_backbone, load_backbone_with_info
    from vtransfer.loading.sources import BUILTIN_SOURCES

    source = BUILTIN_SOURCES["vivit:kinetics400"]
    assert source.preset == "b16x2-fe" and source.url.endswith("/vivit/kinetics_400/vivit_base_16x2_fe/checkpoint")
    with pytest.raises(WeightsError, match=r"vivit_base_16x2_fe/checkpoint .*put it at .*home/weights/"
                                           r"scenic_vivit_base_16x2_fe_kinetics400\.msgpack"):
        load_backbone("vivit", weights="vivit:kinetics400", preset="tiny", gelu="tanh")
    params = scenic_fe_params(TINY_FE, num_classes=400)
    source.cached_path().parent.mkdir(parents=True)
    source.cached_path().write_bytes(flax_to_bytes(train_state(params)))
    model, info = load_backbone_with_info("vivit", weights="vivit:kinetics400", preset="tiny", gelu="tanh",
                                          num_classes=3)
    assert info["source"] == "vivit:kinetics400" and info["pretrained_on"]["published_accuracy"]["acc@1"] == 78.4
    assert len(info["pretrained_classes"]) == 400 and info["head_reset"] and model.num_classes == 3
    np.testing.assert_array_equal(model.spatial_cls.detach().numpy(), params["cls_SpatialTransformer"])
    assert source.provenance()["url"] == source.url
    with pytest.raises(WeightsError, match="sha256"):  # trust on first use: a changed file is refused
        source.cached_path().write_bytes(flax_to_bytes(train_state(scenic_fe_params(TINY_FE, 400, seed=1))))
        load_backbone("vivit", weights="vivit:kinetics400", preset="tiny", gelu="tanh")


def test_a_scenic_file_given_as_weights_path_is_recognised_and_loaded(tmp_path):
    from vtransfer.loading.backbone import load_backbone_with_info
    from vtransfer.loading.sources import summarize_weights_file

    params = scenic_fe_params(TINY_FE, num_classes=7)
    path = tmp_path / "checkpoint"  # Scenic's own file name: no extension
    path.write_bytes(flax_to_bytes(train_state(params)))
    summary = summarize_weights_file(path)
    assert summary["format"] == "scenic-vivit-fe" and summary["backbone"] == "vivit" and summary["num_classes"] == 7
    model, info = load_backbone_with_info(None, weights=path, preset="tiny", gelu="tanh")
    assert info["kind"] == "foreign" and info["layout"] == "scenic-vivit-fe" and model.num_classes == 7
    clip = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        ours = model.eval()(clip).double().numpy()
    ref = ref_space_time_vivit(clip.permute(0, 2, 3, 4, 1).double().numpy(), as64(params))
    assert np.abs(ours - ref).max() <= 1e-5
    with pytest.raises(WeightsError, match=r"checkpoint: Scenic ViViT import: the target model has .*gelu"):
        load_backbone_with_info("vivit", weights=path, preset="tiny")  # exact GELU: not Scenic's layout
