"""torchvision's Kinetics-400 video models as vtransfer backbones.

Every check compares with torchvision itself, run here: its builders make the
reference networks (random init), its state dicts are the files loaded, its
``Weights`` enums hold the metadata the weight sources must carry.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model_builder, get_model_weights
from typer.testing import CliRunner

import vtransfer.cli
from vtransfer.cli.app import app
from vtransfer.utils.errors import ConfigError, WeightsError
from vtransfer.loading.backbone import load_backbone_with_info
from vtransfer.models.base import check_groups_partition
from vtransfer.models import registry
from vtransfer.models.registry import build_backbone, presets
from vtransfer.policies.names import FREEZING_POLICY_NAMES
from vtransfer.policies.freezing import apply_policy, resolve_policy
from vtransfer.weights import hub
from vtransfer.loading.sources import BUILTIN_SOURCES, SourceTable, detect_layout, list_sources


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    """Two torch threads for these networks (the session runs on one, see conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


NAMES = ["r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b"]
TRANSFORMERS = {"mvit_v1_b", "mvit_v2_s", "swin3d_t", "swin3d_s", "swin3d_b"}
#: The whole network backpropagates on the small test clips, except where the smallest clip the network takes
#: is large (S3D >= 14x224x224, MViT exactly 16x224x224) or the weights are (Swin3D-S, -B: 50M, 88M, whose weight
#: gradients alone cost seconds): there the top three groups train, below them frozen as fine-tuning runs them.
BACKWARD_POLICY = {name: "top-3" for name in ("s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_s", "swin3d_b")}
#: Layer-group names (first two and last two) and count of each family.
GROUPS = {
    "r3d_18": (["stem", "layer1"], ["layer4", "head"], 6),
    "s3d": (["Conv3d_1a_7x7", "Conv3d_2b_1x1"], ["Mixed_5c", "head"], 13),
    "mvit_v1_b": (["stem", "blocks.0"], ["blocks.15", "head"], 18),
    "swin3d_t": (["stem", "stage1.0"], ["stage4.1", "head"], 14),
    "swin3d_b": (["stem", "stage1.0"], ["stage4.1", "head"], 26),
}


def invoke(*args: str):
    """Run the CLI in-process; return its JSON output."""
    vtransfer.cli._register_commands()
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


pytestmark = pytest.mark.usefixtures("home")  # conftest: an empty VTRANSFER_HOME, offline


def smallest_preset(name: str) -> str:
    return "tiny" if "tiny" in presets(name) else "kinetics"


INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_", "kaiming_normal_")


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    """(name, torchvision's network at random init, vtransfer's backbone loaded from that network's state-dict file)."""
    name = request.param
    torch.manual_seed(0)
    ref = get_model_builder(name)(weights=None).eval()
    path = tmp_path_factory.mktemp(name) / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:
        # The loaded backbone's own random init is overwritten by the file at once; skipping it saves half the
        # build time (swin3d_b: 7 s). A tensor the file failed to fill would hold garbage and fail the logit check.
        for fn in INIT_FUNCTIONS:
            mp.setattr(torch.nn.init, fn, lambda tensor, *args, **kwargs: tensor)
        model, info = load_backbone_with_info(name, weights=str(path), preset=smallest_preset(name))
    return name, ref, model, info


def test_a_torchvision_file_loads_and_gives_torchvision_logits_forward_and_backward(pair):
    name, ref, model, info = pair
    assert info["kind"] == "foreign" and info["layout"] == f"torchvision-{name}" and model.num_classes == 400
    pre = model.preprocessing
    torch.manual_seed(1)
    x = torch.randn(1, 3, pre.frames, *pre.crop_size)
    plan = resolve_policy(model, BACKWARD_POLICY.get(name, "all"))
    apply_policy(model, plan)
    first, n = plan.first_trainable_group, len(model.layer_groups())
    with torch.no_grad():
        want = ref(x)
        h = model.forward_groups(x, 0, first)
    got = model.forward_groups(h, first, n)
    assert got.shape == (1, 400) and want.abs().max().item() > 1e-2  # logits large enough for the check to bite
    assert (got - want).abs().max().item() <= 1e-5
    F.cross_entropy(got, torch.tensor([7])).backward()
    params = dict(model.named_parameters())
    trainable = set(plan.trainable)
    assert all(params[p].grad is not None and torch.isfinite(params[p].grad).all() for p in trainable)
    assert all(p.grad is None for n_, p in params.items() if n_ not in trainable)
    assert params[model.layer_groups()[first].params[0]].grad.abs().sum() > 0  # the gradient reaches the lowest trainable group
    model.zero_grad(set_to_none=True)


def test_state_dict_is_torchvisions_under_net(pair):
    name, ref, model, _ = pair
    ours = model.state_dict()
    theirs = ref.state_dict()
    assert set(ours) == {f"net.{k}" for k in theirs}
    assert all(torch.equal(ours[f"net.{k}"], v) for k, v in theirs.items())


def test_groups_partition_the_parameters_and_temporal_params_follow_the_conv_rule(pair):
    name, _, model, _ = pair
    check_groups_partition(model)
    groups = model.layer_groups()
    if name in GROUPS:
        head, tail, count = GROUPS[name]
        assert [g.name for g in groups[:2]] == head and [g.name for g in groups[-2:]] == tail and len(groups) == count
    temporal = {p for g in groups for p in g.temporal_params}
    if name in TRANSFORMERS:
        assert not temporal and all(g.tag == "temporal" for g in groups[:-1])
        return
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv3d)}
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm3d)}
    temporal_convs = {n for n, m in convs.items() if m.kernel_size[0] > 1}
    assert {f"{n}.weight" for n in temporal_convs} == {p for p in temporal if p.rpartition(".")[0] in convs}
    temporal_bns = {p.rpartition(".")[0] for p in temporal if p.rpartition(".")[0] in bns}
    assert len(temporal_bns) == len(temporal_convs)  # one BatchNorm after each
    assert temporal <= {f"{n}.weight" for n in temporal_convs} | {f"{b}.{w}" for b in temporal_bns for w in ("weight", "bias")}
    tags = {g.name: g.tag for g in groups}
    if name == "mc3_18":  # 3D convs only in the stem and layer1
        assert [g for g, t in tags.items() if t == "temporal"] == ["stem", "layer1"]
    if name == "r2plus1d_18":  # only the factorised 3x1x1 halves
        assert {convs[c].kernel_size for c in temporal_convs} == {(3, 1, 1)}
    if name == "r3d_18":  # everything but the 1x1x1 shortcuts and the classifier
        assert temporal_convs == {n for n, m in convs.items() if m.kernel_size != (1, 1, 1)}


