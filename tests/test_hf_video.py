"""hf:REPO_OR_DIR: Hugging Face video classifiers as backbones, checked against transformers' own forward.

Every model is a tiny random-init config (hidden size 32, 2 layers, 2 heads,
4 frames of 32 px) written with ``save_pretrained``; nothing touches the network.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vtransfer
from vtransfer import api
from vtransfer.reporting import plots
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.backbone import load_backbone_with_info
from vtransfer.models.base import check_groups_partition
from vtransfer.models.hf_video import HFVideoBackbone
from vtransfer.models.registry import backbone_names, is_backbone_name
from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.policies.freezing import resolve_policy
from vtransfer.loading.checkpoints import model_from_checkpoint
from videos import write_video

pytestmark = pytest.mark.filterwarnings("ignore:hf.*no video_preprocessor_config.json:UserWarning")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3)
CONFIGS = {
    "videomae": lambda: transformers.VideoMAEConfig(**TINY, intermediate_size=64, num_frames=4, image_size=32,
                                                    patch_size=8, tubelet_size=2),
    "timesformer": lambda: transformers.TimesformerConfig(**TINY, intermediate_size=64, num_frames=4, image_size=32,
                                                          patch_size=8),
    "vivit": lambda: transformers.VivitConfig(**TINY, intermediate_size=64, num_frames=4, image_size=32,
                                              tubelet_size=[2, 8, 8]),
    "vjepa2": lambda: transformers.VJEPA2Config(**TINY, frames_per_clip=4, crop_size=32, patch_size=8, tubelet_size=2,
                                                num_pooler_layers=1, pred_hidden_size=32, pred_num_attention_heads=2,
                                                pred_num_hidden_layers=1),
}
HAS_VJEPA2 = hasattr(transformers, "VJEPA2ForVideoClassification")
FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(f == "vjepa2" and not HAS_VJEPA2,
                                                     reason="this transformers has no VJEPA2ForVideoClassification"))
            for f in CONFIGS]
FAST = dict(epochs=1, batch_size=4, clips_per_video=1, val_clips=1, workers=0, patience=0, device="cpu", threads=1,
            stride=2, cache="memory")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> a save_pretrained folder of a tiny random model of that family (no processor config)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, make in CONFIGS.items():
        if family == "vjepa2" and not HAS_VJEPA2:
            continue
        torch.manual_seed(0)
        transformers.AutoModelForVideoClassification.from_config(make()).save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def clips():
    torch.manual_seed(1)
    return torch.randn(2, 3, 4, 32, 32)


def _reference(folder):
    return transformers.AutoModelForVideoClassification.from_pretrained(folder).eval()


def _logits(model, x, layout_bcthw=True):
    with torch.no_grad():
        return model(x) if layout_bcthw else model(x.transpose(1, 2)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(hf_dirs, clips, family):
    with pytest.warns(UserWarning, match="no video_preprocessor_config.json or preprocessor_config.json"):
        model, info = load_backbone_with_info("hf:" + str(hf_dirs[family]), num_classes=3)
    check_groups_partition(model)
    assert model.group_names() == ["embeddings", "layer.0", "layer.1", "pool", "head"]
    want = _logits(_reference(hf_dirs[family]), clips, layout_bcthw=False)
    got = _logits(model, clips)
    assert got.shape == (2, 3)
    assert float((got - want).abs().max()) <= 1e-5
    # hf:X brings X's weights and, with the same class count, X's classifier and labels
    assert info["kind"] == "hf" and not info["head_reset"] and info["classes"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert model.preprocessing.frames == 4 and model.preprocessing.crop_size == (32, 32)
    features = model.features(clips)
    bigger, info5 = load_backbone_with_info("hf:" + str(hf_dirs[family]), num_classes=5)
    assert bigger.num_classes == 5 and info5["head_reset"] and info5["classes"] is None
    torch.testing.assert_close(bigger.features(clips), features, rtol=0, atol=1e-6)


def test_a_checkpoint_without_classifier_gets_a_fresh_head(tmp_path, clips):
    torch.manual_seed(3)
    base = transformers.VideoMAEModel(CONFIGS["videomae"]()).eval()  # a self-supervised encoder: no head
    base.save_pretrained(tmp_path / "encoder")
    model, info = load_backbone_with_info("hf:" + str(tmp_path / "encoder"), num_classes=4)
    assert info["kind"] == "hf" and info["head_reset"] and info["pretrained_classes"] is None
    assert model.num_classes == 4
    torch.testing.assert_close(model.hf.videomae.encoder.layer[1].output.dense.weight, base.encoder.layer[1].output.dense.weight)
    with torch.no_grad():
        tokens = base(clips.transpose(1, 2)).last_hidden_state
    torch.testing.assert_close(model.features(clips), model.hf.fc_norm(tokens.mean(1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_policy_resolves_or_names_the_ones_that_apply(hf_dirs, family):
    model = vtransfer.load_backbone("hf:" + str(hf_dirs[family]), num_classes=2)
    for policy in FREEZING_POLICY_NAMES:
        if policy == "temporal" and family != "timesformer":
            with pytest.raises(ConfigError, match="mix information across time.*jointly.*top-layer, top-3, all"):
                resolve_policy(model, policy)
            continue
        plan = resolve_policy(model, policy)
        assert "hf.classifier.weight" in plan.trainable
    if family == "timesformer":  # divided attention: exactly the time-attention blocks train (plus the head)
        plan = resolve_policy(model, "temporal")
        body = [n for n in plan.trainable if not n.startswith("hf.classifier.")]
        assert body and set(body) == {n for n, _ in model.named_parameters() if ".temporal_" in n}
        assert plan.first_trainable_group == 1  # the embeddings are a frozen prefix
    assert resolve_policy(model, "top-3").trainable_groups == ["layer.1", "pool", "head"]


def test_joint_attention_timesformer_has_no_temporal_part(clips):
    config = CONFIGS["timesformer"]()
    config.attention_type = "joint_space_time"
    model = HFVideoBackbone("tiny-joint", hf_config=config.to_dict(), num_classes=2)
    assert model.backbone_name == "hf:tiny-joint"
    with pytest.raises(ConfigError, match="jointly"):
        resolve_policy(model, "temporal")
    assert _logits(model, clips).shape == (2, 2)
    config.attention_type = "space_only"  # per-frame logits: not a clip classifier
    with pytest.raises(ConfigError, match="space_only"):
        HFVideoBackbone("tiny-space", hf_config=config.to_dict())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-data") / "data"
    for c in ("a", "b"):
        for i in range(4):
            write_video(root / c / f"{c}{i}.mp4", 8 + i, width=40, height=32)
    return root


@pytest.fixture
def quick_plots(monkeypatch):
    """Report plots (tested in test_report.py) would take most of this file's time: render nothing."""
    monkeypatch.setattr(plots, "_to_png", lambda fig, dpi=0: b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_each_policy_and_reload_offline(hf_dirs, videos, tmp_path, monkeypatch, quick_plots, clips, family):
    src = tmp_path / "model"
    shutil.copytree(hf_dirs[family], src)
    res = api.compare_policies(videos, backbone="hf:" + str(src), policies=FREEZING_POLICY_NAMES, out=tmp_path / "cmp", **FAST)
    applicable = [p for p in FREEZING_POLICY_NAMES if p != "temporal" or family == "timesformer"]
    assert [r.policy for r in res.rows] == applicable
    assert list(res.skipped) == ([] if family == "timesformer" else ["temporal"])
    kinds = {p: json.loads((tmp_path / "cmp" / p / "config.json").read_text())["resolved"]["weights"]["kind"]
             for p in applicable}
    assert kinds == {p: "random" if p == "scratch" else "hf" for p in applicable}

    shutil.rmtree(src)  # the checkpoints rebuild from their stored config: no folder, no network
    monkeypatch.setenv("VTRANSFER_OFFLINE", "1")
    for policy in applicable:
        path = tmp_path / "cmp" / policy / "model.safetensors"
        model, ckpt = model_from_checkpoint(path)
        assert ckpt.backbone == "hf:" + str(src) and model.num_classes == 2
        config = transformers.AutoConfig.for_model(**ckpt.config["hf_config"])
        config.num_labels = 2
        ref = transformers.AutoModelForVideoClassification.from_config(config).eval()
        missing, unexpected = ref.load_state_dict({k[len("hf."):]: v for k, v in ckpt.state_dict.items()}, strict=False)
        assert not unexpected and all(k.startswith("vjepa2.predictor.") for k in missing)
        diff = (_logits(model, clips) - _logits(ref, clips, layout_bcthw=False)).abs().max()
        assert float(diff) <= 1e-5, (policy, float(diff))
        again = vtransfer.load_backbone("hf:" + str(src), weights=str(path))  # --weights RUN/model.safetensors
        torch.testing.assert_close(_logits(again, clips), _logits(model, clips), rtol=0, atol=0)


def test_scratch_is_a_random_twin_and_frames_are_fixed(hf_dirs):
    name = "hf:" + str(hf_dirs["videomae"])
    options = dict(backbone=name, weights=None, preset=None, frames=None, stride=None, size=None)
    pretrained, info = api.build_run_model({**options, "policy": "all"}, num_classes=3)
    twin, twin_info = api.build_run_model({**options, "policy": "scratch"}, num_classes=3)
    assert info["kind"] == "hf" and twin_info["kind"] == "random"
    assert twin.config == pretrained.config and twin.preprocessing == pretrained.preprocessing
    w = "hf.videomae.encoder.layer.0.attention.attention.query.weight"
    assert not torch.equal(twin.state_dict()[w], pretrained.state_dict()[w])
    assert api.build_run_model({**options, "policy": "all", "stride": 3}, num_classes=3)[0].preprocessing.stride == 3
    with pytest.raises(ConfigError, match="exactly 4 frames of 32x32"):
        api.build_run_model({**options, "policy": "all", "frames": 8}, num_classes=3)


def _uint8_clip():
    torch.manual_seed(2)
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)


