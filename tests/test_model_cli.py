"""`vtransfer backbones`, `vtransfer inspect` and `vtransfer weights list|add`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.backbone import inspect_backbone
from vtransfer.models.registry import backbone_names, build_backbone
from vtransfer.weights.checkpoint import save_checkpoint

vtransfer.cli._register_commands()
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("home")  # conftest: an empty VTRANSFER_HOME, offline


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def test_backbones_json_lists_every_backbone_with_counts_and_sources():
    rows = {r["name"]: r for r in json.loads(invoke("backbones", "--json").stdout)}
    assert set(rows) == set(backbone_names()) and {"slowfusion", "i3d", "vivit", "effnet3d"} <= set(rows)
    i3d = rows["i3d"]
    assert i3d["default_preset"] in i3d["presets"] and "tiny" in i3d["presets"]
    assert i3d["params"] == 12_697_264 and i3d["num_classes"] == 400  # the I3D reference count
    assert i3d["input"]["size"] == [224, 224] and i3d["input"]["frames"] >= 9
    sources = {s["name"]: s for s in i3d["sources"]}
    assert set(sources) == {"i3d:kinetics400", "i3d:imagenet", "i3d:kinetics400-flow"}
    assert sources["i3d:kinetics400"]["available"] and not sources["i3d:kinetics400"]["present"]
    assert [s["available"] for s in rows["slowfusion"]["sources"]] == [False]
    with torch.device("meta"):  # every count is the real one of the default preset
        for r in rows.values():
            model = build_backbone(r["name"], r["default_preset"])
            assert r["params"] == sum(p.numel() for p in model.parameters())
            assert r["input"]["frames"] == model.preprocessing.frames


def test_backbones_table_marks_a_cached_source_present(home):
    weights = home / "weights"
    weights.mkdir(parents=True)
    (weights / "googlenet-1378be20.pth").write_bytes(b"placeholder")
    out = invoke("backbones").stdout
    assert "i3d:kinetics400" in out and "slowfusion:sports1m" in out
    rows = {r["name"]: r for r in json.loads(invoke("weights", "list", "--json").stdout)}
    assert rows["i3d:imagenet"]["present"] and not rows["i3d:kinetics400"]["present"]


def test_inspect_json_groups_and_counts():
    info = json.loads(invoke("inspect", "--backbone", "i3d", "--preset", "tiny", "--json").stdout)
    model = build_backbone("i3d", "tiny")
    assert [g["name"] for g in info["groups"]] == model.group_names()
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert sum(g["params"] for g in info["groups"]) == info["total_params"]
    assert info["groups"][-1]["tag"] == "head" and info["policy"] is None
    mixed = next(g for g in info["groups"] if g["name"] == "Mixed_3b")
    assert 0 < mixed["temporal_params"] < mixed["params"]  # 1x1x1 convs are not temporal


@pytest.mark.parametrize("backbone", ["slowfusion", "i3d", "vivit"])
def test_inspect_with_policies_counts_what_trains(backbone):
    model = build_backbone(backbone, "tiny")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    groups = model.layer_groups()
    head = sum(sizes[p] for p in groups[-1].params)

    top = json.loads(invoke("inspect", "-b", backbone, "--preset", "tiny", "--policy", "top-layer", "--json").stdout)
    assert top["policy"]["trainable_params"] == head
    assert [g["trains"] for g in top["groups"]] == ["none"] * (len(groups) - 1) + ["all"]

    top3 = inspect_backbone(backbone, "tiny", "top-3")
    assert top3["policy"]["trainable_params"] == sum(sizes[p] for g in groups[-3:] for p in g.params)
    assert top3["policy"]["first_trainable_group"] == len(groups) - 3

    temporal = inspect_backbone(backbone, "tiny", "temporal")
    expected = sum(sizes[p] for g in groups[:-1] for p in g.temporal_params) + head
    assert temporal["policy"]["trainable_params"] == expected < temporal["total_params"]

    scratch = inspect_backbone(backbone, "tiny", "scratch")
    assert scratch["policy"]["reinit"] and scratch["policy"]["fraction"] == 1.0


def test_inspect_custom_groups_and_table():
    info = json.loads(invoke("inspect", "-b", "vivit", "--preset", "tiny", "--train", "temporal.*", "--json").stdout)
    trains = {g["name"]: g["trains"] for g in info["groups"]}
    assert info["policy"]["policy"] == "custom"
    assert all(v == "all" for k, v in trains.items() if k.startswith("temporal.") or k == "head")
    assert all(v == "none" for k, v in trains.items() if k.startswith("spatial.") or k == "embed")
    out = invoke("inspect", "-b", "vivit", "--preset", "tiny", "--policy", "temporal").stdout
    assert "temporal.0" in out and "frozen" in out and "trains" in out


def test_inspect_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet'"):
        invoke("inspect", "-b", "resnet")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        invoke("inspect", "-b", "i3d", "--preset", "huge")
    with pytest.raises(ConfigError, match="unknown policy"):
        invoke("inspect", "-b", "i3d", "--preset", "tiny", "--policy", "most")


def test_weights_add_then_list(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("vivit", "tiny", num_classes=3)
    ckpt = save_checkpoint(tmp_path / "v.safetensors", model, classes=["x", "y", "z"])
    added = json.loads(invoke("weights", "add", str(ckpt), "--name", "vivit:mine", "--json").stdout)
    assert added["name"] == "vivit:mine" and added["backbone"] == "vivit" and added["num_classes"] == 3
    rows = {r["name"]: r for r in json.loads(invoke("weights", "list", "--json").stdout)}
    assert rows["vivit:mine"]["present"] and rows["vivit:mine"]["kind"] == "registered"
    assert "vivit:mine" in invoke("weights", "list", "--backbone", "vivit").stdout
    assert "registered" in invoke("weights", "add", str(ckpt), "--name", "vivit:again").stdout
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="junk.pt: is not a recognised weights file"):
        invoke("weights", "add", str(tmp_path / "junk.pt"), "--name", "junk")


def test_weights_fetch_offline_names_the_path(home):
    with pytest.raises(WeightsError, match="Offline\\? Download it elsewhere and put it at .*googlenet-1378be20.pth"):
        invoke("weights", "fetch", "i3d:imagenet")


def test_version_flag():
    from importlib.metadata import version

    assert invoke("--version").stdout.strip() == f"vtransfer {version('vtransfer')}"