def test_every_policy_resolves_and_temporal_is_refused_with_a_reason_on_transformers(pair):
    name, _, model, _ = pair
    groups = model.layer_groups()
    every = [p for g in groups for p in g.params]
    for policy in FREEZING_POLICY_NAMES:
        if policy == "temporal" and name in TRANSFORMERS:
            with pytest.raises(ConfigError) as err:
                resolve_policy(model, policy)
            msg = str(err.value)
            assert "space and time jointly" in msg and name in msg
            assert all(p in msg for p in ("top-layer", "top-3", "all", "scratch"))
            continue
        plan = resolve_policy(model, policy)
        if policy in ("all", "scratch"):
            assert sorted(plan.trainable) == sorted(every) and plan.reinit == (policy == "scratch")
        elif policy == "top-layer":
            assert plan.trainable_groups == ["head"]
        elif policy == "top-3":
            assert plan.trainable_groups == [g.name for g in groups[-3:]]
        else:
            assert set(plan.trainable) == {p for g in groups for p in g.temporal_params} | set(groups[-1].params)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_keeps_the_head_the_last_group(name):
    with torch.device("meta"):
        model = build_backbone(name, smallest_preset(name), num_classes=7)
        assert model.num_classes == 7
        model.reset_classifier(3)
    assert model.num_classes == 3 and model.config["num_classes"] == 3
    head = model.layer_groups()[-1]
    assert head.tag == "head" and all(dict(model.named_parameters())[p].shape[0] == 3 for p in head.params)


def test_mvit_takes_only_its_fixed_geometry_and_s3d_its_minimum():
    with pytest.raises(ConfigError, match="exactly 16 frames of 224x224"):
        build_backbone("mvit_v2_s", frames=8)
    with pytest.raises(ConfigError, match="exactly 16 frames of 224x224"):
        build_backbone("mvit_v1_b", crop_size=112)
    with pytest.raises(ConfigError, match="at least 14 frames of 224x224"):
        build_backbone("s3d", crop_size=112)
    assert set(presets("mvit_v1_b")) == {"kinetics"}
    with torch.device("meta"):
        mvit = build_backbone("mvit_v1_b")
        with pytest.raises(ConfigError, match="exactly 16 frames"):
            mvit(torch.empty(1, 3, 8, 224, 224))


def test_presets_and_preprocessing_come_from_the_weights_enum():
    for name in NAMES:
        weights = get_model_weights(name).KINETICS400_V1
        t = weights.transforms()
        with torch.device("meta"):
            model = build_backbone(name)
        pre = model.preprocessing
        assert list(pre.crop_size) == list(t.crop_size) and pre.resize_short == min(t.resize_size)
        assert pre.mean == pytest.approx(t.mean) and pre.std == pytest.approx(t.std)
        assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]
    assert presets("r3d_18")["kinetics"]["frames"] == 16 and presets("swin3d_t")["kinetics"]["frames"] == 32  # clip_len
    assert presets("mvit_v1_b")["kinetics"]["frame_stride"] == 4 and presets("r3d_18")["kinetics"]["frame_stride"] == 2


