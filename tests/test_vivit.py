"""Tests for the factorised-encoder ViViT, its vit-pytorch importer and torchvision ViT initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.models.base import check_groups_partition, group_param_counts
from vtransfer.models.vivit import PRESETS, ViViT
from vtransfer.weights.vit_init import init_vivit_from_torchvision_vit
from vtransfer.weights.vit_pytorch_import import (
    load_vit_pytorch_vivit,
    looks_like_vit_pytorch_vivit,
    vivit_config_from_vit_pytorch,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**overrides) -> ViViT:
    """The tiny preset (eval mode) with some kwargs overridden."""
    return ViViT(**{**PRESETS["tiny"], **overrides}).eval()


def clip(b: int = 2, t: int = 8, h: int = 64, w: int = 64) -> torch.Tensor:
    """A random normalised clip B x 3 x T x H x W."""
    return torch.randn(b, 3, t, h, w)


# -- the model -------------------------------------------------------------------


def test_tiny_forward_backward_reaches_every_parameter():
    model = tiny().train()
    logits = model(clip())
    assert logits.shape == (2, 10)
    logits.logsumexp(dim=1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_groups_partition_names_and_tags():
    model = tiny()
    check_groups_partition(model)
    groups = model.layer_groups()
    assert [g.name for g in groups] == ["embed", "spatial.0", "spatial.1", "temporal.0", "temporal.1", "head"]
    assert [g.tag for g in groups] == ["spatial", "spatial", "spatial", "temporal", "temporal", "head"]
    assert {"spatial_cls", "spatial_pos", "patch_embed.proj.weight"} <= set(groups[0].params)
    assert "spatial_norm.weight" in groups[2].params
    assert {"temporal_cls", "temporal_pos"} <= set(groups[3].params)
    assert "temporal_norm.weight" in groups[4].params
    for g in groups:
        assert g.temporal_params == (g.params if g.tag == "temporal" else [])
    counts = dict((n, c) for n, _, c in group_param_counts(model))
    assert counts["head"] == 64 * 10 + 10
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


def test_split_at_every_group_boundary_matches_forward():
    model = tiny()
    x = clip()
    with torch.no_grad():
        ref = model(x)
        n = len(model.layer_groups())
        for k in range(n + 1):
            mid = model.forward_groups(x, 0, k)
            out = model.forward_groups(mid, k, n)
            assert torch.equal(out, ref), k
        # state after the last spatial group = per-time CLS tokens B x T' x D
        assert model.forward_groups(x, 0, 3).shape == (2, 4, 64)
        feats = model.features(x)
        assert feats.shape == (2, 64)
        assert torch.allclose(model.head(feats), ref, atol=1e-6)


def test_mean_pool_and_joint_positions_variants_run():
    for overrides in ({"pool": "mean"}, {"pos_embed": "joint", "patch_embed": "ln_linear_ln", "qkv_bias": False}):
        model = tiny(**overrides)
        check_groups_partition(model)
        with torch.no_grad():
            assert model.forward_groups(clip(), 0, 3).shape == (2, 4, 64)
            assert model(clip()).shape == (2, 10)


def test_shorter_clip_uses_first_temporal_positions():
    model = tiny()
    with torch.no_grad():
        assert model(clip(t=4)).shape == (2, 10)
        assert model.forward_groups(clip(t=4), 0, 3).shape == (2, 2, 64)


@pytest.mark.parametrize("shape", [(2, 3, 7, 64, 64), (2, 3, 10, 64, 64), (2, 3, 8, 48, 64), (2, 1, 8, 64, 64)])
def test_bad_clip_shape_is_a_config_error(shape):
    with pytest.raises(ConfigError, match="vivit expects a clip"):
        tiny()(torch.randn(*shape))


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="patch_embed"):
        tiny(patch_embed="mlp")
    with pytest.raises(ConfigError, match="not divisible"):
        tiny(image_size=[64, 60])
    with pytest.raises(ConfigError, match="frame_patch_size"):
        tiny(frames=9)


def test_reset_classifier():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.config["num_classes"] == 7
    check_groups_partition(model)
    with torch.no_grad():
        assert model(clip()).shape == (2, 7)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_config_rebuilds_same_architecture_and_preprocessing():
    model = tiny()
    cfg = json.loads(json.dumps(model.config))
    twin = ViViT(**cfg)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    pre = model.preprocessing
    assert (pre.frames, pre.stride, pre.crop_size, pre.resize_short) == (8, 2, (64, 64), 64)
    assert twin.preprocessing == pre
    assert model.describe()["backbone"] == "vivit"


def test_full_size_presets_build_with_expected_param_counts():
    import torchvision

    with torch.device("meta"):
        vb = ViViT(**PRESETS["vivit-b"])
        seed = ViViT(**PRESETS["vivit-seed"])
        tv = torchvision.models.vit_b_16()
    n_b = sum(p.numel() for p in vb.parameters())
    n_seed = sum(p.numel() for p in seed.parameters())
    assert n_b == 115_062_928
    assert n_seed == 125_691_747
    # the spatial part of vivit-b is ViT-B/16 without its head, plus a second tubelet frame
    counts = dict((n, c) for n, _, c in group_param_counts(vb))
    spatial = counts["embed"] + sum(c for n, c in counts.items() if n.startswith("spatial."))
    tv_no_head = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("heads."))
    assert spatial == tv_no_head + 768 * 3 * 16 * 16
    assert vb.preprocessing.frames == 32 and vb.preprocessing.crop_size == (224, 224)
    assert seed.preprocessing.frames == 150 and seed.preprocessing.crop_size == (240, 320)
    assert len(vb.layer_groups()) == 1 + 12 + 4 + 1 and len(seed.layer_groups()) == 1 + 6 + 6 + 1


# -- vit-pytorch import ------------------------------------------------------------


def _vit_pytorch():
    return pytest.importorskip("vit_pytorch.vivit")


SMALL_VIT_PYTORCH = dict(
    image_size=(32, 48),
    image_patch_size=16,
    frames=8,
    frame_patch_size=2,
    num_classes=5,
    dim=32,
    spatial_depth=2,
    temporal_depth=2,
    heads=4,
    dim_head=12,  # inner width 48 != dim, as with the seed paper's 8 x 64 vs 1024
    mlp_dim=64,
)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_vivit_imports_with_identical_logits(pool):
    vp = _vit_pytorch()
    kwargs = {**SMALL_VIT_PYTORCH, "pool": pool}
    ref = vp.ViViT(**kwargs, variant="factorized_encoder").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # LayerNorm weights/biases become non-trivial too
    sd = ref.state_dict()
    assert looks_like_vit_pytorch_vivit(sd)
    model = ViViT(**vivit_config_from_vit_pytorch(**kwargs)).eval()
    load_vit_pytorch_vivit(sd, model)
    for t in (8, 4):  # full clip, and a shorter one that slices the position table
        x = torch.randn(2, 3, t, 32, 48)
        with torch.no_grad():
            diff = (model(x) - ref(x)).abs().max().item()
        assert diff < 1e-4, (t, diff)


def test_vit_pytorch_single_head_without_output_projection():
    vp = _vit_pytorch()
    kwargs = {**SMALL_VIT_PYTORCH, "heads": 1, "dim_head": 32}
    ref = vp.ViViT(**kwargs).eval()
    assert not any("to_out" in k for k in ref.state_dict())
    model = ViViT(**vivit_config_from_vit_pytorch(**kwargs)).eval()
    load_vit_pytorch_vivit(ref.state_dict(), model)
    x = torch.randn(1, 3, 8, 32, 48)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-4


def test_vit_pytorch_mismatches_name_keys_and_shapes():
    vp = _vit_pytorch()
    ref = vp.ViViT(**SMALL_VIT_PYTORCH)
    model = ViViT(**vivit_config_from_vit_pytorch(**SMALL_VIT_PYTORCH))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(ref.state_dict())
    sd["mlp_head.weight"] = torch.zeros(6, 32)
    del sd["temporal_transformer.norm.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as e:
        load_vit_pytorch_vivit(sd, model)
    msg = str(e.value)
    assert "mlp_head.weight: file (6, 32) vs model (5, 32)" in msg
    assert "temporal_transformer.norm.bias" in msg and "extra.weight" in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing copied
    with pytest.raises(WeightsError, match="layout"):
        load_vit_pytorch_vivit(ref.state_dict(), tiny())


def test_vit_pytorch_config_mapping():
    seed_kwargs = dict(
        image_size=(240, 320), image_patch_size=40, frames=150, frame_patch_size=10, num_classes=99,
        dim=1024, spatial_depth=6, temporal_depth=6, heads=8, mlp_dim=2048,
    )
    cfg = vivit_config_from_vit_pytorch(**seed_kwargs)
    with torch.device("meta"):
        imported, preset = ViViT(**cfg).config, ViViT(**PRESETS["vivit-seed"]).config
    preprocessing_keys = {"frame_stride", "resize_short", "mean", "std"}
    assert {k: v for k, v in imported.items() if k not in preprocessing_keys} == {
        k: v for k, v in preset.items() if k not in preprocessing_keys
    }
    with pytest.raises(ConfigError, match="variant"):
        vivit_config_from_vit_pytorch(**seed_kwargs, variant="factorized_self_attention")
    with pytest.raises(ConfigError, match="missing.*heads"):
        vivit_config_from_vit_pytorch(**{k: v for k, v in seed_kwargs.items() if k != "heads"})
    with pytest.raises(ConfigError, match="unknown.*depth"):
        vivit_config_from_vit_pytorch(**seed_kwargs, depth=3)


# -- torchvision ViT initialisation -------------------------------------------------


def _small_torchvision_vit(image_size: int = 64):
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=image_size, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return vit.eval()


def _torchvision_cls(vit, frames: torch.Tensor) -> torch.Tensor:
    """torchvision's encoder output CLS (after encoder.ln, before heads) for N x 3 x H x W."""
    x = vit._process_input(frames)
    x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return vit.encoder(x)[:, 0]