@pytest.mark.parametrize("family, processor", [
    ("vivit", lambda: transformers.VivitVideoProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})),
    ("videomae", lambda: transformers.VideoMAEImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25],
                                                            size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
])
def test_preprocessing_matches_the_checkpoints_processor(hf_dirs, tmp_path, family, processor):
    folder = tmp_path / family
    shutil.copytree(hf_dirs[family], folder)
    proc = processor()
    proc.save_pretrained(folder)
    pre = vtransfer.load_backbone("hf:" + str(folder)).preprocessing
    assert pre.resize_short == proc.size["shortest_edge"] and pre.crop_size == (32, 32) and pre.frames == 4
    clip = _uint8_clip()
    want = proc([list(clip)] if family == "videomae" else [clip], do_resize=False, do_center_crop=False,
                return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    got = (clip.float() / 255 - mean) / std  # what vtransfer's pipeline computes
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


def test_clear_errors(hf_dirs, tmp_path, monkeypatch, home):
    with pytest.raises(WeightsError, match=r"nobody-xyz/no-such-video-model.*save_pretrained.*hf:FOLDER"):
        vtransfer.load_backbone("hf:nobody-xyz/no-such-video-model")
    with pytest.raises(WeightsError, match="no such folder"):
        vtransfer.load_backbone("hf:" + str(tmp_path / "missing"))
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="'vit' model.*videomae, timesformer, vivit, vjepa2"):
        vtransfer.load_backbone("hf:" + str(tmp_path / "vit"))
    with pytest.raises(ConfigError, match="REPO_OR_DIR"):
        vtransfer.load_backbone("hf:")
    assert is_backbone_name("hf:some/repo") and not is_backbone_name("hf:") and "hf:" not in backbone_names()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'pip install "vtransfer\[hf\]"'):
        vtransfer.load_backbone("hf:" + str(hf_dirs["videomae"]))