def test_weight_sources_carry_the_enums_url_hash_classes_and_accuracy():
    expected = {f"{n}:kinetics400": (n, get_model_weights(n).KINETICS400_V1) for n in NAMES}
    expected["swin3d_b:kinetics400-in22k"] = ("swin3d_b", get_model_weights("swin3d_b").KINETICS400_IMAGENET22K_V1)
    for source_name, (backbone, weights) in expected.items():
        src = BUILTIN_SOURCES[source_name]
        assert src.backbone == backbone and src.url == weights.url
        assert src.filename == weights.url.rsplit("/", 1)[-1] and src.filename.endswith(f"-{src.sha256_prefix}.pth")
        assert src.dataset["published_accuracy"] == weights.meta["_metrics"]["Kinetics-400"]
        assert src.class_names() == list(weights.meta["categories"])
        assert list(src.preprocessing["mean"]) == pytest.approx(weights.transforms().mean)
    assert BUILTIN_SOURCES["swin3d_b:kinetics400-in22k"].dataset["init"] == "ImageNet-22k"
    listed = [s["name"] for s in list_sources()]
    first_i3d = listed.index("i3d:kinetics400")  # each family's sources together, in the order it declares them
    assert listed[first_i3d:first_i3d + 2] == ["i3d:kinetics400", "i3d:imagenet"] and listed[-len(expected):] == list(expected)
    assert set(expected) <= {r["name"] for r in invoke("weights", "list", "--json")}


def test_family_sources_are_collected_only_when_asked_for(monkeypatch):
    imported = []
    real = registry.family_module
    monkeypatch.setattr(registry, "family_module", lambda name: imported.append(name) or real(name))
    table = SourceTable(dict(list(BUILTIN_SOURCES.items())[:2]))
    assert "i3d:kinetics400" in table and "x.pth" not in table and "hf:some/repo" not in table
    assert imported == []  # names this module defines, and names of no backbone, import nothing
    assert table["swin3d_t:kinetics400"].url == get_model_weights("swin3d_t").KINETICS400_V1.url
    assert imported == ["swin3d_t"]  # one family, not all
    names = list(table)
    assert set(imported) == set(registry.backbone_names())
    # listed in registry order whatever was looked up first
    assert names[:2] == list(BUILTIN_SOURCES)[:2] and names.index("r3d_18:kinetics400") < names.index("swin3d_t:kinetics400")


def test_offline_fetch_names_the_url_and_where_to_put_the_file(home):
    src = BUILTIN_SOURCES["r3d_18:kinetics400"]
    dest = home.resolve() / "weights" / "r3d_18-b3b3357e.pth"
    for attempt in (src.fetch, lambda: load_backbone_with_info("r3d_18", weights="r3d_18:kinetics400")):
        with pytest.raises(WeightsError) as err:
            attempt()
        assert str(err.value).startswith(f"could not download {src.url} (")
        assert f"put it at {dest}" in str(err.value)


def test_a_file_placed_in_the_cache_is_hash_checked_then_loaded(home, monkeypatch):
    torch.manual_seed(2)
    ref = get_model_builder("mc3_18")(weights=None).eval()
    src = BUILTIN_SOURCES["mc3_18:kinetics400"]
    dest = src.cached_path()
    dest.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), dest)
    with pytest.raises(WeightsError, match="sha256 mismatch: expected a90a0ba3"):  # not the published file
        src.fetch()
    monkeypatch.setitem(BUILTIN_SOURCES, src.name, dataclasses.replace(src, sha256_prefix=hub.sha256_file(dest)[:8]))
    model, info = load_backbone_with_info("mc3_18", weights="mc3_18:kinetics400", preset="tiny")
    assert info["source"] == "mc3_18:kinetics400" and info["path"] == str(dest)
    assert info["pretrained_classes"] == list(get_model_weights("mc3_18").KINETICS400_V1.meta["categories"])
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-5
    fresh, info = load_backbone_with_info("mc3_18", weights=str(dest), preset="tiny", num_classes=5)
    assert info["head_reset"] and fresh.num_classes == 5
    assert torch.equal(fresh.net.layer4[1].conv2[0].weight, ref.layer4[1].conv2[0].weight)


def test_detect_layout_tells_the_nine_networks_apart():
    with torch.device("meta"):
        for name in NAMES:
            state = get_model_builder(name)(weights=None, num_classes=10).state_dict()
            assert detect_layout(state).name == f"torchvision-{name}"
            assert detect_layout({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}).name == f"torchvision-{name}"
            del state[next(iter(state))]
            assert detect_layout(state) is None


def test_backbones_command_lists_them_with_params_geometry_and_sources():
    rows = {r["name"]: r for r in invoke("backbones", "--json")}
    for name in NAMES:
        weights = get_model_weights(name).KINETICS400_V1
        assert rows[name]["params"] == weights.meta["num_params"]
        assert rows[name]["input"]["size"] == list(weights.transforms().crop_size)
        assert f"{name}:kinetics400" in [s["name"] for s in rows[name]["sources"]]
    assert rows["s3d"]["input"] == {"frames": 128, "stride": 2, "size": [224, 224]}
    assert rows["mvit_v2_s"]["input"] == {"frames": 16, "stride": 4, "size": [224, 224]}
