"""ViViT model 1 (joint space-time attention) against transformers' VivitForVideoClassification.

The reference is the library the hub checkpoint ``google/vivit-b-16x2-kinetics400``
is written for, run here at random init on the same clip.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.backbone import load_backbone, load_backbone_with_info
from vtransfer.models.base import check_groups_partition
from vtransfer.models.vivit import PRESETS, ViViT
from vtransfer.weights.hf_vivit import load_hf_vivit, vivit_config_from_hf

transformers = pytest.importorskip("transformers")

TINY = PRESETS["tiny-joint"]
#: google/vivit-b-16x2-kinetics400's preprocessor_config.json on the hub's main branch (commit 8a7171a).
HUB_PROCESSOR = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_normalize": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "ViViTImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00784313725490196,
    "size": {"shortest_edge": 224},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hf_config(num_labels: int = TINY["num_classes"]):
    """A transformers VivitConfig with the tiny-joint preset's geometry."""
    return transformers.VivitConfig(
        image_size=TINY["image_size"][0], num_frames=TINY["frames"],
        tubelet_size=[TINY["frame_patch_size"], *TINY["image_patch_size"]], hidden_size=TINY["dim"],
        num_hidden_layers=TINY["depth"], num_attention_heads=TINY["heads"], intermediate_size=TINY["mlp_dim"],
        num_labels=num_labels,
    )