def test_spatial_cls_equals_torchvision_vit_on_centre_frames():
    vit = _small_torchvision_vit()
    model = tiny()
    temporal_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("temporal", "head"))}
    init_vivit_from_torchvision_vit(vit.state_dict(), model)
    w = model.patch_embed.proj.weight
    assert torch.equal(w[:, :, 1], vit.conv_proj.weight) and not w[:, :, 0].any()
    x = clip(b=2, t=8)
    with torch.no_grad():
        per_time = model.forward_groups(x, 0, 3)  # B x T' x D
        for i in range(4):
            ref = _torchvision_cls(vit, x[:, :, 2 * i + 1])  # centre frame of tubelet i is t//2 = 1
            assert (per_time[:, i] - ref).abs().max().item() < 1e-4, i
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in temporal_before.items())


def test_position_interpolation_matches_torchvision():
    from torchvision.models.vision_transformer import interpolate_embeddings

    vit = _small_torchvision_vit(64)
    model = tiny(image_size=[96, 96])
    init_vivit_from_torchvision_vit(vit.state_dict(), model)
    ref = interpolate_embeddings(96, 16, vit.state_dict())["encoder.pos_embedding"][0]
    assert model.spatial_pos.shape == (1 + 36, 64)
    assert torch.allclose(model.spatial_pos, ref, atol=1e-6)
    non_square = tiny(image_size=[64, 96])
    init_vivit_from_torchvision_vit(vit.state_dict(), non_square)
    assert non_square.spatial_pos.shape == (1 + 4 * 6, 64)


def test_torchvision_init_rejects_incompatible_models():
    sd = _small_torchvision_vit().state_dict()
    assert not looks_like_vit_pytorch_vivit(sd)
    with pytest.raises(WeightsError, match="layout"):
        init_vivit_from_torchvision_vit(sd, tiny(patch_embed="ln_linear_ln", pos_embed="joint", qkv_bias=False))
    with pytest.raises(WeightsError, match="2 encoder layers, model has spatial_depth 3"):
        init_vivit_from_torchvision_vit(sd, tiny(spatial_depth=3))
    with pytest.raises(WeightsError, match=r"spatial_blocks.0.fc1.weight: checkpoint \(128, 64\) vs model \(96, 64\)"):
        init_vivit_from_torchvision_vit(sd, tiny(mlp_dim=96))
    with pytest.raises(WeightsError, match="model patch 8x8"):
        init_vivit_from_torchvision_vit(sd, tiny(image_patch_size=8))