def hf_model(num_labels: int = TINY["num_classes"]):
    """A random VivitForVideoClassification: every parameter non-trivial (transformers zeros CLS and positions)."""
    model = transformers.VivitForVideoClassification(hf_config(num_labels)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def clip(b: int = 2, t: int = TINY["frames"]) -> torch.Tensor:
    return torch.randn(b, 3, t, *TINY["image_size"])


def hf_logits(hf, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(pixel_values=x.transpose(1, 2)).logits  # transformers takes B x T x C x H x W


def test_saved_hf_checkpoint_loads_with_transformers_logits(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")  # the hub's key spelling (vivit.encoder.layer.N.attention.attention.query...)
    model, info = load_backbone_with_info("vivit", weights=tmp_path / "hf" / "model.safetensors", preset="tiny-joint")
    assert info["layout"] == "hf-vivit" and model.num_classes == TINY["num_classes"]
    x = clip()
    with torch.no_grad():
        diff = (model(x) - hf_logits(hf, x)).abs().max().item()
    assert diff <= 1e-5, diff


def test_in_memory_state_dict_and_config_give_the_same_model():
    hf = hf_model()
    assert any(".layers.0.attention.q_proj." in k for k in hf.state_dict())  # transformers 5 spelling
    model = ViViT(**{**TINY, **vivit_config_from_hf(hf.config.to_dict())}).eval()
    assert model.config == ViViT(**TINY).config  # the config maps onto exactly the tiny-joint architecture
    load_hf_vivit(hf.state_dict(), model)
    x = clip()
    with torch.no_grad():
        ours = model(x)
        ref = hf_logits(hf, x)
        assert (ours - ref).abs().max().item() <= 1e-5
        feats = model.features(x)
        ref_feats = hf.vivit(pixel_values=x.transpose(1, 2)).last_hidden_state[:, 0]
    assert (feats - ref_feats).abs().max().item() <= 1e-5


def test_shorter_clip_and_shorter_model_use_the_first_time_steps():
    hf = hf_model()
    model = ViViT(**TINY).eval()
    load_hf_vivit(hf.state_dict(), model)
    short = ViViT(**{**TINY, "frames": 4}).eval()
    load_hf_vivit(hf.state_dict(), short)  # the 8-frame table is cut to its first 2 time steps
    x = clip(t=4)
    with torch.no_grad():
        assert torch.equal(short.pos_embed, model.pos_embed[: 1 + 2 * 16])
        torch.testing.assert_close(short(x), model(x), rtol=0, atol=1e-6)


def test_mismatched_state_dicts_are_refused_by_name():
    hf = hf_model()
    model = ViViT(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(hf.state_dict())
    del sd["vivit.layers.1.attention.k_proj.weight"]
    with pytest.raises(WeightsError, match=r"layer 1 weight: has q/v of q/k/v"):
        load_hf_vivit(sd, model)
    wide = ViViT(**{**TINY, "mlp_dim": 96})
    with pytest.raises(WeightsError, match=r"blocks\.0\.fc1\.weight: file \(128, 64\) vs model \(96, 64\)"):
        load_hf_vivit(hf.state_dict(), wide)
    with pytest.raises(WeightsError, match=r"needs .*'variant': 'joint'"):
        load_hf_vivit(hf.state_dict(), ViViT(**PRESETS["tiny"]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_groups_split_forward_and_refuse_the_temporal_policy():
    from vtransfer.policies.freezing import resolve_policy

    model = ViViT(**TINY).eval()
    check_groups_partition(model)
    groups = model.layer_groups()
    assert [g.name for g in groups] == ["embed", "block.0", "block.1", "head"]
    assert [g.tag for g in groups] == ["spatial", "temporal", "temporal", "head"]
    assert set(groups[0].params) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed"}
    assert "norm.weight" in groups[2].params and all(not g.temporal_params for g in groups)
    x = clip()
    with torch.no_grad():
        ref = model(x)
        for k in range(len(groups) + 1):
            assert torch.equal(model.forward_groups(model.forward_groups(x, 0, k), k, len(groups)), ref), k
        assert model.forward_groups(x, 0, 1).shape == (2, 1 + 4 * 16, 64)
    with pytest.raises(ConfigError, match=r"policy 'temporal'.*attends over the tokens of all frames.*use one of "
                                          r"scratch, top-layer, top-3, all"):
        resolve_policy(model, "temporal")
    assert resolve_policy(model, "top-3").trainable_groups == ["block.0", "block.1", "head"]
    assert resolve_policy(ViViT(**PRESETS["tiny"]), "temporal").trainable_groups[0] == "temporal.0"  # model 2 unchanged


def test_b16x2_joint_is_the_hub_checkpoint_geometry_and_preprocessing():
    from vtransfer.models.hf_video import preprocessing_from

    with torch.device("meta"):
        ours = ViViT(**PRESETS["b16x2-joint"])
        ref = transformers.VivitForVideoClassification(transformers.VivitConfig(num_labels=400))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in _renamed(ref.state_dict()).items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 88_954_000
    with torch.device("meta"):
        hub_config = transformers.VivitConfig(num_labels=400).to_dict()
        from_hf = ViViT(**{**PRESETS["b16x2-joint"], **vivit_config_from_hf(hub_config)})
    assert from_hf.config == ours.config  # VivitConfig's defaults are exactly the preset's architecture
    # the same derivation `hf:google/vivit-b-16x2-kinetics400` makes from the hub's processor file
    want = preprocessing_from(HUB_PROCESSOR, "vivit", frames=32, crop=(224, 224), stride=2)
    assert ours.preprocessing == want
    assert want.mean == (0.75,) * 3 and want.std == (0.25,) * 3 and want.resize_short == 224


def _renamed(hf_state):
    from vtransfer.weights.hf_vivit import hf_vivit_tensors

    tensors, unexpected, incomplete = hf_vivit_tensors(hf_state)
    assert not unexpected and not incomplete
    return tensors


def test_config_round_trip_and_bad_configs():
    model = ViViT(**TINY)
    assert ViViT(**json.loads(json.dumps(model.config))).config == model.config
    assert model.describe()["config"]["variant"] == "joint" and "spatial_depth" not in model.config
    assert ViViT(**PRESETS["tiny"]).config["variant"] == "factorised"
    with pytest.raises(ConfigError, match="give depth, not spatial_depth"):
        ViViT(**{**TINY, "spatial_depth": 2})
    with pytest.raises(ConfigError, match="pos_embed must be 'joint'"):
        ViViT(**{**TINY, "pos_embed": "factorised"})
    with pytest.raises(ConfigError, match="not depth"):
        ViViT(**{**PRESETS["tiny"], "depth": 3})
    with pytest.raises(ConfigError, match="variant must be one of factorised, joint"):
        ViViT(**{**TINY, "variant": "model3"})
    with pytest.raises(ConfigError, match="vivit expects a clip"):
        model(torch.randn(1, 3, 10, 64, 64))


def test_hub_source_checks_the_published_hash_and_names_the_file_offline(tmp_path, monkeypatch, home):
    from vtransfer.weights import hub
    from vtransfer.loading.checkpoints import load_checkpoint
    from vtransfer.weights.checkpoint import save_checkpoint
    from vtransfer.loading.sources import BUILTIN_SOURCES

    source = BUILTIN_SOURCES["vivit:kinetics400-joint"]
    assert source.url == "https://huggingface.co/google/vivit-b-16x2-kinetics400/resolve/main/pytorch_model.bin"
    with pytest.raises(WeightsError, match=r"resolve/main/pytorch_model\.bin .*put it at .*home/weights/"
                                           r"google_vivit-b-16x2-kinetics400_pytorch_model\.bin"):
        load_backbone("vivit", weights="vivit:kinetics400-joint", preset="tiny-joint")
    # a file in the cache that is not the published one is refused by its hash
    hf = hf_model(num_labels=400)
    path = source.cached_path()
    path.parent.mkdir(parents=True)
    torch.save(hf.state_dict(), path)  # a plain pickle, as the hub's .bin is
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_backbone("vivit", weights="vivit:kinetics400-joint", preset="tiny-joint")
    # the same file under its own hash goes through the source's whole path: weights_only load, mapping, classes
    monkeypatch.setitem(BUILTIN_SOURCES, source.name, dataclasses.replace(source, sha256=hub.sha256_file(path)))
    model, info = load_backbone_with_info("vivit", weights="vivit:kinetics400-joint", preset="tiny-joint")
    x = clip(b=1)
    with torch.no_grad():
        assert (model(x) - hf_logits(hf, x)).abs().max().item() <= 1e-5
    assert info["source"] == "vivit:kinetics400-joint" and info["pretrained_on"]["name"] == "Kinetics-400"
    assert len(info["classes"]) == 400 and info["classes"][0] == "abseiling"
    save_checkpoint(tmp_path / "m.safetensors", model, classes=info["classes"], source={"pretrained": info})
    assert load_checkpoint(tmp_path / "m.safetensors").source["pretrained"]["source"] == "vivit:kinetics400-joint"
